"""Throughput of `prepare` and `predict` from SDSS FITS files, and of their per-spectrum kernels.

Goals on the 2-core machine: `prepare` >= 2,000 spectra/s end to end on 20,000 simulated
spec-lite files (seed 0), `predict` >= 1,500 spectra/s from FITS with sigma and flags (10,000
files, seed 1, warm file cache). The data are simulated into DATA once (`stellarparams
simulate`) and reused.

    .venv/bin/python bench/throughput.py [--data DATA] [--workers 2] [--repeat 3] [--model MODEL]
                                         [--only kernels,prepare,predict] [--reader fast|fitsio]
                                         [--prepare-n 20000]

Prints, each with the load average at that moment (the machine is shared; numbers move with it):
- kernels, one process, CPU time per spectrum: reading a lite file (fast reader and fitsio), the
  spline (kernel / SciPy's CubicSpline), `preprocess`, and a whole chunk of `prepare`;
- `prepare` end to end: the `stellarparams prepare` command from launch to exit (start-up
  included), best and median of --repeat runs, and its own in-process rate (summary.json);
- `predict` from FITS with the Python API (the model loaded, the files in the page cache): one
  run to warm the cache, then --repeat runs; and the `stellarparams predict` command end to end.
  --model: a model folder (default: the paper's network trained one epoch on the prepare set and
  calibrated, saved to DATA/model_calibrated: sigma and flags are computed, as for a user's model).
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BAR_N, BAR_SEED = 20_000, 0
PREDICT_N, PREDICT_SEED = 10_000, 1


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def survey(folder: Path, n: int, seed: int, workers: int) -> Path:
    """A simulated survey of ``n`` spectra in ``folder`` (made once; a re-run finds it complete)."""
    from stellarparams.simulate import simulate

    if not (folder / "sppParams.fits").exists():
        t = time.perf_counter()
        simulate(folder, n=n, seed=seed, workers=workers, progress=False)
        print(f"(simulated {n} spectra into {folder} in {time.perf_counter() - t:.0f} s)")
    return folder


def kernels(bar: Path, n: int = 1000):
    """CPU time per spectrum of the reading and resampling kernels, in this process."""
    from scipy.interpolate import CubicSpline

    from stellarparams.surveys import sdss
    from stellarparams.prepare import _Pixels, _run_chunk
    from stellarparams.preprocess import PrepareConfig, preprocess
    from stellarparams.resample import cubic_spline

    files = sorted(glob.glob(str(bar / "spectra" / "**" / "spec-*.fits"), recursive=True))[:n]
    cat = sdss.read_catalog(bar / "sppParams.fits")
    rv = {(r.PLATE, r.MJD, r.FIBERID): r.RV_ADOP for r in cat.itertuples()}
    items = [(i, f, rv[sdss.parse_name(Path(f).name)], None) for i, f in enumerate(files)]
    config = PrepareConfig()

    def per_spectrum(fn, *args):
        t = time.process_time()
        out = fn(*args)
        return 1e3 * (time.process_time() - t) / len(files), out

    fast, specs = per_spectrum(lambda: [sdss.read_spectrum(f, "fast") for f in files])
    read, specs = per_spectrum(lambda: [sdss.read_spectrum(f, "fitsio") for f in files])
    print(f"read a lite file:     {fast:.3f} ms (fast reader), {read:.3f} ms (fitsio)   [{load()}]")
    grid = config.grid.loglam
    xy = []
    for s in specs:
        good = s.good()
        x, y = s.loglam[good], s.flux[good].astype(np.float64)
        xy.append((x, y, np.clip(grid, x[0], x[-1])))
    ours, a = per_spectrum(lambda: [cubic_spline(x, y, at) for x, y, at in xy])
    scipy_, b = per_spectrum(lambda: [CubicSpline(x, y, extrapolate=False)(at) for x, y, at in xy])
    diff = max(float(np.abs(u - v).max()) for u, v in zip(a, b))
    print(f"spline onto the grid: {ours:.3f} ms kernel, {scipy_:.3f} ms SciPy CubicSpline; "
          f"max |difference| {diff:.3g}   [{load()}]")
    pre, _ = per_spectrum(lambda: [preprocess(s, r[2], config, return_sigma=True, return_offset=True)
                                   for s, r in zip(specs, items)])
    with tempfile.TemporaryDirectory() as tmp:
        pixels = _Pixels.open(Path(tmp), config, n)
        chunk, _ = per_spectrum(lambda: [_run_chunk(k // 256, items[k:k + 256], config, tmp, pixels, k)
                                         for k in range(0, n, 256)])
    print(f"preprocess (+sigma):  {pre:.3f} ms; a chunk of prepare (read + preprocess + save): {chunk:.3f} ms "
          f"-> {2e3 / chunk:,.0f} spectra/s on 2 idle cores   [{load()}]")


def prepare_end_to_end(bar: Path, workers: int, repeat: int, reader: str = "fast"):
    """The `stellarparams prepare` command from launch to exit."""
    rates, inner = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeat):
            out = Path(tmp) / f"ds{k}"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "stellarparams.cli", "prepare", "--catalog",
                            str(bar / "sppParams.fits"), "--spectra", str(bar / "spectra"), "--out", str(out),
                            "--workers", str(workers), "--reader", reader, "--no-progress"], check=True, cwd=_tree(),
                           env=_env(),
                           stdout=subprocess.DEVNULL)
            dt = time.perf_counter() - t
            s = json.loads((out / "summary.json").read_text())
            rates.append(s["read"] / dt)
            inner.append(s["spectra_per_s"])
            print(f"  prepare run {k + 1}: {s['read']} spectra in {dt:.2f} s = {rates[-1]:,.0f}/s end to end, "
                  f"{s['spectra_per_s']:,.0f}/s in-process (after start-up)   [{load()}]")
    print(f"prepare, {s['read']} spec-lite files, {workers} workers, --reader {reader}: best {max(rates):,.0f}/s, "
          f"median {statistics.median(rates):,.0f}/s end to end; in-process best {max(inner):,.0f}/s (goal 2,000/s)")


def _tree() -> Path:
    """The source tree of the stellarparams this script imports (PYTHONPATH picks it); commands run there."""
    import stellarparams

    return Path(stellarparams.__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(_tree()) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def default_model(folder: Path, bar: Path, workers: int) -> Path:
    """A calibrated model (paper recipe, one epoch on the prepared bar set; speed only), made once.

    Calibrated so that predict computes sigma, ood_score and every flag, as a user's model does.
    """
    from stellarparams.config import ModelConfig, recipe
    from stellarparams.prepare import prepare
    from stellarparams.train import train

    if not (folder / "model.json").exists():
        dataset = folder.parent / "bar_dataset"
        if not (dataset / "dataset.h5").exists():
            prepare(bar / "sppParams.fits", bar / "spectra", dataset, workers=workers, progress=False)
        train(dataset, folder, ModelConfig(), recipe("paper", epochs=1, calib_folds=0, threads=1), progress=False,
              overwrite=True)
    return folder


def predict_from_fits(spectra: Path, model_folder: Path, workers: int, repeat: int, reader: str = "fast"):
    """`predict` on every file of ``spectra``: Python API (warm), then the command end to end."""
    from stellarparams import load_model
    from stellarparams.predict import predict

    model = load_model(model_folder)
    with tempfile.TemporaryDirectory() as tmp:
        predict(model, [spectra], Path(tmp) / "warm.parquet", workers=workers, progress=False,
                reader=reader)  # page cache
        rates = []
        for k in range(repeat):
            s = predict(model, [spectra], Path(tmp) / f"p{k}.parquet", workers=workers, progress=False, reader=reader)
            rates.append(s["spectra_per_s"])
            print(f"  predict run {k + 1}: {s['n_files']} files in {s['seconds']:.2f} s = "
                  f"{s['spectra_per_s']:,.0f}/s (Python API, model loaded, warm)   [{load()}]")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stellarparams.cli", "predict", str(model_folder), str(spectra),
                        "--out", str(Path(tmp) / "cli.parquet"), "--workers", str(workers), "--reader", reader,
                        "--quiet"],
                       check=True, cwd=_tree(), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dt = time.perf_counter() - t
    n = s["n_files"]
    print(f"predict, {n} files from FITS, {workers} workers, --reader {reader}: best {max(rates):,.0f}/s, median "
          f"{statistics.median(rates):,.0f}/s (API, warm; goal 1,500/s); command end to end "
          f"{n / dt:,.0f}/s ({dt:.1f} s with start-up and model loading)   [{load()}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "bench" / "throughput"),
                    help="where the simulated bar set (bar/) and predict set (predict/) live")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", help="model folder for predict (default: the paper network, one epoch, calibrated)")
    ap.add_argument("--only", default="kernels,prepare,predict", help="comma-separated parts to run")
    ap.add_argument("--reader", default="fast", choices=("fast", "fitsio"), help="SDSS reader of prepare and predict")
    ap.add_argument("--prepare-n", type=int, default=BAR_N, help="spec-lite files of the prepare set")
    args = ap.parse_args()
    data, only = Path(args.data), set(args.only.split(","))
    print(f"os.cpu_count() = {os.cpu_count()}, {load()}")
    bar = survey(data / ("bar" if args.prepare_n == BAR_N else f"bar{args.prepare_n}"), args.prepare_n, BAR_SEED,
                 args.workers)
    if "kernels" in only:
        kernels(bar)
    if "prepare" in only:
        prepare_end_to_end(bar, args.workers, args.repeat, args.reader)
    if "predict" in only:
        spectra = survey(data / "predict", PREDICT_N, PREDICT_SEED, args.workers) / "spectra"
        model = Path(args.model) if args.model else default_model(data / "model_calibrated", bar, args.workers)
        predict_from_fits(spectra, model, args.workers, args.repeat, args.reader)


if __name__ == "__main__":
    main()
