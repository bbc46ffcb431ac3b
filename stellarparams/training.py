"""The plain training loop of docs/method.md, section "Training": data + net in, weights + history out.

One loop: batch -> (noise for augmented copies) -> forward -> masked, weighted Huber
-> backward -> AdamW step -> LR schedule; after each epoch: validation, log, checkpoint.

- Targets: RobustScaler (median, IQR) per label, fitted on the training rows only.
- Augmentation: every training spectrum appears 1 + n_augment times per epoch; copy k >= 1
  gets Gaussian noise of std l_k * sigma_S (sigma_S the spectrum's std, l_k ~ U(1%, 5%)
  drawn once per copy). The noise itself is drawn fresh per batch in torch *(ours: the paper
  stores two fixed noisy copies; fresh draws need no 2x extra memory)*.
- Loss: sum over labels of w_l * mean Huber(delta) over rows where label l is known,
  w_l = 1 / var(scaled training labels l). Rows with a missing label train the others. A
  label no training row knows is an error from scratch; starting from a model
  (``init``), its head must be frozen (``train`` does so), and on the same grid its targets
  are the source network's own outputs for the training spectra (learning without
  forgetting, Li & Hoiem 2016): the trunk learns the new labels while keeping what the frozen
  heads read from it (without them, the frozen heads' errors grew by half: docs/benchmarks.md).
- AdamW; linear warm-up over warmup_frac of all steps, cosine decay to lr_floor * lr.
- The weights with the best validation loss are kept.
- Resumable: after each epoch the checkpoint file holds weights, best weights and AdamW
  moments as tensors, the rest (epoch, history, scheduler) as JSON in its metadata.
  Per-epoch random streams derive from (seed, epoch), so a resumed run equals an
  uninterrupted one.

No model folders here: `stellarparams.train` (the command) saves; `stellarparams.calibrate`
trains its out-of-fold models with the same :func:`fit`.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._version import __version__
from .augment import Neighbours, mix
from .config import ModelConfig, TrainConfig
from .context import Run
from .devices import autocast, to_device
from .files import atomic_write, write_text
from .finetune import apply_init
from .model import Ensemble, StellarNet, count_parameters

LOG = "train_log.csv"      # the per-epoch history, beside the checkpoint


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


def label_matrix(ds, rows, labels) -> np.ndarray:
    """(N, L) float64 labels of ``rows`` in ``labels`` order; NaN where unknown, and for a label the dataset lacks."""
    y = ds.labels(rows)
    return np.stack([y[:, ds.label_names.index(l)].astype(np.float64) if l in ds.label_names
                     else np.full(len(y), np.nan) for l in labels], axis=1).reshape(len(y), len(labels))


def known_counts(ds, rows, labels) -> list:
    """How many of ``rows`` know each label (0 for a label the dataset lacks)."""
    return [int(n) for n in np.isfinite(label_matrix(ds, rows, labels)).sum(0)]


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


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(path, net, best_state, opt, sched, state: dict, ema=None):
    """Weights, best weights and optimizer moments as tensors; ``state`` + schedule as JSON metadata."""
    from safetensors.torch import save

    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best_state.items()})
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for i, s in osd["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous() if torch.is_tensor(v) else torch.tensor(v)
    state = dict(state, param_groups=osd["param_groups"], scheduler=sched.state_dict())
    data = save(tensors, metadata={"state": json.dumps(state)})
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def load_checkpoint(path) -> tuple[dict, dict]:
    """(state dict of JSON metadata, tensors) of a checkpoint file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        state = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return state, tensors


def _restore(net, opt, sched, state, tensors, ema=None):
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    return best


# ---------------------------------------------------------------------- the loop
@dataclass
class Fitted:
    """What :func:`fit` returns: the network holding its best-validation weights, and its record."""

    net: torch.nn.Module
    labels: list
    center: np.ndarray                 # (L,) RobustScaler median of the training labels
    scale: np.ndarray                  # (L,) RobustScaler IQR
    label_ranges: dict                 # {label: [min, max]} in the training rows
    history: list                      # one dict per epoch
    best_val_loss: float
    metrics: dict = field(default_factory=dict)


def fit(ds, rows, model_config: ModelConfig, train_config: TrainConfig, *, net=None, checkpoint=None,
        fingerprint: str = "", on_epoch=None, init=None, target_loss=None, run: Run | None = None,
        progress: bool = False, device=None, precision: str = "fp32") -> Fitted:
    """Train one network on rows of a prepared dataset, keeping the best-validation weights.

    Parameters
    ----------
    ds : stellarparams.dataset.Dataset
        The prepared dataset (flux and labels are read from it).
    rows : (array, array)
        Row numbers of the training and the validation rows.
    model_config : ModelConfig
        Its ``heads`` name the labels (dataset labels); ``n_in`` must equal the pixels.
    train_config : TrainConfig
        Optimisation settings.
    net : torch.nn.Module, optional
        (B, n_in) -> (B, L) used instead of ``StellarNet(model_config)``.
    checkpoint : Path, optional
        Checkpoint file, written after every epoch; when it exists the run resumes from it.
    fingerprint : str
        Identity of the run kept in the checkpoint; a checkpoint of another run is refused.
    on_epoch : callable, optional
        ``on_epoch(epoch, val_loss, metrics)`` after every epoch; may raise to stop.
    init : stellarparams.finetune.Init, optional
        Start from another model's weights and target scaler (``train --init-from``), freezing the
        parts it names; the starting weights' validation loss is ``metrics["init_val_loss"]``.
    target_loss : callable, optional
        ``target_loss(net, teacher, x, g, device)`` -> a scalar added to every batch's loss (unlabeled
        target spectra, :class:`stellarparams.adapt.TargetLoss`; ``teacher``: the EMA network or None).
    run : stellarparams.context.Run, optional
        The three below as one object (then they are not read).
    progress : bool
        Progress bars and one line per epoch on stderr.
    device : str or torch.device, optional
        Where to train (None: ``"auto"``). The data stay on the CPU; each batch is moved there, and noise and
        augmentation run there from random numbers drawn on the CPU generator (the same streams on every
        device). The returned net lives there.
    precision : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA, with a gradient scaler): autocast of the forward passes.

    Returns
    -------
    Fitted
    """
    mc, tc = model_config, train_config
    run = (run or Run(progress=progress, device=device, precision=precision)).on_device()
    d = _data(ds, rows, mc, tc, init)
    batches = _Batches(ds, rows[0], d, tc)
    torch.manual_seed(tc.seed)
    net = StellarNet(mc) if net is None else net
    if init is not None:
        apply_init(net, init)
    net = net.to(run.device)
    steps = math.ceil(batches.n_items / tc.batch_size)   # per epoch
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps * tc.epochs, tc.warmup_frac, tc.lr_floor))
    scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None  # its state is not checkpointed
    # EMA of the weights (0: off, the paper): validated, selected and kept instead of the raw weights.
    # Its memory is capped at ~2 epochs (decay <= 1 - 0.5 / steps per epoch): with few stars there are
    # few steps, and a 0.998 average still lags the training at the last epoch (measured at 100 stars).
    ema = None if not tc.ema else torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(min(tc.ema, 1.0 - 0.5 / steps)))
    kept = net if ema is None else ema.module   # the weights that are validated and kept
    state = _resume(checkpoint, fingerprint, net, opt, sched, ema, kept, run, tc.epochs)

    def evaluate():  # the kept weights on the validation rows
        return validate(kept, d.Xva, d.Yva, d.yva, d.weights, d.center, d.scale, d.labels, tc, run)

    if init is not None and state.start_epoch == 0:  # where the source's weights start, before any step
        state.init_val = evaluate()[0]
        run.say(f"starting from the source model's weights: val loss {state.init_val:.4f}")
    run.say(f"training {count_parameters(net):,} parameters on {batches.n_tr} spectra (+{tc.n_augment} noisy "
                   f"copies), validating on {len(d.Yva)}; {tc.epochs} epochs x {steps} batches of {tc.batch_size}")
    step = _Step(net, opt, sched, scaler, ema, d.weights.to(run.device), tc, run, target_loss)
    for epoch in range(state.start_epoch, tc.epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(step, batches, epoch, steps)
        val_loss, mae = evaluate()
        state.end_epoch(epoch, kept, train_loss, val_loss, mae, opt.param_groups[0]["lr"], time.perf_counter() - t0)
        if run.progress:
            _print_epoch(epoch, tc.epochs, train_loss, val_loss, mae, d, state.best_epoch == epoch)
        if checkpoint is not None:
            write_log(Path(checkpoint).parent / LOG, state.history)
            save_checkpoint(checkpoint, net, state.best_state, opt, sched, state.state(epoch, fingerprint), ema)
        if on_epoch is not None:
            on_epoch(epoch, val_loss, dict(mae, train_loss=train_loss))

    net.load_state_dict(state.best_state)   # the best weights
    net.eval()
    kept = net
    _, best_mae = evaluate()
    metrics = {"best_epoch": state.best_epoch + 1, "val_loss": state.best_val,
               **{f"val_{k}": v for k, v in best_mae.items()},
               "loss_weights": dict(zip(d.labels, d.weights.tolist())), "train_time_s": state.train_time,
               "n_train": batches.n_tr, "n_val": len(d.Yva), "n_params": count_parameters(net)}
    if state.init_val is not None:
        metrics["init_val_loss"] = state.init_val
    metrics.update({k: v for k, v in (("heads_kept_from_source", d.absent), ("heads_distilled", d.distilled)) if v})
    return Fitted(net, d.labels, d.center, d.scale, d.label_ranges, state.history, state.best_val, metrics)


@dataclass
class _Data:
    """The rows of one run as tensors: flux (N, P), scaled targets (N, L; NaN = missing), and what scales them."""

    labels: list
    units: list
    Xtr: torch.Tensor
    Xva: torch.Tensor
    Ytr: torch.Tensor
    Yva: torch.Tensor
    yva: np.ndarray           # validation labels in physical units
    center: np.ndarray
    scale: np.ndarray
    weights: torch.Tensor     # (L,) loss weight per label
    label_ranges: dict
    absent: list              # labels the training rows do not know (heads kept from the source)
    distilled: list           # of those, the heads whose targets are the source network's outputs


def _data(ds, rows, mc: ModelConfig, tc: TrainConfig, init) -> _Data:
    """Read the rows, check them and scale the targets on the training rows only (or with the source's scaler)."""
    from sklearn.preprocessing import RobustScaler

    labels = mc.labels
    units = [ds.label_units[ds.label_names.index(l)] if l in ds.label_names else "" for l in labels]
    itr, iva = rows
    if len(itr) == 0 or len(iva) == 0:
        raise ValueError(f"{ds.path}: needs rows in both the train and val splits (has {len(itr)} train, {len(iva)} val)")
    Xtr, Xva = torch.from_numpy(ds.flux(itr)), torch.from_numpy(ds.flux(iva))
    for name, X in (("train", Xtr), ("val", Xva)):
        bad = int((~torch.isfinite(X).all(1)).sum())
        if bad:
            raise ValueError(f"{ds.path}: {bad} {name} rows have non-finite flux; re-prepare the dataset")
    ytr, yva = label_matrix(ds, itr, labels), label_matrix(ds, iva, labels)
    # a label known for < 2 training rows cannot be learned: with --init-from its head is kept frozen
    # (the source's; loss weight 0), from scratch it is an error
    known = np.isfinite(ytr).sum(0)
    absent = [l for l, n in zip(labels, known) if n < 2]
    kept = [] if init is None else init.frozen_heads(labels)
    for l in absent:
        if l not in kept:
            have = [m for m, n in zip(labels, known) if n >= 2]
            raise ValueError(f"{ds.path}: label {l!r} is known for {int(known[labels.index(l)])} training rows (fewer "
                             f"than 2), so it cannot be learned; train on the labels the dataset has with --labels "
                             f"{','.join(have) or 'LABELS'}" + ("" if init is not None else
                                                                  ", or fine-tune a model that has it (--init-from)"))
    if init is not None:  # the source's scaler: its heads' outputs keep their meaning
        center, scale = np.asarray(init.center, np.float64), np.asarray(init.scale, np.float64)
    else:
        scaler = RobustScaler().fit(ytr)  # NaN-aware: missing values are ignored in fit
        center, scale = scaler.center_, scaler.scale_
    Ytr = torch.tensor((ytr - center) / scale, dtype=torch.float32)
    Yva = torch.tensor((yva - center) / scale, dtype=torch.float32)
    distilled = absent if init is not None and not init.reinit_stem else []
    if distilled:  # learning without forgetting: the frozen heads' targets are the source's own outputs
        cols = [labels.index(l) for l in distilled]
        Ytr[:, cols] = _source_outputs(mc, init, Xtr, tc.eval_batch_size)[:, cols]
    has = np.isfinite(Ytr.numpy()).sum(0) >= 2
    w = np.zeros(len(labels))
    w[has] = loss_weights(Ytr.numpy()[:, has])
    label_ranges = {l: ([float(np.nanmin(ytr[:, j])), float(np.nanmax(ytr[:, j]))] if known[j] >= 2
                        else list(init.label_ranges.get(l, [np.nan, np.nan]))) for j, l in enumerate(labels)}
    return _Data(labels, units, Xtr, Xva, Ytr, Yva, yva, center, scale, torch.tensor(w, dtype=torch.float32),
                 label_ranges, absent, distilled)


class _Batches:
    """The training batches: item j is copy j // N of row j % N; copy 0 is the clean spectrum, copies
    1..n_augment get Gaussian noise of a fixed level each (the paper) and the recipe's physical
    augmentation; mixup blends some copies with a neighbour in label space."""

    def __init__(self, ds, itr, d: _Data, tc: TrainConfig):
        self.X, self.Y, self.n_tr = d.Xtr, d.Ytr, len(itr)
        self.n_items = self.n_tr * (1 + tc.n_augment)
        self.augment, self.O, self.S = _augmenter(ds, itr, tc)
        self.mixer = Neighbours(ds.meta(itr)["object_id"].to_numpy(), d.Ytr.numpy(), tc.mixup_k) if tc.aug_mixup else None
        self.mixup = tc.aug_mixup
        g0 = torch.Generator().manual_seed(tc.seed)
        row_std = d.Xtr.std(dim=1, unbiased=False)                          # sigma_S, (n_tr,)
        levels = torch.zeros(1 + tc.n_augment, self.n_tr)                   # copy 0 is the clean spectrum
        levels[1:] = tc.noise_min + (tc.noise_max - tc.noise_min) * torch.rand(tc.n_augment, self.n_tr, generator=g0)
        self.noise_std = levels * row_std                                   # (1 + n_augment, n_tr)

    def __call__(self, j: torch.Tensor, g: torch.Generator, dev):
        """Items ``j`` -> (x on ``dev``, y scaled, on the CPU); random numbers from ``g`` (CPU)."""
        row, k = j % self.n_tr, j // self.n_tr
        x, y = to_device(self.X[row], dev), self.Y[row]
        o = None if self.O is None else to_device(self.O[row], dev)
        if self.mixer is not None:
            x, o, y = _mixup(self.mixer, self.mixup, row, k, x, o, y, (self.X, self.O, self.Y), g, dev)
        sigma = self.noise_std[k, row]
        noisy = sigma > 0
        if noisy.any():  # drawn on the CPU generator, added on the device
            noise = torch.randn((int(noisy.sum()), x.shape[1]), generator=g) * sigma[noisy, None]
            x[noisy.to(dev)] += to_device(noise, dev)
        if self.augment is not None and (k > 0).any():  # physical augmentation: the copies, never the clean row
            a = torch.nonzero(k > 0)[:, 0]
            a_dev = a.to(dev)
            x[a_dev] = self.augment(x[a_dev], None if o is None else o[a_dev],
                                    None if self.S is None else to_device(self.S[row[a]], dev), g)
        return x, y


@dataclass
class _Step:
    """One optimisation step: forward, Huber loss (+ the target loss), backward, AdamW, schedule, EMA."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    scaler: object            # fp16 gradient scaler or None
    ema: object               # AveragedModel or None
    weights: torch.Tensor     # on the device
    tc: TrainConfig
    run: Run                  # with a resolved device
    target_loss: object = None

    def __call__(self, x, y, g) -> torch.Tensor:
        dev = self.run.device
        with autocast(dev, self.run.precision):
            out = self.net(x)
        loss = masked_huber(out.float(), to_device(y, dev), self.weights, self.tc.huber_delta)
        if self.target_loss is not None:
            loss = loss + self.target_loss(self.net, None if self.ema is None else self.ema.module, x, g, dev)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        return loss.detach()


def _train_epoch(step: _Step, batches: _Batches, epoch: int, steps: int) -> float:
    """One pass over the shuffled items (the order and noise derive from (seed, epoch)); the mean loss."""
    from tqdm.auto import tqdm

    tc, progress, dev = step.tc, step.run.progress, step.run.device
    es = _epoch_seed(tc.seed, epoch)
    g = torch.Generator().manual_seed(es)
    torch.manual_seed(es + 1)  # dropout
    perm = torch.randperm(batches.n_items, generator=g)
    step.net.train()
    run_loss = torch.zeros((), device=dev)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress,
               leave=False, unit="batch", mininterval=1.0)
    for b in bar:
        x, y = batches(perm[b * tc.batch_size:(b + 1) * tc.batch_size], g, dev)
        run_loss += step(x, y, g)
        if progress and b % 50 == 49:
            bar.set_postfix(loss=f"{float(run_loss) / (b + 1):.4f}")
    bar.close()
    return float(run_loss) / steps


@dataclass
class _State:
    """Where a run stands: history, best epoch and weights, time; saved in and restored from the checkpoint."""

    best_state: dict
    history: list = field(default_factory=list)
    best_val: float = float("inf")
    best_epoch: int = -1
    start_epoch: int = 0
    train_time: float = 0.0
    init_val: float | None = None

    def end_epoch(self, epoch, kept, train_loss, val_loss, mae, lr, seconds):
        self.train_time += seconds
        if val_loss < self.best_val:
            self.best_val, self.best_epoch = val_loss, epoch
            self.best_state = copy.deepcopy(kept.state_dict())
        self.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, **mae,
                             "lr": lr, "seconds": seconds})

    def state(self, epoch: int, fingerprint: str) -> dict:
        return {"epoch": epoch, "history": self.history,
                "best_val_loss": self.best_val, "best_epoch": self.best_epoch, "train_time_s": self.train_time,
                "fingerprint": fingerprint, "version": __version__, "init_val_loss": self.init_val}


def _resume(checkpoint, fingerprint, net, opt, sched, ema, kept, run: Run, epochs) -> _State:
    """A fresh :class:`_State`, or the one in ``checkpoint`` (of this run only) with its weights restored."""
    st = _State(best_state=copy.deepcopy(kept.state_dict()))
    if checkpoint is None or not Path(checkpoint).exists():
        return st
    state, tensors = load_checkpoint(checkpoint)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"{checkpoint}: checkpoint of a run with another config or dataset; choose another --out "
                         "or delete the checkpoint to start over")
    st.best_state = _restore(net, opt, sched, state, tensors, ema)
    st.history, st.best_val, st.best_epoch = state["history"], state["best_val_loss"], state["best_epoch"]
    st.start_epoch, st.train_time = state["epoch"] + 1, state.get("train_time_s", 0.0)
    st.init_val = state.get("init_val_loss")
    run.say(f"{Path(checkpoint).parent}: resuming after epoch {st.start_epoch} of {epochs}")
    return st


def _print_epoch(epoch, epochs, train_loss, val_loss, mae, d: _Data, best: bool) -> None:
    from tqdm.auto import tqdm

    maes = " ".join(f"{l} {mae['mae_' + l]:.4g}{(' ' + u) if u else ''}" for l, u in zip(d.labels, d.units))
    tqdm.write(f"epoch {epoch + 1:3d}/{epochs}  train {train_loss:.4f}  val {val_loss:.4f}  "
               f"val MAE: {maes}{'  *' if best else ''}", file=sys.stderr)


@torch.inference_mode()
def _source_outputs(mc, init, X, batch_size: int) -> torch.Tensor:
    """(N, L) scaled outputs of the source network (``init``'s weights, eval mode, CPU) for rows ``X``."""
    net = StellarNet(mc)
    apply_init(net, replace(init, freeze=()))
    net.eval()
    return torch.cat([net(X[i:i + batch_size]) for i in range(0, len(X), batch_size)]).float()


def validate(net, X, Y, y_phys, weights, center, scale, labels, tc: TrainConfig, run: Run):
    """(loss, {"mae_<label>": MAE in physical units}) of ``net`` on rows ``X`` in batches of ``tc.eval_batch_size``.

    ``Y`` are the scaled targets (NaN = missing), ``y_phys`` the same in physical units, ``weights``
    the per-label loss weights; ``net`` runs in eval mode on ``run.device`` (a resolved one; autocast
    to ``run.precision`` as in training).
    """
    dev = run.device
    net.eval()
    with torch.inference_mode(), autocast(dev, run.precision):
        pred = torch.cat([net(to_device(X[i:i + tc.eval_batch_size], dev)).float().cpu()
                          for i in range(0, len(X), tc.eval_batch_size)])
        loss = float(masked_huber(pred, Y, weights, tc.huber_delta))
    err = np.abs(pred.numpy().astype(np.float64) * scale + center - y_phys)
    return loss, {f"mae_{l}": float(np.mean(e[np.isfinite(e)])) if np.isfinite(e).any() else float("nan")
                  for l, e in zip(labels, err.T)}


def fit_ensemble(ds, rows, model_config: ModelConfig, train_config: TrainConfig, *, checkpoint=None,
                 fingerprint: str = "", on_epoch=None, init=None, target_loss=None,
                 run: Run = Run(progress=False)) -> Fitted:
    """:func:`fit` ``train_config.ensemble`` = K networks (seeds seed .. seed+K-1) into one :class:`Ensemble`.

    K = 1 is :func:`fit` itself. Otherwise member i trains with its own checkpoint
    (``checkpoint`` with ``_m<i>`` before the suffix; a finished one is reused, so a killed
    run resumes at the member it was training), and the returned record holds member 0's
    history, every member's best epoch and training time, and the ensemble's own validation
    loss and MAE.
    """
    tc, k = train_config, int(train_config.ensemble)
    run = run.on_device()
    kw = dict(on_epoch=on_epoch, init=init, target_loss=target_loss, run=run)
    if k <= 1:
        return fit(ds, rows, model_config, tc, checkpoint=checkpoint, fingerprint=fingerprint, **kw)
    members = []
    for i in range(k):
        ck = None if checkpoint is None else Path(checkpoint).with_name(
            f"{Path(checkpoint).stem}_m{i}{Path(checkpoint).suffix}")
        run.say(f"ensemble member {i + 1}/{k} (seed {tc.seed + i})")
        members.append(fit(ds, rows, model_config, replace(tc, seed=tc.seed + i, ensemble=1), checkpoint=ck,
                           fingerprint=f"{fingerprint}-m{i}", **kw))
    net, first = Ensemble([m.net for m in members]), members[0]
    iva = rows[1]
    y = label_matrix(ds, iva, first.labels)
    w = torch.tensor([first.metrics["loss_weights"][l] for l in first.labels], dtype=torch.float32)
    val_loss, mae = validate(net, torch.from_numpy(ds.flux(iva)),
                             torch.tensor((y - first.center) / first.scale, dtype=torch.float32), y, w,
                             first.center, first.scale, first.labels, tc, run)
    metrics = dict(first.metrics, val_loss=val_loss, n_params=count_parameters(net), members=k,
                   member_best_epochs=[m.metrics["best_epoch"] for m in members],
                   train_time_s=sum(m.metrics["train_time_s"] for m in members),
                   **{f"val_{name}": v for name, v in mae.items()})
    return Fitted(net, first.labels, first.center, first.scale, first.label_ranges, first.history, val_loss, metrics)


def _mixup(mixer, frac, row, k, x, o, y, train, g, dev):
    """Label-space mixup: a fraction ``frac`` of the noisy copies (k > 0) in a batch become blends
    (:func:`stellarparams.augment.mix`) with a row of a label-neighbour star, labels blended alike."""
    m = torch.nonzero((k > 0) & (torch.rand(len(row), generator=g) < frac))[:, 0]
    if len(m) == 0:
        return x, o, y
    X, O, Y = train
    partner, lam = mixer.draw(row[m], g), torch.rand(len(m), generator=g)
    md = m.to(dev)
    x[md], o[md] = mix(x[md], o[md], to_device(X[partner], dev), to_device(O[partner], dev), to_device(lam, dev))
    y[m] = lam[:, None] * y[m] + (1 - lam[:, None]) * Y[partner]
    return x, o, y


def _augmenter(ds, rows, tc: TrainConfig):
    """(Augmenter or None, offsets or None, per-pixel sigma or None) for the training rows."""
    if not tc.augments:
        return None, None, None
    from .augment import Augmenter

    augment = Augmenter(tc, ds.grid.loglam)
    needs_offset = augment.needs_offset or bool(tc.aug_mixup)
    offset = ds.offset(rows) if needs_offset else None
    sigma = ds.sigma(rows) if tc.aug_pixnoise else None
    if needs_offset and offset is None or tc.aug_pixnoise and sigma is None:
        raise ValueError(f"{ds.path}: the recipe's augmentation needs each spectrum's flux offset and noise, which "
                         "datasets prepared before stellarparams stored them lack; prepare the dataset again, or "
                         "train with --recipe paper")
    return (augment, None if offset is None else torch.from_numpy(offset),
            None if sigma is None else torch.from_numpy(sigma))


def write_log(path, history):
    """The per-epoch history as CSV (atomically)."""
    import pandas as pd

    write_text(path, pd.DataFrame(history).to_csv(index=False))
