"""The prepared-dataset store: one chunked HDF5 file plus its side files.

Why HDF5 (h5py): one self-describing file that astropy/TOPCAT users already know,
chunked row-wise so training and prediction read any subset of rows without loading
the rest, and readable from any language. Zarr would split it into thousands of small
files, which travel badly between machines.

Layout of ``DATASET/dataset.h5`` (N spectra, P grid pixels, L labels)::

    flux       (N, P) float32   standardized rest-frame flux on the common grid
    valid      (N, P) bool      pixel came from good data (not ivar==0/masked/clamped)
    offset     (N,)   float32   mean/std of the resampled flux before standardization (flux + offset is
                                the physical flux in units of its std); absent in older datasets
    sigma      (N, P) float32   per-pixel 1-sigma noise of ``flux``, in the same standardized
                                units (the file's 1/sqrt(ivar), resampled onto the grid by linear
                                interpolation between good pixels and divided by the spectrum's
                                std); +inf where ``valid`` is False (no data there). Written by
                                ``prepare``; datasets made before it, or by :func:`write_dataset`
                                without ``sigma``, lack it (:meth:`Dataset.sigma` returns None).
    labels     (N, L) float32   physical units; NaN where the catalog had -9999
    label_err  (N, L) float32   catalog uncertainties; NaN where not given
    split      (N,)   uint8     0 train, 1 val, 2 test
    plate, mjd, fiberid (N,) int32
    object_id  (N,)   str       grouping key (STAR_ID, else the spectrum's identifier: SDSS
                                PLATE-MJD-FIBER, LAMOST OBSID, DESI TARGETID, a table's ID)
    file       (N,)   str       source spectrum path
    rv, snr    (N,)   float32   km/s; median S/N per pixel
    extra/NAME (N,)   float64   other numeric catalog columns (e.g. TEFF_TRUE)

File attributes (JSON strings): ``label_names``, ``label_units``, ``grid``,
``preprocess``, ``version``, ``input_hash``, ``created``.
Side files written by ``prepare``: ``rejects.csv`` (file, plate, mjd, fiberid, reason,
detail, id: every file, catalog row or spectrum left out) and ``summary.json`` (counts by reason, the
``input_hash`` of the job and the ``dataset_sha256`` of the published ``dataset.h5``: a
re-run is a no-op only when both match). ``.lock`` is the advisory lock of the one writer.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .files import atomic_write

SPLITS = {"train": 0, "val": 1, "test": 2}
DATA_FILE = "dataset.h5"
LABEL_UNITS = {"teff": "K", "feh": "dex", "logg": "dex"}


@dataclass(frozen=True)
class Grid:
    """Common wavelength grid, uniform in log10(lambda / Angstrom) (docs/method.md step 1).

    The default is the paper's; ``Grid.from_angstrom(3900, 5000, 1500)`` or
    :func:`parse_grid` (``--grid``) make any other (docs/surveys.md).
    """

    loglam_min: float = 3.5754
    loglam_max: float = 3.9670
    n_pix: int = 4000

    @property
    def loglam(self) -> np.ndarray:
        return np.linspace(self.loglam_min, self.loglam_max, self.n_pix)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_angstrom(cls, lo: float, hi: float, n_pix: int) -> "Grid":
        """N pixels uniform in log10(lambda) from ``lo`` to ``hi`` Angstrom (both included).

        Parameters
        ----------
        lo, hi : float
            First and last pixel, Angstrom; 0 < lo < hi.
        n_pix : int
            Number of pixels, at least 2.

        Returns
        -------
        Grid
        """
        lo, hi, n_pix = float(lo), float(hi), int(n_pix)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi) or n_pix < 2:
            raise ValueError(f"a grid needs 0 < MIN < MAX Angstrom and N >= 2, got {lo}, {hi}, {n_pix}")
        return cls(float(np.log10(lo)), float(np.log10(hi)), n_pix)


def parse_grid(text: str) -> Grid:
    """``"MIN_A,MAX_A,N"`` (the ``--grid`` option) -> :class:`Grid`.

    Parameters
    ----------
    text : str
        e.g. ``"3900,5000,1500"``: 1500 pixels uniform in log10 lambda, 3900-5000 Angstrom.

    Returns
    -------
    Grid

    Raises
    ------
    ValueError
        Not three numbers, or not 0 < MIN < MAX and N >= 2.
    """
    parts = str(text).split(",")
    try:
        lo, hi, n = float(parts[0]), float(parts[1]), parts[2].strip()
        if len(parts) != 3 or not n.isdigit():
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"--grid: expected MIN_A,MAX_A,N like 3900,5000,1500, got {text!r}") from None
    return Grid.from_angstrom(lo, hi, int(n))


def dataset_file(path) -> Path:
    """Accept either the dataset folder or the .h5 file itself."""
    path = Path(path)
    return path / DATA_FILE if path.is_dir() or path.suffix != ".h5" else path


_STR = h5py.string_dtype()
_META_COLUMNS = ("plate", "mjd", "fiberid", "object_id", "file", "rv", "snr")


def create_dataset(path, n_pix: int, label_names, attrs: dict, chunk_rows: int = 256, sigma: bool = False,
                   offset: bool = False, n_rows: int | None = None):
    """Create an empty, resizable store at ``path`` (a .h5 file) and return the open h5py File.

    Parameters
    ----------
    path : str or Path
        The .h5 file to create (it must not exist).
    n_pix : int
        Grid pixels per spectrum.
    label_names : list of str
        Label columns, e.g. ["teff", "feh", "logg"].
    attrs : dict
        File attributes, each stored as JSON.
    chunk_rows : int
        Rows per HDF5 chunk of the (N, P) datasets.
    sigma : bool
        Also create the (N, P) ``sigma`` dataset; :func:`append_rows` then needs ``sigma``.
    offset : bool
        Also create the (N,) ``offset`` dataset; :func:`append_rows` then needs ``offset``.
    n_rows : int, optional
        Make the pixel arrays (flux, valid, sigma, offset) ``n_rows`` long from the start, each one
        contiguous block of the file whose space is reserved now and never filled: rows are written
        in place, at :func:`pixel_offsets`, by any process (the per-row table is still appended).

    Returns
    -------
    h5py.File
        Open for writing; rows are appended with :func:`append_rows`.
    """
    f = h5py.File(path, "w-")
    L = len(label_names)

    def pixels(name, shape, dtype, chunks, **compression):
        if n_rows is None:
            f.create_dataset(name, (0,) + shape, dtype, maxshape=(None,) + shape, chunks=chunks, **compression)
        else:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            f.create_dataset(name, (n_rows,) + shape, dtype, dcpl=dcpl)

    pixels("flux", (n_pix,), np.float32, (chunk_rows, n_pix))
    if sigma:
        pixels("sigma", (n_pix,), np.float32, (chunk_rows, n_pix))
    if offset:
        pixels("offset", (), np.float32, (4096,))
    pixels("valid", (n_pix,), bool, (chunk_rows, n_pix), compression="gzip", compression_opts=1)
    f.create_dataset("labels", (0, L), np.float32, maxshape=(None, L), chunks=(4096, L))
    f.create_dataset("label_err", (0, L), np.float32, maxshape=(None, L), chunks=(4096, L))
    for name, dt in [("split", np.uint8), ("plate", np.int32), ("mjd", np.int32), ("fiberid", np.int32),
                     ("object_id", _STR), ("file", _STR), ("rv", np.float32), ("snr", np.float32)]:
        f.create_dataset(name, (0,), dt, maxshape=(None,), chunks=(4096,))
    f.attrs["label_names"] = json.dumps(list(label_names))
    f.attrs["label_units"] = json.dumps([LABEL_UNITS.get(n, "") for n in label_names])
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v)
    return f


PIXEL_ARRAYS = ("flux", "valid", "sigma", "offset")


def pixel_offsets(f) -> dict:
    """Where the pixel arrays of a store made with ``n_rows`` (:func:`create_dataset`) lie in its file.

    Returns
    -------
    dict
        name -> (byte offset of row 0, bytes per row), for those of :data:`PIXEL_ARRAYS` it has.
    """
    out = {}
    for name in PIXEL_ARRAYS:
        if name in f:
            ds = f[name]
            start = ds.id.get_offset() if ds.size else 0  # an empty array has no place in the file
            if start is None:
                raise ValueError(f"{f.filename}: {name} is not one contiguous block (not made with n_rows)")
            out[name] = (int(start), int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    return out


def append_rows(f, flux, valid, labels, label_err, split, meta: pd.DataFrame, extra: pd.DataFrame | None = None,
                sigma=None, offset=None):
    """Append a block of rows to a store made by :func:`create_dataset`.

    Parameters
    ----------
    f : h5py.File
        The open store.
    flux, valid : (n, P) arrays
        Standardized flux and its validity mask.
    labels, label_err : (n, L) arrays
    split : (n,) uint8
        0 train, 1 val, 2 test.
    meta : DataFrame
        Columns plate, mjd, fiberid, object_id, file, rv, snr.
    extra : DataFrame, optional
        Other numeric catalog columns (stored under ``extra/``).
    sigma : (n, P) array, optional
        Standardized per-pixel noise; required when the store has a ``sigma`` dataset.
    offset : (n,) array, optional
        mean/std of each spectrum before standardization; required when the store has ``offset``.

    Returns
    -------
    int
        The number of rows now in the store.
    """
    append_pixels(f, flux, valid, sigma, offset)
    return append_table(f, labels, label_err, split, meta, extra)


def append_pixels(f, flux, valid, sigma=None, offset=None) -> int:
    """Append the per-pixel arrays of a block of rows (the large part; :func:`append_table` adds the rest).

    Parameters
    ----------
    f : h5py.File
        A store made by :func:`create_dataset`.
    flux, valid, sigma : (n, P) arrays; offset : (n,) array
        As :func:`append_rows`.

    Returns
    -------
    int
        The number of rows of ``flux`` now in the store.
    """
    if ("sigma" in f) != (sigma is not None):
        raise ValueError("sigma must be given exactly when the store was created with sigma=True")
    if ("offset" in f) != (offset is not None):
        raise ValueError("offset must be given exactly when the store was created with offset=True")
    arrays = {"flux": flux, "valid": valid}
    if sigma is not None:
        arrays["sigma"] = sigma
    if offset is not None:
        arrays["offset"] = offset
    return _append(f, arrays, f["flux"].shape[0], len(flux))


def append_table(f, labels, label_err, split, meta: pd.DataFrame, extra: pd.DataFrame | None = None) -> int:
    """Append the per-row labels, split, metadata and extra columns of a block of rows.

    Parameters
    ----------
    f : h5py.File
        A store made by :func:`create_dataset`.
    labels, label_err, split, meta, extra
        As :func:`append_rows`.

    Returns
    -------
    int
        The number of rows of ``labels`` now in the store.
    """
    n0, n = f["labels"].shape[0], len(labels)
    arrays = {"labels": labels, "label_err": label_err, "split": split}
    arrays.update({c: meta[c].to_numpy() for c in _META_COLUMNS})
    _append(f, arrays, n0, n)
    if extra is not None:
        grp = f.require_group("extra")
        for c in extra.columns:
            if c not in grp:
                grp.create_dataset(c, (n0,), np.float64, maxshape=(None,), chunks=(4096,), fillvalue=np.nan)
            ds = grp[c]
            ds.resize(n0 + n, axis=0)
            ds[n0:n0 + n] = extra[c].to_numpy(np.float64)
    return n0 + n


def _append(f, arrays: dict, n0: int, n: int) -> int:
    for name, a in arrays.items():
        ds = f[name]
        ds.resize(n0 + n, axis=0)
        if ds.dtype == _STR:
            a = np.asarray(a, dtype=object).astype(str).astype(object)
        ds[n0:n0 + n] = a
    return n0 + n


def write_dataset(path, flux, labels, split, label_names=("teff", "feh", "logg"), valid=None,
                  label_err=None, meta: pd.DataFrame | None = None, extra: pd.DataFrame | None = None,
                  attrs: dict | None = None, sigma=None, offset=None):
    """Write a whole dataset from in-memory arrays (tests, simulations, notebooks).

    Parameters
    ----------
    path : str or Path
        The dataset folder; ``dataset.h5`` is written atomically (:func:`files.atomic_write`).
    flux : (N, P) array
    labels : (N, L) array
    split : (N,) array
        0/1/2 or "train"/"val"/"test".
    label_names : list of str
    valid, label_err, meta, extra : optional
        See :func:`append_rows`; defaults: all valid, NaN errors, placeholder identifiers.
    attrs : dict, optional
        Extra file attributes.
    sigma : (N, P) array, optional
        Standardized per-pixel noise (+inf where no data); stored only when given.
    offset : (N,) array, optional
        mean/std of each spectrum before standardization; stored only when given.

    Returns
    -------
    Dataset
        The written dataset, open for reading.
    """
    from . import __version__

    flux = np.asarray(flux, np.float32)
    n, p = flux.shape
    labels = np.asarray(labels, np.float32).reshape(n, -1)
    label_names = list(label_names)
    if labels.shape[1] != len(label_names):
        raise ValueError(f"labels have {labels.shape[1]} columns but label_names has {len(label_names)}: {label_names}")
    split = np.asarray(split)
    if split.dtype.kind in "US":
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split names {unknown}; use train/val/test or 0/1/2")
        split = np.array([SPLITS[s] for s in split], np.uint8)
    if split.shape != (n,) or (split.astype(np.int64) > 2).any() or (split.astype(np.int64) < 0).any():
        raise ValueError(f"split must be ({n},) values in 0/1/2 or train/val/test")
    if valid is None:
        valid = np.ones_like(flux, bool)
    if label_err is None:
        label_err = np.full_like(labels, np.nan)
    if meta is None:
        meta = pd.DataFrame({"plate": 0, "mjd": 0, "fiberid": np.arange(n), "rv": 0.0, "snr": np.nan,
                             "object_id": [str(i) for i in range(n)], "file": ""})
    a = {"grid": Grid(n_pix=p).to_dict(),
         "preprocess": {}, "version": __version__, "input_hash": "", "created": pd.Timestamp.now("UTC").isoformat()}
    a.update(attrs or {})
    folder = Path(path)

    def write(tmp):
        with create_dataset(tmp, p, label_names, a, sigma=sigma is not None, offset=offset is not None) as f:
            append_rows(f, flux, valid, labels, label_err, split.astype(np.uint8), meta, extra,
                        sigma=None if sigma is None else np.asarray(sigma, np.float32),
                        offset=None if offset is None else np.asarray(offset, np.float32))

    atomic_write(folder / DATA_FILE, write)
    return Dataset(folder)


@contextlib.contextmanager
def opened(dataset):
    """Context manager yielding ``dataset`` as an open :class:`Dataset`: a path is opened, and closed
    on leaving (also on an error); an open Dataset is yielded as is and left open (its owner closes it).

    Parameters
    ----------
    dataset : str, Path or Dataset
    """
    if isinstance(dataset, Dataset):
        yield dataset
        return
    with Dataset(dataset) as ds:
        yield ds


class Dataset:
    """Read access to a prepared dataset without loading it all into memory.

    >>> ds = Dataset("runs/default/dataset")
    >>> idx = ds.indices("train")           # row numbers, sorted
    >>> X = ds.flux(idx[:1000])             # (1000, P) float32
    >>> y = ds.labels(idx[:1000])           # (1000, L) float32, NaN = missing
    """

    def __init__(self, path):
        self.path = dataset_file(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no prepared dataset here; create one with `stellarparams prepare`")
        self._f = h5py.File(self.path, "r")
        a = self._f.attrs
        self.attrs = {k: json.loads(a[k]) for k in a.keys()}
        self.label_names = self.attrs["label_names"]
        self.label_units = self.attrs["label_units"]
        self.grid = Grid(**self.attrs["grid"])
        self.n, self.n_pix = self._f["flux"].shape
        self.split = self._f["split"][:]

    def __len__(self):
        return self.n

    def __repr__(self):
        counts = {s: int((self.split == i).sum()) for s, i in SPLITS.items()}
        return f"Dataset({str(self.path)!r}, n={self.n}, n_pix={self.n_pix}, labels={self.label_names}, {counts})"

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def indices(self, split: str | None = None) -> np.ndarray:
        if split is None:
            return np.arange(self.n)
        return np.flatnonzero(self.split == SPLITS[split])

    def _rows(self, name, idx):
        """Rows ``idx`` of one dataset, in the asked order; strings come back as str (UTF-8)."""
        ds = self._f[name]
        read = ds.asstr() if ds.dtype == _STR else ds
        if idx is None:
            return read[:]
        idx = np.asarray(idx)
        if idx.size == 0:
            return np.empty((0,) + ds.shape[1:], ds.dtype)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        lo, hi = int(sorted_idx[0]), int(sorted_idx[-1]) + 1
        if hi - lo <= 4 * len(idx):  # dense: one contiguous read, then pick
            block = read[lo:hi][sorted_idx - lo]
        else:
            uniq, inv = np.unique(sorted_idx, return_inverse=True)
            block = read[uniq][inv]
        out = np.empty_like(block)
        out[order] = block
        return out

    def flux(self, idx=None) -> np.ndarray:
        return self._rows("flux", idx)

    def valid(self, idx=None) -> np.ndarray:
        return self._rows("valid", idx)

    def labels(self, idx=None) -> np.ndarray:
        return self._rows("labels", idx)

    def label_err(self, idx=None) -> np.ndarray:
        return self._rows("label_err", idx)

    def sigma(self, idx=None) -> np.ndarray | None:
        """Per-pixel 1-sigma noise of the standardized flux, (n, P) float32; +inf where there was no data.

        Parameters
        ----------
        idx : array of int, optional
            Rows, in any order (default: all).

        Returns
        -------
        ndarray or None
            None for a dataset written without noise (made before ``prepare`` stored it).
        """
        return self._rows("sigma", idx) if "sigma" in self._f else None

    def offset(self, idx=None) -> np.ndarray | None:
        """mean/std of each spectrum's resampled flux before standardization, (n,) float32.

        ``flux * std + mean`` is the physical flux, so ``flux + offset`` is it in units of the
        std: what multiplicative augmentations (reddening, flux calibration) need. None for a
        dataset written without it.
        """
        return self._rows("offset", idx) if "offset" in self._f else None

    def meta(self, idx=None) -> pd.DataFrame:
        """Identifiers, RV, S/N, split name and extra catalog columns as a DataFrame."""
        cols = {}
        for c in _META_COLUMNS:
            cols[c] = self._rows(c, idx)
        names = {i: s for s, i in SPLITS.items()}
        cols["split"] = [names[int(s)] for s in self._rows("split", idx)]
        if "extra" in self._f:
            for c in self._f["extra"]:
                cols[c] = self._rows(f"extra/{c}", idx)
        return pd.DataFrame(cols)

    def iter_batches(self, split: str | None = None, batch_size: int = 4096):
        """Yield (row indices, flux block) in file order; memory stays at one block."""
        idx = self.indices(split)
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            yield b, self.flux(b)
