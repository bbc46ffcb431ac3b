"""A trained model and its folder format: weights in safetensors, everything else in JSON.

``MODEL/``::

    weights.safetensors   network weights (no pickle: loading never executes code)
    model.json            model + train config, grid and preprocessing config of the data it
                          was trained on, target scalers, label names/units/ranges, metrics,
                          history, package version, dataset hash, seed, sha256 of the weights,
                          and the manifest: the sha256 of every other file of the folder and
                          of model.json's own content
    train_log.csv         one row per epoch (written by `train`)
    uncertainty.json      calibration of the per-star sigmas and the extrapolation flags
    uncertainty.safetensors   (written by `train`; see stellarparams.uncertainty)

Loading checks every file against the manifest and refuses, naming the file, when one does
not match. Folders written before the manifest (they have no ``manifest`` key) are checked
as they were then: the weights' sha256 and the uncertainty tensors' sha256.

>>> model = stellarparams.load_model("runs/default/model")
>>> y = model.predict(flux)          # flux (N, P) prepared spectra -> (N, L) physical units
>>> y, sigma = model.predict(flux, return_sigma=True)   # + (N, L) calibrated 1-sigma
>>> df = model.predict_full(flux)    # labels, sigma_<label>, ood_score, flags as a DataFrame
"""
from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ._version import __version__
from .config import ModelConfig, TrainConfig
from .devices import module_device, resolve_device
from .files import write_bytes, write_text
from .model import StellarNet, count_parameters
from .physics import rv_from_z
from .records import jsonable, sha256_bytes, sha256_file
from .uncertainty import UNC_JSON, UNC_TENSORS, Uncertainty, forward, predict_full

FORMAT = 1
WEIGHTS = "weights.safetensors"
META = "model.json"
LOG = "train_log.csv"


class ModelFileError(ValueError):
    """A model folder that cannot be loaded (missing file, hash mismatch, unknown format)."""


def weights_bytes(net) -> bytes:
    """The bytes of ``weights.safetensors`` for a network (what :func:`save_model` writes).

    Parameters
    ----------
    net : torch.nn.Module

    Returns
    -------
    bytes
        Its state dict in safetensors format (CPU, contiguous), with the folder format in
        the metadata; :attr:`Model.weights_sha256` is their sha256.
    """
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save(state, metadata={"format": str(FORMAT)})


# ---------------------------------------------------------------------- the parts a Model holds
@dataclass
class TargetScaler:
    """Labels between physical and scaled units (RobustScaler median and IQR per label), with
    their names, units and the range each spanned in training (for the out-of-range flag)."""

    label_names: list
    center: np.ndarray                     # (L,) physical = scaled * scale + center
    scale: np.ndarray
    label_units: list = None
    label_ranges: dict = None

    def __post_init__(self):
        self.label_names = list(self.label_names)
        self.center = np.asarray(self.center, np.float64)
        self.scale = np.asarray(self.scale, np.float64)
        self.label_units = list(self.label_units or [""] * len(self.label_names))
        self.label_ranges = dict(self.label_ranges or {})

    def physical(self, scaled) -> np.ndarray:
        """(N, L) scaled -> (N, L) float64 physical units."""
        return np.asarray(scaled, np.float64) * self.scale + self.center

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


@dataclass
class Preprocessing:
    """How raw spectra become the rows the network reads: the training data's grid and
    `prepare` config (dicts), and the function that applies them."""

    grid: dict = None
    prepare_config: dict = None

    def __post_init__(self):
        self.grid = dict(self.grid or {})
        self.prepare_config = dict(self.prepare_config or {})

    def preprocessor(self):
        """(preprocess function, its config) that reproduce the training data's preprocessing."""
        from .preprocess import PrepareConfig, preprocess

        return preprocess, PrepareConfig.from_dict(self.prepare_config) if self.prepare_config else PrepareConfig()

    def apply(self, spectra, rv_kms=None, n_pix: int | None = None) -> np.ndarray:
        """Spectrum record(s) -> (N, P) float32 flux preprocessed like the training data.

        A record that cannot be preprocessed (too little coverage, no good pixel, bad arrays)
        gets a row of NaN (so its labels are NaN) and one warning naming it and the reason;
        the others are unaffected. ``n_pix``: P, for an empty list (then (0, P)).
        """
        from .spectrum import Record

        spectra = [spectra] if isinstance(spectra, Record) else list(spectra)
        if rv_kms is None:
            rv_kms = [rv_from_z(getattr(s, "z", float("nan"))) for s in spectra]
        rv_kms = np.broadcast_to(np.asarray(rv_kms, np.float64), (len(spectra),))
        prep, config = self.preprocessor()
        n_pix = n_pix or config.grid.n_pix
        out = np.full((len(spectra), n_pix), np.nan, np.float32)
        for i, (s, v) in enumerate(zip(spectra, rv_kms)):
            try:
                out[i] = prep(s, float(v), config)[0]
            except Exception as e:  # one bad record: NaN labels for it, the rest go on
                name = getattr(s, "path", None) or getattr(s, "name", None) or f"record {i}"
                warnings.warn(f"spectrum {i} ({name}): {e}; its labels are NaN", stacklevel=4)
        return out


@dataclass
class ModelCard:
    """What the model is and where it came from: configs, metrics, history, hashes, versions."""

    model_config: ModelConfig = None
    train_config: TrainConfig = None
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    dataset_hash: str = ""
    seed: int = None
    version: str = __version__
    best_val_loss: float = None
    fingerprint: str = ""          # of the training run (config + data), for resume/skip

    def __post_init__(self):
        self.metrics = dict(self.metrics or {})
        self.history = list(self.history or [])


class _Part:
    """A field of one of a model's parts, as an attribute of the model (read and write)."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, model, owner=None):
        return self if model is None else getattr(getattr(model, self.part), self.name)

    def __set__(self, model, value):
        setattr(getattr(model, self.part), self.name, value)


class Model:
    """A trained network plus what it needs to answer: prediction lives here.

    Parts it holds (their fields read as attributes of the model, e.g. ``model.center``):

    - ``net``: nn.Module mapping (B, P) standardized flux -> (B, L) scaled targets
    - ``scaler``: :class:`TargetScaler` (label_names, label_units, center, scale, label_ranges)
    - ``preprocessing``: :class:`Preprocessing` (grid, prepare_config) for raw spectra
    - ``card``: :class:`ModelCard` (model/train config, metrics, history, dataset hash, seed,
      version, best_val_loss, fingerprint)
    - ``uncertainty``: :class:`stellarparams.uncertainty.Uncertainty` or None (then sigma is NaN)

    The keyword arguments are the fields of those parts.
    """

    # the parts' fields, read and written as attributes of the model (model.center is model.scaler.center)
    label_names, center, scale, label_units, label_ranges = (_Part("scaler") for _ in range(5))
    grid, prepare_config = _Part("preprocessing"), _Part("preprocessing")
    model_config, train_config, metrics, history, dataset_hash, seed, version, best_val_loss, fingerprint = (
        _Part("card") for _ in range(9))

    def __init__(self, net, label_names, center, scale, *, label_units=None, label_ranges=None, grid=None,
                 prepare_config=None, uncertainty=None, **card):
        self.net = net.eval()
        self.scaler = TargetScaler(label_names, center, scale, label_units, label_ranges)
        self.preprocessing = Preprocessing(grid, prepare_config)
        self.card = ModelCard(**card)
        self.uncertainty = uncertainty
        self.path = None  # the model folder it was loaded from or last saved to (None: only in memory)
        self._warned_uncalibrated = False

    def __repr__(self):
        return (f"Model(labels={self.label_names}, n_in={self.n_in}, params={count_parameters(self.net)}, "
                f"version={self.version!r})")

    @property
    def device(self) -> torch.device:
        """Where the network runs (predictions move each batch there and back to the CPU)."""
        return module_device(self.net)

    def to(self, device) -> "Model":
        """Move the network to ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``).

        Parameters
        ----------
        device : str or torch.device
            As for :func:`stellarparams.devices.resolve_device`.

        Returns
        -------
        Model
            This model.
        """
        self.net.to(resolve_device(device))
        return self

    @property
    def n_in(self) -> int:
        return int(self.grid.get("n_pix") or getattr(self.model_config, "n_in", 0))

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights as :func:`save_model` writes them (the file's hash for a loaded
        model; computed from the state dict for any model). Identifies the model's weights."""
        return sha256_bytes(weights_bytes(self.net))

    # ------------------------------------------------------------------ inference
    def _flux(self, flux, rv_kms):
        from .readers import from_specutils, is_specutils
        from .spectrum import Record

        if is_specutils(flux) or (isinstance(flux, (list, tuple)) and flux and is_specutils(flux[0])):
            recs = [from_specutils(s) for s in (flux if isinstance(flux, (list, tuple)) else [flux])]
            flux = [r for rec in recs for r in (rec if isinstance(rec, list) else [rec])]
        if isinstance(flux, Record) or (isinstance(flux, (list, tuple)) and flux and isinstance(flux[0], Record)):
            return self.preprocessing.apply(flux, rv_kms, self.n_in)
        if isinstance(flux, (list, tuple)) and not flux:  # no spectra: no rows
            return np.zeros((0, self.n_in), np.float32)
        x = flux.to(torch.float32) if isinstance(flux, torch.Tensor) else np.asarray(flux, np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"flux must have shape (N, {self.n_in}) (prepared spectra on the model's grid); "
                             f"got {tuple(x.shape)}")
        return x

    def predict_scaled(self, flux, batch_size: int = 4096) -> np.ndarray:
        """flux (N, P) float32 -> (N, L) float32 in scaled target units."""
        x = self._flux(flux, None)
        x = x.cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return forward(self.net, x, len(self.label_names), batch_size)

    def predict(self, flux, batch_size: int = 4096, rv_kms=None, return_sigma: bool = False):
        """Labels in physical units, (N, L) float64, columns in ``label_names`` order.

        Parameters
        ----------
        flux : array, torch.Tensor, Record, specutils Spectrum or a list of them
            Prepared spectra (N, P) float32 on the model's grid (rows of a Dataset; N may be
            0), or :class:`stellarparams.spectrum.Record` records (any survey's reader, or
            :func:`stellarparams.readers.from_arrays`) or specutils ``Spectrum``/``Spectrum1D``
            objects (:func:`stellarparams.readers.from_specutils`), then preprocessed here with
            the model's own preprocessing config.
        batch_size : int
            Spectra per forward pass.
        rv_kms : float or array, optional
            Radial velocities of records (default: from each record's redshift ``z``).
        return_sigma : bool
            Also return the calibrated 1-sigma uncertainty (NaN, with one warning, for a
            model without calibration).

        Returns
        -------
        ndarray, or (ndarray, ndarray)
            (N, L) labels, and with ``return_sigma`` (N, L) sigmas in the same units.
        """
        flux = self._flux(flux, rv_kms)
        if return_sigma:
            r = self._full(flux, batch_size)
            return r["pred"], r["sigma"]
        return self.scaler.physical(self.predict_scaled(flux, batch_size))

    def _full(self, flux, batch_size=4096) -> dict:
        if self.uncertainty is None and not self._warned_uncalibrated:
            warnings.warn("this model has no uncertainty calibration (trained before stellarparams had it): "
                          "sigma and ood_score are NaN; retrain it to get them", stacklevel=3)
            self._warned_uncalibrated = True
        return predict_full(self.net, self.center, self.scale, self.uncertainty, flux, batch_size)

    def predict_arrays(self, flux, batch_size: int = 4096) -> dict:
        """Labels, sigmas, 95% intervals and flags of prepared (N, P) flux as arrays, physical units.

        Returns the dict of :func:`stellarparams.uncertainty.predict_full`: "pred", "sigma", "lo95",
        "hi95" (N, L), "ood_score" (N,), "flag_unlike_training", "flag_label_hull" (N,) bool.
        """
        return self._full(flux, batch_size)

    def predict_full(self, flux, batch_size: int = 4096, rv_kms=None) -> pd.DataFrame:
        """Everything about each spectrum as a table, one row per input row.

        Columns: ``<labels>``, ``sigma_<label>`` (half-width of the 68.3% interval, same units),
        ``lo95_<label>``, ``hi95_<label>`` (the 95.4% interval), ``ood_score``,
        ``flag_unlike_training``, ``flag_label_hull``, ``flag_out_of_range``.
        ``ood_score`` > 1: the flux is less like the training spectra than 99.5% of held-out
        training-distribution stars (cut on it); ``flag_label_hull``: the predicted labels lie
        outside the convex hull of the training labels. A row with NaN or inf flux has NaN
        labels, ood_score inf and flag_unlike_training True (with a warning).

        Parameters
        ----------
        flux, batch_size, rv_kms
            As for :meth:`predict`.

        Returns
        -------
        pandas.DataFrame
            One row per input row (none for an empty input).
        """
        r = self._full(self._flux(flux, rv_kms), batch_size)
        df = pd.DataFrame(r["pred"], columns=self.label_names)
        for j, name in enumerate(self.label_names):
            df[f"sigma_{name}"] = r["sigma"][:, j]
        for j, name in enumerate(self.label_names):
            df[f"lo95_{name}"], df[f"hi95_{name}"] = r["lo95"][:, j], r["hi95"][:, j]
        df["ood_score"] = r["ood_score"]
        df["flag_unlike_training"] = r["flag_unlike_training"]
        df["flag_label_hull"] = r["flag_label_hull"]
        df["flag_out_of_range"] = self.out_of_range(r["pred"])
        return df

    def prepare_spectra(self, spectra, rv_kms=None) -> np.ndarray:
        """Spectrum record(s) -> (N, P) float32 flux preprocessed like the training data."""
        return self.preprocessing.apply(spectra, rv_kms)

    def preprocessor(self):
        """(preprocess function, its config) that reproduce the training data's preprocessing."""
        return self.preprocessing.preprocessor()

    def out_of_range(self, pred) -> np.ndarray:
        """(N, L) physical predictions -> (N,) bool, True where any label is outside the training range."""
        return self.scaler.out_of_range(pred)

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


# ---------------------------------------------------------------------- save / load
def _architecture(net) -> tuple[str, dict | None]:
    if isinstance(net, StellarNet):
        return "StellarNet", None
    cls = type(net)
    cfg = net.to_dict() if hasattr(net, "to_dict") else None
    return f"{cls.__module__}:{cls.__qualname__}", cfg


def model_meta(model: Model) -> dict:
    """The content of model.json (without the manifest)."""
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


def _meta_text(meta: dict) -> str:
    """model.json's exact text: loading re-creates it from the parsed content and compares."""
    return json.dumps(meta, indent=1) + "\n"


def _self_sha256(meta: dict) -> str:
    return sha256_bytes(_meta_text(dict(meta, manifest=dict(meta["manifest"], model_json=""))).encode())


def save_model(model: Model, folder) -> Path:
    """Write a model folder: weights, train log, calibration, then model.json with the manifest.

    Parameters
    ----------
    model : Model
        The model to write.
    folder : str or Path
        The model folder (created when missing). Each file is replaced atomically, model.json
        last: until it is written a reader sees the old folder or a refused (mismatched) one.

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = weights_bytes(model.net)
    write_bytes(folder / WEIGHTS, data)
    written = [WEIGHTS]
    if model.history:
        write_text(folder / LOG, pd.DataFrame(model.history).to_csv(index=False))
        written.append(LOG)
    if model.uncertainty is not None:
        written += model.uncertainty.save(folder, sha256_bytes(data))
    else:  # a calibration of other weights must not survive next to these
        for name in (UNC_JSON, UNC_TENSORS):
            (folder / name).unlink(missing_ok=True)
    meta = jsonable(model_meta(model))
    meta["weights_sha256"] = sha256_bytes(data)
    meta["manifest"] = {"files": {name: sha256_file(folder / name) for name in written}, "model_json": ""}
    meta["manifest"]["model_json"] = _self_sha256(meta)
    write_text(folder / META, _meta_text(meta))
    model.path = folder
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


def _check_file(path: Path, expected: str, where: Path):
    if not path.exists():
        raise ModelFileError(f"{path}: missing; the model folder is incomplete (re-train or copy the whole folder)")
    digest = sha256_file(path)
    if digest != expected:
        raise ModelFileError(f"{path}: sha256 {digest[:12]}... does not match the {str(expected)[:12]}... recorded in "
                             f"{where}; the file was changed or damaged; refusing to load it")


def _check_manifest(folder: Path, meta: dict, text: str):
    """Every file of the manifest, and model.json's own content, as written; else ModelFileError."""
    man = meta["manifest"]
    if text != _meta_text(meta) or not isinstance(man, dict) or _self_sha256(meta) != man.get("model_json"):
        raise ModelFileError(f"{folder / META}: its content does not match the sha256 recorded in its manifest; "
                             "the file was changed or damaged; refusing to load it")
    for name, digest in man.get("files", {}).items():
        if Path(name).name != name:
            raise ModelFileError(f"{folder / META}: manifest names {name!r}, not a file of the folder; refusing to load it")
        _check_file(folder / name, digest, folder / META)


def load_model(folder, device="cpu") -> Model:
    """Rebuild a model folder written by :func:`save_model`. Only tensors and JSON are read.

    Parameters
    ----------
    folder : str or Path
        The model folder.
    device : str or torch.device
        Where the network runs (:func:`stellarparams.devices.resolve_device`; ``"auto"``: a
        GPU when present). The folder holds CPU tensors whatever device trained it; they are
        read onto the CPU and moved there (like ``torch.load``'s ``map_location``).

    Returns
    -------
    Model

    Raises
    ------
    ModelFileError
        A missing file, a file that does not match the manifest (named), an unknown format
        or architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, dev = Path(folder), resolve_device(device)
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no model folder here (train one with `stellarparams train` or `stellarparams run`)")
    meta_path, weights_path = folder / META, folder / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.exists():
            raise ModelFileError(f"{p}: missing; the model folder is incomplete (re-train or copy the whole folder)")
    try:
        text = meta_path.read_text(encoding="utf-8")
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{meta_path}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(meta, dict):
        raise ModelFileError(f"{meta_path}: not a model description; the file is damaged")
    if meta.get("format", 0) > FORMAT:
        raise ModelFileError(f"{meta_path}: model format {meta.get('format')} is newer than this stellarparams "
                             f"({__version__}) reads; upgrade stellarparams")
    if "manifest" in meta:
        _check_manifest(folder, meta, text)
    _check_file(weights_path, meta.get("weights_sha256", ""), meta_path)
    net = _build_net(meta, folder)
    try:
        net.load_state_dict(load_file(weights_path, device="cpu"))
    except (SafetensorError, RuntimeError) as e:
        raise ModelFileError(f"{weights_path}: weights do not fit the architecture in {meta_path} ({str(e)[:300]})") from e
    if meta.get("stellarparams_version") != __version__:
        warnings.warn(f"{folder}: model written by stellarparams {meta.get('stellarparams_version')}, "
                      f"this is {__version__}", stacklevel=2)
    tc, mc = meta.get("train_config"), meta.get("model_config")
    model = Model(net.to(dev), meta["label_names"], meta["scaler"]["center"], meta["scaler"]["scale"],
                  model_config=ModelConfig.from_dict(mc) if mc else None,
                  train_config=TrainConfig.from_dict(tc) if tc else None,
                  label_units=meta.get("label_units"), label_ranges=meta.get("label_ranges"),
                  grid=meta.get("grid"), prepare_config=meta.get("prepare_config"), metrics=meta.get("metrics"),
                  history=meta.get("history"), dataset_hash=meta.get("dataset_input_hash", ""), seed=meta.get("seed"),
                  version=meta.get("stellarparams_version", ""), best_val_loss=meta.get("best_val_loss"),
                  fingerprint=meta.get("fingerprint", ""), uncertainty=_load_uncertainty(folder, meta["weights_sha256"]))
    model.path = folder
    return model


def _load_uncertainty(folder: Path, weights_sha256: str):
    """The folder's calibration, None when it has none (an older model); ModelFileError when it is
    there but damaged or made for other weights."""
    if not (folder / UNC_JSON).exists() and not (folder / UNC_TENSORS).exists():
        return None  # an older model: Model warns once when sigma is asked for
    try:
        unc, umeta = Uncertainty.load(folder)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelFileError(f"{e}; the calibration is damaged; refusing to load the model "
                             "(retrain, or copy the whole folder again)") from e
    if umeta.get("weights_sha256") != weights_sha256:
        raise ModelFileError(f"{folder / UNC_JSON}: calibrated for other weights than {folder / WEIGHTS}; "
                             "refusing to load the model (retrain to recalibrate)")
    return unc
