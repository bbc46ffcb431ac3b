"""`diagnose` of one source model on simulated targets: the same survey again, the all-shifts survey, DESI.

    .venv/bin/python bench/diagnose_targets.py --model runs/partial/source_model --work runs/diagnose

Each target (``--n`` spectra, simulation seed 7: another realization of the MILES stars) is
prepared on the model's grid (``config_from_model``) and diagnosed as a whole; the shifts are
bench/robustness.py's (one physically typical value per shift, all at once). Prints a markdown
table and writes WORK/diagnose_targets.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from robustness import SHIFTS  # noqa: E402

from stellarparams.diagnose import diagnose  # noqa: E402
from stellarparams.files import write_text  # noqa: E402
from stellarparams.prepare import prepare
from stellarparams.preprocess import PrepareConfig, config_from_model  # noqa: E402
from stellarparams.simulate import simulate  # noqa: E402

TARGETS = {"SDSS again (no shift)": ("sdss", {}), "SDSS, all shifts": ("sdss", SHIFTS["all"]),
           "DESI": ("desi", {}), "LAMOST": ("lamost", {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model folder to diagnose")
    p.add_argument("--work", default="runs/diagnose")
    p.add_argument("--n", type=int, default=1500, help="spectra per target")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    work, t0, out = Path(a.work), time.perf_counter(), {}
    config = config_from_model(a.model, PrepareConfig())
    for i, (name, (survey, shift)) in enumerate(TARGETS.items()):
        folder = work / f"target{i}"
        cat = simulate(folder / "sim", n=a.n, seed=7, workers=a.workers, progress=False, wait=True, survey=survey,
                       **shift)
        prepare(cat, folder / "sim" / "spectra", folder / "dataset", config=config, seed=0, workers=a.workers,
                progress=False, wait=True, survey=survey)
        out[name] = diagnose(a.model, folder / "dataset", folder / "page", progress=False)
    lines = ["| target | spectra | flag_unlike_training | KS vs training | departing regions (worst, A) | verdict |",
             "|---|---|---|---|---|---|"]
    for name, r in out.items():
        w = r["worst_regions"]
        lines.append(f"| {name} | {r['n_spectra']} | {100 * r['fraction_flagged']['flag_unlike_training']:.1f}% | "
                     f"{r['ks_vs_training']['statistic']:.2f} | {len(w)}"
                     + (f" ({w[0]['wave_lo']:.0f}-{w[0]['wave_hi']:.0f}, z {w[0]['peak']:+.1f})" if w else "")
                     + f" | {r['verdict'].split(':')[0]} |")
    write_text(work / "diagnose_targets.json", json.dumps(out, indent=1, default=str))
    print("\n".join(lines))
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
