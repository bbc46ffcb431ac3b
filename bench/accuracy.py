"""Accuracy on stars the model never saw: Ridge, the paper recipe, the default recipe and its ablations.

    .venv/bin/python bench/accuracy.py --work runs/bench            # the default survey (50,000 spectra)
    .venv/bin/python bench/accuracy.py --work /tmp/b --n 3000 --epochs 2 --seeds 0   # a quick look

Builds (or reuses) the default simulated survey and its dataset in WORK/ (as `stellarparams run`
does: `simulate --n N --seed 0`, `prepare --seed 0`, split by star), then on the test split, against
the noiseless truth (TEFF_TRUE, FEH_TRUE, LOGG_TRUE), prints MAE per label as mean +- std over the
training seeds, for:

- Ridge (alpha per label on the validation split; one fit, it has no seed);
- the paper recipe and the default recipe (model folders kept in WORK/models/RECIPE_sSEED, with
  the validation-split calibration, for bench/robustness.py);

Each measured (configuration, seed) is kept in WORK/runs/, so a killed run resumes and several
processes can share the work (e.g. ``--recipes paper --seeds 1,2`` next to ``--recipes default``);
- the default recipe with each ingredient switched off in turn (``--ablation-seeds`` seeds), and
  ``--variant`` configurations; both kept as model folders WORK/models/<name>_sSEED
  (e.g. ``default_no_aug_ebv_s0``) that bench/robustness.py ``--recipes`` scores under shift;
- the same three at a small training set: ``--small-stars`` training stars (all their spectra).

Also: MAE at S/N > 50, ratios to Ridge, training time. Writes WORK/accuracy.json and
WORK/accuracy.md (docs/benchmarks.md's table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stellarparams.baselines import RidgeVal
from stellarparams.config import RECIPES, ModelConfig, recipe
from stellarparams.dataset import Dataset
from stellarparams.files import write_text
from stellarparams.prepare import prepare
from stellarparams.simulate import simulate
from stellarparams.train import train
from stellarparams.training import fit

LABELS = ["teff", "feh", "logg"]
TRUE = [f"{l.upper()}_TRUE" for l in LABELS]
UNITS = ["K", "dex", "dex"]


def ablations(name: str = "default") -> dict:
    """Each ingredient of a recipe switched back to the paper's value: {'no aug_shift_pix': TrainConfig overrides}."""
    paper = recipe("paper")
    return {f"no {k}": {k: getattr(paper, k)} for k in RECIPES[name] if k != "recipe"}


def survey(work: Path, n: int, workers: int) -> Path:
    cat = simulate(work / "survey", n=n, seed=0, workers=workers, progress=False, wait=True)  # processes may share WORK
    prepare(cat, work / "survey" / "spectra", work / "dataset", seed=0, workers=workers, progress=False, wait=True)
    return work / "dataset"


def predict_net(net, center, scale, X, batch=4096) -> np.ndarray:
    net.eval()
    with torch.inference_mode():
        out = torch.cat([net(torch.from_numpy(X[i:i + batch])) for i in range(0, len(X), batch)])
    return out.numpy().astype(np.float64) * scale + center


def scores(pred, truth, snr) -> dict:
    hi = snr > 50
    return {"mae": np.abs(pred - truth).mean(0).tolist(), "mae_snr50": np.abs(pred[hi] - truth[hi]).mean(0).tolist()}


def small_rows(ds: Dataset, n_stars: int, seed: int = 1234) -> np.ndarray:
    itr = ds.indices("train")
    stars = ds.meta(itr)["object_id"].to_numpy()
    keep = np.random.default_rng(seed).choice(np.unique(stars), n_stars, replace=False)
    return itr[np.isin(stars, keep)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench", help="survey/, dataset/, models/, runs/, accuracy.json/.md")
    p.add_argument("--n", type=int, default=50_000, help="spectra of the simulated survey")
    p.add_argument("--seeds", default="0,1,2", help="training seeds")
    p.add_argument("--recipes", default="paper,default", help="recipes trained on the whole training split")
    p.add_argument("--ablation-seeds", type=int, default=1, help="seeds (from the list's start) for the ablations")
    p.add_argument("--ablations", help="comma-separated ingredients to switch off (default: each of the recipe's)")
    p.add_argument("--small-stars", type=int, default=100, help="training stars of the small-set comparison")
    p.add_argument("--epochs", type=int, help="override every recipe's epochs (quick looks only)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: ablations, small")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL,...",
                   help="also train the default recipe with these overrides (TrainConfig fields; 'model.' prefix "
                        "for ModelConfig), e.g. 'wd 0.1:weight_decay=0.1'; repeatable; --ablation-seeds seeds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    seeds = [int(s) for s in a.seeds.split(",")]
    skip = set(filter(None, a.skip.split(",")))
    t0 = time.perf_counter()
    ds = Dataset(survey(work, a.n, a.workers))
    print(f"survey + dataset ready in {time.perf_counter() - t0:.0f} s: {ds.n} spectra", file=sys.stderr)
    tr, va, te = ds.indices("train"), ds.indices("val"), ds.indices("test")
    meta = ds.meta(te)
    truth, snr, Xte = meta[TRUE].to_numpy(np.float64), meta["snr"].to_numpy(np.float64), ds.flux(te)
    mc = ModelConfig(n_in=ds.n_pix)

    def ridge(name, rows_tr):
        if not done(work, name, "-"):
            t = time.perf_counter()
            r = RidgeVal().fit(ds.flux(rows_tr), ds.labels(rows_tr), ds.flux(va), ds.labels(va))
            record(work, name, "-", dict(scores(r.predict(Xte), truth, snr), train_time_s=time.perf_counter() - t))

    def fits(name, tc_list, rows_tr, mc=mc, keep=False):
        """Train and score; ``keep``: as a model folder WORK/models/<name>_sSEED, for bench/robustness.py."""
        for tc in tc_list:
            folder = work / "models" / f"{slug(name)}_s{tc.seed}"
            if done(work, name, tc.seed) and (not keep or (folder / "model.json").exists()):
                continue
            tc = replace(tc, epochs=a.epochs or tc.epochs, threads=a.threads, calib_folds=0)
            if keep:
                m = train(ds, folder, mc, tc, progress=False, overwrite=True)
                pred, metrics = m.predict(Xte), m.metrics
            else:
                f = fit(ds, (rows_tr, va), mc, tc)
                pred, metrics = predict_net(f.net, f.center, f.scale, Xte), f.metrics
            record(work, name, tc.seed, dict(scores(pred, truth, snr), train_time_s=metrics["train_time_s"],
                                             best_epoch=metrics["best_epoch"]))

    def folders(name):
        for s in seeds:
            if done(work, f"{name} recipe", s):
                continue
            tc = recipe(name, seed=s, calib_folds=0, threads=a.threads, epochs=a.epochs or recipe(name).epochs)
            m = train(ds, work / "models" / f"{name}_s{s}", mc, tc, progress=False, overwrite=True)
            record(work, f"{name} recipe", s, dict(scores(m.predict(Xte), truth, snr),
                                                   train_time_s=m.metrics["train_time_s"],
                                                   best_epoch=m.metrics["best_epoch"]))

    ridge("Ridge", tr)
    for name in a.recipes.split(","):
        folders(name)
    if "ablations" not in skip:
        wanted = None if not a.ablations else {f"no {x.strip()}" for x in a.ablations.split(",")}
        for label, over in ablations().items():
            if wanted is not None and label not in wanted:
                continue
            fits(f"default, {label}", [recipe("default", seed=s, **over) for s in seeds[:a.ablation_seeds]], tr,
                 keep=True)
    for v in a.variant:
        name, over = parse_variant(v)
        mco = replace(mc, **over.pop("model", {}))
        fits(f"default, {name}", [recipe("default", seed=s, **over) for s in seeds[:a.ablation_seeds]], tr, mco,
             keep=True)
    if "small" not in skip:
        rows = small_rows(ds, a.small_stars)
        ridge(f"Ridge, {a.small_stars} stars", rows)
        for name in ("paper", "default"):
            fits(f"{name} recipe, {a.small_stars} stars", [recipe(name, seed=s) for s in seeds], rows)
    ds.close()
    out = {"n": a.n, "n_test": int(len(te)), "n_train": int(len(tr)), "epochs_override": a.epochs,
           "results": collect(work)}
    write_text(work / "accuracy.json", json.dumps(out, indent=1))
    table = format_table(out)
    write_text(work / "accuracy.md", table + "\n")
    print(table)
    return 0


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:KEY=VAL,KEY=VAL' -> (NAME, overrides); values are Python literals, 'model.KEY' goes to ModelConfig."""
    import ast

    name, _, body = text.partition(":")
    over = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        v = ast.literal_eval(v.strip())
        if k.strip().startswith("model."):
            over.setdefault("model", {})[k.strip()[6:]] = v
        else:
            over[k.strip()] = v
    return name.strip(), over


def slug(name: str) -> str:
    """A configuration's name as a file name: 'default, no aug_ebv' -> 'default_no_aug_ebv'."""
    return name.replace(" ", "_").replace(",", "").replace("/", "-")


def _run_file(work: Path, name: str, seed) -> Path:
    return work / "runs" / (slug(name) + f"__s{seed}.json")


def done(work: Path, name: str, seed) -> bool:
    """Whether this (configuration, seed) is measured already (several processes may share WORK)."""
    return _run_file(work, name, seed).exists()


def record(work: Path, name: str, seed, run: dict) -> None:
    run = dict(run, name=name, seed=seed)
    write_text(_run_file(work, name, seed), json.dumps(run))
    print(f"{name} seed {seed}: MAE {np.round(run['mae'], 3).tolist()}", file=sys.stderr)


def collect(work: Path) -> dict:
    """Every measured run in WORK/runs, summarised per configuration (in the order first measured)."""
    runs = {}
    for f in sorted((work / "runs").glob("*.json"), key=lambda f: f.stat().st_mtime):
        r = json.loads(f.read_text())
        runs.setdefault(r["name"], []).append(r)
    order = lambda n: (0 if n == "Ridge" else 1 if n.endswith("recipe") else 3 if "stars" in n else 2)  # noqa: E731
    return {n: summarise(runs[n]) for n in sorted(runs, key=order)}


def summarise(runs: list) -> dict:
    s = {k: np.array([r[k] for r in runs]) for k in ("mae", "mae_snr50")}
    return {"runs": len(runs), "seeds": [r.get("seed") for r in runs], "mae_mean": s["mae"].mean(0).tolist(),
            "mae_std": s["mae"].std(0).tolist(), "mae_snr50_mean": s["mae_snr50"].mean(0).tolist(),
            "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
            "best_epoch": [r.get("best_epoch") for r in runs]}


def format_table(out: dict) -> str:
    res = out["results"]
    ridge_full = np.array(res["Ridge"]["mae_mean"])
    small = [k for k in res if k.startswith("Ridge, ")]
    ridge_small = np.array(res[small[0]]["mae_mean"]) if small else None
    lines = ["| model | seeds | Teff (K) | [Fe/H] (dex) | log g (dex) | / Ridge | S/N > 50 | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        ref = ridge_small if ("stars" in name and ridge_small is not None) else ridge_full
        m, sd = np.array(r["mae_mean"]), np.array(r["mae_std"])
        cells = [f"{m[j]:.{0 if j == 0 else 3}f} ± {sd[j]:.{0 if j == 0 else 3}f}" for j in range(3)]
        ratio = "/".join(f"{x:.2f}" for x in m / ref)
        hi = "/".join(f"{x:.{0 if j == 0 else 3}f}" for j, x in enumerate(r["mae_snr50_mean"]))
        lines.append(f"| {name} | {r['runs']} | {' | '.join(cells)} | {ratio} | {hi} | {r['train_time_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
