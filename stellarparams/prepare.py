"""prepare: SDSS spectra + an SSPP label catalog -> a prepared dataset (docs/method.md steps 1-4).

Per spectrum (:func:`preprocess`):
1. drop pixels with ivar == 0, a bad ``and_mask`` bit or non-finite flux (never zeros);
2. rest frame: loglam_rest = loglam_obs - log10(1+z), 1+z = sqrt((1+b)/(1-b)), b = RV/c;
3. one not-a-knot cubic spline through the good pixels (SciPy's ``CubicSpline``, bit for bit:
   :func:`resample.cubic_spline`), evaluated on the common grid, with the ends clamped
   (nearest available flux outside the spectrum's coverage);
4. standardize: subtract the mean over the P grid pixels, divide by the population std.

:func:`prepare` runs this over a folder of files in parallel and writes ``DATASET/``:
``dataset.h5`` (see :mod:`stellarparams.dataset`), ``rejects.csv`` and ``summary.json``.
Work happens in ``DATASET/.partial/`` (one file per finished chunk), so a killed run
resumes where it stopped. One process at a time writes a dataset folder (``DATASET/.lock``).
The dataset is read back and checked before it is renamed into place, and summary.json
records its sha256: a re-run is a no-op only when the inputs are the same and the
published file still matches that record.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from . import desi, engine, lamost, readers, sdss, tables
from .dataset import DATA_FILE, SPLITS, Grid, append_rows, create_dataset, parse_grid
from .files import atomic_write, write_text
from .outputs import locked_output
from .physics import doppler_log_shift
from .records import sha256_file
from .resample import cubic_spline
from .workers import pool as worker_pool

REJECTS_FILE = "rejects.csv"
SUMMARY_FILE = "summary.json"
PARTIAL_DIR = ".partial"
REJECT_COLUMNS = ["file", "plate", "mjd", "fiberid", "reason", "detail", "id"]  # id: the survey's identifier
MAX_GAP_PIX = 2.0  # a grid pixel farther than this many native pixels from good data is not valid
LOGLAM_RANGE = (3.0, 4.7)  # 1000 A - 5 um: anything outside is a damaged wavelength solution


@dataclass
class PrepareConfig:
    """Preprocessing options; the defaults are the paper's (docs/method.md).

    grid: common log10-wavelength grid (4000 pixels, 3.5754-3.9670)
    bad_mask: SPPIXMASK bits that make a pixel unusable (sdss.DEFAULT_BAD_MASK)
    min_coverage: fraction of grid pixels that must come from good data, else "low_coverage"
    rest_frame: shift to the rest frame with the catalog RV (km/s) before resampling
    labels: our label name -> catalog column
    rv_column: catalog column with the heliocentric radial velocity, km/s
    reject_classes: spectrum CLASS values rejected as "not_a_star"
    """

    grid: Grid = field(default_factory=Grid)
    bad_mask: int = sdss.DEFAULT_BAD_MASK
    min_coverage: float = 0.5
    rest_frame: bool = True
    labels: dict = field(default_factory=lambda: {"teff": "TEFF_ADOP", "feh": "FEH_ADOP", "logg": "LOGG_ADOP"})
    rv_column: str = "RV_ADOP"
    reject_classes: tuple = ("GALAXY", "QSO")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reject_classes"] = list(self.reject_classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PrepareConfig":
        d = dict(d)
        if isinstance(d.get("grid"), dict):
            d["grid"] = Grid(**d["grid"])
        if "reject_classes" in d:
            d["reject_classes"] = tuple(d["reject_classes"])
        return cls(**d)


MODEL_META = "model.json"  # the model folder's description (written by model_io; read here as plain JSON)
FLUX_KEYS = ("grid", "bad_mask", "rest_frame")  # the preprocessing that changes the flux a model sees


def config_from_model(model_folder, config: PrepareConfig | None = None) -> PrepareConfig:
    """``config`` with the grid and flux preprocessing of a trained model (``--grid-from``).

    The model folder's ``model.json`` records the grid and the ``prepare`` config of its
    training data; it is read as JSON (prepare sits below the model layer). Label and RV
    column names, ``min_coverage`` and ``reject_classes`` stay those of ``config``: they
    do not change the flux the model sees.

    Parameters
    ----------
    model_folder : str or Path
        A model folder (from ``train`` or ``run``), or its model.json.
    config : PrepareConfig, optional
        The rest of the options (default: the defaults).

    Returns
    -------
    PrepareConfig

    Raises
    ------
    ValueError
        No readable model.json, or it records no grid.
    """
    path = Path(model_folder)
    path = path if path.suffix == ".json" else path / MODEL_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the model's description ({e}); --grid-from needs a model folder") from e
    prep = dict(meta.get("prepare_config") or {})
    grid = meta.get("grid") or prep.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: the model records no wavelength grid")
    d = (config or PrepareConfig()).to_dict()
    d.update({k: prep[k] for k in FLUX_KEYS if k in prep})
    d["grid"] = Grid(**{k: grid[k] for k in ("loglam_min", "loglam_max", "n_pix")})
    return PrepareConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# one spectrum

@lru_cache(maxsize=8)
def _grid_loglam(grid: Grid) -> np.ndarray:
    g = grid.loglam
    g.flags.writeable = False
    return g


def preprocess(spec: sdss.Spectrum, rv_kms: float, config: PrepareConfig = PrepareConfig(),
               return_sigma: bool = False, return_offset: bool = False):
    """Resample one spectrum onto the common rest-frame grid and standardize it.

    Parameters
    ----------
    spec : sdss.Spectrum or readers.Record
        A spectrum on its native grid (observed frame), of any survey; a record whose reader
        found it unusable (``problem``) raises that reason.
    rv_kms : float
        Heliocentric radial velocity in km/s (ignored when ``config.rest_frame`` is False).
    config : PrepareConfig
    return_sigma : bool
        Also return the per-pixel noise.
    return_offset : bool
        Also return mean/std of the resampled flux (after sigma when both are asked).

    Returns
    -------
    flux : (P,) float32
        Mean 0 and population std 1 over the P grid pixels.
    valid : (P,) bool
        True where the pixel lies inside the good coverage and within ~2 native pixels of a
        good pixel.
    sigma : (P,) float32, only with ``return_sigma``
        1-sigma noise of ``flux`` in the same standardized units: 1/sqrt(ivar) of the good
        pixels, linearly interpolated onto the grid and divided by the std that standardized
        the flux; +inf where ``valid`` is False.
    offset : float, only with ``return_offset``
        mean / std of the resampled flux: ``flux + offset`` is the physical flux in units of
        its std (what multiplicative augmentations such as reddening act on).

    Raises
    ------
    sdss.SpectrumError
        Reasons: missing_rv, bad_wavelength, nonfinite_flux, no_good_pixels, too_few_pixels,
        low_coverage, constant_flux.
    """
    path = spec.path
    problem = getattr(spec, "problem", None)  # found by the reader (readers.Record)
    if problem:
        raise sdss.SpectrumError(path, *problem)
    loglam = np.asarray(spec.loglam, np.float64)
    flux = np.asarray(spec.flux)
    good = spec.good(config.bad_mask) & np.isfinite(loglam)
    n_nonfinite = int(np.count_nonzero(~np.isfinite(flux) & (spec.ivar > 0)))
    n_good = int(np.count_nonzero(good))
    if n_good == 0:
        if n_nonfinite:
            raise sdss.SpectrumError(path, "nonfinite_flux", f"{n_nonfinite} pixels with ivar > 0 have NaN/inf flux")
        raise sdss.SpectrumError(path, "no_good_pixels", "every pixel has ivar == 0 or a bad and_mask bit")
    if n_good < 4:
        raise sdss.SpectrumError(path, "too_few_pixels", f"{n_good} good pixels, a cubic spline needs 4")
    x = loglam[good]
    y = flux[good].astype(np.float64)
    dx = np.diff(x)
    if not np.isfinite(loglam[[0, -1]]).all() or not (dx > 0).all():
        raise sdss.SpectrumError(path, "bad_wavelength", "loglam is not finite and strictly increasing")
    if not (LOGLAM_RANGE[0] < x[0] and x[-1] < LOGLAM_RANGE[1]):
        raise sdss.SpectrumError(path, "bad_wavelength", f"loglam {x[0]:.4g}-{x[-1]:.4g} is not an optical spectrum "
                                 f"(log10 Angstrom between {LOGLAM_RANGE[0]} and {LOGLAM_RANGE[1]})")
    if config.rest_frame:
        if rv_kms is None or not np.isfinite(rv_kms) or rv_kms <= sdss.SENTINEL:
            raise sdss.SpectrumError(path, "missing_rv", f"RV = {rv_kms}")
        x = x - doppler_log_shift(rv_kms)

    grid = _grid_loglam(config.grid)
    at = np.clip(grid, x[0], x[-1])  # clamp = nearest flux
    out = cubic_spline(x, y, at)  # SciPy's CubicSpline(x, y)(at), bit for bit

    # validity: inside the good coverage and near a good pixel
    step = float(loglam[-1] - loglam[0]) / (len(loglam) - 1)  # native pixel, log10 A (1e-4 for SDSS)
    reach = MAX_GAP_PIX * step * (1 + 1e-6)
    valid = np.zeros(len(grid), bool)
    valid[np.searchsorted(grid, x[0], side="left"):np.searchsorted(grid, x[-1], side="right")] = True
    gaps = np.flatnonzero(dx > 2 * reach)  # gaps whose middle lies farther than `reach` from both sides
    if len(gaps):
        a = np.searchsorted(grid, x[gaps] + reach, side="right")
        b = np.searchsorted(grid, x[gaps + 1] - reach, side="left")
        for i, k in zip(a, b):
            valid[i:k] = False
    coverage = float(valid.mean())
    if coverage < config.min_coverage:
        why = f"{coverage:.1%} of the grid from good data, need {config.min_coverage:.0%}"
        if n_nonfinite:
            raise sdss.SpectrumError(path, "nonfinite_flux", f"{n_nonfinite} NaN/inf pixels; {why}")
        raise sdss.SpectrumError(path, "low_coverage", why)

    mean, std = out.mean(), out.std()
    if not np.isfinite(std) or std <= 1e-12 * max(abs(mean), 1e-30):
        raise sdss.SpectrumError(path, "constant_flux", f"std {std:.3g} over the grid")
    result = [((out - mean) / std).astype(np.float32), valid]
    if return_sigma:
        noise = np.interp(at, x, 1.0 / np.sqrt(spec.ivar[good].astype(np.float64))) / std
        result.append(np.where(valid, noise, np.inf).astype(np.float32))
    if return_offset:
        result.append(float(mean / std))
    return tuple(result)


def preprocess_file(path, rv_kms: float, config: PrepareConfig = PrepareConfig()):
    """Read one SDSS spectrum file and preprocess it.

    Parameters
    ----------
    path : str or Path
        An SDSS spec-*.fits or spSpec-*.fit file.
    rv_kms : float
        Radial velocity for the rest-frame shift, km/s.
    config : PrepareConfig

    Returns
    -------
    tuple
        (Spectrum, flux (P,) float32, valid (P,) bool), as :func:`preprocess`.
    """
    spec = sdss.read_spectrum(path)
    flux, valid = preprocess(spec, rv_kms, config)
    return spec, flux, valid


# ---------------------------------------------------------------------------------------------
# finding files and matching them to the catalog

_SPEC_RE = re.compile(r"^spec-(\d+)-(\d+)-(\d+)\.fits(\.gz)?$", re.I)
_SPSPEC_RE = re.compile(r"^spSpec-(\d+)-(\d+)-(\d+)\.fits?(\.gz)?$", re.I)


def parse_spectrum_name(name: str):
    """The SDSS key of a spectrum file name.

    Parameters
    ----------
    name : str
        ``spec-PLATE-MJD-FIBER.fits(.gz)`` or ``spSpec-MJD-PLATE-FIBER.fit(s)(.gz)``.

    Returns
    -------
    tuple of int or None
        (plate, mjd, fiberid), or None for any other name.
    """
    m = _SPEC_RE.match(name)
    if m:
        return int(m[1]), int(m[2]), int(m[3])
    m = _SPSPEC_RE.match(name)
    if m:
        return int(m[2]), int(m[1]), int(m[3])
    return None


def find_spectra(folder) -> list[Path]:
    """All spec-*.fits(.gz) and spSpec-*.fit(s)(.gz) files under ``folder``, recursively, sorted.

    Parameters
    ----------
    folder : str or Path

    Returns
    -------
    list of Path

    Raises
    ------
    FileNotFoundError
        ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: spectra folder not found")
    return sorted(p for p in folder.rglob("*") if parse_spectrum_name(p.name) and p.is_file())


def _input_hash(cat: pd.DataFrame, files: list[Path], job: dict) -> str:
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(cat, index=True).to_numpy().tobytes())
    h.update(",".join(cat.columns).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(job, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# splits

def assign_splits(n: int, seed: int = 0, fractions=(0.6, 0.1, 0.3), groups=None) -> np.ndarray:
    """Shuffled train/val/test assignment (0/1/2) of n rows, (n,) uint8.

    With ``groups`` ((n,) keys), all rows of one group land in the same split; groups are
    shuffled with the seed and filled in order until each split holds its fraction of rows.

    Parameters
    ----------
    n : int
        Rows.
    seed : int
    fractions : sequence of 3 floats
        Train, val and test shares (normalized to sum 1).
    groups : array-like, optional
        (n,) group key of each row.

    Returns
    -------
    np.ndarray
        (n,) uint8: 0 train, 1 val, 2 test.
    """
    f = np.asarray(fractions, np.float64)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    f = f / f.sum()
    keys = np.arange(n) if groups is None else np.asarray(groups).astype(str)
    uniq, inv = np.unique(keys, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    sizes = np.bincount(inv, minlength=len(uniq))[order]
    mid = (np.cumsum(sizes) - sizes / 2) / max(n, 1)  # each group's midpoint in [0, 1]
    split_of_group = np.empty(len(uniq), np.uint8)
    split_of_group[order] = np.searchsorted(np.cumsum(f)[:2], mid, side="right")
    return split_of_group[inv].reshape(-1)


def _parse_split_values(values) -> np.ndarray:
    """train/val/test (or validation, 0/1/2) -> 0/1/2; 255 where not understood."""
    names = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "test": 2, "0": 0, "1": 1, "2": 2}
    out = []
    for v in values:
        s = str(v).strip().lower()
        if s.endswith(".0"):
            s = s[:-2]
        out.append(names.get(s, 255))
    return np.array(out, np.uint8)


# ---------------------------------------------------------------------------------------------
# the work of one chunk (runs in a worker process)

def _read_record(path, index, survey, cache: dict):
    """Spectrum ``index`` of a file (SDSS: the file's one spectrum); the last file's records are cached."""
    if survey == "sdss":
        return sdss.read_spectrum(path)
    if cache.get("path") != path:
        cache.clear()
        try:
            cache.update(path=path, records=readers.read(path, survey))
        except sdss.SpectrumError as e:
            cache.update(path=path, error=e)
    if "error" in cache:
        raise cache["error"]
    return cache["records"][index or 0]


def _run_chunk(chunk_id: int, items: list, config: PrepareConfig, partial: str, survey: str = "sdss") -> dict:
    """Preprocess the files of one chunk and save the result as ``partial/chunk-ID.npz``.

    items: list of (row, file, rv) or (row, file, rv, index of the spectrum in the file or
    None). Returns counts and rejects (small, for the main process).
    """
    P = config.grid.n_pix
    flux = np.empty((len(items), P), np.float32)
    valid = np.empty((len(items), P), bool)
    sigma = np.empty((len(items), P), np.float32)
    offset = np.empty(len(items), np.float32)
    rows, snr, rejects = [], [], []
    cache = {}
    for item in items:
        row, path, rv = item[:3]
        index = item[3] if len(item) > 3 else None
        try:
            spec = _read_record(path, index, survey, cache)
            if spec.objclass in config.reject_classes:
                raise sdss.SpectrumError(path, "not_a_star", f"CLASS {spec.objclass}")
            f, v, sg, o = preprocess(spec, rv, config, return_sigma=True, return_offset=True)
        except sdss.SpectrumError as e:
            rejects.append({"row": row, "file": str(path), "reason": e.reason, "detail": e.detail})
            continue
        except Exception as e:  # a file we did not foresee must not stop the batch
            rejects.append({"row": row, "file": str(path), "reason": "error", "detail": f"{type(e).__name__}: {e}"[:300]})
            continue
        k = len(rows)
        flux[k], valid[k], sigma[k], offset[k] = f, v, sg, o
        rows.append(row)
        snr.append(spec.snr)
    n = len(rows)
    atomic_write(Path(partial) / f"chunk-{chunk_id:05d}.npz", lambda tmp: np.savez(
        tmp, flux=flux[:n], valid=valid[:n], sigma=sigma[:n], offset=offset[:n], rows=np.array(rows, np.int64),
        snr=np.array(snr, np.float32), rejects=np.array(json.dumps(rejects))))
    return {"chunk": chunk_id, "n": len(items), "kept": n, "rejects": rejects}


def _load_chunk_summary(path: Path) -> dict:
    with np.load(path) as z:
        return {"rows": z["rows"], "snr": z["snr"], "rejects": json.loads(str(z["rejects"]))}


# ---------------------------------------------------------------------------------------------
# the whole job

def _log(msg, progress):
    if progress:
        print(msg, file=sys.stderr, flush=True)


def verify_dataset(path, n_rows: int, block_rows: int = 4096) -> None:
    """Read every dataset of a freshly written ``dataset.h5`` back before it is published.

    Parameters
    ----------
    path : str or Path
        The .h5 file.
    n_rows : int
        Rows it must hold.

    Raises
    ------
    RuntimeError
        A dataset has the wrong number of rows or cannot be read, or a flux row is all zeros
        (a standardized spectrum never is).
    """
    import h5py

    def fail(why):
        raise RuntimeError(f"{path}: the written dataset is damaged ({why}); nothing was published")

    names = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            for name in names:
                ds = f[name]
                if ds.shape[0] != n_rows:
                    fail(f"{name} has {ds.shape[0]} rows, expected {n_rows}")
                for lo in range(0, n_rows, block_rows):
                    block = ds[lo:lo + block_rows]
                    if name == "flux":
                        zero = np.flatnonzero(~block.any(axis=1))
                        if len(zero):
                            fail(f"flux row {lo + int(zero[0])} is all zeros")
    except (OSError, KeyError) as e:
        fail(f"{type(e).__name__}: {e}")
    if "flux" not in names:
        fail("no flux dataset")


def _up_to_date(out: Path, input_hash: str) -> dict | None:
    """The summary of a finished job with these inputs whose dataset still matches its sha256, else None."""
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    final = out / DATA_FILE
    if summary.get("input_hash") != input_hash or not final.is_file() or "dataset_sha256" not in summary:
        return None
    if sha256_file(final) != summary["dataset_sha256"]:
        return None
    return summary


def _group_keys(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Group keys as text, and a mask of rows without one (NaN, -9999 or empty)."""
    missing = (col.isna().to_numpy() | col.astype(str).str.strip().isin(["", "nan", "None"]).to_numpy()
               | (pd.to_numeric(col, errors="coerce") <= sdss.SENTINEL).to_numpy())
    values = col
    if pd.api.types.is_float_dtype(col) and np.all(np.mod(col[~missing], 1) == 0):
        values = col.astype("Int64")  # 3.0 -> "3" when a NaN made an integer column float
    return values.astype(str).to_numpy(dtype=object), missing


def prepare(catalog, spectra, out, *, config: PrepareConfig = PrepareConfig(), workers: int | None = None,
            seed: int = 0, fractions=(0.6, 0.1, 0.3), group_by: str | None = None,
            split_column: str | None = None, chunk_size: int = 256, progress: bool = True,
            wait: bool = False, survey: str | None = None, dask=None) -> dict:
    """Turn a folder of survey spectra plus a label catalog into ``out/dataset.h5``.

    Parameters
    ----------
    catalog : str, Path or DataFrame, or None
        Read with :func:`sdss.read_catalog` (FITS, CSV or Parquet); column names are
        upper-cased. None only for a spectrum table (``survey="table"``), whose scalar columns
        are the catalog.
    spectra : str or Path
        Folder searched recursively for spectrum files (or one file). Catalog rows match files
        by a FILE column (an absolute path, or a path relative to the catalog file's folder,
        the current folder for a DataFrame; the same rule as ``predict``), or by survey:
        SDSS (PLATE, MJD, FIBERID) from the file name; LAMOST OBSID from the file header or
        (LMJD, PLANID, SPID, FIBERID) from the file name; DESI TARGETID in the coadd's
        FIBERMAP; a table: its rows.
    out : str or Path
        Dataset folder; gets dataset.h5, rejects.csv, summary.json. One writer at a time
        (an advisory lock, :func:`files.output_lock`).
    config : PrepareConfig
    workers : int, optional
        Reading processes (default: all CPUs).
    seed, fractions
        The shuffled train/val/test split.
    group_by : str, optional
        Catalog column whose rows stay in one split (default STAR_ID when present). A row
        without a value (NaN, -9999, empty) is a group of its own.
    split_column : str, optional
        Catalog column with train/val/test (or 0/1/2) to use as given.
    chunk_size : int
        Spectra per resumable chunk.
    progress : bool
        Progress bar and summary on stderr.
    wait : bool
        When another process is writing ``out``: wait for it (True) or raise
        :class:`files.OutputBusy` at once (False).
    survey : str, optional
        ``sdss``, ``lamost``, ``desi`` or ``table`` (:data:`readers.SURVEYS`); default:
        detected from the files. For a survey other than SDSS, a config with the SDSS default
        columns (TEFF_ADOP, ..., RV_ADOP) takes that survey's instead (:data:`SURVEY_COLUMNS`).
    dask : str or distributed.Client, optional
        Read the chunks on a Dask cluster instead of ``workers`` processes here:
        ``tcp://HOST:PORT``, ``local:N`` or a client (:mod:`stellarparams.engine`). Workers
        write the chunks into ``out/.partial/`` themselves, so they must share the file system
        with this process. Connected before anything is written; the dataset is the same.

    Returns
    -------
    dict
        The summary (also saved as summary.json, with the dataset's sha256). Rejected rows and
        files are listed in rejects.csv with their reason; none stops the batch.

    Raises
    ------
    sdss.NoUsableInput
        No spectrum was kept, or no kept spectrum has a label; nothing is published.
    ValueError
        Bad catalog, options or output folder; :class:`engine.DaskError` when ``dask`` names no
        scheduler that answers.
    """
    with engine.connect(dask, progress) as client, locked_output(out, wait):
        return _prepare(catalog, Path(spectra), Path(out), config, workers, seed, fractions, group_by, split_column,
                        chunk_size, progress, survey, client)


# labels and RV column of each survey's catalog (upper-case, as read)
SURVEY_COLUMNS = {"lamost": (lamost.LABELS, lamost.RV_COLUMN), "desi": (desi.LABELS, desi.RV_COLUMN),
                  "table": (tables.LABELS, tables.RV_COLUMN)}


def detect_survey(spectra) -> str:
    """The survey of a spectra folder (or file): the one survey its file names (or content) show.

    Parameters
    ----------
    spectra : str or Path

    Returns
    -------
    str
        One of :data:`readers.SURVEYS`.

    Raises
    ------
    ValueError
        Files of more than one survey, or none; name it with ``--survey``.
    """
    spectra = Path(spectra)
    if spectra.is_file():
        try:
            return readers.detect(spectra)
        except sdss.SpectrumError as e:
            raise ValueError(str(e)) from e
    files = readers.find_files(spectra)
    found = sorted({readers.detect(p) for p in files})
    if not found and readers.find_files(spectra, "table"):
        found = ["table"]
    if len(found) == 1:
        return found[0]
    if not found:
        return "sdss"  # an empty folder: the SDSS path reports it as before
    raise ValueError(f"{spectra}: files of several surveys ({', '.join(found)}); choose one with --survey")


def _locate(cat: pd.DataFrame, files: list, row_files: list, survey: str) -> list:
    """Where each catalog row's spectrum is, for LAMOST, DESI and tables: [(file, index in file) or None]."""
    n = len(cat)
    loc = [None] * n
    if survey == "table":
        rows = pd.to_numeric(cat["ROW"], errors="coerce").to_numpy() if "ROW" in cat else np.arange(n)
        only = files[0] if len(files) == 1 else None
        for i in range(n):
            f = row_files[i] or only
            loc[i] = (f, int(rows[i])) if f is not None and np.isfinite(rows[i]) else None
        return loc
    if survey == "desi":
        tid = pd.to_numeric(cat["TARGETID"], errors="coerce").to_numpy() if "TARGETID" in cat else np.full(n, np.nan)
        where = {}
        for p in sorted(set(files) | {f for f in row_files if f is not None and f.is_file()}):
            sp = desi.parse_name(p.name)  # (survey, program) of coadd-SURVEY-PROGRAM-PIXNUM.fits
            try:
                for j, t in enumerate(desi.target_ids(p)):
                    where.setdefault((p, int(t)), (p, j))
                    where.setdefault((sp, int(t)), (p, j))
                    where.setdefault((None, int(t)), (p, j))
            except (OSError, ValueError, KeyError):
                continue  # an unreadable coadd: its rows become no_file, the file a reject when read
        sp_col = ([(str(a).strip().lower(), str(b).strip().lower()) for a, b in zip(cat["SURVEY"], cat["PROGRAM"])]
                  if "SURVEY" in cat and "PROGRAM" in cat else [None] * n)
        for i in range(n):
            if np.isfinite(tid[i]):
                t = int(tid[i])
                loc[i] = where.get((row_files[i], t)) if row_files[i] is not None else \
                    where.get((sp_col[i], t)) if sp_col[i] is not None else where.get((None, t))
            elif row_files[i] is not None:
                loc[i] = (row_files[i], 0)
        return loc
    # lamost: FILE, else (LMJD, PLANID, SPID, FIBERID) from the file names, then the headers, else OBSID
    return lamost.locate(cat, files, row_files)


def _id_text(v) -> str:
    """A catalog identifier as text (an integer stored as float loses its '.0'); '' when missing."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _resolve_file(f, base: Path):
    """A FILE cell -> Path (absolute, or relative to ``base``), None when empty."""
    if f is None or (isinstance(f, float) and np.isnan(f)) or str(f).strip() == "":
        return None
    p = Path(str(f).strip())
    return p if p.is_absolute() else base / p


# ---------------------------------------------------------------------------------------------
# the job, top to bottom: check -> match -> read -> split -> write

def _prepare(catalog, spectra, out, config, workers, seed, fractions, group_by, split_column, chunk_size,
             progress, survey=None, client=None) -> dict:
    """:func:`prepare` inside the output lock."""
    t0 = time.perf_counter()
    job = _check(catalog, spectra, config, survey, seed, fractions, group_by, split_column, chunk_size, progress)
    done = _finished(out, job.input_hash, progress)
    if done is not None:
        return done
    matched = _match(job)
    parts = _read(out / PARTIAL_DIR, job, matched.work, chunk_size, workers, progress, client)
    splits = _split(job, matched, parts, seed, fractions, progress)
    return _write(out, job, matched, parts, splits, seed, fractions, t0, progress)


@dataclass
class _Job:
    """The checked inputs of one prepare job (what :func:`_check` hands on)."""
    cat: pd.DataFrame        # the label catalog, upper-case column names
    cat_name: str            # its path, or "<DataFrame>"
    spectra: Path
    survey: str
    config: PrepareConfig    # with the survey's label and RV columns, upper-cased
    group_by: str | None     # upper-cased
    split_column: str | None  # upper-cased
    files: list              # spectrum files found under ``spectra``
    row_files: list          # each catalog row's FILE as a Path, or None
    input_hash: str


@dataclass
class _Matched:
    """Catalog rows matched to spectra (:func:`_match`): what to read, and the rejects so far."""
    keys: list               # SDSS (plate, mjd, fiberid) of each catalog row, or None
    row_id: list             # the survey's identifier of each catalog row, as text ('' when none)
    work: list               # (row, file, rv, index of the spectrum in the file or None), in reading order
    rejects: list = field(default_factory=list)  # dicts with REJECT_COLUMNS

    def reject(self, row, file, reason, detail=""):
        """Add a rejected catalog row."""
        key = self.keys[row] or (None, None, None)
        self.rejects.append({"file": str(file or ""), "plate": key[0], "mjd": key[1], "fiberid": key[2],
                             "reason": reason, "detail": detail, "id": self.row_id[row]})


@dataclass
class _Splits:
    """The spectra that were read and kept, with their groups and splits (:func:`_split`)."""
    rows: np.ndarray         # catalog row of each, in dataset order
    snr: np.ndarray
    kept: pd.DataFrame       # those catalog rows
    file_of_row: dict        # catalog row -> spectrum file
    object_id: np.ndarray    # group key of each
    split: np.ndarray        # SPLITS value of each (255: a bad split_column value)
    bad: np.ndarray          # rows rejected for a bad split_column value (not written)


# --- check ---------------------------------------------------------------------------------

def _survey_config(survey: str, config: PrepareConfig) -> PrepareConfig:
    """The survey's label and RV columns when ``config`` has the SDSS defaults; column names upper-cased."""
    default = PrepareConfig()
    if survey in SURVEY_COLUMNS and config.labels == default.labels and config.rv_column == default.rv_column:
        labels, rv_column = SURVEY_COLUMNS[survey]
        config = PrepareConfig.from_dict({**config.to_dict(), "labels": dict(labels), "rv_column": rv_column})
    return PrepareConfig.from_dict({**config.to_dict(), "rv_column": config.rv_column.upper(),
                                    "labels": {k: v.upper() for k, v in config.labels.items()}})


def _table_catalog(spectra: Path, survey: str) -> pd.DataFrame:
    """Without a catalog: a spectrum table's scalar columns (with FILE) are the catalog."""
    if survey != "table":
        raise ValueError("a label catalog is needed (--catalog); only a spectrum table carries its own labels")
    found = readers.find_files(spectra, "table")
    return pd.concat([tables.catalog(p).assign(FILE=str(p.resolve())) for p in found], ignore_index=True) \
        if found else pd.DataFrame()


def _check(catalog, spectra: Path, config: PrepareConfig, survey, seed, fractions, group_by, split_column,
           chunk_size, progress) -> _Job:
    """Read the catalog, find the files, check columns and options, and hash the inputs."""
    survey = survey or detect_survey(spectra)
    if survey not in readers.SURVEYS:
        raise ValueError(f"unknown survey {survey!r}; choose one of {', '.join(readers.SURVEYS)}")
    config = _survey_config(survey, config)
    if catalog is None:
        catalog = _table_catalog(spectra, survey)
    cat = sdss.read_catalog(catalog)
    cat_name = "<DataFrame>" if isinstance(catalog, pd.DataFrame) else str(catalog)
    need = {"sdss": (sdss.CATALOG_ID_COLUMNS,), "lamost": (("OBSID",), lamost.KEY_COLUMNS),
            "desi": (("TARGETID",),), "table": (("ROW",),)}[survey]
    if "FILE" not in cat.columns and not any(all(c in cat.columns for c in cols) for cols in need) \
            and not (survey == "table" and len(readers.find_files(spectra, "table")) == 1):
        raise ValueError(f"{cat_name}: a {survey} catalog needs " + " or ".join(", ".join(c) for c in need)
                         + f" (or FILE) columns; it has {', '.join(cat.columns[:30])}")
    if config.rest_frame and config.rv_column not in cat.columns:
        raise ValueError(f"{cat_name}: no {config.rv_column} column for the rest-frame shift; name the RV column "
                         f"with --rv-column (Python: PrepareConfig(rv_column=...)), or skip the shift with "
                         f"--no-rest-frame")
    for c in (split_column, group_by):
        if c is not None and c.upper() not in cat.columns:
            raise ValueError(f"{cat_name}: no column {c!r} (it has {', '.join(cat.columns[:30])})")
    split_column = split_column.upper() if split_column else None
    group_by = group_by.upper() if group_by else None
    if group_by is None and split_column is None and "STAR_ID" in cat.columns:
        group_by = "STAR_ID"
        _log("grouping splits by STAR_ID (all spectra of one star in one split); pass --group-by to change", progress)

    files = find_spectra(spectra) if survey == "sdss" else readers.find_files(spectra, survey)
    base = Path.cwd() if isinstance(catalog, pd.DataFrame) else Path(catalog).parent
    row_files = [_resolve_file(f, base) for f in cat["FILE"]] if "FILE" in cat.columns else [None] * len(cat)
    job = {"config": config.to_dict(), "seed": seed, "fractions": list(fractions), "group_by": group_by,
           "split_column": split_column, "chunk_size": chunk_size, "spectra": str(spectra.resolve()),
           "store": 2}  # 2: chunks and dataset carry sigma and offset (older partial work is not reused)
    if survey != "sdss":
        job["survey"] = survey
    input_hash = _input_hash(cat, sorted(set(files) | {f for f in row_files if f is not None and f.is_file()}), job)
    return _Job(cat, cat_name, spectra, survey, config, group_by, split_column, files, row_files, input_hash)


def _finished(out: Path, input_hash: str, progress) -> dict | None:
    """The summary of a finished, still intact job with these inputs (marked ``up_to_date``), else None."""
    final = out / DATA_FILE
    done = _up_to_date(out, input_hash)
    if done is not None:
        done["up_to_date"] = True
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)  # left over if killed right after finishing
        _log(f"{final}: already prepared from the same inputs (input_hash {input_hash}, sha256 checked); "
             "nothing to do", progress)
        return done
    if final.exists():
        _log(f"{final}: made from other inputs, or does not match its summary.json record; preparing again",
             progress)
    return None


# --- match catalog rows and files ----------------------------------------------------------

def _identify(job: _Job):
    """Each catalog row's SDSS key, (file, index), identity (for duplicates) and identifier text.

    Returns (by_key, keys, located, ident, row_id); ``by_key`` maps an SDSS key to its first file.
    """
    cat, files, row_files, survey = job.cat, job.files, job.row_files, job.survey
    by_key = {}
    if survey == "sdss":
        for p in files:
            by_key.setdefault(parse_spectrum_name(p.name), p)
    if survey == "sdss" and all(c in cat.columns for c in sdss.CATALOG_ID_COLUMNS):
        ids = cat[list(sdss.CATALOG_ID_COLUMNS)].to_numpy(np.float64)
        keys = [tuple(int(v) for v in k) if np.isfinite(k).all() else None for k in ids]
    else:
        keys = [None] * len(cat)
    if survey == "sdss":
        located = [(row_files[i] or by_key.get(keys[i]), None) for i in range(len(cat))]
        ident = [str(f) if f is not None else None if k is None else str(k) for k, f in zip(keys, row_files)]
        row_id = [f"{k[0]:04d}-{k[1]:05d}-{k[2]:04d}" if k else "" for k in keys]
    else:
        located = [loc or (None, None) for loc in _locate(cat, files, row_files, survey)]
        ident = [None if f is None else f"{Path(f).resolve()}|{j}" for f, j in located]
        id_col = {"lamost": "OBSID", "desi": "TARGETID", "table": "ID"}[survey]
        row_id = [_id_text(v) for v in cat[id_col]] if id_col in cat.columns else \
            lamost.row_ids(cat) if survey == "lamost" else \
            [f"row {r}" for r in (cat["ROW"] if "ROW" in cat.columns else range(len(cat)))]
    return by_key, keys, located, ident, row_id


def _duplicate_rows(job: _Job, ident: list) -> np.ndarray:
    """Rows whose spectrum an earlier row (for DESI: a PRIMARY one first) already has."""
    cat = job.cat
    first = np.arange(len(cat))
    if job.survey == "desi" and "PRIMARY" in cat.columns:  # mwsall: several rows per TARGETID; keep the PRIMARY one
        primary = cat["PRIMARY"].map(lambda v: str(v).strip().lower() in ("true", "1", "t")).to_numpy()
        first = np.argsort(~primary, kind="stable")
    dup = np.zeros(len(cat), bool)
    dup[first] = pd.Series([ident[i] for i in first]).duplicated().to_numpy()
    dup &= np.array([i is not None for i in ident], bool)
    return dup


def _resolver():
    """A ``Path.resolve`` for many files in few folders: each folder is resolved once, each file costs one lstat.

    ``realpath(folder/name) == realpath(folder)/name`` unless ``name`` is itself a link (then resolved in full).
    """
    folders = {}

    def resolve(path) -> Path:
        path = os.path.join(os.getcwd(), path)  # not abspath: '..' after a linked folder is resolved by realpath
        if os.path.islink(path):
            return Path(path).resolve()
        folder, name = os.path.split(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        return Path(folders[folder], name)

    return resolve


def _match(job: _Job) -> _Matched:
    """Match catalog rows and spectrum files: the spectra to read, and rejected rows and files."""
    cat, config, survey, row_files = job.cat, job.config, job.survey, job.row_files
    resolve = _resolver()
    by_key, keys, located, ident, row_id = _identify(job)
    dup = _duplicate_rows(job, ident)
    matched = _Matched(keys, row_id, [])
    reject = matched.reject

    rv = cat[config.rv_column].to_numpy(np.float64) if config.rv_column in cat.columns else np.full(len(cat), np.nan)
    used = set()
    cls_col = cat["CLASS"].astype(str).str.upper().to_numpy() if "CLASS" in cat.columns else None
    for i in range(len(cat)):
        f, index = located[i]
        if dup[i]:
            reject(i, f, "duplicate_row", "same spectrum as another catalog row; kept the first"
                   + (" PRIMARY one" if survey == "desi" and "PRIMARY" in cat.columns else ""))
            continue
        if f is None or (row_files[i] is not None and not f.exists()):
            reject(i, f, "no_file", f"no spectrum file for catalog row {i}" + (f" ({f} does not exist)" if f else ""))
            continue
        used.add(resolve(f))
        if cls_col is not None and cls_col[i] in config.reject_classes:
            reject(i, f, "not_a_star", f"catalog CLASS {cls_col[i]}")
            continue
        if config.rest_frame and not np.isfinite(rv[i]):
            reject(i, f, "missing_rv", f"{config.rv_column} is missing (-9999, NaN, empty or text)")
            continue
        matched.work.append((i, str(f), float(rv[i]), index))
    _reject_unused_files(job, by_key, used, matched.rejects, resolve)

    if survey in ("desi", "table"):  # many spectra per file: read each file once per chunk, not once per row
        matched.work.sort(key=lambda w: (w[1], w[3] or 0))
    return matched


def _reject_unused_files(job: _Job, by_key: dict, used: set, rejects: list, resolve=Path.resolve) -> None:
    """Reject each file no catalog row uses (for SDSS: a second file of a used spectrum is a duplicate)."""
    for p in job.files:
        if job.survey != "sdss":
            if resolve(p) not in used:
                rejects.append({"file": str(p), "reason": "no_catalog_row",
                                "detail": "no catalog row matches a spectrum of this file", "id": ""})
            continue
        if resolve(p) not in used:
            k = parse_spectrum_name(p.name)
            twin = by_key[k]
            reason, detail = (("duplicate_file", f"another file of the same spectrum was used: {twin}")
                              if twin != p and resolve(twin) in used else
                              ("no_catalog_row", "file has no matching catalog row"))
            rejects.append({"file": str(p), "plate": k[0], "mjd": k[1], "fiberid": k[2],
                            "reason": reason, "detail": detail, "id": f"{k[0]:04d}-{k[1]:05d}-{k[2]:04d}"})


# --- read: resumable parallel preprocessing ------------------------------------------------

def _chunk_path(partial: Path, k: int) -> Path:
    return partial / f"chunk-{k:05d}.npz"


def _read(partial: Path, job: _Job, work: list, chunk_size: int, workers, progress, client=None) -> list:
    """Preprocess ``work`` in chunks into ``partial`` (reusing finished chunks of the same inputs).

    In a process pool of ``workers``, or on the Dask cluster of ``client`` when given.

    Returns each chunk's summary (rows kept, their S/N, rejects), in chunk order.
    """
    from tqdm.auto import tqdm

    job_file = partial / "job.json"
    if partial.exists():
        try:
            old = json.loads(job_file.read_text()).get("input_hash")
        except (OSError, ValueError):
            old = None
        if old != job.input_hash:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_text(job_file, json.dumps({"input_hash": job.input_hash, "n_work": len(work)}))
    chunks = [work[i:i + chunk_size] for i in range(0, len(work), chunk_size)]
    todo = [k for k in range(len(chunks)) if not _chunk_path(partial, k).exists()]
    if len(todo) < len(chunks):
        _log(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} chunks already done in {partial}", progress)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    n_todo = sum(len(chunks[k]) for k in todo)
    bar = tqdm(total=n_todo, desc="prepare", unit="spec", disable=not progress, smoothing=0.1)
    if client is not None:  # the same chunks on a cluster; files as absolute paths (workers may run elsewhere)
        calls = ((k, [(i, engine.absolute(f), *rest) for i, f, *rest in chunks[k]], job.config,
                  engine.absolute(partial), job.survey) for k in todo)
        for r in engine.map_unordered(client, _run_chunk, calls):
            bar.update(r["n"])
    elif workers == 1 or len(todo) <= 1:
        for k in todo:
            r = _run_chunk(k, chunks[k], job.config, str(partial), job.survey)
            bar.update(r["n"])
    else:
        with worker_pool(workers) as pool:
            futs = [pool.submit(_run_chunk, k, chunks[k], job.config, str(partial), job.survey) for k in todo]
            for fut in as_completed(futs):
                bar.update(fut.result()["n"])
    bar.close()
    return [_load_chunk_summary(_chunk_path(partial, k)) for k in range(len(chunks))]


# --- split: train/val/test, grouped -----------------------------------------------------------

def _split(job: _Job, matched: _Matched, parts: list, seed, fractions, progress) -> _Splits:
    """Collect the spectra read (their rejects into ``matched``), group them and assign splits."""
    file_of_row = {i: f for i, f, _, _ in matched.work}
    for part in parts:
        for r in part["rejects"]:
            matched.reject(r["row"], file_of_row.get(r["row"], r["file"]), r["reason"], r["detail"])
    rows = np.concatenate([p["rows"] for p in parts]) if parts else np.zeros(0, np.int64)
    snr = np.concatenate([p["snr"] for p in parts]) if parts else np.zeros(0, np.float32)
    kept = job.cat.iloc[rows].reset_index(drop=True)

    key_text = np.array([matched.row_id[int(r)] or Path(file_of_row[int(r)]).stem for r in rows], dtype=object)
    id_col = job.group_by or ("STAR_ID" if "STAR_ID" in kept.columns else None)
    if id_col:
        object_id, no_id = _group_keys(kept[id_col])
        object_id[no_id] = key_text[no_id]  # a row without an ID is a star of its own
        if no_id.any():
            _log(f"warning: {int(no_id.sum())} of {len(kept)} kept rows have no {id_col} (NaN, -9999 or empty); "
                 "each of them is a group of its own", progress)
    else:
        object_id = key_text
    split_column = job.split_column
    if split_column:
        split = _parse_split_values(kept[split_column])
        bad = split == 255
        for i in np.flatnonzero(bad):
            matched.reject(int(rows[i]), file_of_row[int(rows[i])], "bad_split_value",
                           f"{split_column} = {kept[split_column].iloc[i]!r}; want train/val/test or 0/1/2")
    else:
        split = assign_splits(len(kept), seed, fractions, object_id if job.group_by else None)
        bad = np.zeros(len(kept), bool)
    return _Splits(rows, snr, kept, file_of_row, object_id, split, bad)


# --- write: assemble, verify, publish ----------------------------------------------------------

def _label_arrays(kept: pd.DataFrame, config: PrepareConfig, progress):
    """Labels and their errors (NaN where missing) of the kept rows, in ``config.labels`` order."""
    labels = np.full((len(kept), len(config.labels)), np.nan, np.float32)
    label_err = np.full_like(labels, np.nan)
    for j, (name, col) in enumerate(config.labels.items()):
        col = col.upper()
        if col in kept.columns:
            labels[:, j] = pd.to_numeric(kept[col], errors="coerce").to_numpy(np.float64, na_value=np.nan)
            ecol = sdss.error_column(kept, col)
            if ecol:
                label_err[:, j] = pd.to_numeric(kept[ecol], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        else:
            _log(f"warning: catalog has no {col} column; label {name} is NaN for every row", progress)
    return labels, label_err


def _row_meta(splits: _Splits, job: _Job):
    """Per-row metadata, and the catalog's other numeric columns (None when there are none)."""
    kept, config = splits.kept, job.config

    def ints(col):
        return pd.to_numeric(kept[col], errors="coerce").fillna(0).to_numpy(np.int32) if col in kept \
            else np.zeros(len(kept), np.int32)

    meta = pd.DataFrame({
        "plate": ints("PLATE"), "mjd": ints("MJD"), "fiberid": ints("FIBERID"),
        "object_id": splits.object_id,
        "file": [splits.file_of_row[int(r)] for r in splits.rows],
        "rv": kept[config.rv_column].to_numpy(np.float32, na_value=np.nan) if config.rv_column in kept else np.nan,
        "snr": splits.snr,
    })
    standard = set(sdss.CATALOG_ID_COLUMNS) | {config.rv_column, job.split_column or ""}
    for col in config.labels.values():
        standard |= {col.upper(), col.upper() + "_UNC", col.upper() + "_ERR"}
    extra_cols = [c for c in kept.columns if c not in standard and pd.api.types.is_numeric_dtype(kept[c])
                  and not pd.api.types.is_bool_dtype(kept[c])]
    extra = kept[extra_cols].astype(np.float64) if extra_cols else None
    return meta, extra


def _write_h5(tmp, partial: Path, parts: list, keep_mask, config, attrs, labels, label_err, split, meta, extra):
    """Write the kept rows of every chunk to ``tmp`` and read it back (:func:`verify_dataset`)."""
    with create_dataset(tmp, config.grid.n_pix, list(config.labels), attrs, sigma=True, offset=True) as f:
        start = 0
        for k, part in enumerate(parts):
            n = len(part["rows"])
            sel = np.flatnonzero(keep_mask[start:start + n])
            if len(sel):
                with np.load(_chunk_path(partial, k)) as z:
                    fl, va, sg, of = z["flux"][sel], z["valid"][sel], z["sigma"][sel], z["offset"][sel]
                idx = start + sel
                append_rows(f, fl, va, labels[idx], label_err[idx], split[idx],
                            meta.iloc[idx].reset_index(drop=True),
                            None if extra is None else extra.iloc[idx].reset_index(drop=True), sigma=sg,
                            offset=of)
            start += n
    verify_dataset(tmp, int(keep_mask.sum()))  # before it is renamed into place


def _write(out: Path, job: _Job, matched: _Matched, parts: list, splits: _Splits, seed, fractions, t0,
           progress) -> dict:
    """Publish rejects.csv, the verified dataset.h5, then summary.json with its sha256; return the summary."""
    from . import __version__

    config, partial, final = job.config, out / PARTIAL_DIR, out / DATA_FILE
    labels, label_err = _label_arrays(splits.kept, config, progress)
    keep_mask = ~splits.bad
    n_kept = int(keep_mask.sum())
    rej = pd.DataFrame(matched.rejects, columns=REJECT_COLUMNS)
    by_reason = {k: int(v) for k, v in rej["reason"].value_counts().sort_index().items()}
    why = ", ".join(f"{k} {v}" for k, v in by_reason.items()) or "no catalog row or spectrum file"
    if n_kept == 0:
        raise sdss.NoUsableInput(f"no spectrum was kept ({why}); nothing was written to {out}")
    if np.isnan(labels[keep_mask]).all():
        raise sdss.NoUsableInput(f"none of the {n_kept} kept spectra has a label ({', '.join(config.labels.values())} "
                                 f"all missing or -9999); nothing was written to {out}")
    meta, extra = _row_meta(splits, job)
    attrs = {"grid": config.grid.to_dict(), "preprocess": config.to_dict(), "version": __version__,
             "input_hash": job.input_hash, "created": pd.Timestamp.now("UTC").isoformat(),
             "seed": seed, "fractions": list(fractions), "group_by": job.group_by, "split_column": job.split_column,
             "catalog": job.cat_name, "spectra": str(job.spectra)}
    for c in ("plate", "mjd", "fiberid"):
        rej[c] = pd.to_numeric(rej[c], errors="coerce").astype("Int64")
    rej["id"] = rej["id"].fillna("")
    seconds = time.perf_counter() - t0
    n_read = len(matched.work)
    summary = {
        "dataset": str(final), "input_hash": job.input_hash, "catalog_rows": len(job.cat),
        "files_found": len(job.files), "read": n_read, "kept": n_kept, "rejected": int(len(rej)),
        "rejected_by_reason": by_reason,
        "splits": {s: int(((splits.split == i) & keep_mask).sum()) for s, i in SPLITS.items()},
        "group_by": job.group_by, "split_column": job.split_column, "seed": seed,
        "seconds": round(seconds, 2), "spectra_per_s": round(n_read / max(seconds, 1e-9), 1),
        "version": __version__,
    }
    # publish: rejects, then the verified dataset, then the summary with the dataset's sha256
    # (a summary whose sha256 matches the dataset marks a finished job)
    atomic_write(out / REJECTS_FILE, lambda tmp: rej.to_csv(tmp, index=False))
    atomic_write(final, lambda tmp: _write_h5(tmp, partial, parts, keep_mask, config, attrs, labels, label_err,
                                              splits.split, meta, extra))
    summary["dataset_sha256"] = sha256_file(final)
    write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    shutil.rmtree(partial, ignore_errors=True)
    if progress:
        print(format_summary(summary), file=sys.stderr)
    return summary


def format_summary(s: dict) -> str:
    """The summary as the lines printed on stderr.

    Parameters
    ----------
    s : dict
        What :func:`prepare` returns.

    Returns
    -------
    str
    """
    lines = [f"prepared {s['kept']} of {s['read']} spectra read ({s['files_found']} files, "
             f"{s['catalog_rows']} catalog rows) in {s['seconds']:.1f} s ({s['spectra_per_s']:.0f} spectra/s)",
             "  splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items())]
    if s["rejected_by_reason"]:
        lines.append(f"  rejected {s['rejected']}: " + ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()))
    if s["kept"] == 0:
        lines.append("  warning: no spectrum was kept; rejects.csv says why for each file and catalog row")
    lines.append(f"  -> {s['dataset']} (rejects.csv, summary.json beside it)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(p):
    """Add the ``prepare`` options to an argparse parser.

    Parameters
    ----------
    p : argparse.ArgumentParser
    """
    p.description = ("Turn a folder of survey spectra (SDSS spec-*.fits/spSpec-*.fit, LAMOST "
                     "spec-LMJD-PLANID_spSS-FFF.fits, DESI coadd-*.fits, or a FITS/Parquet/HDF5 spectrum table) "
                     "plus a label catalog into a prepared dataset: rest-frame shift with the catalog RV (SDSS RV_ADOP, "
                     "LAMOST rv, DESI VRAD), one cubic-spline resampling onto "
                     "the 4000-pixel grid, per-spectrum standardization, shuffled 60/10/30 split. Writes "
                     "OUT/dataset.h5, OUT/rejects.csv (every file or row left out, with its reason) and "
                     "OUT/summary.json. An interrupted run resumes; re-running with the same inputs does nothing. "
                     "A FILE column in the catalog holds absolute paths or paths relative to the catalog's folder. "
                     "Exit status: 0 done, 1 nothing usable (no spectrum kept, no label), 2 bad input or options, "
                     "3 the output is being written by another process.")
    p.add_argument("--catalog", default=None, help="label catalog (.fits, .csv or .parquet): SDSS SSPP sppParams, "
                   "the LAMOST A/F/G/K parameter table, DESI mwsall (RVTAB); not needed for a spectrum table "
                   "with label columns")
    p.add_argument("--spectra", required=True, help="folder with the spectra (searched recursively), or one file")
    p.add_argument("--survey", choices=readers.SURVEYS, default=None,
                   help="format of the spectra (default: detected from the files; see docs/surveys.md)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled split")
    p.add_argument("--fractions", default="0.6,0.1,0.3", help="train,val,test fractions")
    p.add_argument("--group-by", default=None, help="catalog column whose rows stay in one split "
                   "(default: STAR_ID when the catalog has it)")
    p.add_argument("--split-column", default=None, help="catalog column with train/val/test (or 0/1/2) to use as given")
    p.add_argument("--min-coverage", type=float, default=0.5, help="fraction of the grid that must come from good pixels")
    add_grid_arguments(p)
    p.add_argument("--rv-column", default="RV_ADOP", help="catalog column with the radial velocity in km/s "
                   "(default RV_ADOP; LAMOST rv, DESI VRAD, table RV)")
    p.add_argument("--no-rest-frame", action="store_true", help="skip the rest-frame shift (no RV needed)")
    p.add_argument("--wait", action="store_true", help="if another process is writing OUT, wait for it instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    engine.add_argument(p)


def add_grid_arguments(p) -> None:
    """``--grid MIN_A,MAX_A,N`` and ``--grid-from MODEL`` (one or the other), for every command that prepares.

    Parameters
    ----------
    p : argparse.ArgumentParser
    """
    g = p.add_mutually_exclusive_group()
    g.add_argument("--grid", default=None, metavar="MIN_A,MAX_A,N",
                   help="common grid: N pixels uniform in log10 wavelength from MIN_A to MAX_A Angstrom "
                        "(default 3761-9268 A, 4000 pixels: log10 3.5754-3.9670)")
    g.add_argument("--grid-from", default=None, metavar="MODEL",
                   help="prepare exactly as this model folder expects: its grid and flux preprocessing "
                        "(read from MODEL/model.json)")


def config_from_args(args, config: PrepareConfig | None = None) -> PrepareConfig:
    """``config`` with the grid named by ``--grid`` or ``--grid-from`` (unchanged when neither is given).

    Parameters
    ----------
    args : argparse.Namespace
        With ``grid`` and ``grid_from`` (see :func:`add_grid_arguments`).
    config : PrepareConfig, optional

    Returns
    -------
    PrepareConfig

    Raises
    ------
    ValueError
        A malformed ``--grid`` or an unreadable model.
    """
    config = config or PrepareConfig()
    if getattr(args, "grid_from", None):
        return config_from_model(args.grid_from, config)
    if getattr(args, "grid", None):
        return PrepareConfig.from_dict({**config.to_dict(), "grid": parse_grid(args.grid)})
    return config


def run_cli(args) -> int:
    """Run ``stellarparams prepare`` with parsed arguments.

    Parameters
    ----------
    args : argparse.Namespace

    Returns
    -------
    int
        Exit status.
    """
    from .files import OutputBusy

    try:
        fractions = tuple(float(x) for x in args.fractions.split(","))
    except ValueError:
        print(f"--fractions: expected three numbers like 0.6,0.1,0.3, got {args.fractions!r}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args, PrepareConfig(min_coverage=args.min_coverage,
                                                      rest_frame=not args.no_rest_frame, rv_column=args.rv_column))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        prepare(args.catalog, args.spectra, args.out, config=config, workers=args.workers, seed=args.seed,
                fractions=fractions, group_by=args.group_by, split_column=args.split_column,
                progress=not args.no_progress, wait=args.wait, survey=args.survey, dask=args.dask)
    except OutputBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except sdss.NoUsableInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
