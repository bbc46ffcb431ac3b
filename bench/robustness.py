"""Robustness to another spectrograph: the models of bench/accuracy.py on instrument-shifted surveys.

    .venv/bin/python bench/robustness.py --work runs/bench        # after bench/accuracy.py --work runs/bench

Simulates surveys of the same MILES stars (``--seed 7``, ``--n`` spectra each) with one
instrument shift at a time and with all of them together (docs/shifts.md gives each shift's
physical range), prepares each exactly as the training data, and scores only the stars of the
default dataset's test split (never seen in training), against the noiseless truth:

- MAE per label, mean +- std over the seeds, for Ridge and each recipe's models
  (WORK/models/RECIPE_sSEED, trained by bench/accuracy.py on WORK/dataset);
- shifted / in-domain MAE (in-domain: the same seed-7 survey without a shift, so only the shift
  differs; the default dataset's own test split is listed too) and network / Ridge;
- the fraction flagged ``flag_unlike_training``; on the all-shifts survey, the coverage of
  sigma (68.3% expected) and of the 95.4% interval (lo95/hi95);
- ``ood_score`` against the amplitude of the instrument response (WORK/robustness_ood.png).

Writes WORK/robustness.json and WORK/robustness.md (docs/benchmarks.md's table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from stellarparams import load_model
from stellarparams.baselines import RidgeVal
from stellarparams.dataset import Dataset
from stellarparams.files import atomic_write, write_text
from stellarparams.prepare import prepare
from stellarparams.simulate import simulate

TRUE = ["TEFF_TRUE", "FEH_TRUE", "LOGG_TRUE"]
# one physically typical value per shift (docs/shifts.md); "all" applies every one of them
SHIFTS = {
    "none": {},                                          # the same realisation without a shift: the reference
    "response": {"response": "legendre:0.1"},             # 10% rms fixed instrument response
    "telluric": {"telluric": 0.3, "airmass": (1.0, 1.5)},  # 30% of the O2/H2O bands left uncorrected
    "lsf": {"lsf": "gauss:200"},                          # R = 1500 instead of 2000
    "offset": {"wave_offset": 0.2},                       # 0.2 px (14 km/s) wavelength-solution offset
    "sky": {"sky_residual": 0.05},                        # 5% of the sky lines left
}
SHIFTS["all"] = {k: v for s in SHIFTS.values() for k, v in s.items()}
OOD_AMPLITUDES = (0.0, 0.05, 0.1, 0.2, 0.3)


def shifted_dataset(work: Path, name: str, shift: dict, n: int, workers: int) -> Path:
    folder = work / "shifted" / name
    cat = simulate(folder / "survey", n=n, seed=7, workers=workers, progress=False, **shift)
    prepare(cat, folder / "survey" / "spectra", folder / "dataset", seed=0, workers=workers, progress=False)
    return folder / "dataset"


def test_star_rows(ds: Dataset, stars: set) -> np.ndarray:
    ids = ds.meta()["object_id"].to_numpy().astype(str)
    return np.flatnonzero(np.isin(ids, list(stars)))


def mae(pred, truth) -> np.ndarray:
    return np.abs(pred - truth).mean(0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench", help="the folder of bench/accuracy.py (dataset/, models/)")
    p.add_argument("--n", type=int, default=6000, help="spectra per shifted survey")
    p.add_argument("--n-ood", type=int, default=1500, help="spectra per survey of the ood_score curve")
    p.add_argument("--recipes", default="paper,default")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    work = Path(a.work)
    t0 = time.perf_counter()
    base = Dataset(work / "dataset")
    tr, va, te = base.indices("train"), base.indices("val"), base.indices("test")
    test_stars = set(base.meta(te)["object_id"].astype(str))
    ridge = RidgeVal().fit(base.flux(tr), base.labels(tr), base.flux(va), base.labels(va))
    models = {r: sorted(f for f in (work / "models").glob(f"{r}_s*") if (f / "model.json").exists())
              for r in a.recipes.split(",")}  # finished folders only (bench/accuracy.py may still be training)
    if not all(models.values()):
        print(f"error: no model folders {work}/models/RECIPE_sSEED for {a.recipes}; run bench/accuracy.py first",
              file=sys.stderr)
        return 1
    loaded = {r: [load_model(f) for f in folders] for r, folders in models.items()}

    sets = {"in-domain": (base, te)}
    for name, shift in SHIFTS.items():
        ds = Dataset(shifted_dataset(work, name, shift, a.n, a.workers))
        sets[name] = (ds, test_star_rows(ds, test_stars))
    print(f"surveys ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    res = {}
    for name, (ds, rows) in sets.items():
        X, truth = ds.flux(rows), ds.meta(rows)[TRUE].to_numpy(np.float64)
        entry = {"n": int(len(rows)), "Ridge": {"mae": mae(ridge.predict(X), truth).tolist()}}
        for r, ms in loaded.items():
            per = []
            for m in ms:
                df = m.predict_full(X)
                pred = df[m.label_names].to_numpy(np.float64)
                sig = df[[f"sigma_{l}" for l in m.label_names]].to_numpy(np.float64)
                lo = df[[f"lo95_{l}" for l in m.label_names]].to_numpy(np.float64)
                hi = df[[f"hi95_{l}" for l in m.label_names]].to_numpy(np.float64)
                per.append({"mae": mae(pred, truth), "flagged": float(df["flag_unlike_training"].mean()),
                            "cov1": (np.abs(pred - truth) <= sig).mean(0),
                            "cov95": ((truth >= lo) & (truth <= hi)).mean(0)})
            entry[r] = {k: np.mean([q[k] for q in per], 0).tolist() for k in per[0]}
            entry[r]["mae_std"] = np.std([q["mae"] for q in per], 0).tolist()
            entry[r]["seeds"] = len(per)
        res[name] = entry
    for name, entry in res.items():
        for r in ["Ridge", *loaded]:
            entry[r]["vs_in_domain"] = (np.array(entry[r]["mae"]) / res["none"][r]["mae"]).tolist()
            entry[r]["vs_ridge"] = (np.array(entry[r]["mae"]) / entry["Ridge"]["mae"]).tolist()

    curve = ood_curve(work, loaded, test_stars, a.n_ood, a.workers)
    out = {"shifts": SHIFTS, "n": a.n, "results": res, "ood_vs_response": curve,
           "seconds": round(time.perf_counter() - t0, 1)}
    write_text(work / "robustness.json", json.dumps(out, indent=1, default=str))
    table = format_table(out)
    write_text(work / "robustness.md", table + "\n")
    print(table)
    return 0


def ood_curve(work, loaded, test_stars, n, workers) -> dict:
    """Median ood_score and flagged fraction against the response amplitude, for each recipe's first model
    (the score measures the flux against the training spectra, so it hardly depends on the recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = {r: {"median_ood": [], "flagged": []} for r in loaded}
    for amp in OOD_AMPLITUDES:
        shift = {"response": f"legendre:{amp}"} if amp else {}
        ds = Dataset(shifted_dataset(work, f"response_{amp}", shift, n, workers))  # seed 7, n spectra
        X = ds.flux(test_star_rows(ds, test_stars))
        for r, ms in loaded.items():
            df = ms[0].predict_full(X)
            curve[r]["median_ood"].append(float(df["ood_score"].median()))
            curve[r]["flagged"].append(float(df["flag_unlike_training"].mean()))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r, c in curve.items():
        ax.plot(OOD_AMPLITUDES, c["median_ood"], "o-", label=f"{r} recipe")
    ax.axhline(1.0, color="grey", ls=":", label="flag threshold")
    ax.set_xlabel("instrument response amplitude (rms of ln response)")
    ax.set_ylabel("median ood_score, test stars")
    ax.legend()
    atomic_write(work / "robustness_ood.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return {"amplitudes": list(OOD_AMPLITUDES), **curve}


def format_table(out: dict) -> str:
    res = out["results"]
    recipes = [k for k in res["in-domain"] if k not in ("n", "Ridge")]
    fmt = lambda v: f"{v[0]:.0f} / {v[1]:.3f} / {v[2]:.3f}"
    ratio = lambda v: "/".join(f"{x:.2f}" for x in v)
    lines = ["| survey | model | MAE Teff / [Fe/H] / log g | shifted / in-domain | / Ridge | flagged |",
             "|---|---|---|---|---|---|"]
    for name, e in res.items():
        lines.append(f"| {name} ({e['n']}) | Ridge | {fmt(e['Ridge']['mae'])} | {ratio(e['Ridge']['vs_in_domain'])} | "
                     f"1 | - |")
        for r in recipes:
            q = e[r]
            lines.append(f"| | {r} ({q['seeds']} seeds) | {fmt(q['mae'])} | {ratio(q['vs_in_domain'])} | "
                         f"{ratio(q['vs_ridge'])} | {q['flagged']:.1%} |")
    e = res["all"]
    lines += ["", "Coverage of the error bars on the all-shifts survey (fraction of true labels within sigma / "
              "inside the 95% interval; 68.3% / 95.4% expected):", ""]
    for r in recipes:
        lines.append(f"- {r}: " + ", ".join(f"{l} {c1:.1%} / {c2:.1%}" for l, c1, c2 in
                                            zip(("Teff", "[Fe/H]", "log g"), e[r]["cov1"], e[r]["cov95"])))
    c = out["ood_vs_response"]
    lines += ["", "Median ood_score of the test stars against the response amplitude "
              + ", ".join(str(x) for x in c["amplitudes"]) + ":", ""]
    for r in recipes:
        lines.append(f"- {r}: " + ", ".join(f"{x:.2f}" for x in c[r]["median_ood"])
                     + " (flagged " + ", ".join(f"{x:.0%}" for x in c[r]["flagged"]) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
