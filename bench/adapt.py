"""Domain adaptation: a model trained on simulated SDSS, adapted to other surveys from their unlabeled spectra.

    .venv/bin/python bench/adapt.py --work runs/adapt                 # docs/benchmarks.md's table (3 seeds)
    .venv/bin/python bench/adapt.py --work /tmp/adapt_quick --quick   # a smoke check: minutes on 1 thread

The MILES stars are split in two halves by a hash of the star and the seed (no star is in both):
the source survey holds the first half's spectra, every target the second half's; within each
half the stars are split 60/10/30 into train/val/test (the same hash). Each seed draws its own
split, so the spread over seeds includes which stars land where (seed 0's split is the one of
the tables before; ``--same-split`` gives every seed seed 0's). Source: the default simulated
SDSS survey (seed 0). Targets, each prepared on the source's grid:

- ``sdss``: the source survey itself (its second-half stars): the no-harm check;
- ``all-shifts``: SDSS with every shift of bench/robustness.py (seed 4);
- ``lamost``, ``desi``: ``simulate --survey lamost|desi`` (seeds 1, 2);
- ``hard``: SDSS with a strong response (legendre:0.2), R 1500 (``--lsf gauss:200``), a
  0.3 px wavelength offset and reddening (mean E(B-V) 0.2 mag) (seed 3).

Per seed (the split of the stars, the training seed and the draw of the 100 labelled stars), per target, on the
target's test stars, MAE against the noiseless truth (TEFF_TRUE, FEH_TRUE, LOGG_TRUE) of:

- as-is: the source model (default recipe on the source's train stars);
- adapted: ``train --adapt-to`` (input matching, ``--adapt-match`` rounds, groups from
  ``--adapt-group``: ridge on continuum-free flux, or the source model as the first pass),
  trained from scratch like the source model (the same budget, so only the matching
  differs); the target's train-split spectra are its unlabeled set;
- 100 labelled: the source model fine-tuned on 100 labelled target stars (target val split
  for model selection);
- 100 labelled + adapted: the adapted model fine-tuned on the same stars;
- ceiling: the default recipe trained from scratch on every labelled target train star;
- Ridge on the 100 labelled stars, and on every labelled target star.

And: the fraction of the gap closed, (as-is - adapted) / (as-is - ceiling), per label; the paired
differences adapted - as-is and 100 labelled + adapted - 100 labelled (the same seed, split and
stars); the
coverage of sigma (68.3% expected) and of the 95.4% interval on the target's test stars of each
calibrated model, each calibrated as `train` calibrates it (``--calib-folds`` out-of-fold models):

- as-is: on the source validation stars (no out-of-fold models);
- adapted: on the source validation stars and out-of-fold predictions of every source training
  star, all passed through the input matching, then widened by the growth of the network's
  disagreement with a response-blind ridge on the target (``widen_for_target``, as `train`
  does; "not widened" without it); for comparison also on the validation stars
  alone ("val only"), those each times what the matching leaves ("val x excess",
  ``MatchedDataset.for_calibration``), and `train`'s with weighted split-conformal factors
  ("weighted conformal", Tibshirani et al. 2019: the calibration rows weighted by
  p_target(x) / p_source(x) from a logistic-regression domain classifier on the PCA of the
  adapted network's trunk output (``--shift-features``) of the matched source rows against the
  target's unlabeled spectra, ``stellarparams.adapt.shift_weights``);
- 100 labelled (+ adapted): as `train --init-from` does on a dataset of labelled target stars:
  on the target's validation stars plus out-of-fold models (each started from the same
  weights) of the 100 labelled stars;

and the fraction flagged ``flag_unlike_training`` (source model vs adapted, whose novelty reference
includes the target's unlabeled spectra).
Writes WORK/adapt.json and WORK/adapt.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table

from stellarparams.adapt import (TargetLoss, match_source, pseudo_refit, reference_target, shift_weights,
                                 widen_for_target)
from stellarparams.baselines import RidgeVal
from stellarparams.calibrate import out_of_fold
from stellarparams.config import ModelConfig, recipe
from stellarparams.dataset import Dataset
from stellarparams.files import write_text
from stellarparams.finetune import Init
from stellarparams.model_io import Model
from stellarparams.prepare import config_from_model, prepare
from stellarparams.simulate import simulate
from stellarparams.training import fit
from stellarparams.uncertainty import fit_uncertainty

LABELS = ["teff", "feh", "logg"]
TRUE = [f"{l.upper()}_TRUE" for l in LABELS]
HARD = {"response": "legendre:0.2", "lsf": "gauss:200", "wave_offset": 0.3, "ebv_mean": 0.2}
ALL_SHIFTS = {"response": "legendre:0.1", "telluric": 0.3, "airmass": (1.0, 1.5), "lsf": "gauss:200",
              "wave_offset": 0.2, "sky_residual": 0.05}      # bench/robustness.py's "all"
TARGETS = {"sdss": None, "hard": ("sdss", 3, HARD), "all-shifts": ("sdss", 4, ALL_SHIFTS),
           "lamost": ("lamost", 1, {}), "desi": ("desi", 2, {})}   # name -> (survey, simulation seed, shifts)
STAR_COLUMN = {"sdss": "STAR_ID", "lamost": "star_id", "desi": "STAR_ID"}
SPLIT_OF = ["train"] * 6 + ["val"] + ["test"] * 3


def half_and_split(star, seed: int = 0) -> tuple[int, str]:
    """(0: source half, 1: target half; split) of a MILES star, from a hash of its id and the seed."""
    key = str(int(float(star))) + (f":{seed}" if seed else "")
    h = zlib.crc32(key.encode())
    return h % 2, SPLIT_OF[(h // 2) % 10]


def simulated(work: Path, name: str, survey: str, seed: int, shifts: dict, n: int, grid_from, a) -> Path:
    """Simulate and prepare one survey (split by the star hash; on the source's grid when given)."""
    folder = work / name
    if (folder / "dataset" / "dataset.h5").exists():
        return folder / "dataset"
    cat = simulate(folder / "sim", n=n, seed=seed, workers=a.workers, progress=False, wait=True, survey=survey,
                   **shifts)
    table = Table.read(cat)
    table["SPLIT"] = [half_and_split(s)[1] for s in table[STAR_COLUMN[survey]]]
    cat_split = folder / "catalog_split.fits"
    table.write(cat_split, overwrite=True)
    kw = {} if grid_from is None else {"config": config_from_model(grid_from)}
    prepare(cat_split, folder / "sim" / "spectra", folder / "dataset", seed=0, workers=a.workers, progress=False,
            wait=True, survey=survey, split_column="SPLIT", **kw)
    return folder / "dataset"


def rows_of(ds: Dataset, half: int, seed: int = 0) -> dict:
    """{split: row numbers} of the stars of one half, in ``seed``'s split of the stars."""
    meta = ds.meta()
    star = meta["STAR_ID"] if "STAR_ID" in meta else meta["object_id"]
    side, split = np.array([half_and_split(s, seed) for s in star]).T
    return {s: np.flatnonzero((side == str(half)) & (split == s)) for s in ("train", "val", "test")}


def stars_rows(ds: Dataset, rows: np.ndarray, n_stars: int, seed: int) -> np.ndarray:
    meta = ds.meta(rows)
    stars = (meta["STAR_ID"] if "STAR_ID" in meta else meta["object_id"]).astype(str).to_numpy()
    keep = np.random.default_rng(1000 + seed).choice(np.unique(stars), min(n_stars, len(np.unique(stars))),
                                                     replace=False)
    return rows[np.isin(stars, keep)]


def model_of(f, ds, mc, tc) -> Model:
    return Model(f.net, f.labels, f.center, f.scale, model_config=mc, train_config=tc,
                 label_units=[ds.label_units[ds.label_names.index(l)] for l in f.labels],
                 label_ranges=f.label_ranges, grid=ds.attrs.get("grid"), prepare_config=ds.attrs.get("preprocess"),
                 metrics=f.metrics, seed=tc.seed)


def init_of(f) -> Init:
    return Init({k: v.detach().cpu() for k, v in f.net.state_dict().items()}, f.center, f.scale)


def predict(f, X) -> np.ndarray:
    f.net.eval()
    with torch.inference_mode():
        out = torch.cat([f.net(torch.from_numpy(X[i:i + 4096])) for i in range(0, len(X), 4096)])
    return out.numpy().astype(np.float64) * f.scale + f.center


def trunk_features(f, X) -> np.ndarray:
    """The trunk's output (what the heads read; dropout off) of a single-trunk StellarNet for flux X."""
    f.net.eval()
    with torch.inference_mode():
        return torch.cat([f.net.trunks[0].body(f.net.features(torch.from_numpy(X[i:i + 4096])))
                          for i in range(0, len(X), 4096)]).numpy()


def labels_of(ds, rows, labels=LABELS):
    return ds.labels(rows)[:, [ds.label_names.index(l) for l in labels]].astype(np.float64)


def coverage_of(model, X, truth) -> dict:
    """{"cov1": (3,) fraction within sigma, "cov95": (3,) within the 95.4% interval} of a calibrated model."""
    df = model.predict_full(X)
    pred = df[LABELS].to_numpy(np.float64)
    sig = df[[f"sigma_{l}" for l in LABELS]].to_numpy(np.float64)
    lo, hi = (df[[f"{k}_{l}" for l in LABELS]].to_numpy(np.float64) for k in ("lo95", "hi95"))
    return {"cov1": (np.abs(pred - truth) <= sig).mean(0).tolist(),
            "cov95": ((truth >= lo) & (truth <= hi)).mean(0).tolist()}


def fine_tuned(tds, lab, va, mc, tc, init, seed, a) -> tuple:
    """A model fine-tuned from ``init`` on the labelled rows ``lab`` (``va`` selects), calibrated as
    `train --init-from` calibrates it: on the target's validation stars plus out-of-fold models
    (each started from ``init``) of the labelled stars. (fit result, calibrated Model)."""
    f = fit(tds, (lab, va), mc, tc, init=init)
    model = model_of(f, tds, mc, tc)
    oof = None
    if a.calib_folds >= 2:
        oof = out_of_fold(tds, lab, va, mc, tc, a.calib_folds, init=init)
        if oof is not None:
            oof["y"] = labels_of(tds, oof["rows"])
    model.uncertainty = fit_uncertainty(model, tds.flux(lab), labels_of(tds, lab), tds.flux(va), labels_of(tds, va),
                                        seed=seed, oof=oof)
    return f, model


def run_target(name, tds, trows, src, srows, source, source_model, seed, a):
    """One target, one seed: {model: MAE (3,)} plus the coverage of each calibrated model and flags."""
    mc = ModelConfig(n_in=tds.n_pix)
    tc = recipe("default", seed=seed, calib_folds=0, threads=a.threads, epochs=a.epochs,
                adapt_match=a.adapt_match, adapt_bins=a.adapt_bins, adapt_order=a.adapt_order,
                adapt_narrow=a.adapt_narrow, adapt_group=a.adapt_group, adapt_coral=a.adapt_coral,
                adapt_consistency=a.adapt_consistency, adapt_noise=a.adapt_noise, adapt_pseudo=a.pseudo)
    te = trows["test"]
    Xte, truth = tds.flux(te), tds.meta(te)[TRUE].to_numpy(np.float64)
    mae = lambda p: np.abs(p - truth).mean(0).tolist()  # noqa: E731
    res, t0 = {"as-is": mae(predict(source, Xte))}, time.perf_counter()
    cov = {"as-is": coverage_of(source_model, Xte, truth)}
    # adapted: the target's train-split spectra, unlabeled
    unl = trows["train"]
    Xu, Ou = tds.flux(unl), tds.offset(unl)
    # from scratch, as the source model: the same training budget, so only the input matching differs
    matched = match_source(src, (srows["train"], srows["val"]), mc, tc, Xu, Ou, source.net)
    loss = TargetLoss(Xu, tc) if tc.adapt_coral or tc.adapt_consistency else None
    adapted = fit(matched, (srows["train"], srows["val"]), mc, tc, target_loss=loss)
    res["adapted"] = mae(predict(adapted, Xte))
    if a.pseudo > 0:  # as `train --adapt-to` does with adapt_pseudo; "adapted" stays the network before it
        matched.target_offset = Ou
        res["adapted + pseudo-labels"] = mae(predict(pseudo_refit(adapted, matched, Xu, mc, tc, target_loss=loss,
                                                                  rows=(srows["train"], srows["val"])), Xte))
    model = model_of(adapted, src, mc, tc)
    oof = None
    if a.calib_folds >= 2:  # out-of-fold models of the matched source, from scratch (as `train --calib-folds`)
        oof = out_of_fold(matched, srows["train"], srows["val"], mc, tc, a.calib_folds)
        oof["y"] = labels_of(src, oof["rows"])
    extra = {"match": {k: v for k, v in matched.match.to_dict().items() if k != "log_response"}, "cov": cov}
    # calibrated as `train --adapt-to` does (matched validation + out-of-fold matched training stars), and for
    # comparison: on the matched validation stars alone, plain and each times what the matching leaves
    # (MatchedDataset.for_calibration); and train's with weighted conformal factors (covariate shift)
    Xtr_m, ytr, Xva_m, yva = (matched.flux(srows["train"]), labels_of(src, srows["train"]), matched.flux(srows["val"]),
                              labels_of(src, srows["val"]))
    for key, cal, o in (("adapted, val only", matched, None),
                        ("adapted, val x excess", matched.for_calibration(srows["val"], seed), None)):
        model.uncertainty = fit_uncertainty(model, Xtr_m, ytr, cal.flux(srows["val"]), yva, seed=seed, oof=o)
        cov[key] = coverage_of(model, Xte, truth)
    # weighted split-conformal (Tibshirani et al. 2019): the calibration rows (validation, then out-of-fold)
    # weighted by p_target(x) / p_source(x) from a domain classifier on the PCA of the trunk output (or flux)
    cal_x = Xva_m if oof is None else np.concatenate([Xva_m, matched.flux(oof["rows"])])
    if a.shift_features == "trunk":
        cal_x, Xu_rep = trunk_features(adapted, cal_x), trunk_features(adapted, Xu)
    w, extra["shift_weights"] = shift_weights(cal_x, Xu if a.shift_features == "flux" else Xu_rep, seed=seed)
    model.uncertainty = fit_uncertainty(model, Xtr_m, ytr, Xva_m, yva, seed=seed, oof=oof, conformal_weights=w)
    cov["adapted, weighted conformal"] = coverage_of(model, Xte, truth)
    model.uncertainty = fit_uncertainty(model, Xtr_m, ytr, Xva_m, yva, seed=seed, oof=oof)
    cov["adapted, not widened"] = coverage_of(model, Xte, truth)
    extra["widening"] = widen_for_target(model, matched, (srows["train"], srows["val"]), Xu, Ou, seed=seed)
    cov["adapted"] = coverage_of(model, Xte, truth)
    reference_target(model, matched.flux(srows["train"]), matched.flux(srows["val"]), Xu, seed)
    extra["flagged_adapted"] = float(model.predict_full(Xte)["flag_unlike_training"].mean())
    if a.adapted_only:
        res["ceiling (all labelled target)"] = [np.nan] * 3
        return res, extra
    # 100 labelled target stars: from the source model, and from the adapted one
    lab = stars_rows(tds, trows["train"], a.stars, seed)
    va = trows["val"]
    for key, start in ((f"{a.stars} labelled", source), (f"{a.stars} labelled + adapted", adapted)):
        f, m = fine_tuned(tds, lab, va, mc, tc, init_of(start), seed, a)
        res[key] = mae(predict(f, Xte))
        cov[key] = coverage_of(m, Xte, truth)
    res["ceiling (all labelled target)"] = mae(predict(fit(tds, (unl, va), mc, tc), Xte))
    Xva, yva = tds.flux(va), labels_of(tds, va)
    res[f"Ridge, {a.stars} labelled"] = mae(RidgeVal().fit(tds.flux(lab), labels_of(tds, lab), Xva, yva).predict(Xte))
    res["Ridge, all labelled"] = mae(RidgeVal().fit(Xu, labels_of(tds, unl), Xva, yva).predict(Xte))
    print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f} s): "
          + "; ".join(f"{k} {np.round(v, 3).tolist()}" for k, v in res.items())
          + f"; match {extra['match']['shift_px']:+.1f} px, LSF {extra['match']['lsf_px']:.1f} px, response rms "
            f"{extra['match']['response_rms']:.3f}, excess rms {extra['match'].get('excess_rms', 0):.4f}; cov1 "
          + "; ".join(f"{k} {np.round(v['cov1'], 2).tolist()}" for k, v in cov.items()),
          file=sys.stderr)
    return res, extra


def format_table(out: dict) -> str:
    lines = ["| target | model | Teff (K) | [Fe/H] (dex) | log g (dex) |", "|---|---|---|---|---|"]
    def fmt(m, s, j):
        d = 0 if j == 0 else 3
        return f"{m:.{d}f}" + (f" ± {s:.{d}f}" if s is not None else "")
    for name, r in out["targets"].items():
        for model, runs in r["mae"].items():
            m, sd = np.mean(runs, 0), (np.std(runs, 0) if len(runs) > 1 else [None] * 3)
            lines.append(f"| {name} | {model} | " + " | ".join(fmt(m[j], sd[j], j) for j in range(3)) + " |")
        g = np.array(r["gap_closed"])
        asis, ad, ceil = (np.mean(r["mae"][k], 0) for k in ("as-is", "adapted", "ceiling (all labelled target)"))
        lines.append(f"| {name} | gap closed by adapting (of the means) | " + " | ".join(
            f"{g[:, j].mean():.2f}" + (f" ± {g[:, j].std():.2f}" if len(g) > 1 else "")
            + f" ({(asis[j] - ad[j]) / (asis[j] - ceil[j]):.2f})" for j in range(3)) + " |")
        n = out["settings"]["stars"]
        for new, old in (("adapted", "as-is"), (f"{n} labelled + adapted", f"{n} labelled")):
            # paired differences: the same split, stars and seed; (k/n) seeds where new is lower
            if new in r["mae"] and old in r["mae"] and not np.isnan(r["mae"][old]).any():
                d = np.array(r["mae"][new]) - np.array(r["mae"][old])
                lines.append(f"| {name} | {new} - {old} (paired) | " + " | ".join(
                    f"{fmt(d[:, j].mean(), d[:, j].std() if len(d) > 1 else None, j)} ({(d[:, j] < 0).sum()}/{len(d)})"
                    for j in range(3)) + " |")
    lines += ["", "| target | model (calibration) | cov sigma (68.3%) | cov 95.4% interval |", "|---|---|---|---|"]
    cov = lambda runs: " / ".join(  # noqa: E731
        f"{m:.2f}" + (f" ± {sd:.2f}" if len(runs) > 1 else "") for m, sd in zip(np.mean(runs, 0), np.std(runs, 0)))
    for name, r in out["targets"].items():
        for model, c in r["coverage"].items():
            lines.append(f"| {name} | {model} | {cov(c['cov1'])} | {cov(c['cov95'])} |")
    lines += ["", "| target | flagged: as-is / adapted | shift px, LSF px, response rms, excess rms (seed 0) | "
              "density ratio: classifier AUC, n_eff / n, clipped | sigma widened by (mean over seeds) |",
              "|---|---|---|---|---|"]
    for name, r in out["targets"].items():
        m, sw = r["match"][0], r["shift_weights"]
        lines.append(f"| {name} | {np.mean(r['flagged_as_is']):.2f} / {np.mean(r['flagged_adapted']):.2f}"
                     f" | {m['shift_px']:+.1f}, {m['lsf_px']:.1f}, {m['response_rms']:.3f}, "
                     f"{m.get('excess_rms', 0):.4f} | {np.mean([x['auc'] for x in sw]):.2f}, "
                     f"{np.mean([x['n_eff'] / x['n'] for x in sw]):.2f}, {np.mean([x['clipped'] for x in sw]):.2f} | "
                     + " / ".join(f"{np.mean([w.get(l, np.nan) for w in r.get('widening', [{}])]):.2f}" for l in LABELS)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/adapt", help="source/, one folder per target, adapt.json, adapt.md")
    p.add_argument("--quick", action="store_true",
                   help="a smoke check: 1500 spectra per survey, 1 seed, 3 epochs, targets sdss and hard")
    p.add_argument("--n-source", type=int, default=4000, help="spectra of the source survey (both halves)")
    p.add_argument("--n-target", type=int, default=4000, help="spectra of each target survey (both halves)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of every network (default recipe)")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--stars", type=int, default=100, help="labelled target stars")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--same-split", action="store_true",
                   help="every seed uses seed 0's split of the stars (as the tables before; default: each seed "
                        "draws its own)")
    p.add_argument("--adapt-match", type=int, default=2, help="rounds of input matching")
    p.add_argument("--adapt-bins", type=int, default=16)
    p.add_argument("--adapt-order", type=int, default=10)
    p.add_argument("--adapt-narrow", type=float, default=0.0, help="threshold of narrow shared features (sigma)")
    p.add_argument("--adapt-group", default="ridge", choices=["net", "ridge"],
                   help="what predicts the labels the groups are made of (TrainConfig.adapt_group)")
    p.add_argument("--adapt-coral", type=float, default=0.0, help="weight of CORAL on target spectra")
    p.add_argument("--adapt-consistency", type=float, default=0.0, help="weight of the mean-teacher consistency")
    p.add_argument("--adapt-noise", type=float, default=0.0,
                   help="noise of the target's excess per-pixel variance on the matched source "
                        "(TrainConfig.adapt_noise)")
    p.add_argument("--pseudo", type=float, default=0.0,
                   help="TrainConfig.adapt_pseudo: train again on the matched source plus this fraction of the "
                        "target's unlabeled spectra, labelled by the adapted model (smallest MC-dropout spread); "
                        "row 'adapted + pseudo-labels' (the 'adapted' row is the network before)")
    p.add_argument("--calib-folds", type=int, default=3,
                   help="out-of-fold models (of the matched source) calibrating the adapted model's sigma, as "
                        "`train` does; 0: the source validation stars alone")
    p.add_argument("--shift-features", default="trunk", choices=["flux", "trunk"],
                   help="what the domain classifier of the weighted conformal row reads (its PCA): the matched "
                        "flux, or the adapted network's trunk output")
    p.add_argument("--adapted-only", action="store_true",
                   help="only as-is and adapted (comparing adaptation settings; no gap closed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    if a.quick:
        a.n_source = a.n_target = 1500
        a.seeds, a.epochs, a.targets, a.calib_folds = "0", 3, "sdss,hard", 0
    a.seeds = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    t0 = time.perf_counter()
    src = Dataset(simulated(work, "source", "sdss", 0, {}, a.n_source, None, a))
    split = {seed: 0 if a.same_split else seed for seed in a.seeds}
    srows = {seed: rows_of(src, 0, split[seed]) for seed in a.seeds}
    grid = work / "grid.json"   # what --grid-from reads: the source dataset's grid and preprocessing
    write_text(grid, json.dumps({"grid": src.attrs["grid"], "prepare_config": src.attrs.get("preprocess")}))
    out = {"settings": vars(a), "targets": {}}
    sources = {}
    for seed in a.seeds:
        mc, tc = ModelConfig(n_in=src.n_pix), recipe("default", seed=seed, calib_folds=0, threads=a.threads,
                                                      epochs=a.epochs)
        tr, va = srows[seed]["train"], srows[seed]["val"]
        f = fit(src, (tr, va), mc, tc)
        m = model_of(f, src, mc, tc)
        m.uncertainty = fit_uncertainty(m, src.flux(tr), labels_of(src, tr), src.flux(va), labels_of(src, va), seed=seed)
        sources[seed] = (f, m)
    print(f"source: {[len(r['train']) for r in srows.values()]} train spectra, {len(a.seeds)} models, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for name in a.targets.split(","):
        if TARGETS[name] is None:
            tds = src
        else:
            survey, sim_seed, shifts = TARGETS[name]
            tds = Dataset(simulated(work, name, survey, sim_seed, shifts, a.n_target, grid, a))
        r = out["targets"][name] = {"n_unlabeled": [], "n_test": [], "mae": {}, "gap_closed": [], "coverage": {},
                                    "flagged_as_is": [], "flagged_adapted": [], "match": [], "shift_weights": [],
                                    "widening": []}
        for seed in a.seeds:
            f, m = sources[seed]
            trows = rows_of(tds, 1, split[seed])
            r["n_unlabeled"].append(int(len(trows["train"])))
            r["n_test"].append(int(len(trows["test"])))
            res, extra = run_target(name, tds, trows, src, srows[seed], f, m, seed, a)
            for k, v in res.items():
                r["mae"].setdefault(k, []).append(v)
            asis, ad, ceil = (np.array(res[k]) for k in ("as-is", "adapted", "ceiling (all labelled target)"))
            r["gap_closed"].append(((asis - ad) / (asis - ceil)).tolist())
            r["flagged_as_is"].append(float(m.predict_full(tds.flux(trows["test"]))["flag_unlike_training"].mean()))
            for k, c in extra["cov"].items():
                for q in ("cov1", "cov95"):
                    r["coverage"].setdefault(k, {}).setdefault(q, []).append(c[q])
            for k in ("flagged_adapted", "match", "shift_weights", "widening"):
                r[k].append(extra[k])
        write_text(work / "adapt.json", json.dumps(out, indent=1))
    out["seconds"] = round(time.perf_counter() - t0)
    write_text(work / "adapt.json", json.dumps(out, indent=1))
    table = format_table(out)
    write_text(work / "adapt.md", table + "\n")
    print(table)
    print(f"{out['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
