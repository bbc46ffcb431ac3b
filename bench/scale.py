"""Scale test of the per-file stages: simulate, prepare and predict on the process pool and on Dask.

Simulates the survey once, growing it through the sizes of ``--n`` in increasing order
(``stellarparams simulate --dask local:2`` into ``WORK/survey``; simulate resumes, so each
size only writes the spectra the smaller one lacks, and the largest is simulated once; each
run's time and memory are printed), links the first N spectra of it into ``WORK/nN/`` (hard
links, else symbolic ones) with the first N catalog rows as ``WORK/nN/sppParams.fits`` (FITS,
like SSPP's, which prepare reads in blocks),
and for each N runs, each as its own ``stellarparams`` command (so start-up counts and
memory is measured per run):

- ``prepare`` with the default pool (all CPUs), ``--dask local:1`` and ``--dask local:2``
  (``--engines`` picks some, e.g. ``--engines pool``; the projection needs local:1);
- ``predict`` of all N spectra (FITS files) with the same engines, with the model of
  ``--model`` or, without it, one trained for one epoch on the smallest N (speed only);
  it writes sigma and the flags (the model is calibrated).

Both read the SDSS files with ``--reader`` (default fast). ``--distinct M`` simulates only M
spectra and makes each N of them by linking file j under the name of spectrum j (its
catalog row: PLATE, MJD, FIBERID of spectrum j, the rest of spectrum j mod M): many files
cheaply, for memory and bookkeeping (the reading is the same work per file).

It prints spectra/s and the peak resident memory of the main process (the kernel's
high-water mark, VmHWM, read every 0.1 s), of the largest worker process and of all of
them together (psutil, every 0.1 s), checks that every engine gives the same dataset and
the same predictions, then projects the wall time for 20 million spectra on W workers from
the CPU seconds of the local:1 run of the largest N: the workers' (spectra per CPU second:
the per-worker rate) and the main process's (the part that does not spread over workers:
matching, splitting and writing the dataset; the network in predict). CPU seconds, not wall
time, because this machine may be shared. With two sizes or more it prints, per stage and
engine, the main process's peak-memory growth per spectrum between consecutive sizes (the
goal: <= 100 bytes), and that slope times 20 million. Results go to ``WORK/scale.json``.
The main process's peak moves by 10-20 MB from run to run (glibc's heap; docs/design.md,
"Memory"): ``--repeat`` reports medians, and ``MALLOC_MMAP_THRESHOLD_=131072`` in the
environment (passed on to every command) shows the memory without that noise.

    .venv/bin/python bench/scale.py --work runs/scale --n 100000 200000 --engines pool local:1 --repeat 2  # the goal's sizes
    .venv/bin/python bench/scale.py --work runs/scale --n 10000 20000 --engines pool local:1
    .venv/bin/python bench/scale.py --work runs/dev --n 5000 15000 --engines pool --distinct 300  # minutes
"""
import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stellarparams.files import atomic_write, write_text  # noqa: E402
from stellarparams.records import dumps  # noqa: E402

ENGINES = ("pool", "local:1", "local:2")
TARGET = 20_000_000
PROJECT_WORKERS = (1, 8, 32, 64, 128, 512)


def measured(cmd, log: Path) -> dict:
    """Run ``cmd``; its wall time, peak resident memory (MB: main process, largest worker, all together) and
    CPU seconds (the main process's own; all its descendants': pool or Dask workers and nannies)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    peak = {"main_mb": 0.0, "worker_mb": 0.0, "total_mb": 0.0}
    cpu = {}  # pid -> latest user + system seconds (main: "main")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample():
            me = psutil.Process(proc.pid)
            while not done.is_set():
                workers, main = [], 0
                try:
                    main = max(me.memory_info().rss, _high_water(proc.pid))
                    t = me.cpu_times()
                    cpu["main"] = t.user + t.system
                    for c in me.children(recursive=True):
                        with c.oneshot():
                            t = c.cpu_times()
                            workers.append(c.memory_info().rss)
                        cpu[c.pid] = t.user + t.system
                except psutil.Error:
                    pass
                peak["main_mb"] = max(peak["main_mb"], main / 2**20)
                peak["worker_mb"] = max(peak["worker_mb"], max(workers, default=0) / 2**20)
                peak["total_mb"] = max(peak["total_mb"], (main + sum(workers)) / 2**20)
                done.wait(0.1)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed with exit status {rc}; see {log}")
    main_cpu = cpu.pop("main", 0.0)
    return {"seconds": round(seconds, 2), **{k: round(v) for k, v in peak.items()},
            "main_cpu_s": round(main_cpu, 1), "worker_cpu_s": round(sum(cpu.values()), 1)}


def _high_water(pid: int) -> int:
    """The kernel's peak resident memory of process ``pid`` so far (bytes; VmHWM), 0 where there is none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def cli(*args) -> list:
    return [sys.executable, "-m", "stellarparams.cli", *map(str, args)]


def survey(work: Path, sizes: list, seed: int, distinct: int | None) -> tuple[pd.DataFrame, list]:
    """The catalog of the largest size's spectra in ``work/survey``, simulated through ``sizes`` in increasing
    order (simulate resumes: each run writes only the new spectra), and the measured simulate runs."""
    from stellarparams.surveys.sdss import read_catalog

    rows = []
    for n in ([distinct] if distinct else sizes):
        r = measured(cli("simulate", "--out", work / "survey", "--n", n, "--seed", seed, "--dask", "local:2",
                         "--no-progress"), work / "logs" / f"simulate-n{n}.log")
        rows.append({"n": n, "stage": "simulate", "engine": "local:2", **r, "spectra_per_s": round(n / r["seconds"], 1)})
        print(f"survey: {n} spectra in {work / 'survey'} (simulate --dask local:2: {r['seconds']:.0f} s; peak MB "
              f"main {r['main_mb']}, largest worker {r['worker_mb']}; only the spectra a smaller size lacked "
              "were written)", flush=True)
    cat = read_catalog(work / "survey" / "sppParams.fits")
    if distinct:
        cat = cloned(cat, sizes[-1])
    return cat, rows


def cloned(cat: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` catalog rows from the ``m`` of ``cat``: row j is row j mod m renamed as simulated spectrum j
    (its PLATE, MJD, FIBERID), with SOURCE_ROW = j mod m (whose file it links to)."""
    from stellarparams.simulate import FIBERS_PER_PLATE, MJD0, PLATE0

    j = np.arange(n)
    out = cat.iloc[j % len(cat)].reset_index(drop=True)
    plate = PLATE0 + j // FIBERS_PER_PLATE
    return out.assign(PLATE=plate, MJD=MJD0 + plate - PLATE0, FIBERID=j % FIBERS_PER_PLATE + 1, SOURCE_ROW=j % len(cat))


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: a symbolic link
        os.symlink(src.resolve(), dst)


def subset(work: Path, cat: pd.DataFrame, n: int) -> tuple:
    """The first ``n`` spectra of the survey as their own folder (links) and catalog (Parquet)."""
    from stellarparams.surveys.sdss import simulated_path as spectrum_path

    folder = work / f"n{n}"
    sub = cat.iloc[:n]
    keys = cat[["PLATE", "MJD", "FIBERID"]].to_numpy()
    src = keys[sub.SOURCE_ROW.to_numpy()] if "SOURCE_ROW" in sub else keys  # --distinct: the source row's file
    for (p, m, f), (sp, sm, sf) in zip(sub[["PLATE", "MJD", "FIBERID"]].to_numpy(), src):
        dst = spectrum_path(folder, p, m, f)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link(spectrum_path(work / "survey", sp, sm, sf), dst)
    catalog = folder / "sppParams.fits"
    if not catalog.exists():
        from astropy.table import Table

        table = Table.from_pandas(sub.drop(columns="SOURCE_ROW", errors="ignore"))
        atomic_write(catalog, lambda tmp: table.write(tmp, format="fits"))
    return catalog, folder / "spectra"


def engine_args(engine: str) -> list:
    return [] if engine == "pool" else ["--dask", engine]


def quick_model(work: Path, dataset: Path) -> Path:
    """A model of the default architecture trained for one epoch (paper recipe, calibrated on val): speed only."""
    from stellarparams.config import recipe
    from stellarparams.config import ModelConfig
    from stellarparams.train import train

    out = work / "model"
    if not (out / "model.json").exists():
        train(dataset, out, ModelConfig(), recipe("paper", epochs=1, calib_folds=0, threads=1), progress=False,
              overwrite=True)
    return out


def same_datasets(folders) -> bool:
    """Same rows, flux, labels and split, and the same rejects.csv, in every dataset folder."""
    from stellarparams.dataset import Dataset

    first = None
    for f in folders:
        with Dataset(f) as ds:
            n = len(ds)
            h = [ds.split.copy(), ds.labels(), ds.meta()["file"].to_numpy()]
            h.append(np.array([float(ds.flux(np.arange(i, min(i + 4096, n))).astype(np.float64).sum())
                               for i in range(0, n, 4096)]))
        h.append((Path(f) / "rejects.csv").read_bytes())
        if first is None:
            first = h
        elif not all(np.array_equal(a, b) if not isinstance(a, bytes) else a == b for a, b in zip(first, h)):
            return False
    return True


def same_predictions(files) -> bool:
    frames = [pd.read_parquet(f) for f in files]
    return all(frames[0].equals(f) for f in frames[1:])


def project(rows: list, sizes: list) -> dict:
    """Per stage, from the local:1 runs: the rate of one worker (spectra per CPU second of the worker
    processes), the main process's CPU seconds per spectrum (the part that does not spread over workers:
    matching, splitting and writing the dataset; the network in predict), and the hours for 20M spectra on
    W workers, t = 20M * (main per spectrum + 1 / (W * rate)): no overlap counted, one core per worker.
    With two sizes or more the costs per spectrum are the slopes between the smallest and the largest N
    (start-up, imports and the model load cancel); with one size they include them."""
    out = {}
    for stage in ("prepare", "predict"):
        run = {r["n"]: r for r in rows if r["stage"] == stage and r["engine"] == "local:1"}
        lo, hi = (run[sizes[0]], run[sizes[-1]]) if len(sizes) > 1 else ({"n": 0, "main_cpu_s": 0, "worker_cpu_s": 0},
                                                                           run[sizes[-1]])
        dn = hi["n"] - lo["n"]
        worker = max(hi["worker_cpu_s"] - lo["worker_cpu_s"], 1e-9) / dn
        main = max(hi["main_cpu_s"] - lo["main_cpu_s"], 0.0) / dn
        out[stage] = {"worker_rate": round(1 / worker, 1), "main_ms_per_spectrum": round(1000 * main, 3),
                      "hours_20M": {w: round(TARGET * (main + worker / w) / 3600, 2) for w in PROJECT_WORKERS}}
    return out


def memory_growth(rows: list) -> dict:
    """(stage, engine, n0, n1) -> the main process's peak RSS growth per spectrum between consecutive sizes."""
    out = {}
    for r in rows:
        lower = [x for x in rows if x["stage"] == r["stage"] and x["engine"] == r["engine"] and x["n"] < r["n"]]
        if lower:
            lo = max(lower, key=lambda x: x["n"])
            b = (r["main_mb"] - lo["main_mb"]) * 2**20 / (r["n"] - lo["n"])
            out[(r["stage"], r["engine"], lo["n"], r["n"])] = {"bytes_per_spectrum": round(b),
                                                              "gb_20M": round(b * TARGET / 1e9, 2)}
    return out


def show(r: dict) -> dict:
    """Print one run's line of the table; returns it."""
    print(f"{r['n']:>8} {r['stage']:8} {r['engine']:8} {r['seconds']:>8.1f} {r['spectra_per_s']:>8.0f} {r['main_mb']:>8} "
          f"{r['worker_mb']:>9} {r['total_mb']:>8} {r['main_cpu_s']:>8} {r['worker_cpu_s']:>8}", flush=True)
    return r


def run(stage: str, n: int, engine: str, cmd: list, work: Path, repeat: int = 1, before=None) -> dict:
    """A measured ``stellarparams`` command of ``stage`` on ``n`` spectra, run ``repeat`` times (``before()`` ahead of
    each), printed: the medians of the runs (the main process's peak moves by ~10 MB from run to run)."""
    runs = []
    for _ in range(repeat):
        if before is not None:
            before()
        runs.append(measured(cmd, work / "logs" / f"{stage}-n{n}-{engine.replace(':', '')}.log"))
    r = {k: round(float(np.median([x[k] for x in runs])), 2) for k in runs[0]}
    r["main_mb_runs"] = [x["main_mb"] for x in runs]
    return show({"n": n, "stage": stage, "engine": engine, **r, "spectra_per_s": round(n / r["seconds"], 1)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the survey, datasets, predictions and scale.json")
    ap.add_argument("--n", type=int, nargs="+", default=[200_000], help="survey sizes (spectra), e.g. 20000 60000")
    ap.add_argument("--model", help="model folder for predict (default: one trained for one epoch here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, help="engines to run")
    ap.add_argument("--stages", nargs="+", default=["prepare", "predict"], choices=("prepare", "predict"),
                    help="stages to run at each size (predict alone needs --model)")
    ap.add_argument("--distinct", type=int, help="simulate only this many spectra and link them under the names "
                    "of the larger sizes (memory and bookkeeping at any N, cheaply)")
    ap.add_argument("--repeat", type=int, default=1, help="run each prepare and predict command this many times and "
                    "report the medians (the main process's peak moves by ~10 MB from run to run: at 100,000 spectra "
                    "apart that is 100 bytes per spectrum)")
    ap.add_argument("--reader", default="fast", choices=("fast", "fitsio"), help="SDSS reader of prepare and predict")
    args = ap.parse_args()
    engines = args.engines
    if "prepare" not in args.stages and not args.model:
        ap.error("--stages without prepare needs --model")
    work = Path(args.work).resolve()
    sizes = sorted(set(args.n))
    print(f"{'N':>8} {'stage':8} {'engine':8} {'seconds':>8} {'spec/s':>8} {'main MB':>8} {'worker MB':>9} "
          f"{'total MB':>8} {'main cpu':>8} {'wrk cpu':>8}", flush=True)
    cat, rows = survey(work, sizes, args.seed, args.distinct)
    rows = [show(r) for r in rows]
    model = Path(args.model).resolve() if args.model else None
    cpus = os.cpu_count()
    print(f"{cpus} CPUs; load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    checks = {}
    for n in sizes:
        catalog, spectra = subset(work, cat, n)
        if "prepare" in args.stages:
            for engine in engines:
                out = work / f"n{n}" / f"dataset-{engine.replace(':', '')}"
                rows.append(run("prepare", n, engine, cli("prepare", "--catalog", catalog, "--spectra", spectra, "--out",
                                                          out, "--no-progress", "--reader", args.reader,
                                                          *engine_args(engine)), work, args.repeat,
                                lambda: subprocess.run(["rm", "-rf", str(out)], check=True)))
            datasets = [work / f"n{n}" / f"dataset-{e.replace(':', '')}" for e in engines]
            checks[f"prepare n={n} identical"] = same_datasets(datasets)
            model = model or quick_model(work, datasets[0])
        if "predict" in args.stages:
            for engine in engines:
                out = work / f"n{n}" / f"pred-{engine.replace(':', '')}.parquet"
                rows.append(run("predict", n, engine, cli("predict", model, spectra, "--out", out, "--quiet", "--reader",
                                                          args.reader, *engine_args(engine)), work, args.repeat,
                                lambda: out.unlink(missing_ok=True)))
            checks[f"predict n={n} identical"] = same_predictions(
                [work / f"n{n}" / f"pred-{e.replace(':', '')}.parquet" for e in engines])
    report(work, rows, sizes, engines, checks, cpus)


def report(work: Path, rows: list, sizes: list, engines: list, checks: dict, cpus: int) -> None:
    """Print the checks, the memory slopes and the 20-million projection; write ``work/scale.json``."""
    for k, v in checks.items():
        print(f"{k}: {'yes' if v else 'NO'}")
    growth = memory_growth(rows)
    for (stage, engine, n0, n1), g in growth.items():
        print(f"main-process peak RSS growth, {stage} {engine}, N {n0} -> {n1}: "
              f"{g['bytes_per_spectrum']:,.0f} bytes/spectrum (x 20M: {g['gb_20M']:.1f} GB; goal <= 100 bytes)")
    proj = project(rows, sizes) if "local:1" in engines and {"prepare", "predict"} <= {r["stage"] for r in rows} else {}
    if proj:
        print(f"\nprojection for {TARGET:,} spectra from the local:1 runs of N = {', '.join(map(str, sizes))}: "
              "hours = 20M x (main CPU per spectrum + 1 / (W x worker rate))")
        print(f"{'stage':8} {'spec/s/worker':>13} {'main ms/spec':>12} "
              + " ".join(f"{'W=' + str(w):>8}" for w in PROJECT_WORKERS))
    for stage, p in proj.items():
        print(f"{stage:8} {p['worker_rate']:>13.0f} {p['main_ms_per_spectrum']:>12.3f} "
              + " ".join(f"{p['hours_20M'][w]:>7.2f}h" for w in PROJECT_WORKERS))
    write_text(work / "scale.json", dumps({"sizes": sizes, "runs": rows, "checks": checks, "projection": proj,
                                           "memory_growth": {f"{s} {e} {a}->{b}": g
                                                             for (s, e, a, b), g in growth.items()},
                                           "cpus": cpus, "load_average_end": os.getloadavg()}))
    print(f"results: {work / 'scale.json'}")


if __name__ == "__main__":
    main()
