"""Each ingredient of the default recipe under instrument shifts: its ablation models on the all-shifts survey.

    .venv/bin/python bench/accuracy.py --work runs/bench --skip small     # trains default_no_<x>_s0
    .venv/bin/python bench/robustness.py --work runs/bench                # builds the shifted surveys
    .venv/bin/python bench/ablation_shift.py --work runs/bench

For the paper and default recipes' models (WORK/models/RECIPE_sSEED), each ablation model
(WORK/models/default_no_<ingredient>_sSEED) and each ``--variant`` of bench/accuracy.py, on the test stars of the seed-7 survey without a
shift ("none") and with every shift of bench/robustness.py together ("all"), against the
noiseless truth: MAE per label and all / none. An ingredient helps under shift when switching
it off raises the all-shifts MAE by more than the default's seed-to-seed spread.
Writes WORK/ablation_shift.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from robustness import TRUE, mae, test_star_rows
from stellarparams import load_model
from stellarparams.dataset import Dataset
from stellarparams.files import write_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench")
    a = p.parse_args(argv)
    work = Path(a.work)
    base = Dataset(work / "dataset")
    stars = set(base.meta(base.indices("test"))["object_id"].astype(str))
    sets = {}
    for name in ("none", "all"):
        ds = Dataset(work / "shifted" / name / "dataset")
        rows = test_star_rows(ds, stars)
        sets[name] = (ds.flux(rows), ds.meta(rows)[TRUE].to_numpy(np.float64))
    groups = {"paper": [], "default": []}  # then every other model folder (ablations, variants), by name
    for f in sorted((work / "models").glob("*_s*")):
        groups.setdefault(f.name.rsplit("_s", 1)[0], []).append(f)
    fmt = lambda v: f"{v[0]:.0f} / {v[1]:.3f} / {v[2]:.3f}"  # noqa: E731
    lines = ["| model | seeds | MAE, no shift | MAE, all shifts | all / none |", "|---|---|---|---|---|"]
    for name, folders in groups.items():
        models = [load_model(f) for f in folders if (f / "model.json").exists()]
        if not models:
            continue
        m = {k: np.array([mae(x.predict(X), y) for x in models]) for k, (X, y) in sets.items()}
        spread = "" if len(models) < 2 else f" (± {fmt(m['all'].std(0))})"
        lines.append(f"| {name} | {len(models)} | {fmt(m['none'].mean(0))} | {fmt(m['all'].mean(0))}{spread} | "
                     + "/".join(f"{x:.2f}" for x in m["all"].mean(0) / m["none"].mean(0)) + " |")
        print(lines[-1], file=sys.stderr)
    table = "\n".join(lines)
    write_text(work / "ablation_shift.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
