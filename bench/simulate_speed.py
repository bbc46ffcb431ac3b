"""Speed of `simulate`: spectra per second, end to end, and where one spectrum's time goes.

Target: 50,000 spectra in under 5 minutes on the 2-core machine, i.e. >= 167 spectra/s.
The per-spectrum lines also time a realization with every instrument shift on
(ALL_SHIFTS); ``--shifts`` runs the end-to-end survey with them too.

    .venv/bin/python bench/simulate_speed.py [--n 5000] [--workers 2] [--shifts] [--keep DIR]
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

from stellarparams import simulate as S

ALL_SHIFTS = dict(response="legendre:0.05", telluric=0.2, lsf="gh:150:0.05:0.03", wave_offset=0.1, sky_residual=0.02)


def per_step(n=200):
    """Seconds of the Simulator set-up, and mean seconds per spectrum of realizing (without and
    with every shift) and writing (fitsio, and astropy for comparison), in one process."""
    t = time.perf_counter()
    sim = S.Simulator(S.SimConfig())
    t_init = time.perf_counter() - t
    plans = [S.draw_plan(0, i, len(sim.labels), sim.cfg) for i in range(n)]
    t = time.perf_counter()
    specs = [sim.realize(p, 0) for p in plans]
    t_real = (time.perf_counter() - t) / n
    shifted = S.Simulator(S.SimConfig(), S.Shifts(**ALL_SHIFTS))
    t = time.perf_counter()
    for p in plans:
        shifted.realize(p, 0)
    t_shifted = (time.perf_counter() - t) / n
    from stellarparams.surveys.sdss import simulated_path, write_simulated

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        for p, s in zip(plans, specs):
            write_simulated(simulated_path(d, p["plate"], p["mjd"], p["fiberid"]), s,
                            plate=p["plate"], mjd=p["mjd"], fiberid=p["fiberid"])
        t_write = (time.perf_counter() - t) / n
        from stellarparams.surveys.sdss import write_spec_lite
        t = time.perf_counter()
        for i, s in enumerate(specs[:50]):
            write_spec_lite(Path(d) / f"astropy-{i}.fits", s["loglam"], s["flux"], s["ivar"], s["and_mask"],
                            plate=1, mjd=1, fiberid=i + 1, sky=s["sky"])
        t_astropy = (time.perf_counter() - t) / 50
    return t_init, t_real, t_shifted, t_write, t_astropy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="spectra to simulate")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", default=None, help="write here and keep (default: a temporary folder)")
    ap.add_argument("--shifts", action="store_true", help=f"end to end with every shift on: {ALL_SHIFTS}")
    args = ap.parse_args()

    t_init, t_real, t_shifted, t_write, t_astropy = per_step()
    print(f"load + resolution-match MILES: {t_init:.2f} s per process")
    print(f"per spectrum, one process: realize {1e3 * t_real:.2f} ms (every shift on: {1e3 * t_shifted:.2f} ms), "
          f"write (fitsio) {1e3 * t_write:.2f} ms, write with astropy (sdss.write_spec_lite) {1e3 * t_astropy:.2f} ms")

    out = Path(args.keep or tempfile.mkdtemp(prefix="simbench-"))
    try:
        t = time.perf_counter()
        shifts = ALL_SHIFTS if args.shifts else {}
        S.simulate(out, n=args.n, seed=0, workers=args.workers, progress=False, **shifts)
        dt = time.perf_counter() - t
        rate = args.n / dt
        print(f"simulate{' (every shift on)' if args.shifts else ''}: {args.n} spectra, {args.workers} workers: "
              f"{dt:.1f} s, {rate:.0f} spectra/s; "
              f"50,000 spectra would take {50000 / rate / 60:.1f} min (target < 5 min)")
        t = time.perf_counter()
        S.simulate(out, n=args.n, seed=0, workers=args.workers, progress=False, **shifts)
        print(f"re-run (all files present, catalog rewritten): {time.perf_counter() - t:.1f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
