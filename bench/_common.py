"""What the fine-tuning benches share (bench/transfer.py, bench/partial.py).

Their options, the source model trained on simulated SDSS, the draw of a few training stars,
the training config of one seed, a network fitted (or fine-tuned) on those stars and its
predictions, the mean +- std cells of their tables, and WORK/NAME.json/.md at the end.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stellarparams.config import ModelConfig, recipe
from stellarparams.dataset import Dataset
from stellarparams.files import write_text
from stellarparams.prepare import prepare
from stellarparams.simulate import simulate
from stellarparams.train import source_init, train
from stellarparams.training import fit

LABELS = ["teff", "feh", "logg"]
TRUE = [f"{l.upper()}_TRUE" for l in LABELS]


def add_options(p, *, work: str, n_source: int, source_epochs: int, n_target: int, epochs: int, workers: int):
    """The options both benches take (with their own defaults)."""
    p.add_argument("--work", default=work, help="where the surveys, datasets, models and results go")
    p.add_argument("--source-model", help="a trained model folder to start from (default: train one on simulated SDSS)")
    p.add_argument("--n-source", type=int, default=n_source, help="spectra of the simulated SDSS survey")
    p.add_argument("--source-epochs", type=int, default=source_epochs,
                   help="epochs of the source model (default recipe)")
    p.add_argument("--n-target", type=int, default=n_target, help="spectra of each simulated target survey")
    p.add_argument("--stars", type=int, default=100, help="training stars of the target survey (all their spectra)")
    p.add_argument("--epochs", type=int, default=epochs, help="epochs of the fine-tuned and the from-scratch models")
    p.add_argument("--seeds", default="0,1,2", help="seeds: the draw of the training stars and the training")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=workers)


def parse(p, argv):
    """The parsed options, ``seeds`` as a list of ints; torch set to ``--threads``."""
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(a.threads)
    return a


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


def stars_rows(ds: Dataset, n_stars: int, seed: int) -> np.ndarray:
    """Rows of ``n_stars`` training stars (all their spectra), drawn with ``seed``."""
    itr = ds.indices("train")
    stars = ds.meta(itr)["object_id"].to_numpy()
    keep = np.random.default_rng(1000 + seed).choice(np.unique(stars), n_stars, replace=False)
    return itr[np.isin(stars, keep)]


def train_config(seed: int, a, source: Path | None = None, model=None):
    """The default recipe of one seed (``--epochs``, ``--threads``, no calibration folds); with ``source``
    (a model folder, loaded as ``model``) started from its weights, as ``train --init-from`` records it."""
    start = {} if source is None else {"init_from": str(source), "init_sha256": model.weights_sha256}
    return recipe("default", seed=seed, calib_folds=0, threads=a.threads, epochs=a.epochs, **start)


def predict(net, center, scale, X, batch=4096) -> np.ndarray:
    """(N, L) physical-unit predictions of a fitted network for flux ``X`` (N, P)."""
    net.eval()
    with torch.inference_mode():
        out = torch.cat([net(torch.from_numpy(X[i:i + batch])) for i in range(0, len(X), batch)])
    return out.numpy().astype(np.float64) * scale + center


def fit_predict(ds: Dataset, rows, va, mc, tc, X, fitted: list | None = None) -> np.ndarray:
    """Train ``mc`` on ``rows`` (``va`` selects the epoch), started from ``tc.init_from`` when set (fine-tuning,
    the stem fresh on another grid), and predict ``X``; the :class:`~stellarparams.training.Fitted` is
    appended to ``fitted`` when given."""
    f = fit(ds, (rows, va), mc, tc, init=source_init(tc, mc, ds))
    if fitted is not None:
        fitted.append(f)
    return predict(f.net, f.center, f.scale, X)


def cell(values, decimals: int) -> str:
    """``mean ± std`` of ``values`` (None left out) to ``decimals``; the mean alone for one value, "-" for none."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{np.mean(v):.{decimals}f}" + (f" ± {np.std(v):.{decimals}f}" if len(v) > 1 else "")


def finish(work: Path, name: str, out: dict, format_table, t0: float) -> int:
    """Record the seconds since ``t0``, write WORK/NAME.json and the table (``format_table(out)``) to
    WORK/NAME.md, print the table; 0."""
    out["seconds"] = round(time.perf_counter() - t0)
    write_text(work / f"{name}.json", json.dumps(out, indent=1, default=str))
    table = format_table(out)
    write_text(work / f"{name}.md", table + "\n")
    print(table)
    print(f"{out['seconds']} s", file=sys.stderr)
    return 0
