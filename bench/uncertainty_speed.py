"""Inference speed with calibrated uncertainties on, next to the plain network, on prepared arrays.

Target (2-core machine): with uncertainties (sigma + ood_score + flags) >= 10,000 spectra/s.
The network is the paper's default (542,771 parameters, untrained weights: speed only); the
calibration is fitted on random arrays (speed does not depend on its values). Also prints
the one-off calibration time that `train` adds after training.

    .venv/bin/python bench/uncertainty_speed.py [--n 30000] [--threads 2] [--passes 16]
"""
import argparse
import os
import time

import numpy as np
import torch

from stellarparams import uncertainty
from stellarparams.config import ModelConfig
from stellarparams.dataset import Grid
from stellarparams.model import StellarNet
from stellarparams.model_io import Model


def best_rate(fn, n, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30_000, help="spectra per timed run")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--passes", type=int, default=uncertainty.N_PASSES, help="MC-dropout passes")
    ap.add_argument("--batch-size", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model(StellarNet(ModelConfig()), ["teff", "feh", "logg"], [6000, -1, 3.5], [1500, 0.8, 1.2],
                  model_config=ModelConfig(), label_units=["K", "dex", "dex"], grid=Grid().to_dict())
    rng = np.random.default_rng(1)
    X = rng.standard_normal((args.n, 4000), dtype=np.float32)
    y = np.column_stack([rng.uniform(4000, 9000, 20000), rng.uniform(-3, 0.5, 20000), rng.uniform(0, 5, 20000)])
    t0 = time.perf_counter()
    n_fit = min(12000, args.n)
    model.uncertainty = uncertainty.fit_uncertainty(model, X[:n_fit], y[:n_fit], X[-5000:], y[:5000],
                                                    n_passes=args.passes)
    fit_s = time.perf_counter() - t0
    model.predict(X[:2048])
    model.predict_full(X[:2048])
    plain = best_rate(lambda: model.predict(X, batch_size=args.batch_size), args.n)
    full = best_rate(lambda: model.predict(X, batch_size=args.batch_size, return_sigma=True), args.n)
    table = best_rate(lambda: model.predict_full(X, batch_size=args.batch_size), args.n)
    print(f"{args.n} prepared spectra x 4000 px, batch {args.batch_size}, {args.threads} threads, "
          f"T = {args.passes} MC-dropout passes (stem computed once)")
    print(f"plain network inference:                {plain:10,.0f} spectra/s")
    print(f"with sigma + ood_score + flags:         {full:10,.0f} spectra/s  "
          f"({'PASS' if full >= 10_000 else 'FAIL'}: target >= 10,000)")
    print(f"predict_full (DataFrame):               {table:10,.0f} spectra/s")
    print(f"calibration fit (once, after training, without the out-of-fold models; 12k train / 5k val rows): {fit_s:.1f} s")


if __name__ == "__main__":
    main()
