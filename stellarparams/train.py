"""Train the residual multitask network exactly as METHOD.md "Training" describes.

One plain loop: batch -> (noise for augmented copies) -> forward -> masked, weighted Huber
-> backward -> AdamW step -> LR schedule; after each epoch: validation, log, checkpoint.

- Targets: RobustScaler (median, IQR) per label, fitted on the training split only.
- Augmentation: every training spectrum appears 1 + n_augment times per epoch; copy k >= 1
  gets Gaussian noise of std l_k * sigma_S (sigma_S the spectrum's std, l_k ~ U(1%, 5%)
  drawn once per copy). The noise itself is drawn fresh per batch in torch *(ours: the paper
  stores two fixed noisy copies; fresh draws need no 2x extra memory)*.
- Loss: sum over labels of w_l * mean Huber(delta) over rows where label l is known,
  w_l = 1 / var(scaled training labels l). Rows with a missing label train the others.
- AdamW; linear warm-up over warmup_frac of all steps, cosine decay to lr_floor * lr.
- The weights with the best validation loss are kept.
- Then the per-star uncertainties and extrapolation flags are calibrated and saved with the
  model (stellarparams.uncertainty). The sigma coefficients are fitted on held-out residuals:
  the final model's on the validation split plus out-of-fold ones for every training star
  (``calib_folds`` = K extra models with the same config, each trained without 1/K of the
  training stars and predicting them; K = 3 costs 2x the training time again). 0 fits on the
  validation split alone (no extra training; too few stars there gives too-narrow tails).
- Resumable: after each epoch OUT/checkpoint.safetensors holds weights, best weights and
  AdamW moments as tensors, the rest (epoch, history, scheduler) as JSON in its metadata.
  Per-epoch random streams derive from (seed, epoch), so a resumed run equals an
  uninterrupted one.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import __version__
from .dataset import Dataset
from .model import ModelConfig, StellarNet, config_from_dict, count_parameters

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.csv"


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are the paper's (METHOD.md "Training")."""

    lr: float = 7e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    epochs: int = 30
    warmup_frac: float = 0.05     # fraction of all steps with linear warm-up
    lr_floor: float = 0.01        # cosine decays to lr_floor * lr (ours: the paper gives no value)
    huber_delta: float = 1.0
    n_augment: int = 2            # noisy copies per training spectrum
    noise_min: float = 0.01       # noise std as a fraction of the spectrum's std
    noise_max: float = 0.05
    seed: int = 0
    threads: int | None = None    # torch threads (None: torch's default)
    eval_batch_size: int = 4096
    calib_folds: int = 3          # out-of-fold models for the sigma calibration (0: validation split only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, "train")


def load_config(path) -> tuple[ModelConfig, TrainConfig]:
    """Read a TOML file with optional ``[model]`` (and ``[model.heads]``) and ``[train]`` tables.

    Example::

        [model]
        stem_width = 96
        block_widths = [64, 32]
        [model.heads]
        teff = [48, 32]
        logg = [48]
        [train]
        epochs = 20
    """
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config ({e})") from e
    unknown = set(d) - {"model", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; use [model] and [train]")
    try:
        return ModelConfig.from_dict(d.get("model", {})), TrainConfig.from_dict(d.get("train", {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def lr_factor(step: int, total_steps: int, warmup_frac: float = 0.05, floor: float = 0.01) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up (step+1)/W over the first W = max(1, round(warmup_frac * total)) steps,
    reaching 1 at step W-1; then cosine from 1 at step W to ``floor`` at the last step.
    """
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def loss_weights(y_scaled: np.ndarray) -> np.ndarray:
    """(N, L) scaled training targets (NaN = missing) -> (L,) inverse population variances."""
    var = np.nanvar(np.asarray(y_scaled, np.float64), axis=0)
    if np.any(~np.isfinite(var) | (var <= 0)):
        raise ValueError(f"a label has no spread in the training split (variances {var.tolist()}); cannot weight it")
    return 1.0 / var


def masked_huber(pred, target, weights, delta: float = 1.0):
    """Sum over labels of weights[l] * mean Huber over rows where target[:, l] is finite.

    pred, target: (B, L) scaled units; weights: (L,). Returns a scalar tensor.
    """
    known = torch.isfinite(target)
    t = torch.where(known, target, pred.detach())
    per = F.huber_loss(pred, t, delta=delta, reduction="none") * known
    per_label = per.sum(0) / known.sum(0).clamp(min=1)
    return (per_label * weights).sum()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _fingerprint(model_config, train_config, labels, ds, net=None) -> str:
    arch = None if net is None else [type(net).__module__, type(net).__qualname__,
                                     net.to_dict() if hasattr(net, "to_dict") else count_parameters(net)]
    d = {"model": model_config.to_dict(), "net": arch, "train": {k: v for k, v in train_config.to_dict().items() if k != "threads"},
         "labels": labels, "data": [ds.attrs.get("input_hash") or str(ds.path.resolve()), ds.n]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(path, net, best_state, opt, sched, state: dict):
    from safetensors.torch import save_file

    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    osd = opt.state_dict()
    for i, s in osd["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = v.detach().reshape(v.shape).contiguous() if torch.is_tensor(v) else torch.tensor(v)
    state = dict(state, param_groups=osd["param_groups"], scheduler=sched.state_dict())
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, tmp, metadata={"state": json.dumps(state)})
    os.replace(tmp, path)


def _load_checkpoint(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        state = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return state, tensors


def _restore(net, opt, sched, state, tensors):
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    return best


def _write_log(path, history):
    tmp = Path(str(path) + ".tmp")
    pd.DataFrame(history).to_csv(tmp, index=False)
    os.replace(tmp, path)


def train(dataset, out=None, model_config: ModelConfig = None, train_config: TrainConfig = None, *, net=None,
          on_epoch=None, progress: bool = True, overwrite: bool = False):
    """Train on a prepared dataset's train split, select on its val split; return a Model.

    dataset: folder/path of a prepared dataset or a :class:`stellarparams.dataset.Dataset`.
    out: model folder (checkpoint, train_log.csv, then weights.safetensors + model.json);
        None writes nothing. Re-running with the same out resumes an interrupted run, and
        returns the finished model when it is already complete.
    model_config: architecture; its ``heads`` name the labels to learn (each must be a
        dataset label); ``n_in`` is set from the dataset.
    net: optional nn.Module (B, n_in) -> (B, L) used instead of StellarNet(model_config)
        (baselines); L = number of labels in model_config.heads.
    on_epoch: callback(epoch, val_loss, metrics) after every epoch; may raise (e.g.
        optuna.TrialPruned) to stop; the exception propagates.
    overwrite: a model or checkpoint in ``out`` from another config or dataset is discarded
        (instead of an error); `stellarparams run` uses this for its own model folder.
    """
    if isinstance(dataset, Dataset):
        return _train(dataset, out, model_config, train_config, net, on_epoch, progress, overwrite)
    with Dataset(dataset) as ds:  # closed even when on_epoch raises
        return _train(ds, out, model_config, train_config, net, on_epoch, progress, overwrite)


def _train(ds, out, model_config, train_config, net, on_epoch, progress, overwrite=False, rows=None,
           calibrate=True):
    from sklearn.preprocessing import RobustScaler
    from tqdm.auto import tqdm

    from .model_io import META, Model, load_model, save_model

    mc = model_config or ModelConfig()
    tc = train_config or TrainConfig()
    if tc.threads:
        torch.set_num_threads(int(tc.threads))
    labels = mc.labels
    missing = [l for l in labels if l not in ds.label_names]
    if missing:
        raise ValueError(f"{ds.path}: labels {missing} are not in the dataset (it has {ds.label_names}); "
                         "set the model's heads to the labels you want, e.g. [model.heads] in the TOML config")
    if mc.n_in != ds.n_pix:
        mc = replace(mc, n_in=ds.n_pix)
    cols = [ds.label_names.index(l) for l in labels]
    units = [ds.label_units[c] for c in cols]
    out = Path(out) if out is not None else None
    fingerprint = _fingerprint(mc, tc, labels, ds, net)

    if out is not None and (out / META).exists() and not (out / CHECKPOINT).exists():
        done = json.loads((out / META).read_text())
        if done.get("fingerprint") == fingerprint:
            if progress:
                print(f"{out}: already trained with this config and data; loading it (delete the folder to retrain)",
                      file=sys.stderr)
            model = load_model(out)
            if model.uncertainty is None:  # trained before calibration existed: add it now
                from .uncertainty import calibrate

                calibrate(model, ds, out, progress=progress)
            return model
        if not overwrite:
            raise ValueError(f"{out}: holds a model trained with another config or dataset; choose another --out, "
                             "delete the folder, or pass --overwrite (overwrite=True)")
        if progress:
            print(f"{out}: the config or dataset changed; training a new model", file=sys.stderr)
        for name in (META, "weights.safetensors", LOG):
            (out / name).unlink(missing_ok=True)

    # ---- data: one float32 tensor in memory; targets scaled on train only
    itr, iva = rows if rows is not None else (ds.indices("train"), ds.indices("val"))
    if len(itr) == 0 or len(iva) == 0:
        raise ValueError(f"{ds.path}: needs rows in both the train and val splits (has {len(itr)} train, {len(iva)} val)")
    Xtr, Xva = torch.from_numpy(ds.flux(itr)), torch.from_numpy(ds.flux(iva))
    for name, X in (("train", Xtr), ("val", Xva)):
        bad = int((~torch.isfinite(X).all(1)).sum())
        if bad:
            raise ValueError(f"{ds.path}: {bad} {name} rows have non-finite flux; re-prepare the dataset")
    ytr, yva = ds.labels(itr)[:, cols].astype(np.float64), ds.labels(iva)[:, cols].astype(np.float64)
    for j, l in enumerate(labels):
        if np.isfinite(ytr[:, j]).sum() < 2:
            raise ValueError(f"{ds.path}: label {l!r} is known for fewer than 2 training rows")
    scaler = RobustScaler().fit(ytr)  # NaN-aware: missing values are ignored in fit
    center, scale = scaler.center_, scaler.scale_
    Ytr = torch.tensor((ytr - center) / scale, dtype=torch.float32)
    Yva = torch.tensor((yva - center) / scale, dtype=torch.float32)
    weights = torch.tensor(loss_weights(Ytr.numpy()), dtype=torch.float32)
    label_ranges = {l: [float(np.nanmin(ytr[:, j])), float(np.nanmax(ytr[:, j]))] for j, l in enumerate(labels)}

    n_tr = len(itr)
    g0 = torch.Generator().manual_seed(tc.seed)
    row_std = Xtr.std(dim=1, unbiased=False)                               # sigma_S, (n_tr,)
    levels = torch.zeros(1 + tc.n_augment, n_tr)                           # copy 0 is the clean spectrum
    levels[1:] = tc.noise_min + (tc.noise_max - tc.noise_min) * torch.rand(tc.n_augment, n_tr, generator=g0)
    noise_std = levels * row_std                                           # (1 + n_augment, n_tr)

    # ---- model, optimizer, schedule
    torch.manual_seed(tc.seed)
    own_net = net is None   # out-of-fold calibration models can only be built for our own network
    net = StellarNet(mc) if own_net else net
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    n_items = n_tr * (1 + tc.n_augment)
    steps_per_epoch = math.ceil(n_items / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, tc.warmup_frac, tc.lr_floor))

    history, best_val, best_epoch, start_epoch, train_time = [], float("inf"), -1, 0, 0.0
    best_state = copy.deepcopy(net.state_dict())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / CHECKPOINT
        if ckpt.exists():
            state, tensors = _load_checkpoint(ckpt)
            if state.get("fingerprint") != fingerprint and overwrite:
                ckpt.unlink()
        if ckpt.exists():
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"{ckpt}: checkpoint of a run with another config or dataset; choose another --out "
                                 "or delete the checkpoint to start over")
            best_state = _restore(net, opt, sched, state, tensors)
            history, best_val, best_epoch = state["history"], state["best_val_loss"], state["best_epoch"]
            start_epoch, train_time = state["epoch"] + 1, state.get("train_time_s", 0.0)
            if progress:
                print(f"{out}: resuming after epoch {start_epoch} of {tc.epochs}", file=sys.stderr)

    def evaluate(X, Y, y_phys):
        net.eval()
        with torch.inference_mode():
            pred = torch.cat([net(X[i:i + tc.eval_batch_size]) for i in range(0, len(X), tc.eval_batch_size)])
            loss = float(masked_huber(pred, Y, weights, tc.huber_delta))
        p = pred.numpy().astype(np.float64) * scale + center
        mae = {f"mae_{l}": float(np.nanmean(np.abs(p[:, j] - y_phys[:, j]))) for j, l in enumerate(labels)}
        return loss, mae

    if progress:
        print(f"training {count_parameters(net):,} parameters on {n_tr} spectra (+{tc.n_augment} noisy copies), "
              f"validating on {len(iva)}; {tc.epochs} epochs x {steps_per_epoch} batches of {tc.batch_size}",
              file=sys.stderr)
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.perf_counter()
        es = _epoch_seed(tc.seed, epoch)
        g = torch.Generator().manual_seed(es)
        torch.manual_seed(es + 1)  # dropout
        perm = torch.randperm(n_items, generator=g)
        net.train()
        run_loss = torch.zeros(())
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress,
                   leave=False, unit="batch", mininterval=1.0)
        for b in bar:
            j = perm[b * tc.batch_size:(b + 1) * tc.batch_size]
            row, k = j % n_tr, j // n_tr
            x = Xtr[row]
            sigma = noise_std[k, row]
            noisy = sigma > 0
            if noisy.any():
                x[noisy] += torch.randn((int(noisy.sum()), x.shape[1]), generator=g) * sigma[noisy, None]
            loss = masked_huber(net(x), Ytr[row], weights, tc.huber_delta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.detach()
            if progress and b % 50 == 49:
                bar.set_postfix(loss=f"{float(run_loss) / (b + 1):.4f}")
        bar.close()
        train_loss = float(run_loss) / steps_per_epoch
        val_loss, mae = evaluate(Xva, Yva, yva)
        train_time += time.perf_counter() - t0
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(net.state_dict())
        row_log = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, **mae,
                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        history.append(row_log)
        if progress:
            maes = " ".join(f"{l} {mae['mae_' + l]:.4g}{(' ' + u) if u else ''}" for l, u in zip(labels, units))
            tqdm.write(f"epoch {epoch + 1:3d}/{tc.epochs}  train {train_loss:.4f}  val {val_loss:.4f}  "
                       f"val MAE: {maes}{'  *' if best_epoch == epoch else ''}", file=sys.stderr)
        if out is not None:
            _write_log(out / LOG, history)
            _save_checkpoint(out / CHECKPOINT, net, best_state, opt, sched,
                             {"epoch": epoch, "history": history, "best_val_loss": best_val, "best_epoch": best_epoch,
                              "train_time_s": train_time, "fingerprint": fingerprint, "version": __version__})
        if on_epoch is not None:
            on_epoch(epoch, val_loss, dict(mae, train_loss=train_loss))

    net.load_state_dict(best_state)
    net.eval()
    _, best_mae = evaluate(Xva, Yva, yva)
    metrics = {"best_epoch": best_epoch + 1, "val_loss": best_val, **{f"val_{k}": v for k, v in best_mae.items()},
               "loss_weights": dict(zip(labels, weights.tolist())), "train_time_s": train_time, "n_train": n_tr, "n_val": len(iva), "n_params": count_parameters(net)}
    model = Model(net, labels, center, scale, model_config=mc, train_config=tc, label_units=units,
                  label_ranges=label_ranges, grid=ds.attrs.get("grid"), prepare_config=ds.attrs.get("preprocess"),
                  metrics=metrics, history=history, dataset_hash=ds.attrs.get("input_hash", ""), seed=tc.seed,
                  best_val_loss=best_val, fingerprint=fingerprint)
    if calibrate:
        oof = None
        if tc.calib_folds >= 2 and own_net:
            t0 = time.perf_counter()
            oof = _out_of_fold(ds, itr, iva, mc, tc, out, fingerprint, progress)
            model.metrics["calib_folds_s"] = round(time.perf_counter() - t0, 1)
            if oof is not None:
                oof["y"] = ytr[np.searchsorted(itr, oof["rows"])]
        _calibrate(model, Xtr, ytr, Xva, yva, tc.seed, progress, oof)
    if out is not None:
        save_model(model, out)
        (out / CHECKPOINT).unlink(missing_ok=True)
        for f in out.glob("oof_*.npz"):
            f.unlink()
    if progress:
        print(f"best epoch {best_epoch + 1} (val loss {best_val:.4f}); trained in {train_time:.0f} s"
              + (f"; model written to {out}" if out else ""), file=sys.stderr)
    return model


def fold_of(groups, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of each row: all rows of a group (a star) share one fold, and
    the folds hold equal numbers of groups (+-1), shuffled with ``seed``."""
    uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    fold = np.empty(len(uniq), np.int64)
    fold[np.random.default_rng(seed).permutation(len(uniq))] = np.arange(len(uniq)) % k
    return fold[inv.reshape(-1)]


def _out_of_fold(ds, itr, iva, mc, tc, out, fingerprint, progress):
    """Out-of-fold predictions for every training row, for the sigma calibration.

    The training stars (dataset object_id) go into K folds; model k (same config, selected on
    val) is trained without fold k and predicts it with MC dropout. Returns dict(rows, pred,
    s_mc (physical units), noise), or None when there are fewer than K stars. Each finished
    fold is kept in OUT/oof_<fingerprint>_fold<k>.npz, so a killed run resumes there.
    """
    from tqdm.auto import tqdm

    from .uncertainty import raw_uncertainty

    K = int(tc.calib_folds)
    groups = ds.meta(itr)["object_id"].to_numpy()
    if len(np.unique(groups)) < K:
        return None
    folds = fold_of(groups, K, tc.seed)
    bar = tqdm(total=K * tc.epochs, desc=f"calibration: {K} out-of-fold models", unit="epoch",
               disable=not progress, mininterval=1.0)
    parts = []
    for k in range(K):
        path = out / f"oof_{fingerprint[:16]}_fold{k}.npz" if out is not None else None
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as z:
                parts.append({name: z[name] for name in z.files})
            bar.update(tc.epochs)
            continue
        held = itr[folds == k]
        fm = _train(ds, None, mc, replace(tc, calib_folds=0), None, lambda *a: bar.update(1), False,
                    rows=(itr[folds != k], iva), calibrate=False)
        pred, s_mc, noise = raw_uncertainty(fm.net, ds.flux(held), seed=tc.seed)
        parts.append(dict(rows=held, pred=pred * fm.scale + fm.center, s_mc=s_mc * fm.scale, noise=noise))
        if path is not None:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **parts[-1])
            os.replace(tmp, path)
    bar.close()
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _calibrate(model, Xtr, ytr, Xva, yva, seed, progress, oof=None):
    """Fit the uncertainty calibration (sets model.uncertainty); a failure only warns."""
    import warnings

    from .uncertainty import fit_uncertainty

    t0 = time.perf_counter()
    try:
        u = fit_uncertainty(model, Xtr, ytr, Xva, yva, seed=seed, oof=oof)
    except (ValueError, RuntimeError) as e:
        warnings.warn(f"uncertainty calibration failed ({e}); the model predicts without sigma", stacklevel=3)
        return
    model.metrics["calibration_s"] = round(time.perf_counter() - t0, 2)
    if progress:
        print(u.summary(model.metrics["calibration_s"]), file=sys.stderr)


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser):
    p.description = ("Train the residual multitask network (arXiv:2606.13868) on a prepared dataset. "
                     "Defaults are the paper's: AdamW 7e-4, weight decay 0.01, batch 256, 30 epochs, "
                     "5% warm-up + cosine, Huber(1) weighted by inverse label variance, 2 noisy copies per "
                     "spectrum. Then 3 out-of-fold models (each without a third of the training stars) calibrate "
                     "the per-star error bars: 2x the training time again. Killed mid-run, the same command "
                     "resumes from OUT/checkpoint.safetensors and the finished folds.")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (from `stellarparams prepare`)")
    p.add_argument("--out", required=True, help="model folder to write (weights.safetensors, model.json, train_log.csv)")
    p.add_argument("--config", help="TOML file with [model] and [train] tables overriding the defaults")
    p.add_argument("--epochs", type=int, help="override [train] epochs")
    p.add_argument("--seed", type=int, help="override [train] seed")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--calib-folds", type=int, dest="calib_folds",
                   help="out-of-fold models whose residuals calibrate the sigmas (default 3: 2x the training time "
                        "again); 0 calibrates on the validation split alone")
    p.add_argument("--labels", help="comma-separated labels to learn (default: those of the config heads)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model or checkpoint in --out that was trained with another config or dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args) -> int:
    mc, tc = load_config(args.config) if args.config else (ModelConfig(), TrainConfig())
    over = {k: getattr(args, k) for k in ("epochs", "seed", "threads", "calib_folds") if getattr(args, k) is not None}
    tc = replace(tc, **over)
    if args.labels:
        wanted = [s.strip() for s in args.labels.split(",") if s.strip()]
        mc = replace(mc, heads={l: mc.heads.get(l, (48,)) for l in wanted})
    try:
        model = train(args.dataset, args.out, mc, tc, progress=not args.quiet, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = model.metrics
    print(f"{args.out}: best epoch {m['best_epoch']}, val loss {m['val_loss']:.4f}, " +
          ", ".join(f"val MAE {l} {m['val_mae_' + l]:.4g} {u}".rstrip() for l, u in zip(model.label_names, model.label_units)))
    return 0
