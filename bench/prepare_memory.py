"""prepare's main-process memory against the number of spectra N, without simulating N spectra.

Simulates a few hundred SDSS spectra once (``WORK/source``, ``stellarparams simulate``), then
for each N of ``--n`` builds ``WORK/nN/``: N hard links to those files under new names
(``lite/PLATE/spec-PLATE-MJD-FIBER.fits``, 1,000 fibers a plate) and an sppParams catalog of N
rows (the source rows, repeated, with the new PLATE/MJD/FIBERID; STAR_ID: two spectra per
star, so the split is grouped). prepare matches by file name and takes the key columns from
the catalog, so the copies need no header of their own.

Each N is prepared in a fresh process (``--workers`` reading processes, a small grid so the
reading is quick) that prints its own peak resident memory (``ru_maxrss``: the main process
only, not its workers) and the dataset's sha256. The slope of the peak between the smallest
and the largest N is the growth per spectrum. ``--tracemalloc`` also runs the smallest N with
tracemalloc (one reading process, in the main one) and prints the largest allocations held
when the dataset is written (everything prepare keeps per spectrum is alive then).
``--catalog parquet`` also writes the catalog as ``sppParams.parquet`` (``DataFrame.to_parquet``'s
defaults) and prepares from that one.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/prepare_memory.py --work runs/pm --n 20000 60000
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/prepare_memory.py --work runs/pm --n 100000 200000
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/prepare_memory.py --work runs/pm --n 100000 200000 --catalog parquet
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIBERS = 1000  # fibers per plate of the copies

CHILD = r"""
import json, resource, sys, time
import psutil
from stellarparams import prepare as P
from stellarparams.dataset import parse_grid
from stellarparams.preprocess import PrepareConfig
args = json.loads(sys.argv[1])
if args["trace"]:
    import tracemalloc
    tracemalloc.start(8)
    write = P._write
    def traced(*a, **k):
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        for s in snap.statistics("traceback")[:args["trace"]]:
            print(f"{s.size / 1e6:8.2f} MB {s.count:9d} blocks", file=sys.stderr)
            for line in s.traceback.format()[-6:]:
                print("      " + line, file=sys.stderr)
        print(f"traced now {tracemalloc.get_traced_memory()[0] / 1e6:.1f} MB, "
              f"peak {tracemalloc.get_traced_memory()[1] / 1e6:.1f} MB", file=sys.stderr)
        r = write(*a, **k)
        print(f"traced peak {tracemalloc.get_traced_memory()[1] / 1e6:.1f} MB", file=sys.stderr)
        return r
    P._write = traced
def staged(name, fn):
    def call(*a, **k):
        r = fn(*a, **k)
        print(f"  after {name:7s} RSS {psutil.Process().memory_info().rss / 2**20:7.1f} MB, "
              f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:7.1f} MB", file=sys.stderr)
        return r
    return call
for name in ("_check", "_match", "_read", "_split", "_write"):
    setattr(P, name, staged(name, getattr(P, name)))
t0 = time.perf_counter()
s = P.prepare(args["catalog"], args["spectra"], args["out"], workers=args["workers"], progress=False,
              config=PrepareConfig(grid=parse_grid(args["grid"])))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "kept": s["kept"], "rejected": s["rejected"], "sha256": s["dataset_sha256"]}))
"""


def simulate_source(work: Path, n: int) -> Path:
    """``WORK/source``: n simulated SDSS spectra and their catalog (made once)."""
    src = work / "source"
    if not (src / "sppParams.fits").exists():
        subprocess.run([sys.executable, "-c", "import sys; from stellarparams.cli import main; sys.exit(main())", "simulate", "--out", str(src), "--n", str(n),
                        "--workers", "1", "--no-progress"], check=True, cwd=ROOT)
    return src


def build(work: Path, src: Path, n: int, catalog: str = "fits") -> Path:
    """``WORK/nN``: N hard links to the source files under new names and their N-row catalog
    (``sppParams.fits``, and ``sppParams.parquet`` too for ``catalog="parquet"``)."""
    import fitsio

    from stellarparams.surveys.sdss import _read_fits_table, parse_name

    out = work / f"n{n}"
    if catalog == "parquet" and not (out / "sppParams.parquet").exists():
        _read_fits_table(build(work, src, n) / "sppParams.fits").to_parquet(out / "sppParams.tmp.parquet", index=False)
        os.replace(out / "sppParams.tmp.parquet", out / "sppParams.parquet")
    if (out / "sppParams.fits").exists():
        return out
    files = sorted(p for p in (src / "spectra").rglob("spec-*.fits") if parse_name(p.name))
    cat = fitsio.read(src / "sppParams.fits", ext=1)
    by_key = {tuple(int(v) for v in (r["PLATE"], r["MJD"], r["FIBERID"])): i for i, r in enumerate(cat)}
    rows = np.array([by_key[parse_name(p.name)] for p in files])  # the catalog row of each source file
    k = np.arange(n)
    plate, mjd, fiber = 2000 + k // FIBERS, np.full(n, 53000), k % FIBERS + 1
    new = cat[rows[k % len(files)]]
    new["PLATE"], new["MJD"], new["FIBERID"], new["STAR_ID"] = plate, mjd, fiber, k // 2
    for p in np.unique(plate):
        (out / "spectra" / "lite" / str(p)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.link(files[i % len(files)],
                out / "spectra" / "lite" / str(plate[i]) / f"spec-{plate[i]:04d}-{mjd[i]:05d}-{fiber[i]:04d}.fits")
    fitsio.write(str(out / "sppParams.tmp.fits"), new, clobber=True)
    os.replace(out / "sppParams.tmp.fits", out / "sppParams.fits")
    return out


def run(folder: Path, workers: int, grid: str, trace: int = 0, catalog: str = "fits") -> dict:
    """prepare ``folder`` (its ``sppParams.CATALOG``) in a fresh process (its dataset made anew); what the child
    printed."""
    import shutil

    out = folder / "dataset"
    shutil.rmtree(out, ignore_errors=True)
    args = {"catalog": str(folder / f"sppParams.{catalog}"), "spectra": str(folder / "spectra"), "out": str(out),
            "workers": 1 if trace else workers, "grid": grid, "trace": trace}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, cwd=ROOT, check=True,
                       stdout=subprocess.PIPE, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the source, the copies and the datasets")
    ap.add_argument("--n", type=int, nargs="+", default=[20000, 60000], help="numbers of spectra (at least two)")
    ap.add_argument("--source", type=int, default=200, help="spectra simulated once and copied")
    ap.add_argument("--workers", type=int, default=2, help="reading processes")
    ap.add_argument("--grid", default="3800,9000,200", help="prepare's grid (few pixels: quick reading)")
    ap.add_argument("--catalog", choices=["fits", "parquet"], default="fits",
                    help="the catalog prepare reads (both are read a block of rows at a time)")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="K",
                    help="also print the K largest allocations held when the smallest N's dataset is written")
    args = ap.parse_args(argv)
    src = simulate_source(args.work, args.source)
    results = {}
    print("| N | seconds | spectra/s | main-process peak RSS MB | kept | rejected |")
    print("|---|---|---|---|---|---|")
    for n in sorted(args.n):
        t0 = time.perf_counter()
        folder = build(args.work, src, n, args.catalog)
        print(f"(built {folder} in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        r = results[n] = run(folder, args.workers, args.grid, catalog=args.catalog)
        print(f"| {n:,} | {r['seconds']:.1f} | {n / r['seconds']:.0f} | {r['peak_mb']:.1f} | {r['kept']:,} | "
              f"{r['rejected']:,} |", flush=True)
    lo, hi = min(results), max(results)
    if hi > lo:
        slope = (results[hi]["peak_mb"] - results[lo]["peak_mb"]) * 2**20 / (hi - lo)
        print(f"\nmain-process peak grows {slope:,.0f} bytes per spectrum between {lo:,} and {hi:,}")
    if args.tracemalloc:
        run(args.work / f"n{lo}", 1, args.grid, args.tracemalloc, args.catalog)
    (args.work / "prepare_memory.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
