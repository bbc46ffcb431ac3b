"""Partial catalogs and `diagnose`: a simulated-SDSS model fine-tuned on a LAMOST catalog that has only [Fe/H].

    .venv/bin/python bench/partial.py --work runs/partial               # docs/benchmarks.md's tables
    .venv/bin/python bench/partial.py --work /tmp/p --n-source 3000 --n-target 1500 --seeds 0   # a quick look

1. Source: simulated SDSS (``--n-source`` spectra), prepared (split by star) and trained with
   the default recipe (bench/transfer.py's ``source_model``: calib_folds 0).
2. Target: simulated LAMOST (``--n-target`` spectra, seed 1: other realizations of the same
   MILES stars, every star in the split it had in the source dataset), its catalog's teff and
   logg set to -9999 (a metallicity catalog), prepared on the source's grid.
3. Per seed, ``--stars`` training stars of the target (all their spectra, [Fe/H] only), the
   val split for model selection; MAE on the test split against the noiseless truth of:
   - the source model as it is;
   - fine-tuned on [Fe/H] only, the teff and logg heads kept frozen (what `train --init-from`
     does on such a catalog): all three labels, to see what the moving trunk does to the
     frozen heads;
   - fine-tuned with ``--labels feh`` (the other heads dropped);
   - fine-tuned on the same stars with all three labels (what a full catalog would give);
   - from scratch on the same stars, [Fe/H] only; Ridge on them.
4. `diagnose` of the source model on the SDSS test split (in domain) and on the whole LAMOST
   set: fraction flagged, KS statistic against training, departing regions.
Prints markdown tables and writes WORK/partial.json, .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.table import Table

from stellarparams.baselines import RidgeVal
from stellarparams.calibrate import calibrate
from stellarparams.dataset import Dataset
from stellarparams.diagnose import diagnose
from stellarparams.model_io import Model, load_model
from stellarparams.prepare import prepare
from stellarparams.preprocess import PrepareConfig, config_from_model
from stellarparams.simulate import simulate
from stellarparams.train import frozen_absent, source_heads, source_init

sys.path.insert(0, str(Path(__file__).parent))
from _common import (LABELS, TRUE, add_options, cell, finish, fit_predict, parse, source_model,  # noqa: E402
                     stars_rows, train_config)


def feh_only_target(work: Path, source: Path, splits: dict, a) -> tuple[Path, Path]:
    """(the target dataset whose catalog has only [Fe/H], the same with every label)."""
    out = work / "lamost"
    cat = simulate(out / "sim", n=a.n_target, seed=1, workers=a.workers, progress=False, wait=True, survey="lamost")
    config = config_from_model(source, PrepareConfig())
    table = Table.read(cat)
    table["SPLIT"] = [splits.get(str(s), "train") for s in table["star_id"]]
    full = out / "catalog_full.fits"
    table.write(full, overwrite=True)
    for c in ("teff", "logg", "teff_err", "logg_err"):
        table[c] = -9999.0
    feh = out / "catalog_feh.fits"
    table.write(feh, overwrite=True)
    paths = []
    for name, c in (("dataset_feh", feh), ("dataset_full", full)):
        prepare(c, out / "sim" / "spectra", out / name, config=config, seed=0, workers=a.workers, progress=False,
                wait=True, survey="lamost", split_column="SPLIT")
        paths.append(out / name)
    return tuple(paths)


def run(ds: Dataset, full: Dataset, source: Path, a) -> dict:
    assert (ds.meta()["object_id"] == full.meta()["object_id"]).all(), "the two target datasets' rows differ"
    va, te = ds.indices("val"), ds.indices("test")
    truth, Xte = ds.meta(te)[TRUE].to_numpy(np.float64), ds.flux(te)
    src = load_model(source)
    mae = lambda pred, cols=(0, 1, 2): [float(np.abs(pred[:, k] - truth[:, c]).mean()) if k is not None else None  # noqa: E731
                                        for k, c in zip(cols, range(3))]
    res, cov = {"SDSS model as it is": [mae(src.predict(Xte))]}, []
    for seed in a.seeds:
        rows = stars_rows(ds, a.stars, seed)
        t = time.perf_counter()
        base = train_config(seed, a, source, src)
        mc = replace(src.model_config, n_in=ds.n_pix)
        tc, fitted = frozen_absent(base, mc.labels, ds), []
        res.setdefault("fine-tuned on [Fe/H] only, teff/logg heads frozen", []).append(
            mae(fit_predict(ds, rows, va, mc, tc, Xte, fitted)))
        cov.append(coverage(fitted[0], mc, tc, source_init(tc, mc, ds), ds, full, te))
        one = source_heads(mc, ["feh"])
        res.setdefault("fine-tuned with --labels feh", []).append(
            mae(fit_predict(ds, rows, va, one, base, Xte), (None, 0, None)))
        res.setdefault("fine-tuned on all three labels (a full catalog)", []).append(
            mae(fit_predict(full, rows, va, mc, base, Xte)))
        res.setdefault("from scratch on [Fe/H] only", []).append(
            mae(fit_predict(ds, rows, va, one, train_config(seed, a), Xte), (None, 0, None)))
        j = ds.label_names.index("feh")
        r = RidgeVal().fit(ds.flux(rows), ds.labels(rows)[:, [j]], ds.flux(va), ds.labels(va)[:, [j]])
        res.setdefault("Ridge on [Fe/H] only", []).append(mae(r.predict(Xte), (None, 0, None)))
        print(f"seed {seed}: {len(rows)} spectra of {a.stars} stars, {time.perf_counter() - t:.0f} s; "
              + "; ".join(f"{k}: {v[-1]}" for k, v in res.items()), file=sys.stderr)
    return {"n_train_spectra": int(len(rows)), "n_test": int(len(te)), "mae": res, "coverage_frozen": cov}


def coverage(f, mc, tc, init, ds, full, te) -> dict:
    """Coverage of sigma and of the 95% interval on the test split, against the catalog's labels (the full
    catalog's, for teff and logg), of the frozen-head model calibrated as `train` does it (validation split,
    feh known there; teff and logg carried from the source)."""
    m = Model(f.net, f.labels, f.center, f.scale, model_config=mc, train_config=tc, label_ranges=f.label_ranges,
              grid=ds.attrs.get("grid"), seed=tc.seed)
    m.uncertainty = calibrate(m, ds, folds=0, progress=False, init=init)[0]
    df = m.predict_full(ds.flux(te))
    y = full.labels(te)
    out = {}
    for j, name in enumerate(m.label_names):
        t = y[:, full.label_names.index(name)]
        ok = np.isfinite(t)
        out[name] = [float(np.mean(np.abs(df[name].to_numpy()[ok] - t[ok]) <= df[f"sigma_{name}"].to_numpy()[ok])),
                     float(np.mean((df[f"lo95_{name}"].to_numpy()[ok] <= t[ok]) & (t[ok] <= df[f"hi95_{name}"].to_numpy()[ok])))]
    out["carried"] = m.uncertainty.stats.get("carried_from_source", [])
    return out


def format_tables(out: dict) -> str:
    lines = ["| model | Teff (K) | [Fe/H] (dex) | log g (dex) |", "|---|---|---|---|"]
    for name, runs in out["finetune"]["mae"].items():
        cells = [cell([r[j] for r in runs], 0 if j == 0 else 3) for j in range(3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cov = out["finetune"]["coverage_frozen"]
    if cov:
        lines += ["", "| frozen-head model | Teff | [Fe/H] | log g |", "|---|---|---|---|"]
        for k, what in ((0, "coverage of sigma"), (1, "coverage of the 95% interval")):
            lines.append(f"| {what} | " + " | ".join(
                f"{100 * np.mean([c[n][k] for c in cov]):.0f}% ± {100 * np.std([c[n][k] for c in cov]):.0f}"
                for n in LABELS) + " |")
    lines += ["", "| set | n | flag_unlike_training | flag_out_of_range | KS vs training | departing regions "
              "(worst, A) |", "|---|---|---|---|---|---|"]
    for name, r in out["diagnose"].items():
        f, w = r["fraction_flagged"], r["worst_regions"]
        lines.append(f"| {name} | {r['n_spectra']} | {100 * f['flag_unlike_training']:.1f}% | "
                     f"{100 * f['flag_out_of_range']:.1f}% | {r['ks_vs_training']['statistic']:.2f} | {len(w)}"
                     + (f" ({w[0]['wave_lo']:.0f}-{w[0]['wave_hi']:.0f}, z {w[0]['peak']:+.1f})" if w else "") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, work="runs/partial", n_source=6000, source_epochs=10, n_target=3000, epochs=30, workers=1)
    a = parse(p, argv)
    work = Path(a.work)
    t0 = time.perf_counter()
    source, splits = source_model(work, a)
    feh, full = feh_only_target(work, source, splits, a)
    out = {"settings": vars(a)}
    with Dataset(feh) as ds, Dataset(full) as dfull:
        out["finetune"] = run(ds, dfull, source, a)
    out["diagnose"] = {
        "SDSS test split (in domain)": diagnose(source, work / "sdss_dataset", work / "diagnose_sdss", split="test",
                                                progress=False),
        "LAMOST (all)": diagnose(source, feh, work / "diagnose_lamost", progress=False)}
    return finish(work, "partial", out, format_tables, t0)


if __name__ == "__main__":
    sys.exit(main())
