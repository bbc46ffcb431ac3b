"""Calibration as its own stage: a trained model + a dataset -> ``model.uncertainty``.

The sigma coefficients are fitted on held-out residuals (stellarparams.uncertainty): the
final model's on the validation split plus, with ``folds`` = K >= 2, out-of-fold ones for
every training star: K extra models with the same config, each trained by the plain
training loop (:func:`stellarparams.training.fit`) without 1/K of the training stars and
predicting them (K = 3 costs 2x the training time again). Each finished fold is kept in
``FOLDER/oof_<tag>_fold<k>.npz``, so a killed run resumes there. Nothing here writes a model
folder: the `train` command saves the calibrated model.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .context import Run
from .dataset import Dataset
from .files import atomic_write
from .training import fit_ensemble, label_matrix
from .uncertainty import Uncertainty, fit_uncertainty, raw_uncertainty


def fold_of(groups, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of each row: all rows of a group (a star) share one fold, and
    the folds hold equal numbers of groups (+-1), shuffled with ``seed``."""
    uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    fold = np.empty(len(uniq), np.int64)
    fold[np.random.default_rng(seed).permutation(len(uniq))] = np.arange(len(uniq)) % k
    return fold[inv.reshape(-1)]


def out_of_fold(ds, itr, iva, model_config, train_config, k: int, folder=None, tag: str = "", *,
                run: Run = Run(progress=False), init=None) -> dict | None:
    """Out-of-fold predictions for every training row, for the sigma calibration.

    Parameters
    ----------
    ds : Dataset
        The prepared dataset.
    itr, iva : array
        Training and validation row numbers.
    model_config, train_config : ModelConfig, TrainConfig
        The final model's configs; each fold model uses them (without calibration).
    k : int
        Number of folds K: the training stars (``object_id``) go into K folds; model k is
        trained without fold k (selected on ``iva``) and predicts it with MC dropout.
    folder : Path, optional
        Where finished folds are kept (``oof_<tag>_fold<k>.npz``) to resume.
    run : stellarparams.context.Run
        A progress bar over the folds' epochs; where and how the fold models train
        (:func:`stellarparams.training.fit`; they print nothing themselves).
    init : stellarparams.finetune.Init, optional
        The fold models start where the final model started (``train --init-from``).

    Returns
    -------
    dict or None
        ``rows``, ``pred`` and ``s_mc`` (physical units), ``noise``, ``fold`` (the fold model that
        predicted each row) and, for every fold model, its predictions of the validation rows
        (``val_pred``, with ``val_fold``; what :func:`stellarparams.uncertainty.fit_uncertainty`
        compares with the final model's); None when there are fewer than K stars.
    """
    from tqdm.auto import tqdm

    tc = train_config
    groups = ds.meta(itr)["object_id"].to_numpy()
    if len(np.unique(groups)) < k:
        return None
    folds = fold_of(groups, k, tc.seed)
    bar = tqdm(total=k * tc.epochs * max(1, tc.ensemble), desc=f"calibration: {k} out-of-fold models", unit="epoch",
               disable=not run.progress, mininterval=1.0)
    parts = []
    for f in range(k):
        path = Path(folder) / f"oof_{tag[:16]}_fold{f}.npz" if folder is not None else None
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as z:
                parts.append({name: z[name] for name in z.files})
            bar.update(tc.epochs * max(1, tc.ensemble))
            continue
        held = itr[folds == f]
        fm = fit_ensemble(ds, (itr[folds != f], iva), model_config, replace(tc, calib_folds=0),
                          on_epoch=lambda *a: bar.update(1), run=run.quiet(), init=init)
        pred, s_mc, noise = raw_uncertainty(fm.net, ds.flux(held), seed=tc.seed)
        val_pred = raw_uncertainty(fm.net, ds.flux(iva), seed=tc.seed)[0]
        parts.append(dict(rows=held, pred=pred * fm.scale + fm.center, s_mc=s_mc * fm.scale, noise=noise,
                          fold=np.full(len(held), f), val_pred=val_pred * fm.scale + fm.center,
                          val_fold=np.full(len(iva), f)))
        if path is not None:
            atomic_write(path, lambda tmp, part=parts[-1]: _savez(tmp, part))
    bar.close()
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0] if all(name in p for p in parts)}


def _savez(path, arrays: dict):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def calibrate(model, dataset, *, folds: int = 0, folder=None, tag: str = "", init=None, run: Run | None = None,
              progress: bool = True, device=None, precision: str = "fp32") -> Uncertainty:
    """Fit the uncertainty model of a trained model on a prepared dataset's train/val splits.

    Parameters
    ----------
    model : stellarparams.model_io.Model
        The trained model (read only: the caller keeps the result as ``model.uncertainty``).
    dataset : Dataset or path
        The dataset it was trained on.
    folds : int
        K >= 2 adds K out-of-fold models (:func:`out_of_fold`, using ``model.model_config``
        and ``model.train_config``); 0 fits on the validation split alone.
    folder, tag : Path, str
        Where finished folds are kept, and the run identity in their names.
    init : stellarparams.finetune.Init, optional
        Where the fold models start (the final model's ``--init-from``). A label the dataset
        does not know (its head kept from the source) takes the source's sigma coefficients
        (``init.uncertainty``); each other label is calibrated on the rows that know it.
    run : stellarparams.context.Run, optional
        Progress, device and precision at once; when given, the three below are not read.
    progress : bool
        Progress bar and a one-line summary on stderr.
    device : str or torch.device, optional
        Where the fold models train (None: the model's own device); the MC-dropout passes run
        on the device of each network.
    precision : str
        Autocast of the fold models' training (:func:`stellarparams.training.fit`).

    Returns
    -------
    (Uncertainty, dict)
        The calibration, and its timings in seconds (``calib_folds_s`` with folds, ``calibration_s``).
    """
    run = run or Run(progress=progress, device=device, precision=precision)
    if run.device is None:
        run = replace(run, device=model.device)
    seconds = {}
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    try:
        itr, iva = ds.indices("train"), ds.indices("val")
        Xtr, Xva = ds.flux(itr), ds.flux(iva)
        ytr, yva = label_matrix(ds, itr, model.label_names), label_matrix(ds, iva, model.label_names)
        seed = int(model.seed or 0)
        oof = None
        if folds >= 2:
            t0 = time.perf_counter()
            oof = out_of_fold(ds, itr, iva, model.model_config, model.train_config, folds, folder, tag, run=run,
                              init=init)
            seconds["calib_folds_s"] = round(time.perf_counter() - t0, 1)
            if oof is not None:
                oof["y"] = ytr[np.searchsorted(itr, oof["rows"])]
    finally:
        if ds is not dataset:
            ds.close()
    t0 = time.perf_counter()
    u = fit_uncertainty(model, Xtr, ytr, Xva, yva, seed=seed, oof=oof, carry=None if init is None else init.uncertainty)
    seconds["calibration_s"] = round(time.perf_counter() - t0, 2)
    run.say(u.summary(seconds["calibration_s"]))
    return u, seconds
