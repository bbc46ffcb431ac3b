"""Speed of `prepare`: spectra per second end to end, and against the naive path.

Writes N synthetic spectra in the SDSS lite format (spec-PLATE-MJD-FIBER.fits) plus an
SSPP-like catalog to a temporary folder, runs `prepare` on them with W workers and prints
spectra/s. On a subset it then times the naive path the paper describes: astropy reader,
one SciPy cubic spline onto the grid, a second one for the rest-frame shift, then
standardization (one process), and prints the ratio.

    .venv/bin/python bench/prepare_speed.py [--n 5000] [--workers 2] [--naive 300]
"""
import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from stellarparams.spectrum import pixmask
from stellarparams.surveys import sdss
from stellarparams.dataset import Dataset, Grid
from stellarparams.physics import doppler_log_shift
from stellarparams.prepare import prepare


def _write(args):
    folder, i, seed = args
    rng = np.random.default_rng(seed + i)
    n = int(rng.integers(3850, 4650))
    loglam = 3.5790 + rng.uniform(0, 0.002) + 1e-4 * np.arange(n)
    lam = 10 ** loglam
    teff = rng.uniform(4000, 9000)
    cont = 1.0 / (lam / 5000) ** 5 / np.expm1(1.4388e8 / (lam * teff))  # Planck shape (arbitrary scale)
    cont = 100 * cont / cont.mean()
    for line in (3934.8, 3969.6, 4102.9, 4341.7, 4862.7, 5176.7, 5894.6, 6564.6, 8544.4):
        cont *= 1 - 0.4 * np.exp(-0.5 * ((lam - line) / 3.0) ** 2)
    ivar = np.full(n, 1 / 4.0, np.float32)
    flux = cont + rng.normal(0, 2.0, n)
    mask = np.zeros(n, np.int32)
    bad = rng.integers(0, n - 10)
    mask[bad:bad + 5] = pixmask("NODATA")
    ivar[bad:bad + 5] = 0
    plate, mjd, fiber = 3000 + i // 1000, 55000 + i // 1000, i % 1000 + 1
    sdss.write_spec_lite(Path(folder) / f"{plate:04d}" / sdss.spec_filename(plate, mjd, fiber), loglam, flux, ivar,
                         mask, plate=plate, mjd=mjd, fiberid=fiber)
    return dict(PLATE=plate, MJD=mjd, FIBERID=fiber, TEFF_ADOP=teff, FEH_ADOP=rng.uniform(-2.5, 0.3),
                LOGG_ADOP=rng.uniform(1, 5), RV_ADOP=rng.uniform(-300, 300))


def naive(path, rv, grid: Grid):
    """The paper's path: astropy read, spline onto the grid, shift, spline again, standardize."""
    from astropy.io import fits
    from scipy.interpolate import CubicSpline

    with fits.open(path) as h:
        d = h["COADD"].data
        loglam, flux, ivar = d["loglam"].astype(float), d["flux"].astype(float), d["ivar"]
    ok = ivar > 0
    g = grid.loglam
    f1 = CubicSpline(loglam[ok], flux[ok])(np.clip(g, loglam[ok][0], loglam[ok][-1]))
    f2 = CubicSpline(g - doppler_log_shift(rv), f1)(np.clip(g, g[0] - doppler_log_shift(rv), g[-1] - doppler_log_shift(rv)))
    return (f2 - f2.mean()) / f2.std()


def _cpu_seconds():
    """User + system CPU time of this process and its finished children (pool workers)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="number of spectra")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--naive", type=int, default=300, help="spectra timed on the naive path")
    ap.add_argument("--keep", help="write the test data here and keep it (default: a temp folder)")
    args = ap.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="prepare_speed_"))
    spectra = root / "spectra"
    try:
        t = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            rows = list(pool.map(_write, [(spectra, i, 0) for i in range(args.n)], chunksize=64))
        cat = pd.DataFrame(rows)
        cat.to_csv(root / "sppParams.csv", index=False)
        print(f"wrote {args.n} spectra in {time.perf_counter() - t:.1f} s")

        out = root / "dataset"
        shutil.rmtree(out, ignore_errors=True)
        t, cpu = time.perf_counter(), _cpu_seconds()
        s = prepare(root / "sppParams.csv", spectra, out, workers=args.workers, progress=False)
        dt, dcpu = time.perf_counter() - t, _cpu_seconds() - cpu
        ours = s["kept"] / dt
        print(f"prepare: {s['kept']} of {args.n} spectra kept, {dt:.2f} s, {ours:.0f} spectra/s "
              f"end to end with {args.workers} workers (os.cpu_count() = {os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.1f})")
        print(f"  CPU time {1e3 * dcpu / args.n:.2f} ms per spectrum (all processes): "
              f"~{args.workers * args.n / dcpu:.0f} spectra/s on {args.workers} uncontended cores")
        t = time.perf_counter()
        s2 = prepare(root / "sppParams.csv", spectra, out, workers=args.workers, progress=False)
        print(f"re-run with the same inputs: {time.perf_counter() - t:.2f} s (up_to_date={s2.get('up_to_date')})")

        m = min(args.naive, args.n)
        files = [spectra / f"{r.PLATE:04d}" / sdss.spec_filename(r.PLATE, r.MJD, r.FIBERID) for r in cat.itertuples()][:m]
        t, cpu = time.perf_counter(), _cpu_seconds()
        X = np.stack([naive(f, rv, Grid()) for f, rv in zip(files, cat.RV_ADOP[:m])])
        dtn, dcpun = time.perf_counter() - t, _cpu_seconds() - cpu
        nv = m / dtn
        print(f"naive (astropy + two cubic splines, 1 process): {m} spectra, {dtn:.2f} s, {nv:.0f} spectra/s; "
              f"CPU time {1e3 * dcpun / m:.2f} ms per spectrum")
        print(f"CPU time per spectrum, naive / prepare: {(dcpun / m) / (dcpu / args.n):.1f}x")
        print(f"ratio prepare / naive: {ours / nv:.1f}x  (per process: {ours / args.workers / nv:.1f}x)")
        with Dataset(out) as ds:
            diff = np.abs(ds.flux(np.arange(m)) - X)
        print(f"|prepare - naive| over the subset (std units): median {np.median(diff):.4f}, "
              f"99th percentile {np.percentile(diff, 99):.3f}, max {diff.max():.3f} "
              f"(the naive path interpolates twice and clamps the red end at the grid edge)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
