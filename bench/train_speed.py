"""Training speed: time per batch of `stellarparams.train.train` vs a bare PyTorch loop.

Prints ms/batch for both and the implied time of the paper's schedule
(30,000 spectra x 3 copies = 90,000 per epoch, 30 epochs, batch 256). Target: <= 5 min.

    .venv/bin/python bench/train_speed.py [--n 4000] [--threads 2]
"""
import argparse
import math
import tempfile
import time

import numpy as np
import torch

from stellarparams.config import ModelConfig
from stellarparams.dataset import write_dataset
from stellarparams.model import StellarNet
from stellarparams.train import TrainConfig, train
from stellarparams.training import masked_huber


def bare_loop(n_batches, batch=256, n_in=4000):
    net = StellarNet(ModelConfig(n_in=n_in))
    opt = torch.optim.AdamW(net.parameters(), lr=7e-4, weight_decay=0.01)
    x, y = torch.randn(batch, n_in), torch.randn(batch, 3)
    w = torch.ones(3)
    net.train()
    for i in range(n_batches + 5):
        if i == 5:
            t0 = time.perf_counter()
        loss = masked_huber(net(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n_batches


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="training spectra (x3 with the noisy copies)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, p = args.n, 4000
    n_val = max(256, n // 6)
    flux = rng.standard_normal((n + n_val, p), dtype=np.float32)
    labels = np.c_[rng.uniform(4000, 9500, n + n_val), rng.uniform(-4, 0.5, n + n_val), rng.uniform(0, 5, n + n_val)]
    split = np.r_[np.zeros(n, np.uint8), np.ones(n_val, np.uint8)]
    bare = bare_loop(60)
    with tempfile.TemporaryDirectory() as tmp:
        ds = write_dataset(tmp + "/ds", flux, labels, split)
        tc = TrainConfig(epochs=1, threads=args.threads, calib_folds=0)  # the loop alone, no out-of-fold models
        t0 = time.perf_counter()
        model = train(ds, None, train_config=tc, progress=False)
        total = time.perf_counter() - t0
        ds.close()
    steps = math.ceil(3 * n / 256)
    per_batch = model.history[0]["seconds"] / steps
    paper_steps = math.ceil(90_000 / 256) * 30
    print(f"threads {args.threads}, {n} train spectra x 3 = {3 * n} per epoch, {steps} batches of 256")
    print(f"bare loop          : {bare * 1e3:7.1f} ms/batch  -> paper schedule {bare * paper_steps / 60:5.1f} min")
    print(f"train() (1 epoch)  : {per_batch * 1e3:7.1f} ms/batch  -> paper schedule {per_batch * paper_steps / 60:5.1f} min "
          f"(target <= 5 min; includes augmentation and validation)")
    print(f"train() overhead vs bare loop: x{per_batch / bare:.2f}; whole call incl. data load {total:.1f} s")


if __name__ == "__main__":
    main()
