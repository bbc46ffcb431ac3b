"""Hyperparameter-search speed: trials per hour with pruning, and the time 100 trials imply.

Runs `stellarparams.tune.tune` (TPE + successive halving, the paper's 30 epochs per trial) on
a synthetic dataset of --n-train training spectra x 4000 pixels (or on --dataset), then prints
what was used, trials/hour, epochs trained per trial and the implied time of 100 trials:
  measured:  100 trials at this run's rate (few trials: the first ones are pruned less,
             and the paper-default reference trial always runs all epochs);
  expected:  100 trials at the long-run cost of successive halving (r, 3r, 9r, ... keeping
             the best third: ~7 of 30 epochs per trial) and this run's seconds per epoch;
  scaled:    the expected time at the paper's 30,000 training spectra (epoch time ~ rows).

    .venv/bin/python bench/tune_speed.py [--n-train 2000] [--trials 6] [--epochs 30] [--threads 2]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from stellarparams.dataset import Dataset, write_dataset
from stellarparams.tune import make_pruner, tune

PAPER_TRAIN = 30_000


def synthetic(path, n_train, n_pix=4000, seed=0):
    """Smooth random spectra with labels that depend on them (so losses fall and pruning has signal)."""
    rng = np.random.default_rng(seed)
    n_val = max(50, n_train // 6)
    n = n_train + n_val
    basis = np.cos(np.outer(np.linspace(0, np.pi, n_pix), np.arange(12)))     # (P, 12) smooth shapes
    coef = rng.normal(size=(n, 12))
    X = coef @ basis.T + 0.05 * rng.normal(size=(n, n_pix))
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    y = coef[:, :3] * [500, 0.5, 0.5] + [6000, -1, 4] + rng.normal(size=(n, 3)) * [50, 0.05, 0.05]
    split = np.array(["train"] * n_train + ["val"] * n_val)
    write_dataset(path, X.astype(np.float32), y, split).close()


def asha_epochs_per_trial(epochs, reduction=3):
    """Long-run mean epochs per trial of the pruner: a 1/3**k fraction passes rung k."""
    r = make_pruner(epochs)._min_resource
    rungs = [r * reduction ** k for k in range(20) if r * reduction ** k < epochs]
    edges = rungs + [epochs]
    return edges[0] + sum((edges[k + 1] - edges[k]) / reduction ** (k + 1) for k in range(len(rungs)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", help="a prepared dataset to search on (default: synthetic)")
    ap.add_argument("--n-train", type=int, default=2000, help="training spectra of the synthetic dataset")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.dataset or Path(tmp) / "ds"
        if not args.dataset:
            synthetic(data, args.n_train)
        with Dataset(data) as ds:
            n_train, n_val, n_pix = len(ds.indices("train")), len(ds.indices("val")), ds.n_pix
        t0 = time.perf_counter()
        tune(data, Path(tmp) / "out", trials=args.trials, epochs=args.epochs, threads=args.threads, progress=False)
        wall = time.perf_counter() - t0
        s = json.loads((Path(tmp) / "out" / "summary.json").read_text())

    c, cost = s["trials"], s["cost"]
    n_done = c["complete"] + c["pruned"]
    per_epoch = cost["seconds"] / max(1, cost["epochs_trained"])
    expected = asha_epochs_per_trial(args.epochs)
    print(f"dataset: {'synthetic' if not args.dataset else args.dataset}, {n_train} train (+2 noisy copies) / "
          f"{n_val} val spectra x {n_pix} pixels; {args.epochs} epochs per trial; {args.threads} torch threads")
    print(f"trials: {n_done} ({c['complete']} complete, {c['pruned']} pruned) in {wall:.0f} s wall, "
          f"{cost['epochs_trained']} epochs trained = {cost['epochs_trained'] / n_done:.1f} per trial "
          f"({100 * cost['fraction_of_unpruned']:.0f}% of unpruned); {per_epoch:.2f} s per epoch")
    rate = 3600 * n_done / wall
    print(f"trials per hour (measured): {rate:.1f}  ->  100 trials: {100 / rate:.1f} h")
    exp_h = 100 * expected * per_epoch / 3600
    print(f"expected long-run cost with pruning: {expected:.1f} of {args.epochs} epochs per trial "
          f"({100 * expected / args.epochs:.0f}%)  ->  100 trials: {exp_h:.1f} h "
          f"({100 * expected / args.epochs:.0f} full trainings' worth instead of 100)")
    scale = PAPER_TRAIN / n_train
    print(f"scaled to the paper's {PAPER_TRAIN:,} training spectra (x{scale:.1f} per epoch): 100 trials ~ "
          f"{exp_h * scale:.1f} h on this machine")


if __name__ == "__main__":
    main()
