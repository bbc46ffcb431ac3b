"""A trained model and its folder format: weights in safetensors, everything else in JSON.

``MODEL/``::

    weights.safetensors   network weights (no pickle: loading never executes code)
    model.json            model + train config, grid and preprocessing config of the data it
                          was trained on, target scalers, label names/units/ranges, metrics,
                          history, package version, dataset hash, seed, sha256 of the weights
    train_log.csv         one row per epoch (written by `train`)
    uncertainty.json      calibration of the per-star sigmas and the extrapolation flags
    uncertainty.safetensors   (written by `train`; see stellarparams.uncertainty)

>>> model = stellarparams.load_model("runs/default/model")
>>> y = model.predict(flux)          # flux (N, P) prepared spectra -> (N, L) physical units
>>> y, sigma = model.predict(flux, return_sigma=True)   # + (N, L) calibrated 1-sigma
>>> df = model.predict_full(flux)    # labels, sigma_<label>, ood_score, flags as a DataFrame
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .model import ModelConfig, StellarNet

FORMAT = 1
WEIGHTS = "weights.safetensors"
META = "model.json"
UNC_JSON = "uncertainty.json"          # names also in stellarparams.uncertainty
UNC_TENSORS = "uncertainty.safetensors"


class ModelFileError(ValueError):
    """A model folder that cannot be loaded (missing file, hash mismatch, unknown format)."""


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Model:
    """A trained network plus everything needed to use it on new data.

    net:          nn.Module mapping (B, P) standardized flux -> (B, L) scaled targets
    label_names:  L names (e.g. teff, feh, logg); label_units: their units (K, dex, dex)
    center, scale: (L,) RobustScaler median and IQR; physical = scaled * scale + center
    label_ranges: {label: [min, max]} seen in training (for the out-of-range flag)
    grid, prepare_config: the preprocessing the training data went through (dicts)
    uncertainty:  :class:`stellarparams.uncertainty.Uncertainty` or None (then sigma is NaN)
    """

    def __init__(self, net, label_names, center, scale, *, model_config=None, train_config=None,
                 label_units=None, label_ranges=None, grid=None, prepare_config=None, metrics=None,
                 history=None, dataset_hash="", seed=None, version=__version__, best_val_loss=None, fingerprint="",
                 uncertainty=None):
        self.net = net.eval()
        self.uncertainty = uncertainty
        self._warned_uncalibrated = False
        self.model_config = model_config
        self.train_config = train_config
        self.label_names = list(label_names)
        self.label_units = list(label_units or [""] * len(self.label_names))
        self.center = np.asarray(center, np.float64)
        self.scale = np.asarray(scale, np.float64)
        self.label_ranges = dict(label_ranges or {})
        self.grid = dict(grid or {})
        self.prepare_config = dict(prepare_config or {})
        self.metrics = dict(metrics or {})
        self.history = list(history or [])
        self.dataset_hash = dataset_hash
        self.seed = seed
        self.version = version
        self.best_val_loss = best_val_loss
        self.fingerprint = fingerprint  # of the training run (config + data), for resume/skip

    def __repr__(self):
        return (f"Model(labels={self.label_names}, n_in={self.n_in}, params={sum(p.numel() for p in self.net.parameters())}, "
                f"version={self.version!r})")

    @property
    def n_in(self) -> int:
        return int(self.grid.get("n_pix") or getattr(self.model_config, "n_in", 0))

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict_scaled(self, flux, batch_size: int = 4096) -> np.ndarray:
        """flux (N, P) float32 -> (N, L) float32 in scaled target units."""
        if isinstance(flux, torch.Tensor):
            x = flux.to(torch.float32)
        else:
            x = torch.from_numpy(np.ascontiguousarray(flux, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"flux must have shape (N, {self.n_in}) (prepared spectra on the model's grid); "
                             f"got {tuple(x.shape)}")
        self.net.eval()
        out = np.empty((x.shape[0], len(self.label_names)), np.float32)
        for i in range(0, x.shape[0], batch_size):
            out[i:i + batch_size] = self.net(x[i:i + batch_size]).numpy()
        return out

    def predict(self, flux, batch_size: int = 4096, rv_kms=None, return_sigma: bool = False):
        """Labels in physical units, (N, L) float64, columns in ``label_names`` order.

        ``return_sigma=True`` returns ``(labels, sigma)``, sigma (N, L) the calibrated 1-sigma
        uncertainty in the same units (NaN, with one warning, for a model without calibration).

        ``flux``: prepared spectra (N, P) float32 on the model's grid (rows of a Dataset), or
        one or a list of :class:`stellarparams.sdss.Spectrum` records (then they are
        preprocessed here with the model's own preprocessing config; ``rv_kms`` gives their
        radial velocities, default from each record's redshift ``z``).
        """
        from .sdss import Spectrum

        if isinstance(flux, Spectrum) or (isinstance(flux, (list, tuple)) and flux and isinstance(flux[0], Spectrum)):
            flux = self.prepare_spectra(flux, rv_kms=rv_kms)
        if return_sigma:
            r = self._full(flux, batch_size)
            return r["pred"], r["sigma"]
        return self.predict_scaled(flux, batch_size).astype(np.float64) * self.scale + self.center

    def _full(self, flux, batch_size=4096) -> dict:
        from .uncertainty import predict_full

        if self.uncertainty is None and not self._warned_uncalibrated:
            warnings.warn("this model has no uncertainty calibration (trained before stellarparams had it): "
                          "sigma and ood_score are NaN; retrain it to get them", stacklevel=3)
            self._warned_uncalibrated = True
        if not isinstance(flux, torch.Tensor):
            flux = np.asarray(flux, np.float32)
        if flux.ndim != 2 or flux.shape[1] != self.n_in:
            raise ValueError(f"flux must have shape (N, {self.n_in}) (prepared spectra on the model's grid); "
                             f"got {tuple(flux.shape)}")
        return predict_full(self, flux, batch_size)

    def predict_full(self, flux, batch_size: int = 4096, rv_kms=None) -> pd.DataFrame:
        """Everything about each spectrum as a table, one row per input row::

            <labels>, sigma_<label> (1-sigma, same units), ood_score, flag_unlike_training,
            flag_label_hull, flag_out_of_range

        ``ood_score`` > 1: the flux is less like the training spectra than 99.5% of held-out
        training-distribution stars (cut on it); ``flag_label_hull``: the predicted labels lie
        outside the convex hull of the training labels. Accepts what :meth:`predict` accepts.
        """
        from .sdss import Spectrum

        if isinstance(flux, Spectrum) or (isinstance(flux, (list, tuple)) and flux and isinstance(flux[0], Spectrum)):
            flux = self.prepare_spectra(flux, rv_kms=rv_kms)
        r = self._full(flux, batch_size)
        df = pd.DataFrame(r["pred"], columns=self.label_names)
        for j, name in enumerate(self.label_names):
            df[f"sigma_{name}"] = r["sigma"][:, j]
        df["ood_score"] = r["ood_score"]
        df["flag_unlike_training"] = r["flag_unlike_training"]
        df["flag_label_hull"] = r["flag_label_hull"]
        df["flag_out_of_range"] = self.out_of_range(r["pred"])
        return df

    def predict_spectra(self, spectra, rv_kms=None) -> np.ndarray:
        """Spectrum record(s) -> (N, L) physical labels; raises SpectrumError for a bad one."""
        return self.predict(self.prepare_spectra(spectra, rv_kms))

    def prepare_spectra(self, spectra, rv_kms=None) -> np.ndarray:
        """Spectrum record(s) -> (N, P) float32 flux preprocessed like the training data."""
        from .sdss import Spectrum

        spectra = [spectra] if isinstance(spectra, Spectrum) else list(spectra)
        if rv_kms is None:
            rv_kms = [rv_from_z(getattr(s, "z", float("nan"))) for s in spectra]
        rv_kms = np.broadcast_to(np.asarray(rv_kms, np.float64), (len(spectra),))
        prep, config = self.preprocessor()
        return np.stack([prep(s, float(v), config)[0] for s, v in zip(spectra, rv_kms)]).astype(np.float32)

    def preprocessor(self):
        """(preprocess function, its config) that reproduce the training data's preprocessing."""
        from .prepare import PrepareConfig, preprocess

        return preprocess, PrepareConfig.from_dict(self.prepare_config) if self.prepare_config else PrepareConfig()

    def out_of_range(self, pred) -> np.ndarray:
        """(N, L) physical predictions -> (N,) bool, True where any label is outside the training range."""
        pred = np.asarray(pred, np.float64)
        flag = np.zeros(len(pred), bool)
        for j, name in enumerate(self.label_names):
            if name in self.label_ranges:
                lo, hi = self.label_ranges[name]
                with np.errstate(invalid="ignore"):
                    flag |= (pred[:, j] < lo) | (pred[:, j] > hi)
        return flag

    def predict_frame(self, flux, batch_size: int = 4096) -> pd.DataFrame:
        """Same as :meth:`predict_full` (labels, sigmas, ood_score, flags)."""
        return self.predict_full(flux, batch_size)

    # ------------------------------------------------------------------ compatibility
    def check_dataset(self, dataset):
        """Raise ValueError if a prepared dataset's grid/preprocessing differ from the model's.

        A different package version only warns (predictions may differ slightly).
        """
        attrs = getattr(dataset, "attrs", dataset)
        name = getattr(dataset, "path", "the data")
        grid = attrs.get("grid")
        if grid and self.grid and {k: grid[k] for k in grid} != {k: self.grid.get(k) for k in grid}:
            raise ValueError(f"{name}: its wavelength grid {grid} differs from the model's {self.grid}; "
                             "re-prepare the spectra with the model's grid (or use `stellarparams predict` on the FITS files)")
        prep = attrs.get("preprocess")
        if prep and self.prepare_config and _comparable(prep) != _comparable(self.prepare_config):
            raise ValueError(f"{name}: preprocessing {prep} differs from the model's {self.prepare_config}; "
                             "re-prepare the spectra with the model's settings")
        version = attrs.get("version")
        if version and version != self.version:
            warnings.warn(f"{name} was prepared with stellarparams {version}, the model trained with {self.version}",
                          stacklevel=2)


def _comparable(prep: dict) -> dict:
    # the label/column mapping does not change the flux a model sees
    return {k: v for k, v in prep.items() if k not in ("labels", "rv_column", "reject_classes", "min_coverage")}


def rv_from_z(z) -> float:
    """Radial velocity (km/s) from a redshift: inverse of 1+z = sqrt((1+b)/(1-b)), b = v/c."""
    from astropy.constants import c

    z = float(z)
    if not np.isfinite(z):
        return float("nan")
    a = (1.0 + z) ** 2
    return float((a - 1.0) / (a + 1.0) * c.to_value("km/s"))


# ---------------------------------------------------------------------- save / load
def _architecture(net) -> tuple[str, dict | None]:
    if isinstance(net, StellarNet):
        return "StellarNet", None
    cls = type(net)
    cfg = net.to_dict() if hasattr(net, "to_dict") else None
    return f"{cls.__module__}:{cls.__qualname__}", cfg


def model_meta(model: Model) -> dict:
    arch, net_config = _architecture(model.net)
    tc = model.train_config
    return {
        "format": FORMAT,
        "architecture": arch,
        "net_config": net_config,
        "model_config": model.model_config.to_dict() if model.model_config is not None else None,
        "train_config": tc.to_dict() if hasattr(tc, "to_dict") else tc,
        "label_names": model.label_names,
        "label_units": model.label_units,
        "scaler": {"kind": "sklearn.preprocessing.RobustScaler", "center": model.center.tolist(),
                   "scale": model.scale.tolist()},
        "label_ranges": model.label_ranges,
        "grid": model.grid,
        "prepare_config": model.prepare_config,
        "metrics": model.metrics,
        "best_val_loss": model.best_val_loss,
        "history": model.history,
        "dataset_input_hash": model.dataset_hash,
        "seed": model.seed,
        "fingerprint": model.fingerprint,
        "stellarparams_version": model.version,
        "torch_version": torch.__version__,
    }


def _write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_model(model: Model, folder) -> Path:
    """Write ``folder/weights.safetensors`` and ``folder/model.json`` (+ train_log.csv).

    A new folder appears at once (written beside it, then renamed). In an existing folder
    (e.g. the training folder) each file is replaced atomically, model.json last.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, tmp / WEIGHTS, metadata={"format": str(FORMAT)})
    meta = model_meta(model)
    meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)
    if model.history:
        pd.DataFrame(model.history).to_csv(tmp / "train_log.csv", index=False)
    if model.uncertainty is not None:
        model.uncertainty.save(tmp, meta["weights_sha256"])
    _write_json(tmp / META, meta)
    if not folder.exists():
        os.rename(tmp, folder)
        return folder
    if model.uncertainty is None:  # a calibration of other weights must not survive next to these
        for name in (UNC_JSON, UNC_TENSORS):
            (folder / name).unlink(missing_ok=True)
    for name in [WEIGHTS, "train_log.csv", UNC_TENSORS, UNC_JSON, META]:  # model.json last: it vouches for the weights
        if (tmp / name).exists():
            os.replace(tmp / name, folder / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build_net(meta, folder):
    arch = meta.get("architecture", "StellarNet")
    if arch == "StellarNet":
        return StellarNet(ModelConfig.from_dict(meta["model_config"]))
    # another network of this package (a baseline): rebuilt from its JSON config by a
    # classmethod `from_dict`; modules outside stellarparams are never imported
    modname, _, qualname = arch.partition(":")
    if not modname.startswith("stellarparams.") or not qualname.isidentifier():
        raise ModelFileError(f"{folder / META}: architecture {arch!r} is not one of stellarparams' networks; refusing to load it")
    cls = getattr(importlib.import_module(modname), qualname, None)
    if cls is None or not hasattr(cls, "from_dict") or meta.get("net_config") is None:
        raise ModelFileError(f"{folder / META}: cannot rebuild {arch!r} (it needs a `from_dict` classmethod and a saved net_config)")
    return cls.from_dict(meta["net_config"])


def load_model(folder) -> Model:
    """Rebuild a model folder written by :func:`save_model`. Only tensors and JSON are read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .train import TrainConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no model folder here (train one with `stellarparams train` or `stellarparams run`)")
    meta_path, weights_path = folder / META, folder / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.exists():
            raise ModelFileError(f"{p}: missing; the model folder is incomplete (re-train or copy the whole folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{meta_path}: not valid JSON ({e}); the file is damaged") from e
    if meta.get("format", 0) > FORMAT:
        raise ModelFileError(f"{meta_path}: model format {meta.get('format')} is newer than this stellarparams "
                             f"({__version__}) reads; upgrade stellarparams")
    digest = sha256_file(weights_path)
    if digest != meta.get("weights_sha256"):
        raise ModelFileError(f"{weights_path}: sha256 {digest[:12]}... does not match the {meta.get('weights_sha256', '')[:12]}... "
                             f"recorded in {meta_path}; the weights were changed or damaged")
    net = _build_net(meta, folder)
    try:
        state = load_file(weights_path)
        net.load_state_dict(state)
    except (SafetensorError, RuntimeError) as e:
        raise ModelFileError(f"{weights_path}: weights do not fit the architecture in {meta_path} ({str(e)[:300]})") from e
    if meta.get("stellarparams_version") != __version__:
        warnings.warn(f"{folder}: model written by stellarparams {meta.get('stellarparams_version')}, "
                      f"this is {__version__}", stacklevel=2)
    tc = meta.get("train_config")
    mc = meta.get("model_config")
    unc = _load_uncertainty(folder, digest)
    return Model(net, meta["label_names"], meta["scaler"]["center"], meta["scaler"]["scale"],
                 model_config=ModelConfig.from_dict(mc) if mc else None,
                 train_config=TrainConfig.from_dict(tc) if tc else None,
                 label_units=meta.get("label_units"), label_ranges=meta.get("label_ranges"),
                 grid=meta.get("grid"), prepare_config=meta.get("prepare_config"), metrics=meta.get("metrics"),
                 history=meta.get("history"), dataset_hash=meta.get("dataset_input_hash", ""), seed=meta.get("seed"),
                 version=meta.get("stellarparams_version", ""), best_val_loss=meta.get("best_val_loss"),
                 fingerprint=meta.get("fingerprint", ""), uncertainty=unc)


def _load_uncertainty(folder: Path, weights_sha256: str):
    """The folder's calibration, or None (with a warning when it is there but unusable)."""
    from .uncertainty import Uncertainty

    if not (folder / UNC_JSON).exists():
        return None  # an older model: Model warns once when sigma is asked for
    try:
        unc, umeta = Uncertainty.load(folder)
    except (ValueError, KeyError, OSError) as e:
        warnings.warn(f"{e}; uncertainties disabled (retrain to recalibrate)", stacklevel=3)
        return None
    if umeta.get("weights_sha256") != weights_sha256:
        warnings.warn(f"{folder / UNC_JSON}: calibrated for other weights; uncertainties disabled "
                      "(retrain to recalibrate)", stacklevel=3)
        return None
    return unc
