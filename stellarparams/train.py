"""The `train` command: training loop -> calibration -> model folder (docs/method.md, section "Training").

- :func:`stellarparams.training.fit` trains the network (resumable from OUT/checkpoint.safetensors).
- :func:`stellarparams.calibrate.calibrate` fits the per-star uncertainties and extrapolation
  flags: on the validation split plus out-of-fold residuals of every training star
  (``calib_folds`` = K extra models, each trained without 1/K of the training stars; K = 3
  costs 2x the training time again; 0 fits on the validation split alone).
- :func:`stellarparams.model_io.save_model` writes the folder.

The output folder is locked for the run (one writer per folder); a finished folder with the
same config and data is loaded instead of trained again.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from .calibrate import calibrate
from .config import DEFAULT_RECIPE, RECIPE_HELP, RECIPES, ModelConfig, TrainConfig, load_config, recipe
from .context import Run
from .dataset import opened
from .devices import add_arguments as add_device_arguments
from .finetune import Init, OptionError, check_freeze, parse_freeze, select_labels
from .model import StellarNet, count_parameters
from .model_io import META, WEIGHTS, Model, load_model, save_model
from .outputs import locked_output
from .training import LOG, fit, fit_ensemble, known_counts

CHECKPOINT = "checkpoint.safetensors"


def _fingerprint(model_config, train_config, labels, ds, net=None) -> str:
    arch = None if net is None else [type(net).__module__, type(net).__qualname__,
                                     net.to_dict() if hasattr(net, "to_dict") else count_parameters(net)]
    adapting = bool(getattr(train_config, "adapt_to", None))  # without it, the adapt_* keys leave the hash as before
    d = {"model": model_config.to_dict(), "net": arch,
         "train": {k: v for k, v in train_config.to_dict().items()
                   if k != "threads" and (adapting or not k.startswith("adapt_"))},
         "labels": labels, "data": [ds.attrs.get("input_hash") or str(ds.path.resolve()), ds.n]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_output(out) -> Path:
    """Refuse, in one line and before any work, an ``out`` that cannot become a model folder.

    Parameters
    ----------
    out : str or Path
        The model folder to write.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        ``out`` is a file, or neither it nor its nearest existing parent folder is writable.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose another --out")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{base}: is a file, so {out} cannot be created; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{base}: not writable, so the model cannot be written to {out}; choose another --out")
    return out


def train(dataset, out=None, model_config: ModelConfig = None, train_config: TrainConfig = None, *, net=None,
          on_epoch=None, progress: bool = True, overwrite: bool = False, wait: bool = False, device=None,
          precision: str = "fp32", run: Run | None = None) -> Model:
    """Train on a prepared dataset's train split, select on its val split, calibrate; return a Model.

    Parameters
    ----------
    dataset : str, Path or Dataset
        A prepared dataset (folder or path) or an open :class:`stellarparams.dataset.Dataset`.
    out : str or Path, optional
        Model folder (checkpoint, train_log.csv, then weights.safetensors + model.json); None
        writes nothing. Re-running with the same out resumes an interrupted run, and returns
        the finished model when it is already complete. The folder is locked for the run.
    model_config : ModelConfig, optional
        Architecture; its ``heads`` name the labels to learn (each must be a dataset label);
        ``n_in`` is set from the dataset.
    train_config : TrainConfig, optional
        Optimisation and ``calib_folds``.
    net : torch.nn.Module, optional
        (B, n_in) -> (B, L) used instead of ``StellarNet(model_config)`` (baselines); then
        the calibration uses the validation split alone.
    on_epoch : callable, optional
        ``on_epoch(epoch, val_loss, metrics)`` after every epoch; may raise (e.g.
        optuna.TrialPruned) to stop; the exception propagates.
    progress : bool
        Progress bars and summaries on stderr.
    overwrite : bool
        A model or checkpoint in ``out`` from another config or dataset is discarded (instead
        of an error); `stellarparams run` uses this for its own model folder.
    wait : bool
        Wait for another process holding ``out`` instead of failing at once.
    device : str or torch.device, optional
        Where to train and calibrate (None: ``"auto"``, a GPU when present); the returned
        model's network lives there, the folder holds CPU tensors. Not part of the run's
        fingerprint: a run killed on one device resumes on another.
    precision : str
        ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only): autocast of the training.
    run : stellarparams.context.Run, optional
        ``progress``, ``device`` and ``precision`` as one object; when given, those three are not read.

    Returns
    -------
    Model

    Raises
    ------
    ValueError
        Bad labels, data or output folder (one line, before any work).
    stellarparams.files.OutputBusy
        Another process is writing ``out`` (and ``wait`` is False).
    """
    run = (run or Run(progress=progress, device=device, precision=precision)).on_device()
    tc = train_config or recipe()
    if tc.epochs < 1:  # an untrained network would be published as a model
        raise ValueError(f"epochs = {tc.epochs}: training needs at least 1 epoch")
    if tc.init_from:
        model_config, tc = _source_configs(tc, model_config, net)
    out = None if out is None else check_output(out)
    with (contextlib.nullcontext() if out is None else locked_output(out, wait)), opened(dataset) as ds:
        return _train(ds, out, model_config or ModelConfig(), tc, net, on_epoch, overwrite, run)


def _source_configs(tc, model_config, net):
    """(ModelConfig, TrainConfig) of a run with ``tc.init_from``: the source's architecture, its weights' sha256."""
    if net is not None:
        raise ValueError("init_from starts a StellarNet from a model folder; it cannot start another net")
    source = load_model(tc.init_from)
    if tc.init_sha256 and tc.init_sha256 != source.weights_sha256:
        raise ValueError(f"{tc.init_from}: its weights (sha256 {source.weights_sha256[:12]}...) are not the ones the "
                         f"config records ({tc.init_sha256[:12]}...)")
    src = source.model_config
    if src is None or not isinstance(source.net, StellarNet):
        raise ValueError(f"{tc.init_from}: not a StellarNet model; --init-from needs one")
    if model_config is not None:  # the source's architecture, or the same with fewer heads (--labels)
        kept = [l for l in model_config.labels if l in src.heads]
        if len(kept) < len(model_config.labels) or replace(model_config, n_in=src.n_in) != source_heads(src, kept):
            raise ValueError(f"{tc.init_from}: --init-from keeps the source's architecture, which differs from the "
                             "given [model] config; drop the [model] table (--labels may name a subset of the source's "
                             f"labels {src.labels})")
        src = replace(src, heads={l: src.heads[l] for l in kept})
    return src, replace(tc, init_sha256=source.weights_sha256, freeze=parse_freeze(tc.freeze, src.labels))


def source_heads(mc: ModelConfig, labels) -> ModelConfig:
    """``mc`` (a source model's architecture) with only the heads of ``labels``; ValueError naming an unknown one."""
    unknown = [l for l in labels if l not in mc.heads]
    if unknown:
        raise OptionError(f"--labels {','.join(unknown)}: not a label of the --init-from model (it has {mc.labels})")
    return replace(mc, heads={l: mc.heads[l] for l in labels})


def source_init(tc, mc, ds):
    """The :class:`finetune.Init` of a run with ``tc.init_from`` (None without).

    Parameters
    ----------
    tc : TrainConfig
        With ``init_from`` (a model folder) and ``freeze``.
    mc : ModelConfig
        The run's architecture (its labels must be the source's).
    ds : Dataset
        The dataset trained on: when its grid (``attrs["grid"]``) differs from the source
        model's, the stem's input layer starts fresh (``Init.reinit_stem``).

    Returns
    -------
    finetune.Init or None
    """
    if not tc.init_from:
        return None
    source = load_model(tc.init_from)
    grid, src_grid = ds.attrs.get("grid") or {}, source.grid or {}
    same = (int(src_grid.get("n_pix", -1)) == ds.n_pix
            and all(np.isclose(float(src_grid.get(k, np.nan)), float(grid.get(k, np.nan)), rtol=0, atol=1e-9)
                    for k in ("loglam_min", "loglam_max")))
    if not set(mc.labels) <= set(source.label_names):
        raise ValueError(f"{tc.init_from}: labels {source.label_names}, this run {mc.labels}")
    check_freeze(tc.freeze, not same)
    idx = [source.label_names.index(l) for l in mc.labels]
    state = select_labels({k: v.detach().cpu() for k, v in source.net.state_dict().items()}, source.label_names,
                          mc.labels, mc.multitask)
    return Init(state, source.center[idx], source.scale[idx], reinit_stem=not same, freeze=tuple(tc.freeze),
                label_ranges=dict(source.label_ranges), label_units=dict(zip(source.label_names, source.label_units)),
                uncertainty=source.uncertainty)


def frozen_absent(tc, labels, ds) -> TrainConfig:
    """With ``tc.init_from``: ``tc`` with ``heads.LABEL`` frozen for every label the train split does not have
    (no column, or fewer than 2 known rows): those heads are kept exactly as the source's."""
    if not tc.init_from:
        return tc
    known = known_counts(ds, ds.indices("train"), labels)
    absent = [f"heads.{l}" for l, n in zip(labels, known) if n < 2 and "heads" not in tc.freeze]
    return replace(tc, freeze=tuple(dict.fromkeys([*tc.freeze, *absent])))


def _train(ds, out, mc, tc, net, on_epoch, overwrite, run: Run) -> Model:
    """The body of :func:`train`, on an open dataset, holding ``out``'s lock (when writing), on ``run.device``."""
    if tc.threads:
        import torch

        torch.set_num_threads(int(tc.threads))
    labels = mc.labels
    missing = [l for l in labels if l not in ds.label_names]
    if missing and not tc.init_from:  # with --init-from a label the dataset lacks keeps the source's head
        raise ValueError(f"{ds.path}: labels {missing} are not in the dataset (it has {ds.label_names}); "
                         "set the model's heads to the labels you want, e.g. [model.heads] in the TOML config")
    if mc.n_in != ds.n_pix:
        mc = replace(mc, n_in=ds.n_pix)
    tc = frozen_absent(tc, labels, ds)
    if tc.adapt_to:
        if net is not None:
            raise ValueError("adapt_to adapts a StellarNet; it cannot adapt another net")
        from .adapt import target_hash

        tc = replace(tc, adapt_hash=target_hash(tc.adapt_to, ds))
    fingerprint = _fingerprint(mc, tc, labels, ds, net)
    folds = tc.calib_folds if (net is None and tc.calib_folds >= 2) else 0

    done = _finished(out, ds, fingerprint, overwrite, run)
    if done is not None:
        return done
    checkpoint = None if out is None else out / CHECKPOINT
    if checkpoint is not None and overwrite:
        _drop_other_checkpoints(checkpoint, fingerprint)

    # ---- train -> calibrate -> save
    init = source_init(tc, mc, ds)
    if init is not None and run.progress:
        _announce_init(init, tc, labels, ds)
    fit_ds, target, target_loss = ds, None, None
    if tc.adapt_to:  # the source seen through the target's estimated instrument (stellarparams.adapt)
        from .adapt import TargetLoss, source_for_target

        fit_ds, target = source_for_target(ds, mc, tc, init, run=run)
        if tc.adapt_coral or tc.adapt_consistency:
            target_loss = TargetLoss(target, tc)
    if net is None:
        fitted = fit_ensemble(fit_ds, (ds.indices("train"), ds.indices("val")), mc, tc, checkpoint=checkpoint,
                              fingerprint=fingerprint, on_epoch=on_epoch, init=init, target_loss=target_loss, run=run)
    else:
        fitted = fit(ds, (ds.indices("train"), ds.indices("val")), mc, tc, net=net, checkpoint=checkpoint,
                     fingerprint=fingerprint, on_epoch=on_epoch, run=run)
    if target is not None and tc.adapt_pseudo:  # confident pseudo-labels on the target, then again (adapt.py)
        from .adapt import pseudo_refit

        fitted = pseudo_refit(fitted, fit_ds, target, mc, tc, init=init, target_loss=target_loss, run=run)
    units = [ds.label_units[ds.label_names.index(l)] if l in ds.label_names else init.label_units.get(l, "")
             for l in labels]
    model = Model(fitted.net, labels, fitted.center, fitted.scale, model_config=mc, train_config=tc,
                  label_units=units, label_ranges=fitted.label_ranges,
                  grid=ds.attrs.get("grid"), prepare_config=ds.attrs.get("preprocess"), metrics=fitted.metrics,
                  history=fitted.history, dataset_hash=ds.attrs.get("input_hash", ""), seed=tc.seed,
                  best_val_loss=fitted.best_val_loss, fingerprint=fingerprint)
    _calibrate(model, fit_ds, folds, out, fingerprint, run, init)
    if init is not None and target is None and model.uncertainty is not None:
        model.uncertainty.stats["calibrated_on"] += (f" of this dataset (fine-tuned from {tc.init_from}; the out-of-fold "
                                                     "models start from its weights too)")
    if target is not None:
        from .adapt import reference_target

        reference_target(model, fit_ds.flux(fit_ds.indices("train")), fit_ds.flux(fit_ds.indices("val")), target,
                         tc.seed)
        if model.uncertainty is not None:
            model.uncertainty.stats["calibrated_on"] += " of the source, passed through the input matching"
            if tc.adapt_widen:
                from .adapt import widen_for_target

                f = widen_for_target(model, fit_ds, (fit_ds.indices("train"), fit_ds.indices("val")), target,
                                     fit_ds.target_offset, order=tc.adapt_order, seed=tc.seed)
                if f:
                    model.uncertainty.stats["calibrated_on"] += (", then widened for the target by "
                                                                 + ", ".join(f"{v:.2f} ({k})" for k, v in f.items()))
                    run.say("sigma widened for the target: " + ", ".join(f"{k} x{v:.2f}" for k, v in f.items()))
        model.metrics["adapt"] = fit_ds.match.to_dict()
    if out is not None:
        save_model(model, out)
        checkpoint.unlink(missing_ok=True)
        for f in [*out.glob("oof_*.npz"), *out.glob(f"{checkpoint.stem}_m*{checkpoint.suffix}")]:
            f.unlink()
    m = model.metrics
    run.say(f"best epoch {m['best_epoch']} (val loss {m['val_loss']:.4f}); trained in {m['train_time_s']:.0f} s"
            + (f"; model written to {out}" if out else ""))
    return model


def _finished(out, ds, fingerprint, overwrite, run: Run):
    """The model already in ``out`` when it was trained with this config and data (calibrated now if it
    predates calibration); None when there is nothing there, or (``overwrite``) after clearing another run."""
    if out is None or not (out / META).exists() or (out / CHECKPOINT).exists():
        return None
    done = json.loads((out / META).read_text())
    if done.get("fingerprint") == fingerprint:
        run.say(f"{out}: already trained with this config and data; loading it (delete the folder to retrain)")
        model = load_model(out, run.device)
        if model.uncertainty is None:
            _calibrate(model, ds, 0, out, fingerprint, run)
            save_model(model, out)
        return model
    if not overwrite:
        raise ValueError(f"{out}: holds a model trained with another config or dataset; choose another --out, "
                         "delete the folder, or pass --overwrite (overwrite=True)")
    run.say(f"{out}: the config or dataset changed; training a new model")
    for name in (META, WEIGHTS, LOG):
        (out / name).unlink(missing_ok=True)
    return None


def _drop_other_checkpoints(checkpoint, fingerprint) -> None:
    """Delete the checkpoints of another run: the run's own and its ensemble members' (``_m<i>``)."""
    from .training import load_checkpoint

    for ck in [checkpoint, *checkpoint.parent.glob(f"{checkpoint.stem}_m*{checkpoint.suffix}")]:
        if ck.exists() and not load_checkpoint(ck)[0].get("fingerprint", "").startswith(fingerprint):
            ck.unlink()


def _announce_init(init, tc, labels, ds) -> None:
    print(f"starting from {tc.init_from} (weights sha256 {tc.init_sha256[:12]}...)"
          + ("; the grid differs: the stem's input layer starts fresh" if init.reinit_stem else "")
          + (f"; frozen: {', '.join(init.freeze)}" if init.freeze else ""), file=sys.stderr)
    kept = [l for l, n in zip(labels, known_counts(ds, ds.indices("train"), labels)) if n < 2]
    if kept:
        print(f"the dataset has no {', '.join(kept)} labels: "
              f"{'that head is' if len(kept) == 1 else 'those heads are'} kept exactly as in {tc.init_from} "
              "(frozen; its calibration carried from the source), or drop them with --labels", file=sys.stderr)


def _calibrate(model, ds, folds, folder, fingerprint, run: Run, init=None):
    """Calibrate into model.uncertainty (timings into its metrics); a failure only warns: the model then
    predicts without sigma. The fold models train on the model's device."""
    try:
        model.uncertainty, seconds = calibrate(model, ds, folds=folds, folder=folder, tag=fingerprint, init=init,
                                               run=replace(run, device=model.device))
        model.metrics.update(seconds)
    except (ValueError, RuntimeError) as e:
        warnings.warn(f"uncertainty calibration failed ({e}); the model predicts without sigma", stacklevel=3)


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser):
    p.description = ("Train the residual multitask network (arXiv:2606.13868; docs/method.md, section "
                     "\"Training\") on a prepared dataset. --recipe paper is the paper's recipe exactly: AdamW 7e-4, "
                     "weight decay 0.01, batch 256, 30 epochs, 5% warm-up + cosine, Huber(1) weighted by inverse label "
                     "variance, 2 noisy copies per spectrum. The default recipe trains 12 epochs and gives the noisy "
                     "copies physical augmentation (shifts, flux-calibration and reddening distortions, LSF jitter, "
                     "telluric residuals, masked pixels): better on unseen stars and other spectrographs (docs/benchmarks.md, "
                     "\"Accuracy\"). Then 3 out-of-fold models (each without a third of the training stars) "
                     "calibrate the per-star error bars: 2x the training time again. Killed mid-run, the same command "
                     "resumes from OUT/checkpoint.safetensors and the finished folds.")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (from `stellarparams prepare`)")
    p.add_argument("--out", required=True, help="model folder to write (weights.safetensors, model.json, train_log.csv)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help=RECIPE_HELP + f" (default: {DEFAULT_RECIPE}; beats a recipe named in --config)")
    p.add_argument("--config", help="TOML file with [model] and [train] tables overriding the recipe")
    p.add_argument("--epochs", type=int, help="override [train] epochs")
    p.add_argument("--seed", type=int, help="override [train] seed")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--calib-folds", type=int, dest="calib_folds",
                   help="out-of-fold models whose residuals calibrate the sigmas (default 3: 2x the training time "
                        "again); 0 calibrates on the validation split alone")
    p.add_argument("--ensemble", type=int, metavar="K",
                   help="train K networks (seeds SEED..SEED+K-1) into one model folder: predictions are their mean "
                        "and sigma includes their spread; K times the training time (the out-of-fold calibration "
                        "models are ensembles of K too)")
    p.add_argument("--labels", help="comma-separated labels to learn (default: those of the config heads); with "
                   "--init-from, the source's heads to keep (the others are dropped). A label no training row has "
                   "cannot be learned from scratch; with --init-from its head is kept frozen, as in the source")
    p.add_argument("--init-from", dest="init_from", metavar="MODEL",
                   help="start from this model folder's weights and target scaler, with its architecture (fine-tuning, "
                        "e.g. on another survey). When the dataset's wavelength grid differs from the model's, the "
                        "stem's input layer (trunks.*.stem.0, the only grid-dependent one) starts fresh and the rest is "
                        "copied. The path and the weights' sha256 are recorded in model.json (train_config)")
    p.add_argument("--freeze", metavar="PARTS",
                   help="with --init-from: comma-separated parts of the network kept fixed (bitwise): stem (the input "
                        "Linear + its LayerNorm), blocks (the residual blocks), ln_out (the shared LayerNorm), trunk "
                        "(all three), heads (every label's head) or heads.LABEL (e.g. heads.teff). On another grid "
                        "the stem's input layer is new, so stem and trunk are refused. Heads of labels the dataset "
                        "lacks are frozen without asking")
    p.add_argument("--adapt-to", dest="adapt_to", metavar="SPECTRA",
                   help="the target survey's spectra: a folder of them, a spectrum file, a catalog with a FILE "
                        "column (read and preprocessed like this dataset's), or a prepared dataset on this "
                        "dataset's grid; labels there, if any, are never read. Estimate how the target's "
                        "instrument differs from the training "
                        "set's (smooth response and reddening, resolution, wavelength offset) from the two "
                        "populations and train on the training spectra made to look like the target's "
                        "(docs/method.md, \"Domain adaptation\"; [train] adapt_group, adapt_bins, adapt_match, "
                        "adapt_order, adapt_narrow, adapt_coral, adapt_consistency, adapt_noise, adapt_pseudo, adapt_widen). "
                        "It costs one "
                        "training with "
                        "adapt_group = ridge (the default) or adapt_bins = 1; with adapt_group = net, adapt_match "
                        "trainings plus a first-pass one without --init-from. "
                        "With a few labelled target stars: train --adapt-to first, then --init-from that model "
                        "on the labelled stars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model or checkpoint in --out that was trained with another config or dataset")
    p.add_argument("--wait", action="store_true",
                   help="when another run is writing --out, wait for it to finish instead of failing at once")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arguments(p)


def _tables(path) -> set:
    import tomllib

    try:
        return set(tomllib.loads(Path(path).read_text()))
    except (OSError, tomllib.TOMLDecodeError):
        return set()


def run_cli(args) -> int:
    mc, tc = (load_config(args.config, args.recipe, DEFAULT_RECIPE) if args.config
              else (ModelConfig(), recipe(args.recipe or DEFAULT_RECIPE)))
    over = {k: getattr(args, k) for k in ("epochs", "seed", "threads", "calib_folds", "ensemble", "init_from",
                                          "freeze", "adapt_to") if getattr(args, k) is not None}
    if over.get("freeze") and not (over.get("init_from") or tc.init_from):
        raise ValueError("--freeze needs --init-from: a fresh network has nothing worth keeping fixed")
    tc = replace(tc, **over)
    wanted = [s.strip() for s in (args.labels or "").split(",") if s.strip()]
    if wanted:
        mc = replace(mc, heads={l: mc.heads.get(l, (48,)) for l in wanted})
    if tc.init_from and not (args.config and "model" in _tables(args.config)):
        mc = None  # the source's architecture, with only the --labels heads when given
        if wanted:
            mc = source_heads(load_model(tc.init_from).model_config or ModelConfig(), wanted)
    model = train(args.dataset, args.out, mc, tc, overwrite=args.overwrite, wait=args.wait, run=Run.from_args(args))
    m, frozen = model.metrics, model.metrics.get("heads_kept_from_source", [])
    print(f"{args.out}: best epoch {m['best_epoch']}, val loss {m['val_loss']:.4f}, " +
          ", ".join(f"{l} head frozen (no labels here; kept from {tc.init_from})" if l in frozen else
                    f"val MAE {l} {_num(m.get('val_mae_' + l))} {u}".rstrip()
                    for l, u in zip(model.label_names, model.label_units)))
    return 0


def _num(v) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.4g}"
