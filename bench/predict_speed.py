"""Prediction speed: network inference on prepared arrays, and `predict` end to end from FITS.

Targets (2-core machine): inference >= 50,000 spectra/s; end to end >= 1,000 spectra/s.
The network is the paper's default (542,771 parameters, untrained weights: speed only).

    .venv/bin/python bench/predict_speed.py [--n-arrays 30000] [--n-files 3000] [--workers 2]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stellarparams.surveys import sdss
from stellarparams.dataset import Grid
from stellarparams.model import ModelConfig, StellarNet
from stellarparams.model_io import Model
from stellarparams.predict import predict
from stellarparams.preprocess import PrepareConfig


def default_model():
    torch.manual_seed(0)
    return Model(StellarNet(ModelConfig()), ["teff", "feh", "logg"], [6000, -1, 3.5], [1500, 0.8, 1.2],
                 model_config=ModelConfig(), label_units=["K", "dex", "dex"],
                 label_ranges={"teff": [4000, 9500], "feh": [-4, 0.7], "logg": [0, 5]},
                 grid=Grid().to_dict(), prepare_config=PrepareConfig().to_dict())


def write_files(folder, n):
    rng = np.random.default_rng(0)
    loglam = 3.5790 + 1e-4 * np.arange(3850)
    lam = 10 ** loglam
    for i in range(n):
        f = 50 * (lam / 5000) ** rng.uniform(-2, 0) * (1 - 0.4 * np.exp(-0.5 * ((lam - 6565) / 6) ** 2))
        err = f / rng.uniform(5, 50)
        sdss.write_spec_lite(Path(folder) / f"{1000 + i // 1000:04d}" / f"spec-{1000 + i // 1000:04d}-52000-{i % 1000 + 1:04d}.fits",
                             loglam, f + rng.normal(size=f.size) * err, 1 / err ** 2, plate=1000 + i // 1000, mjd=52000,
                             fiberid=i % 1000 + 1, z=rng.normal(0, 3e-4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-arrays", type=int, default=30_000)
    ap.add_argument("--n-files", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = default_model()
    X = np.random.default_rng(1).standard_normal((args.n_arrays, 4000), dtype=np.float32)
    model.predict(X[:2048])  # warm-up
    for bs in (1024, 4096):
        best, cpu = float("inf"), float("inf")
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            model.predict(X, batch_size=bs)
            best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        print(f"network inference, batch {bs:5d}, {args.threads} threads: {args.n_arrays / best:9,.0f} spectra/s "
              f"(target >= 50,000; {args.n_arrays / cpu:,.0f} per CPU-second)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_files(tmp + "/spectra", args.n_files)
        print(f"(wrote {args.n_files} lite FITS files in {time.perf_counter() - t0:.1f} s)")
        c0 = time.process_time()
        s1 = predict(model, [tmp + "/spectra/1000"], tmp + "/one.csv", workers=0, progress=False)
        per = (time.process_time() - c0) / s1["n_files"]
        print(f"predict in one process: {1 / per:,.0f} spectra per CPU-second "
              f"(read + preprocess + network; x2 cores -> {2 / per:,.0f}/s)")
        s = predict(model, [tmp + "/spectra"], tmp + "/out.parquet", workers=args.workers, progress=False)
        print(f"predict end to end from FITS, {args.workers} workers: {s['spectra_per_s']:9,.0f} spectra/s "
              f"({s['n_predicted']} of {s['n_files']} predicted in {s['seconds']:.1f} s; target >= 1,000)")


if __name__ == "__main__":
    main()
