"""Where the error on unseen stars lives: per star, and shared by every kind of model.

    .venv/bin/python bench/star_errors.py --work runs/bench      # after bench/accuracy.py --work runs/bench

Every test star has ~60 spectra (S/N 5-100+). For each model of WORK/models (bench/accuracy.py)
and two models of another kind fitted here on each training star's mean spectrum (Ridge, and
5 nearest neighbours), it prints, against the noiseless truth:

- the MAE over test spectra and its split into the star's mean error (its *bias*) and the
  scatter of its spectra around it;
- the median |bias| of a star, and the share of the summed |bias| carried by the worst 10% of stars;
- |bias| per Teff range;
- the correlation of the stars' biases between models: near 1 between two networks means
  the error is a property of the star (its catalogue labels, or a spectrum unlike its
  neighbours'), not of one training run; high with Ridge and neighbours too means not of
  the network at all.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stellarparams import load_model
from stellarparams.dataset import Dataset

TRUE = ["TEFF_TRUE", "FEH_TRUE", "LOGG_TRUE"]
LABELS = ["teff", "feh", "logg"]
TEFF_BINS = [0, 4500, 5500, 6500, 7500, np.inf]


def star_means(ds: Dataset, split: str):
    """(star ids, mean standardized flux per star, truth per star) of a split."""
    idx = ds.indices(split)
    meta = ds.meta(idx)
    flux = ds.flux(idx)
    groups = pd.Series(np.arange(len(idx))).groupby(meta["object_id"].to_numpy()).groups
    stars = sorted(groups)
    truth = meta.groupby("object_id")[TRUE].first().loc[stars].to_numpy(np.float64)
    return stars, np.stack([flux[groups[s]].mean(0) for s in stars]), truth


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench", help="bench/accuracy.py's folder (dataset/, models/)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor

    work = Path(a.work)
    ds = Dataset(work / "dataset")
    te = ds.indices("test")
    meta = ds.meta(te)
    truth, star = meta[TRUE].to_numpy(np.float64), meta["object_id"].to_numpy()
    bias = {}
    print("| model | MAE (spectra) | of which: star bias | scatter within a star | median star |bias| "
          "| worst 10% of stars' share |")
    print("|---|---|---|---|---|---|")
    for folder in sorted((work / "models").iterdir()):
        err = pd.DataFrame(load_model(folder).predict(ds.flux(te)) - truth, columns=LABELS)
        b = err.groupby(star).mean()
        bias[folder.name] = b
        within = (err - b.loc[star].to_numpy()).abs().mean()
        top = b.abs().apply(lambda c: np.sort(c)[::-1][:len(c) // 10].sum() / c.sum())
        print(f"| {folder.name} | {_fmt(err.abs().mean())} | {_fmt(b.abs().mean())} | {_fmt(within)} "
              f"| {_fmt(b.abs().median())} | {'/'.join(f'{x:.2f}' for x in top)} |")
    stars_tr, m_tr, y_tr = star_means(ds, "train")
    stars_te, m_te, y_te = star_means(ds, "test")
    for name, reg in (("Ridge on star means", RidgeCV(alphas=np.logspace(-2, 4, 13))),
                      ("5 nearest stars", KNeighborsRegressor(5, weights="distance"))):
        b = pd.DataFrame(reg.fit(m_tr, y_tr).predict(m_te) - y_te, index=stars_te, columns=LABELS)
        bias[name] = b
        print(f"| {name} | | {_fmt(b.abs().mean())} | | {_fmt(b.abs().median())} | |")
    names = list(bias)
    ref = names[0]
    print(f"\ncorrelation of the test stars' biases with {ref}'s (Teff / [Fe/H] / log g):")
    for n in names[1:]:
        other = bias[n].loc[bias[ref].index]
        print(f"  {n}: " + " / ".join(f"{np.corrcoef(bias[ref][c], other[c])[0, 1]:.2f}" for c in LABELS))
    t = meta.groupby("object_id")["TEFF_TRUE"].first().loc[bias[ref].index]
    print(f"\n{ref}: mean |star bias| per Teff range (stars):")
    for lo, hi in zip(TEFF_BINS[:-1], TEFF_BINS[1:]):
        sel = (t >= lo) & (t < hi)
        print(f"  {lo:>5.0f}-{hi:<5.0f} K ({int(sel.sum()):3d}): {_fmt(bias[ref][sel.to_numpy()].abs().mean())}")
    ds.close()
    return 0


def _fmt(s) -> str:
    s = np.asarray(s, np.float64)
    return f"{s[0]:.0f} / {s[1]:.3f} / {s[2]:.3f}"


if __name__ == "__main__":
    sys.exit(main())
