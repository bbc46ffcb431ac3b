"""GPU check: the default model and recipe on a synthetic dataset, on CUDA when present, next to the CPU.

For each device: trains the default network with the default recipe (physical augmentation on)
for a few epochs and prints the time of one epoch (the median epoch), then inference
spectra/s of ``Model.predict`` without sigma and with sigma (16 MC-dropout passes + flags).
Needs no survey: the spectra are smooth functions of three labels plus noise, written with
``stellarparams.dataset.write_dataset`` (with ``offset=``, which the augmentation needs).
Without CUDA it says so and prints the CPU numbers only.

    .venv/bin/python bench/gpu_check.py [--n 4000] [--epochs 2] [--threads 2] [--precision fp32]
"""
import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stellarparams.config import ModelConfig, recipe
from stellarparams.dataset import write_dataset
from stellarparams.train import train

N_PIX = 4000


def synthetic(folder, n, seed=0):
    """A prepared dataset of n spectra on the default grid (60/20/20 split)."""
    rng = np.random.default_rng(seed)
    y = np.c_[rng.uniform(4000, 9000, n), rng.uniform(-2.5, 0.5, n), rng.uniform(1, 5, n)]
    z = (y - [6500, -1, 3]) / [1500, 0.9, 1.2]
    A = np.random.default_rng(99).normal(size=(3, N_PIX)).astype(np.float32)
    X = np.tanh(z.astype(np.float32) @ A) + 0.05 * rng.standard_normal((n, N_PIX), dtype=np.float32)
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    split = np.repeat([0, 1, 2], [int(0.6 * n), int(0.2 * n), n - int(0.6 * n) - int(0.2 * n)])
    return write_dataset(folder, X, y.astype(np.float32), split, offset=rng.uniform(2, 5, n).astype(np.float32))


def per_second(fn, n, repeats=3):
    fn()  # warm-up (CUDA kernels, caches)
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def check(ds, device, epochs, precision):
    tc = replace(recipe("default"), epochs=epochs, calib_folds=0)
    t0 = time.perf_counter()
    model = train(ds, None, ModelConfig(n_in=N_PIX), tc, progress=False, device=device,
                  precision=precision if device != "cpu" else "fp32")
    total = time.perf_counter() - t0
    epoch_s = float(np.median([h["seconds"] for h in model.history]))
    X = ds.flux(ds.indices("test"))
    plain = per_second(lambda: model.predict(X), len(X))
    sigma = per_second(lambda: model.predict(X, return_sigma=True), len(X))
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    print(f"{device:8s} {name:28s} epoch {epoch_s:7.2f} s ({ds.n * 6 // 10 * (1 + tc.n_augment)} items; train + "
          f"calibrate {total:.0f} s)   predict {plain:9,.0f} spectra/s   with sigma {sigma:9,.0f} spectra/s")
    return {"device": device, "name": name, "epoch_s": epoch_s, "predict_per_s": plain, "sigma_per_s": sigma}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="synthetic spectra (60%% train, 20%% val, 20%% test)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs per device")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast on CUDA")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("no CUDA device on this machine (torch.cuda.is_available() is False): CPU numbers only")
    with tempfile.TemporaryDirectory() as work:
        with synthetic(Path(work) / "ds", args.n) as ds:
            print(f"default model and recipe, {args.n} synthetic spectra of {N_PIX} pixels, {args.epochs} epochs, "
                  f"torch {torch.__version__}, {args.threads} CPU threads")
            for d in devices:
                check(ds, d, args.epochs, args.precision)


if __name__ == "__main__":
    main()
