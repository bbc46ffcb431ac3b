"""Transfer between surveys: a model trained on simulated SDSS, fine-tuned on 100 LAMOST (DESI) stars.

    .venv/bin/python bench/transfer.py --work runs/transfer                 # docs/benchmarks.md's table
    .venv/bin/python bench/transfer.py --work /tmp/t --n-source 3000 --n-target 1500 --seeds 0   # a quick look

1. Source: simulates the SDSS survey (``--n-source`` spectra, seed 0), prepares it (split by
   star, seed 0) and trains the default recipe on it (``--source-epochs``), unless
   ``--source-model`` names a model folder.
2. For LAMOST, then DESI: simulates that survey (``--n-target`` spectra, seed 1 / 2: other
   realizations of the same MILES stars), prepares it on the source model's grid
   (``grid-from``), every star in the split it had in the source dataset, so the test stars
   are unseen by the source model and by the fine-tuning (with ``--source-model`` the split
   is prepare's own, seed 0, and the source may have seen them).
3. Per seed: ``--stars`` training stars drawn from the train split (all their spectra; the
   draw depends on the seed), the whole val split for model selection, then on the test
   split, against the noiseless truth (TEFF_TRUE, FEH_TRUE, LOGG_TRUE), MAE of:
   - the source model as it is (no fine-tuning);
   - fine-tuned: the default recipe started from the source model (``train --init-from``),
     ``--epochs`` epochs;
   - from scratch: the default recipe on the same stars, ``--epochs`` epochs;
   - Ridge (alpha per label on the val split) on the same stars.
Prints a markdown table (mean +- std over the seeds) and writes WORK/transfer.json, .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

from stellarparams.baselines import RidgeVal
from stellarparams.config import ModelConfig
from stellarparams.dataset import Dataset
from stellarparams.model_io import load_model
from stellarparams.prepare import prepare
from stellarparams.preprocess import PrepareConfig, config_from_model
from stellarparams.simulate import simulate

sys.path.insert(0, str(Path(__file__).parent))
from _common import (TRUE, add_options, cell, finish, fit_predict, parse, source_model,  # noqa: E402
                     stars_rows, train_config)

TARGETS = {"lamost": 1, "desi": 2}   # survey -> simulation seed


def target_dataset(work: Path, survey: str, source: Path, splits: dict, a) -> Path:
    """Simulate and prepare ``survey`` on the source's grid, every star in its source split."""
    out = work / survey
    cat = simulate(out / "sim", n=a.n_target, seed=TARGETS[survey], workers=a.workers, progress=False, wait=True,
                   survey=survey)
    config = config_from_model(source, PrepareConfig())
    kw = {}
    if splits:
        table = Table.read(cat)
        star = [str(s) for s in table["star_id" if survey == "lamost" else "STAR_ID"]]
        table["SPLIT"] = [splits.get(s, "train") for s in star]
        cat = out / "catalog_split.fits"
        if not cat.exists():
            table.write(cat)
        kw["split_column"] = "SPLIT"
    prepare(cat, out / "sim" / "spectra", out / "dataset", config=config, seed=0, workers=a.workers,
            progress=False, wait=True, survey=survey, **kw)
    return out / "dataset"


def run_survey(survey: str, ds: Dataset, source: Path, a) -> dict:
    va, te = ds.indices("val"), ds.indices("test")
    truth, Xte, Xva, yva = ds.meta(te)[TRUE].to_numpy(np.float64), ds.flux(te), ds.flux(va), ds.labels(va)
    src = load_model(source)
    mae = lambda pred: np.abs(pred - truth).mean(0).tolist()  # noqa: E731
    res = {"SDSS model as it is, no fine-tuning": [mae(src.predict(Xte))]}
    mc = ModelConfig.from_dict({**src.model_config.to_dict(), "n_in": ds.n_pix})
    for seed in a.seeds:
        rows = stars_rows(ds, a.stars, seed)
        t = time.perf_counter()
        res.setdefault("fine-tuned from SDSS", []).append(
            mae(fit_predict(ds, rows, va, mc, train_config(seed, a, source, src), Xte)))
        res.setdefault(f"from scratch on {a.stars} stars", []).append(
            mae(fit_predict(ds, rows, va, mc, train_config(seed, a), Xte)))
        r = RidgeVal().fit(ds.flux(rows), ds.labels(rows), Xva, yva)
        res.setdefault(f"Ridge on {a.stars} stars", []).append(mae(r.predict(Xte)))
        print(f"{survey} seed {seed}: {len(rows)} spectra of {a.stars} stars, {time.perf_counter() - t:.0f} s; "
              + "; ".join(f"{k}: {np.round(v[-1], 3).tolist()}" for k, v in res.items()), file=sys.stderr)
    return {"n_train_spectra": int(len(rows)), "n_val": int(len(va)), "n_test": int(len(te)),
            "n_test_stars": int(ds.meta(te)["object_id"].nunique()), "mae": res}


def format_table(out: dict) -> str:
    lines = ["| survey | model | Teff (K) | [Fe/H] (dex) | log g (dex) |", "|---|---|---|---|---|"]
    for survey, r in out["surveys"].items():
        for name, runs in r["mae"].items():
            cells = [cell([run[j] for run in runs], 0 if j == 0 else 3) for j in range(3)]
            lines.append(f"| {survey.upper()} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, work="runs/transfer", n_source=10_000, source_epochs=12, n_target=4000, epochs=40, workers=2)
    p.add_argument("--surveys", default="lamost,desi")
    a = parse(p, argv)
    work = Path(a.work)
    t0 = time.perf_counter()
    source, splits = source_model(work, a)
    out = {"settings": {k: v for k, v in vars(a).items()}, "surveys": {}}
    for survey in a.surveys.split(","):
        with Dataset(target_dataset(work, survey, source, splits, a)) as ds:
            out["surveys"][survey] = run_survey(survey, ds, source, a)
    return finish(work, "transfer", out, format_table, t0)


if __name__ == "__main__":
    sys.exit(main())
