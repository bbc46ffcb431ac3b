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
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table

from stellarparams.baselines import RidgeVal
from stellarparams.config import ModelConfig, recipe
from stellarparams.dataset import Dataset
from stellarparams.files import write_text
from stellarparams.model_io import load_model
from stellarparams.prepare import prepare
from stellarparams.preprocess import PrepareConfig, config_from_model
from stellarparams.simulate import simulate
from stellarparams.train import source_init, train
from stellarparams.training import fit

LABELS = ["teff", "feh", "logg"]
TRUE = [f"{l.upper()}_TRUE" for l in LABELS]
TARGETS = {"lamost": 1, "desi": 2}   # survey -> simulation seed
SPLIT_NAMES = {0: "train", 1: "val", 2: "test"}


def predict(net, center, scale, X, batch=4096) -> np.ndarray:
    net.eval()
    with torch.inference_mode():
        out = torch.cat([net(torch.from_numpy(X[i:i + batch])) for i in range(0, len(X), batch)])
    return out.numpy().astype(np.float64) * scale + center


def source_model(work: Path, a) -> tuple[Path, dict]:
    """The source model folder and {star: split} of its dataset ({} for a given --source-model)."""
    if a.source_model:
        return Path(a.source_model), {}
    t = time.perf_counter()
    cat = simulate(work / "sdss", n=a.n_source, seed=0, workers=a.workers, progress=False, wait=True)
    prepare(cat, work / "sdss" / "spectra", work / "sdss_dataset", seed=0, workers=a.workers, progress=False, wait=True)
    with Dataset(work / "sdss_dataset") as ds:
        tc = recipe("default", seed=0, calib_folds=0, threads=a.threads, epochs=a.source_epochs)
        model = train(ds, work / "source_model", ModelConfig(n_in=ds.n_pix), tc, progress=False, overwrite=True)
        meta = ds.meta()
        splits = dict(zip(meta["object_id"], meta["split"]))
    print(f"source: {a.n_source} SDSS spectra, {model.metrics['best_epoch']} best epoch, "
          f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
    return work / "source_model", splits


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


def stars_rows(ds: Dataset, n_stars: int, seed: int) -> np.ndarray:
    itr = ds.indices("train")
    stars = ds.meta(itr)["object_id"].to_numpy()
    keep = np.random.default_rng(1000 + seed).choice(np.unique(stars), n_stars, replace=False)
    return itr[np.isin(stars, keep)]


def run_survey(survey: str, ds: Dataset, source: Path, a) -> dict:
    va, te = ds.indices("val"), ds.indices("test")
    truth, Xte, Xva, yva = ds.meta(te)[TRUE].to_numpy(np.float64), ds.flux(te), ds.flux(va), ds.labels(va)
    src = load_model(source)
    mae = lambda pred: np.abs(pred - truth).mean(0).tolist()  # noqa: E731
    res = {"SDSS model as it is, no fine-tuning": [mae(src.predict(Xte))]}
    mc = ModelConfig.from_dict({**src.model_config.to_dict(), "n_in": ds.n_pix})
    for seed in a.seeds:
        rows = stars_rows(ds, a.stars, seed)
        tc = recipe("default", seed=seed, calib_folds=0, threads=a.threads, epochs=a.epochs)
        t = time.perf_counter()
        ft_tc = tc.__class__(**{**tc.to_dict(), "init_from": str(source), "init_sha256": src.weights_sha256})
        f = fit(ds, (rows, va), mc, ft_tc, init=source_init(ft_tc, mc, ds))
        res.setdefault("fine-tuned from SDSS", []).append(mae(predict(f.net, f.center, f.scale, Xte)))
        f = fit(ds, (rows, va), mc, tc)
        res.setdefault(f"from scratch on {a.stars} stars", []).append(mae(predict(f.net, f.center, f.scale, Xte)))
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
            m, sd = np.mean(runs, 0), np.std(runs, 0)
            cells = [f"{m[j]:.{0 if j == 0 else 3}f}" + (f" ± {sd[j]:.{0 if j == 0 else 3}f}" if len(runs) > 1 else "")
                     for j in range(3)]
            lines.append(f"| {survey.upper()} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/transfer", help="sdss/, source_model/, lamost/, desi/, transfer.json/.md")
    p.add_argument("--source-model", help="a trained model folder to start from (default: train one on simulated SDSS)")
    p.add_argument("--n-source", type=int, default=10_000, help="spectra of the simulated SDSS survey")
    p.add_argument("--source-epochs", type=int, default=12, help="epochs of the source model (default recipe)")
    p.add_argument("--n-target", type=int, default=4000, help="spectra of each simulated target survey")
    p.add_argument("--surveys", default="lamost,desi")
    p.add_argument("--stars", type=int, default=100, help="training stars of the target survey (all their spectra)")
    p.add_argument("--epochs", type=int, default=40, help="epochs of the fine-tuned and the from-scratch models")
    p.add_argument("--seeds", default="0,1,2", help="seeds: the draw of the training stars and the training")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    t0 = time.perf_counter()
    source, splits = source_model(work, a)
    out = {"settings": {k: v for k, v in vars(a).items()}, "surveys": {}}
    for survey in a.surveys.split(","):
        with Dataset(target_dataset(work, survey, source, splits, a)) as ds:
            out["surveys"][survey] = run_survey(survey, ds, source, a)
    out["seconds"] = round(time.perf_counter() - t0)
    write_text(work / "transfer.json", json.dumps(out, indent=1))
    table = format_table(out)
    write_text(work / "transfer.md", table + "\n")
    print(table)
    print(f"{out['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
