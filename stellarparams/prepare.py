"""prepare: survey spectra + a label catalog -> a prepared dataset (docs/method.md steps 1-4).

The job, top to bottom: check (catalog, files, options, input hash) -> match (catalog rows to
spectra: the survey's own rules, :mod:`stellarparams.surveys`) -> read (each spectrum through
:func:`stellarparams.preprocess.preprocess`, in parallel chunks) -> split -> write.

The job writes ``DATASET/``:
``dataset.h5`` (see :mod:`stellarparams.dataset`), ``rejects.csv`` and ``summary.json``.
Work happens in ``DATASET/.partial/`` (``pixels.h5``, whose rows the reading processes write in
place, and one small file per finished chunk), so a killed run resumes where it stopped. One
process at a time writes a dataset folder (``DATASET/.lock``). The dataset is read back and
checked before it is renamed into place, and summary.json records its sha256: a re-run is a
no-op only when the inputs are the same and the published file still matches that record.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice, repeat
from pathlib import Path

import numpy as np
import pandas as pd

from . import engine
from .context import Run
from .config import DEFAULT_LABEL_LIMITS, LABEL_LIMITS, label_outside_limits, parse_fractions
from .dataset import DATA_FILE, PIXEL_ARRAYS, SPLITS, append_table, create_dataset, parse_grid, pixel_offsets
from .files import atomic_write, check_readable, disk_error, write_text
from .outputs import check_disk, check_memory, locked_output
from .matching import resolve_file, walk
from .preprocess import PrepareConfig, config_from_model, preprocess
from .records import sha256_file
from .spectrum import SENTINEL, NoUsableInput, SpectrumError
from .surveys import registry
from .surveys import sdss
from .surveys.sdss import read_catalog
from .workers import pool as worker_pool

REJECTS_FILE = "rejects.csv"
SUMMARY_FILE = "summary.json"
PARTIAL_DIR = ".partial"
REJECT_COLUMNS = ["file", "plate", "mjd", "fiberid", "reason", "detail", "id"]  # id: the survey's identifier



# ---------------------------------------------------------------------------------------------
# finding files and matching them to the catalog

def _input_hash(h, columns: list, files, job: dict) -> str:
    """A hash of the catalog, the files' names, sizes and times, and the options.

    ``h``: a sha256 fed with the catalog's row hashes (``pd.util.hash_pandas_object``), in
    order; ``columns``: the catalog's; ``files``: sorted, one at a time."""
    h.update(",".join(columns).encode())
    for p in (files.texts() if hasattr(files, "texts") else files):
        st = os.stat(p)
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
    if groups is None:  # each row its own group: the same assignment without np.unique's copies
        order = np.random.default_rng(seed).permutation(n)
        split = np.empty(n, np.uint8)
        split[order] = np.searchsorted(np.cumsum(f)[:2], (np.arange(n) + 0.5) / max(n, 1), side="right")
        return split
    keys = np.asarray(groups)
    if keys.dtype.kind not in "SU":  # bytes (UTF-8) sort as their text does
        keys = keys.astype(str)
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

def _run_chunk(chunk_id: int, items: list, config: PrepareConfig, partial: str, pixels: "_Pixels", row0: int,
               survey: str = "sdss", reader: str = "fast") -> dict:
    """Preprocess the files of one chunk, write their pixels in place (rows ``row0...`` of ``pixels``), then
    save the chunk's summary as ``partial/chunk-ID.npz`` (which marks it done).

    items: list of (row, file, rv) or (row, file, rv, index of the spectrum in the file or
    None); reader: :data:`sdss.READERS`. Returns counts and rejects (small, for the main process).
    """
    P = config.grid.n_pix
    flux = np.zeros((len(items), P), np.float32)  # a rejected item's row stays zeros (not part of the dataset)
    valid = np.zeros((len(items), P), bool)
    sigma = np.zeros((len(items), P), np.float32)
    offset = np.zeros(len(items), np.float32)
    rows, pos, snr, rejects = [], [], [], []
    cache = {}
    for j, item in enumerate(items):
        row, path, rv = item[:3]
        index = item[3] if len(item) > 3 else None
        try:
            spec = registry.read_record(path, index, survey, cache, reader)
            if spec.objclass in config.reject_classes:
                raise SpectrumError(path, "not_a_star", f"CLASS {spec.objclass}")
            f, v, sg, o = preprocess(spec, rv, config, return_sigma=True, return_offset=True)
        except SpectrumError as e:
            rejects.append({"row": row, "file": str(path), "reason": e.reason, "detail": e.detail})
            continue
        except Exception as e:  # a file we did not foresee must not stop the batch
            rejects.append({"row": row, "file": str(path), "reason": "error", "detail": f"{type(e).__name__}: {e}"[:300]})
            continue
        flux[j], valid[j], sigma[j], offset[j] = f, v, sg, o
        rows.append(row)
        pos.append(row0 + j)
        snr.append(spec.snr)
    crc = pixels.write(row0, {"flux": flux, "valid": valid, "sigma": sigma, "offset": offset})
    # not fsynced (nor the pixels): a resumed job checks each finished chunk's pixels against its crc
    atomic_write(_chunk_path(Path(partial), chunk_id), durable=False, write=lambda tmp: np.savez(
        tmp, rows=np.array(rows, np.int64), pos=np.array(pos, np.int64), snr=np.array(snr, np.float32),
        rejects=np.array(json.dumps(rejects)), crc=np.int64(crc)))
    return {"chunk": chunk_id, "n": len(items), "kept": len(rows), "rejects": rejects}


def _load_chunk_summary(path: Path) -> dict:
    with np.load(path) as z:
        return {"rows": z["rows"], "pos": z["pos"], "snr": z["snr"], "rejects": json.loads(str(z["rejects"]))}


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


def _int_text(v: np.ndarray) -> np.ndarray:
    """(n,) int64 -> their decimal text as bytes, as wide as the longest."""
    width = max([len(str(int(x))) for x in (v.min(), v.max())] if len(v) else [1])
    return v.astype(f"S{width}")


def _group_keys(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Group keys as text ((n,) array: bytes for whole numbers, else str), and a mask of rows without one
    (NaN, -9999 or empty)."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        v = col.to_numpy(np.float64, na_value=np.nan)
        missing = np.isnan(v) | (v <= SENTINEL)
        if pd.api.types.is_integer_dtype(col):
            return _int_text(col.to_numpy(np.int64, na_value=0)), missing
        if np.all(np.mod(v[~missing], 1) == 0) and np.all(np.abs(v[~missing]) < 2**53):
            return _int_text(np.where(missing, 0, v).astype(np.int64)), missing  # 3.0 -> "3"
    missing = (col.isna().to_numpy() | col.astype(str).str.strip().isin(["", "nan", "None"]).to_numpy()
               | (pd.to_numeric(col, errors="coerce") <= SENTINEL).to_numpy())
    values = col
    if pd.api.types.is_float_dtype(col) and np.all(np.mod(col[~missing], 1) == 0):
        values = col.astype("Int64")  # 3.0 -> "3" when a NaN made an integer column float
    return values.astype(str).to_numpy(dtype=object), missing


def prepare(catalog, spectra, out, *, config: PrepareConfig = PrepareConfig(), workers: int | None = None,
            seed: int = 0, fractions=(0.6, 0.1, 0.3), group_by: str | None = None,
            split_column: str | None = None, chunk_size: int = 256, progress: bool = True,
            wait: bool = False, survey: str | None = None, dask=None, reader: str = "fast",
            run: Run | None = None) -> dict:
    """Turn a folder of survey spectra plus a label catalog into ``out/dataset.h5``.

    Parameters
    ----------
    catalog : str, Path or DataFrame, or None
        Read with :func:`read_catalog` (FITS, CSV or Parquet); column names are
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
        ``sdss``, ``lamost``, ``desi`` or ``table`` (:func:`surveys.registry.names`); default:
        detected from the files. For a survey other than SDSS, a config with the SDSS default
        columns (TEFF_ADOP, ..., RV_ADOP) takes that survey's instead (the survey module's ``labels`` and ``rv_column``).
    dask : str or distributed.Client, optional
        Read the chunks on a Dask cluster instead of ``workers`` processes here:
        ``tcp://HOST:PORT``, ``local:N`` or a client (:mod:`stellarparams.engine`). Workers
        write the chunks into ``out/.partial/`` themselves, so they must share the file system
        with this process. Connected before anything is written; the dataset is the same.
    reader : str
        ``"fast"`` (default): SDSS DR8+ files of the plain layout are read with numpy, the rest
        with cfitsio; ``"fitsio"``: every file with cfitsio (:func:`sdss.read_spectrum`). The
        dataset is the same.
    run : Run, optional
        ``progress``, ``workers`` and ``dask`` as one object (:mod:`stellarparams.context`); when
        given, it replaces those three arguments.

    Returns
    -------
    dict
        The summary (also saved as summary.json, with the dataset's sha256). Rejected rows and
        files are listed in rejects.csv with their reason; none stops the batch.

    Raises
    ------
    NoUsableInput
        No spectrum was kept, or no kept spectrum has a label; nothing is published.
    ValueError
        Bad catalog, options or output folder; :class:`engine.DaskError` when ``dask`` names no
        scheduler that answers.
    """
    if reader not in sdss.READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(sdss.READERS)}")
    run = run or Run(progress=progress, workers=workers, dask=dask)
    with run.cluster() as client, locked_output(out, wait):
        t0 = time.perf_counter()
        job = _check(catalog, Path(spectra), config, survey, seed, fractions, group_by, split_column, chunk_size,
                     run.progress)
        job.reader, job.run, job.client = reader, run, client
        return _prepare(job, Path(out), t0)


def detect_survey(spectra) -> str:
    """The survey of a spectra folder (or file): the one survey its file names (or content) show.

    Parameters
    ----------
    spectra : str or Path

    Returns
    -------
    str
        One of :func:`surveys.registry.names`.

    Raises
    ------
    ValueError
        Files of more than one survey, or none; name it with ``--survey``.
    """
    spectra = Path(spectra)
    if spectra.is_file():
        try:
            return registry.detect(spectra)
        except SpectrumError as e:
            raise ValueError(str(e)) from e
    if not spectra.is_dir():
        raise FileNotFoundError(f"{spectra}: spectra folder not found")
    check_readable(spectra)
    found = sorted({registry.by_name(name) for _, name in walk(spectra)} - {None})  # in no order: a set
    if not found:  # no file named after a survey: the formats found only when asked (tables)
        found = [s for s in registry.names() if not registry.get(s).listed and registry.find_files(spectra, s)][:1]
    if len(found) == 1:
        return found[0]
    if not found:
        return registry.names()[0]  # an empty folder: the first survey's path (SDSS) reports it as before
    raise ValueError(f"{spectra}: files of several surveys ({', '.join(found)}); choose one with --survey")


# ---------------------------------------------------------------------------------------------
# the job, top to bottom: check -> match -> read -> split -> write

def _prepare(job: "_Job", out: Path, t0: float) -> dict:
    """:func:`prepare` inside the output lock, from the checked inputs on: match -> read -> split -> write."""
    done = _finished(out, job.input_hash, job.run.progress)
    if done is not None:
        return done
    rejects = _Rejects(out / ".rejects.csv")  # renamed to rejects.csv when the dataset is published
    try:
        matched = _match(job, rejects)
        _check_resources(out, job, len(matched.rows))
        _release(job, job.config.labels.values())  # read back from the catalog file when written
        pixels, parts = _read(out / PARTIAL_DIR, job, matched)
        matched.rv, matched.n_read, matched.rows = None, len(matched.rows), None  # read: not needed any more
        _release(job, [job.config.rv_column])
        splits = _split(job, matched, parts)
        _release(job, [job.group_by, job.split_column, "STAR_ID"])
        return _write(out, job, matched, pixels, splits, t0)
    finally:
        if not rejects.fh.closed:
            rejects.discard()


BYTES_PER_PIXEL = 9         # stored per spectrum and grid pixel: flux and sigma (float32), valid (bool)
CHUNK_BYTES_PER_PIXEL = 20  # held in memory per spectrum of a chunk and grid pixel (measured: 18)
WORK_BYTES_PER_PIXEL = 1200  # a reading process's resampling temporaries per grid pixel (measured: 1,100-1,200)


def _check_resources(out: Path, job: "_Job", n_work: int) -> None:
    """Refuse, before reading, a job whose chunks and dataset would not fit on disk or in memory."""
    n_pix = job.config.grid.n_pix
    chunk_size, workers = job.chunk_size, job.run.workers if job.client is None else 1
    workers = max(1, min(workers or os.cpu_count() or 1, -(-n_work // chunk_size) or 1))
    per_chunk = min(chunk_size, n_work) * n_pix * CHUNK_BYTES_PER_PIXEL
    check_disk(out, n_work * n_pix * BYTES_PER_PIXEL,  # the pixels file, which becomes the dataset
               f"preparing {n_work:,} spectra x {n_pix:,} pixels")
    check_memory((workers + 1) * per_chunk + workers * n_pix * WORK_BYTES_PER_PIXEL,
                 f"preparing {n_work:,} spectra x {n_pix:,} pixels with {workers} worker(s)",
                 "--workers or the grid's number of pixels (--grid MIN,MAX,N)")


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
    columns: list = None     # every catalog column (``cat`` may hold some of them only)
    numbers: set = None      # the catalog columns of numbers (not logicals)
    rest: object = None      # :func:`sdss.open_catalog`'s, holding the columns not in ``cat`` (None: all are there)
    labelled: np.ndarray = None  # (catalog rows,) bool: the rows with a label (:func:`_match`)
    seed: int = 0            # of the shuffled split
    fractions: tuple = (0.6, 0.1, 0.3)  # train, val, test
    chunk_size: int = 256    # spectra per resumable chunk
    reader: str = "fast"     # :data:`sdss.READERS` (not part of the input hash: both give the same dataset)
    run: Run = Run()         # progress and workers (:mod:`stellarparams.context`)
    client: object = None    # the Dask client reading the chunks, or None for the process pool


class _Rejects:
    """The rejected rows and files, written to a CSV file as they come (never held as a list).

    Parameters
    ----------
    path : Path
        The file written (``rejects.csv``'s columns, :data:`REJECT_COLUMNS`); renamed into place
        by :meth:`publish`.
    """

    def __init__(self, path: Path):
        import csv

        self.path, self.by_reason, self.n = path, {}, 0
        self.fh = open(path, "w", newline="")
        self.csv = csv.writer(self.fh, lineterminator="\n")
        self.csv.writerow(REJECT_COLUMNS)

    def append(self, r: dict) -> None:
        """Write one reject (a dict with some of :data:`REJECT_COLUMNS`)."""
        def num(v):
            return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else int(v)

        self.add(r.get("file"), (num(r.get("plate")), num(r.get("mjd")), num(r.get("fiberid"))), r["reason"],
                 r.get("detail", ""), r.get("id"))

    def add(self, file, key: tuple, reason: str, detail: str, ident) -> None:
        """Write one reject: its file (or None), (plate, mjd, fiberid) (ints or None), reason, detail, identifier."""
        self.csv.writerow((str(file or ""), *key, reason, detail, ident or ""))  # csv writes None as ""
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.n += 1

    def publish(self, final: Path) -> None:
        """Close the file and rename it to ``final`` (atomic)."""
        self.fh.close()
        os.replace(self.path, final)

    def discard(self) -> None:
        """Close and remove the file (a job that published nothing)."""
        self.fh.close()
        self.path.unlink(missing_ok=True)


@dataclass
class _Matched:
    """Catalog rows matched to spectra (:func:`_match`): the rows to read, in reading order, as an array."""
    loc: object              # :class:`surveys.base.Located`: each row's file, key and identifier
    rows: np.ndarray         # (n_work,) int64: the catalog rows to read, in reading order
    rv: np.ndarray           # (catalog rows,) float64 km/s (NaN: none)
    rejects: _Rejects
    n_read: int = 0          # rows read (``rows`` is dropped once they are)

    def reject(self, row, file, reason, detail=""):
        """Add a rejected catalog row."""
        self.rejects.add(file, self.loc.key(row), reason, detail, self.loc.row_id(row))

    def file_of(self, row: int) -> str:
        """The spectrum file of catalog row ``row`` as text."""
        return self.loc.file_text(row)[0]

    def items(self, lo: int, hi: int) -> list:
        """Work items ``lo:hi`` (reading order): (row, file, rv, index of the spectrum in the file or None)."""
        out = []
        for i in self.rows[lo:hi].tolist():
            f, index = self.loc.file_text(i)
            out.append((i, f, float(self.rv[i]), index))
        return out


@dataclass
class _Splits:
    """The spectra that were read and kept, with their groups and splits (:func:`_split`)."""
    rows: np.ndarray         # catalog row of each, in dataset order
    snr: np.ndarray
    object_id: np.ndarray | None  # group key of each (text), None: each row's identifier (made per block)
    split: np.ndarray        # SPLITS value of each (255: a bad split_column value)
    bad: np.ndarray          # rows rejected for a bad split_column value (not written)
    pos: np.ndarray          # the row of each in the pixels file (:class:`_Pixels`)


# --- check ---------------------------------------------------------------------------------

def _survey_config(survey: str, config: PrepareConfig) -> PrepareConfig:
    """The survey's label and RV columns when ``config`` has the defaults; column names upper-cased."""
    default, fmt = PrepareConfig(), registry.get(survey)
    if fmt.labels is not None and config.labels == default.labels and config.rv_column == default.rv_column:
        config = PrepareConfig.from_dict({**config.to_dict(), "labels": dict(fmt.labels), "rv_column": fmt.rv_column})
    return PrepareConfig.from_dict({**config.to_dict(), "rv_column": config.rv_column.upper(),
                                    "labels": {k: v.upper() for k, v in config.labels.items()}})


def _own_catalog(spectra: Path, survey: str) -> pd.DataFrame:
    """Without a catalog: the files' own (a spectrum table's scalar columns, with FILE)."""
    fmt = registry.get(survey)
    if not fmt.carries_labels:
        return fmt.own_catalog([])  # says that a catalog is needed
    return fmt.own_catalog(registry.find_files(spectra, survey))


def _check(catalog, spectra: Path, config: PrepareConfig, survey, seed, fractions, group_by, split_column,
           chunk_size, progress) -> _Job:
    """Read the catalog, find the files, check columns and options, and hash the inputs."""
    if spectra.is_dir():
        check_readable(spectra)
    survey = survey or detect_survey(spectra)
    fmt = registry.get(survey)
    config = _survey_config(survey, config)
    if catalog is None:
        catalog = _own_catalog(spectra, survey)
    stream = sdss.open_catalog(catalog) if fmt.catalog_columns is not None \
        and not isinstance(catalog, pd.DataFrame) else None
    cat = None if stream is not None else read_catalog(catalog)
    columns = stream.columns if stream is not None else list(cat.columns)
    cat_name = "<DataFrame>" if isinstance(catalog, pd.DataFrame) else str(catalog)
    need = fmt.catalog_keys
    if "FILE" not in columns and not any(all(c in columns for c in cols) for cols in need) \
            and not (fmt.one_file_is_enough and len(registry.find_files(spectra, survey)) == 1):
        raise ValueError(f"{cat_name}: a {survey} catalog needs " + " or ".join(", ".join(c) for c in need)
                         + f" (or FILE) columns; it has {', '.join(columns[:30])}")
    if config.rest_frame and config.rv_column not in columns:
        raise ValueError(f"{cat_name}: no {config.rv_column} column for the rest-frame shift; name the RV column "
                         f"with --rv-column (Python: PrepareConfig(rv_column=...)), or skip the shift with "
                         f"--no-rest-frame")
    for c in (split_column, group_by):
        if c is not None and c.upper() not in columns:
            raise ValueError(f"{cat_name}: no column {c!r} (it has {', '.join(columns[:30])})")
    split_column = split_column.upper() if split_column else None
    group_by = group_by.upper() if group_by else None
    if group_by is None and split_column is None and "STAR_ID" in columns:
        group_by = "STAR_ID"
        _log("grouping splits by STAR_ID (all spectra of one star in one split); pass --group-by to change", progress)

    rows_hash = hashlib.sha256()
    if stream is not None:  # read in blocks: only the columns used before the dataset is written stay in memory
        cat = _read_blocks(stream, _in_memory(stream, fmt, config, group_by, split_column), rows_hash,
                           fmt.catalog_columns)
    else:
        rows_hash.update(pd.util.hash_pandas_object(cat, index=True).to_numpy().tobytes())
    files = registry.prepare_files(spectra, survey)
    base = Path.cwd() if isinstance(catalog, pd.DataFrame) else Path(catalog).parent
    row_files = [resolve_file(f, base) for f in cat["FILE"]] if "FILE" in cat.columns else _NoFiles(len(cat))
    job = {"config": config.to_dict(), "seed": seed, "fractions": list(fractions), "group_by": group_by,
           "split_column": split_column, "chunk_size": chunk_size, "spectra": str(spectra.resolve()),
           "store": 2}  # 2: chunks and dataset carry sigma and offset (older partial work is not reused)
    if fmt.hashed_name:  # absent for SDSS, so earlier datasets stay up to date
        job["survey"] = survey
    if LABEL_LIMITS != DEFAULT_LABEL_LIMITS:  # absent for the defaults, so earlier datasets stay up to date
        job["label_limits"] = dict(LABEL_LIMITS)
    named = {f for f in row_files if f is not None and f.is_file()}
    input_hash = _input_hash(rows_hash, columns, sorted(set(files) | named) if named else files, job)
    numbers = stream.numbers if stream is not None else {c for c in columns if sdss.is_number(cat[c])}
    return _Job(cat, cat_name, spectra, survey, config, group_by, split_column, files, row_files, input_hash,
                columns=columns, numbers=numbers, rest=stream, seed=seed, fractions=tuple(fractions),
                chunk_size=chunk_size)


class _NoFiles:
    """Each catalog row's FILE (a Path or None) for a catalog without that column: None, n times (no list)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return None

    def __iter__(self):
        return iter(repeat(None, self.n))


def _in_memory(stream, fmt, config: PrepareConfig, group_by, split_column) -> list:
    """The catalog columns prepare reads before it writes the dataset: the survey's keys, labels, RV, groups,
    split, FILE and CLASS. Label errors and extra columns are read when written; other text is only hashed."""
    keep = set(fmt.catalog_columns) | set(config.labels.values()) | {config.rv_column, group_by, split_column,
                                                                     fmt.id_column, "STAR_ID", "FILE", "CLASS"}
    return [c for c in stream.columns if c in keep]


CATALOG_BLOCK = 1 << 16  # catalog rows read at a time


def _read_blocks(stream, keep: list, rows_hash, narrow=()) -> pd.DataFrame:
    """The columns ``keep`` of a catalog of :func:`sdss.open_catalog`, read a block of rows at a time; every
    block's row hashes (all columns) go to ``rows_hash``. Integer columns of ``narrow`` (the keys) are held as
    int32 when their values fit (the same values, half the memory)."""
    arrays = {}
    for block in stream.blocks(CATALOG_BLOCK):
        rows_hash.update(pd.util.hash_pandas_object(block, index=True).to_numpy().tobytes())
        lo = int(block.index[0])
        for c in keep:
            v = block[c].to_numpy()
            if c not in arrays:
                arrays[c] = np.empty(stream.n, v.dtype)
            arrays[c][lo:lo + len(v)] = v
    for c in set(narrow) & set(arrays):
        a = arrays[c]
        if a.dtype.kind == "i" and len(a) and np.iinfo(np.int32).min <= a.min() and a.max() <= np.iinfo(np.int32).max:
            arrays[c] = a.astype(np.int32)
    return pd.DataFrame({c: arrays[c] for c in keep}, copy=False)


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

def _duplicate_rows(job: _Job, ident: list) -> np.ndarray:
    """Rows whose spectrum an earlier row (in the survey's order: DESI's PRIMARY rows first) already has."""
    first, _ = registry.get(job.survey).row_order(job.cat)
    dup = np.zeros(len(job.cat), bool)
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


NO_FILE, DUPLICATE, NOT_A_STAR, MISSING_RV, BAD_LABEL, READ = range(6)  # why a row is not read (READ: it is)


def _match(job: _Job, rejects: _Rejects) -> _Matched:
    """Match catalog rows and spectrum files: the rows to read (an array), and the rejected rows and files
    (written to ``rejects`` in catalog order, then the files no row took)."""
    cat, config, row_files = job.cat, job.config, job.row_files
    fmt = registry.get(job.survey)
    loc = fmt.locate(cat, job.files, row_files)
    rv = cat[config.rv_column].to_numpy(np.float64) if config.rv_column in cat.columns else np.full(len(cat), np.nan)
    matched = _Matched(loc, np.zeros(0, np.int64), rv, rejects)
    why = np.full(len(cat), READ, np.uint8)  # the first reason that applies, in this order
    bad_label = _bad_labels(cat, config)
    job.labelled = _labelled(cat, config)
    if config.rest_frame:
        why[~np.isfinite(rv)] = MISSING_RV
    bad = np.fromiter(bad_label, np.int64, len(bad_label))
    why[bad] = np.where(why[bad] == READ, BAD_LABEL, why[bad])
    if "CLASS" in cat.columns:
        why[cat["CLASS"].astype(str).str.upper().isin(list(config.reject_classes)).to_numpy()] = NOT_A_STAR
    has_file = loc.has_file()
    for i in np.flatnonzero(has_file & np.array([f is not None for f in row_files], bool)):
        has_file[i] = loc.file(i)[0].exists()  # a FILE cell naming a file that is not there
    why[~has_file] = NO_FILE
    why[loc.dup if loc.dup is not None else _duplicate_rows(job, loc.ident)] = DUPLICATE
    used = _mark_used(loc, why, len(job.files))
    for i in np.flatnonzero(why != READ).tolist():
        _reject_row(matched, i, why[i], bad_label, config.rv_column, fmt, cat)
    _reject_unused_files(job, loc.twin, used[1], rejects, used[2], used[0])
    loc.twin = loc.dup = loc.ident = None  # no longer needed
    matched.rows = np.flatnonzero(why == READ)
    if fmt.many_per_file:  # read each file once per chunk, not once per row
        files = [loc.file(i) for i in matched.rows.tolist()]
        order = sorted(range(len(files)), key=lambda k: (str(files[k][0]), files[k][1] or 0))
        matched.rows = matched.rows[np.array(order, np.int64)]
    return matched


def _mark_used(loc, why: np.ndarray, n_files: int) -> tuple:
    """The files the rows with a file use: (m,) bool by index, and the resolved paths of the others
    (a FILE cell, or a survey matched by content); with the resolver used."""
    resolve = _resolver()
    used_file, used = np.zeros(n_files, bool), set()
    taking = (why != NO_FILE) & (why != DUPLICATE)
    by_index = taking & (loc.match >= 0) & np.array([f is None for f in loc.row_files], bool)
    used_file[loc.match[by_index]] = True  # one of job.files: no path to resolve
    for i in np.flatnonzero(taking & ~by_index).tolist():
        used.add(resolve(loc.file(i)[0]))
    return used_file, used, resolve


def _reject_row(matched: _Matched, i: int, why: int, bad_label: dict, rv_column: str, fmt, cat) -> None:
    """Write the reject of catalog row ``i`` (``why``: one of NO_FILE ... BAD_LABEL)."""
    f = matched.loc.file(i)[0]
    if why == DUPLICATE:
        matched.reject(i, f, "duplicate_row", "same spectrum as another catalog row; kept the first"
                       + fmt.row_order(cat)[1])
    elif why == NO_FILE:
        matched.reject(i, f, "no_file", f"no spectrum file for catalog row {i}" + (f" ({f} does not exist)" if f else ""))
    elif why == NOT_A_STAR:
        matched.reject(i, f, "not_a_star", f"catalog CLASS {str(cat['CLASS'].iat[i]).upper()}")
    elif why == MISSING_RV:
        matched.reject(i, f, "missing_rv", f"{rv_column} is missing (-9999, NaN, empty or text)")
    else:
        matched.reject(i, f, "bad_label", bad_label[i])


def _bad_labels(cat: pd.DataFrame, config: PrepareConfig) -> dict:
    """{catalog row: why a label is outside its physical limits (:data:`config.LABEL_LIMITS`)} for the rows with one."""
    why = {}
    for name, col in config.labels.items():
        col = col.upper()
        if col not in cat.columns:
            continue
        values = pd.to_numeric(cat[col], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        lo, hi = LABEL_LIMITS.get(name, (None, None))
        for i in np.flatnonzero(label_outside_limits(name, values)).tolist():
            why.setdefault(i, f"{col} = {values[i]:g} is outside the physical limits {lo:g} to {hi:g} "
                              "(stellarparams.config.LABEL_LIMITS)")
    return why


def _reject_unused_files(job: _Job, twin, used: set, rejects, resolve=Path.resolve, used_file=None) -> None:
    """Reject each file no catalog row uses (the survey's rejects; for SDSS a second file of a used spectrum is a duplicate;
    ``twin``: each file's first file of the same key, an index in ``job.files``; ``used``: the resolved
    paths of the files used, ``used_file``: (files,) bool, the files used by index)."""
    if used_file is None:
        used_file = np.zeros(len(job.files), bool)

    def is_used(j):
        return used_file[j] or bool(used) and resolve(job.files[j]) in used

    registry.get(job.survey).reject_unused(job.files, twin, is_used, rejects)


# --- read: resumable parallel preprocessing ------------------------------------------------

def _chunk_path(partial: Path, k: int) -> Path:
    return partial / f"chunk-{k:05d}.npz"


def _read(partial: Path, job: _Job, matched: _Matched) -> tuple:
    """Preprocess the rows of ``matched`` in chunks into ``partial`` (reusing finished chunks of the same inputs).

    In a process pool of ``job.run.workers``, or on the Dask cluster of ``job.client`` when given.
    A chunk's work items are made when it is handed out, and only a few chunks wait at a time.

    Returns the :class:`_Pixels` file and each chunk's summary (rows kept, their positions in that
    file and S/N, rejects), in chunk order.
    """
    from tqdm.auto import tqdm

    chunk_size, progress, client = job.chunk_size, job.run.progress, job.client
    job_file, n_work = partial / "job.json", len(matched.rows)
    if partial.exists():
        try:
            old = json.loads(job_file.read_text()).get("input_hash")
        except (OSError, ValueError):
            old = None
        if old != job.input_hash:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_text(job_file, json.dumps({"input_hash": job.input_hash, "n_work": n_work}))
    pixels = _Pixels.open(partial, job.config, n_work)
    n_chunks = -(-n_work // chunk_size)
    todo = [k for k in range(n_chunks) if not _intact(partial, pixels, k, chunk_size)]
    if len(todo) < n_chunks:
        _log(f"resuming: {n_chunks - len(todo)} of {n_chunks} chunks already done in {partial}", progress)
    workers = max(1, min(job.run.workers or os.cpu_count() or 1, len(todo) or 1))
    n_todo = sum(min(n_work, (k + 1) * chunk_size) - k * chunk_size for k in todo)
    bar = tqdm(total=n_todo, desc="prepare", unit="spec", disable=not progress, smoothing=0.1)

    def calls(path=str):  # the chunks' arguments, made one at a time
        for k in todo:
            items = matched.items(k * chunk_size, (k + 1) * chunk_size)
            yield (k, [(i, path(f), *rest) for i, f, *rest in items], job.config, path(partial), pixels,
                   k * chunk_size, job.survey, job.reader)

    if client is not None:  # the same chunks on a cluster; files as absolute paths (workers may run elsewhere)
        results = engine.map_unordered(client, _run_chunk, calls(engine.absolute))
    elif workers == 1 or len(todo) <= 1:
        results = (_run_chunk(*args) for args in calls())
    else:
        results = _pool_map(workers, calls())
    for r in results:
        bar.update(r["n"])
    bar.close()
    return pixels, [_load_chunk_summary(_chunk_path(partial, k)) for k in range(n_chunks)]


def _intact(partial: Path, pixels: "_Pixels", k: int, chunk_size: int) -> bool:
    """Whether chunk ``k`` is finished and its pixels are on disk as written (a power cut may lose either);
    a chunk that is not is removed, to be read again."""
    path = _chunk_path(partial, k)
    if not path.exists():
        return False
    try:
        with np.load(path) as z:
            crc = int(z["crc"])
        row0 = k * chunk_size
        if pixels.crc(row0, min(pixels.n_rows, row0 + chunk_size) - row0) == crc:
            return True
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass
    path.unlink()
    return False


def _pool_map(workers: int, calls):
    """Yield ``_run_chunk(*args)`` for each of ``calls`` as they finish, in a process pool of ``workers``,
    with at most two chunks per worker handed out at a time."""
    from concurrent.futures import FIRST_COMPLETED, wait

    with worker_pool(workers) as pool:
        running = {pool.submit(_run_chunk, *args) for args in islice(calls, 2 * workers)}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            running |= {pool.submit(_run_chunk, *args) for args in islice(calls, len(done))}
            for fut in done:
                yield fut.result()


@dataclass(frozen=True)
class _Pixels:
    """``partial/pixels.h5``: a dataset file (:func:`create_dataset` with ``n_rows``) whose pixel arrays hold
    one row per work item. The reading process that preprocessed a chunk writes its rows in place
    (``os.pwrite`` at :func:`pixel_offsets`), so no process copies the pixels again: when every row read
    is kept, this file becomes the dataset once its per-row table is added (:func:`_write_h5`).

    Attributes
    ----------
    path : str
    n_rows : int
    offsets : dict
        name -> (byte offset of row 0, bytes per row).
    """
    path: str
    n_rows: int
    offsets: dict

    NAME = "pixels.h5"

    @classmethod
    def open(cls, partial: Path, config: PrepareConfig, n_rows: int) -> "_Pixels":
        """The pixels file of ``partial`` when it fits (a resumed job), else a new one (finished chunks dropped)."""
        import h5py

        path = Path(os.path.abspath(partial / cls.NAME))  # absolute: a Dask worker may start in another folder
        try:
            with h5py.File(path, "r") as f:
                if f["flux"].shape == (n_rows, config.grid.n_pix):
                    return cls(str(path), n_rows, pixel_offsets(f))
        except (OSError, KeyError, ValueError):
            pass
        for chunk in partial.glob("chunk-*.npz"):  # their pixels are not in a new file
            chunk.unlink()
        path.unlink(missing_ok=True)
        with create_dataset(path, config.grid.n_pix, list(config.labels), {}, sigma=True, offset=True,
                            n_rows=n_rows) as f:
            offsets = pixel_offsets(f)
        return cls(str(path), n_rows, offsets)

    def holds_only(self, pos: np.ndarray) -> bool:
        """Whether the rows ``pos`` (distinct and increasing, as :func:`_split` gives them) are every row of
        the file (nothing to leave out)."""
        return len(pos) == self.n_rows

    def write(self, row0: int, arrays: dict) -> int:
        """Write ``arrays`` (name -> rows ``row0...`` of that pixel array, every one of :data:`PIXEL_ARRAYS`) in
        place; returns the crc32 of what was written (:meth:`crc`)."""
        crc = 0
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for name in PIXEL_ARRAYS:
                start, row_bytes = self.offsets[name]
                data = memoryview(np.ascontiguousarray(arrays[name])).cast("B")
                crc = zlib.crc32(data, crc)
                at = start + row0 * row_bytes
                while len(data):
                    n = os.pwrite(fd, data, at)
                    data, at = data[n:], at + n
        except OSError as e:  # a full disk: one error naming the file, as atomic_write gives
            err = disk_error(e, self.path)
            if err is None or err is e:
                raise
            raise err from e
        finally:
            os.close(fd)
        return crc

    def crc(self, row0: int, n: int) -> int:
        """The crc32 of rows ``row0:row0 + n`` of every pixel array, as the file holds them."""
        crc = 0
        with open(self.path, "rb") as f:
            for name in PIXEL_ARRAYS:
                start, row_bytes = self.offsets[name]
                want = n * row_bytes
                data = os.pread(f.fileno(), want, start + row0 * row_bytes)
                if len(data) != want:
                    raise ValueError(f"{self.path}: {name} is cut short")
                crc = zlib.crc32(data, crc)
        return crc


# --- split: train/val/test, grouped -----------------------------------------------------------

def _split(job: _Job, matched: _Matched, parts: list) -> _Splits:
    """Collect the spectra read (their rejects into ``matched``), group them and assign splits."""
    seed, fractions, progress = job.seed, job.fractions, job.run.progress
    for part in parts:
        for r in part["rejects"]:
            matched.reject(r["row"], matched.file_of(r["row"]), r["reason"], r["detail"])
    def joined(key, dtype):  # row numbers as int32 when they fit: half the memory per spectrum
        a = np.concatenate([p[key] for p in parts]) if parts else np.zeros(0, dtype)
        return a.astype(np.int32) if a.dtype == np.int64 and len(job.cat) < 2 ** 31 else a

    rows, snr, pos = joined("rows", np.int64), joined("snr", np.float32), joined("pos", np.int64)
    parts.clear()  # held once, in ``rows``, ``snr`` and ``pos``
    object_id = None
    id_col = job.group_by or ("STAR_ID" if "STAR_ID" in job.cat.columns else None)
    if id_col:
        object_id, no_id = _group_keys(job.cat[id_col].iloc[rows].reset_index(drop=True))
        if no_id.any():  # a row without an ID is a star of its own
            object_id = np.char.decode(object_id) if object_id.dtype.kind == "S" else object_id
            object_id = object_id.astype(object)
            object_id[no_id] = [_row_key(matched, int(r)) for r in rows[no_id]]
            object_id = object_id.astype(str)
            _log(f"warning: {int(no_id.sum())} of {len(rows)} kept rows have no {id_col} (NaN, -9999 or empty); "
                 "each of them is a group of its own", progress)
    split_column = job.split_column
    if split_column:
        values = job.cat[split_column].iloc[rows]
        split = _parse_split_values(values)
        bad = split == 255
        for i in np.flatnonzero(bad):
            matched.reject(int(rows[i]), matched.file_of(int(rows[i])), "bad_split_value",
                           f"{split_column} = {values.iloc[i]!r}; want train/val/test or 0/1/2")
    else:
        groups = None
        if job.group_by:
            groups = object_id
        split = assign_splits(len(rows), seed, fractions, groups)
        bad = np.zeros(len(rows), bool)
    return _Splits(rows, snr, object_id, split, bad, pos)


def _row_key(matched: _Matched, row: int) -> str:
    """A row's own group key: its identifier, else its file's name without the suffix."""
    return matched.loc.row_id(row) or Path(matched.file_of(row)).stem


# --- write: assemble, verify, publish ----------------------------------------------------------

def _label_arrays(kept: pd.DataFrame, config: PrepareConfig):
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
    return labels, label_err


def _text(a: np.ndarray) -> np.ndarray:
    """An array of text as str (bytes decoded as UTF-8)."""
    return np.char.decode(a, "utf-8") if a.dtype.kind == "S" else a


def _extra_columns(job: _Job) -> list:
    """The catalog's other numeric columns (written under ``extra/``)."""
    config = job.config
    standard = set(sdss.CATALOG_ID_COLUMNS) | {config.rv_column, job.split_column or ""}
    for col in config.labels.values():
        standard |= {col.upper(), col.upper() + "_UNC", col.upper() + "_ERR"}
    return [c for c in job.columns if c not in standard and c in job.numbers]


def _table_block(job: _Job, matched: _Matched, splits: _Splits, idx: np.ndarray, extra_cols: list):
    """The per-row table of the kept spectra ``idx`` (indices in ``splits``): labels, label errors, split,
    metadata and the extra columns (None when there are none)."""
    rows, config = splits.rows[idx], job.config
    kept = job.cat.iloc[rows].reset_index(drop=True)
    errors = {c.upper() + e for c in config.labels.values() for e in ("_UNC", "_ERR")}
    other = [c for c in job.columns if c not in job.cat.columns and (c in job.numbers or c in errors)]
    if other:  # read from the catalog file now
        kept = pd.concat([kept, job.rest.read(rows, other).reset_index(drop=True)], axis=1)
    labels, label_err = _label_arrays(kept, config)

    def ints(col):
        return pd.to_numeric(kept[col], errors="coerce").fillna(0).to_numpy(np.int32) if col in kept \
            else np.zeros(len(kept), np.int32)

    files = [matched.file_of(int(r)) for r in rows]
    object_id = _text(splits.object_id[idx]) if splits.object_id is not None else \
        np.array([matched.loc.row_id(int(r)) or Path(f).stem for r, f in zip(rows, files)], dtype=object)
    meta = pd.DataFrame({
        "plate": ints("PLATE"), "mjd": ints("MJD"), "fiberid": ints("FIBERID"),
        "object_id": object_id, "file": files,
        "rv": kept[config.rv_column].to_numpy(np.float32, na_value=np.nan) if config.rv_column in kept else np.nan,
        "snr": splits.snr[idx],
    })
    extra = kept[extra_cols].astype(np.float64) if extra_cols else None
    return labels, label_err, splits.split[idx], meta, extra


TABLE_BLOCK = 1 << 14  # rows of the per-row table written at a time


def _write_h5(tmp, pixels: _Pixels, pos: np.ndarray, config, attrs, table) -> str:
    """Write the dataset of the kept rows (at ``pos`` in ``pixels``) to ``tmp``, read it back
    (:func:`verify_dataset`) while hashing it, and return its sha256.

    ``table(idx)``: the per-row table (labels, label errors, split, metadata, extra) of the kept
    rows ``idx``, made a block at a time. When every row of the pixels file is kept, that file
    becomes ``tmp`` and only the table is added; else the kept rows are copied to a new file.
    """
    import h5py

    if pixels.holds_only(pos):
        os.replace(pixels.path, tmp)
        with h5py.File(tmp, "r+") as f:
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v)
            for lo in range(0, len(pos), TABLE_BLOCK):
                append_table(f, *table(np.arange(lo, min(lo + TABLE_BLOCK, len(pos)))))
    else:
        _copy_rows(tmp, pixels, pos, config, attrs, table)
    with ThreadPoolExecutor(2) as threads:  # the hash, the read-back and the flush to disk run together
        digest, synced = threads.submit(sha256_file, tmp), threads.submit(_fsync, tmp)  # hashlib frees the GIL
        verify_dataset(tmp, len(pos))  # before it is renamed into place
        synced.result()
        return digest.result()


def _fsync(path) -> None:
    """Flush a file to disk (then :func:`atomic_write`'s own fsync finds nothing left to write)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_rows(tmp, pixels: _Pixels, pos: np.ndarray, config, attrs, table):
    """Write the rows ``pos`` (increasing) of the pixels file, and their table, to a new dataset ``tmp``."""
    import h5py

    with h5py.File(pixels.path, "r") as src, \
            create_dataset(tmp, config.grid.n_pix, list(config.labels), attrs, sigma=True, offset=True,
                           n_rows=len(pos)) as f:
        for lo in range(0, len(pos), TABLE_BLOCK):
            idx = np.arange(lo, min(lo + TABLE_BLOCK, len(pos)))
            at = pos[idx]
            for name in PIXEL_ARRAYS:
                f[name][idx[0]:idx[-1] + 1] = src[name][at[0]:at[-1] + 1][at - at[0]]
            append_table(f, *table(idx))


def _labelled(cat: pd.DataFrame, config: PrepareConfig) -> np.ndarray:
    """(n,) bool: the catalog rows with a label (a value that is not NaN as float32)."""
    found = np.zeros(len(cat), bool)
    for col in config.labels.values():
        if col.upper() in cat.columns:
            values = pd.to_numeric(cat[col.upper()], errors="coerce").to_numpy(np.float64, na_value=np.nan)
            found |= ~np.isnan(values.astype(np.float32))
    return found


def _release(job: _Job, columns) -> None:
    """Drop catalog ``columns`` no longer needed in memory (read back from the file when the dataset is written)."""
    if job.rest is not None:
        drop = [c for c in columns if c in job.cat.columns and c in job.numbers
                and c not in registry.get(job.survey).catalog_columns]
        job.cat = job.cat.drop(columns=drop)


def _any_label(job: _Job, rows: np.ndarray, progress) -> bool:
    """Whether any of the catalog ``rows`` has a label (warns about a label column the catalog lacks)."""
    for name, col in job.config.labels.items():
        if col.upper() not in job.columns:
            _log(f"warning: catalog has no {col.upper()} column; label {name} is NaN for every row", progress)
    return bool(job.labelled[rows].any())


def _write(out: Path, job: _Job, matched: _Matched, pixels: _Pixels, splits: _Splits, t0) -> dict:
    """Publish the verified dataset.h5, rejects.csv, then summary.json with its sha256; return the summary."""
    from . import __version__

    config, partial, final = job.config, out / PARTIAL_DIR, out / DATA_FILE
    seed, fractions, progress = job.seed, job.fractions, job.run.progress
    keep_mask = ~splits.bad
    n_kept = int(keep_mask.sum())
    rejects = matched.rejects
    by_reason = dict(sorted(rejects.by_reason.items()))
    why = ", ".join(f"{k} {v}" for k, v in by_reason.items()) or "no catalog row or spectrum file"
    if n_kept == 0:
        raise NoUsableInput(f"no spectrum was kept ({why}); nothing was written to {out}")
    if not _any_label(job, splits.rows[keep_mask], progress):
        raise NoUsableInput(f"none of the {n_kept} kept spectra has a label ({', '.join(config.labels.values())} "
                                 f"all missing or -9999); nothing was written to {out}")
    extra_cols = _extra_columns(job)
    attrs = {"grid": config.grid.to_dict(), "preprocess": config.to_dict(), "version": __version__,
             "input_hash": job.input_hash, "created": pd.Timestamp.now("UTC").isoformat(),
             "seed": seed, "fractions": list(fractions), "group_by": job.group_by, "split_column": job.split_column,
             "catalog": job.cat_name, "spectra": str(job.spectra)}
    seconds = time.perf_counter() - t0
    n_read = matched.n_read
    summary = {
        "dataset": str(final), "input_hash": job.input_hash, "catalog_rows": len(job.cat),
        "files_found": len(job.files), "read": n_read, "kept": n_kept, "rejected": rejects.n,
        "rejected_by_reason": by_reason,
        "splits": {s: int(((splits.split == i) & keep_mask).sum()) for s, i in SPLITS.items()},
        "group_by": job.group_by, "split_column": job.split_column, "seed": seed,
        "seconds": round(seconds, 2), "spectra_per_s": round(n_read / max(seconds, 1e-9), 1),
        "version": __version__,
    }
    # publish: the verified dataset (the large file: a full disk stops the job before anything of it is
    # published), then the rejects, then the summary with the dataset's sha256 (which marks a finished job)
    kept = None if n_kept == len(keep_mask) else np.flatnonzero(keep_mask)  # None: every one (no index array)
    pos = splits.pos if kept is None else splits.pos[kept]
    if not pixels.holds_only(pos):  # the kept rows are copied to a new file
        check_disk(out, n_kept * config.grid.n_pix * BYTES_PER_PIXEL, f"the dataset of {n_kept:,} spectra")
    digest = {}
    atomic_write(final, lambda tmp: digest.update(sha256=_write_h5(
        tmp, pixels, pos, config, attrs,
        lambda idx: _table_block(job, matched, splits, idx if kept is None else kept[idx], extra_cols))))
    rejects.publish(out / REJECTS_FILE)
    summary["dataset_sha256"] = digest["sha256"]
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
    p.add_argument("--survey", choices=registry.names(), default=None,
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
    add_reader_argument(p)
    engine.add_argument(p)


def add_reader_argument(p) -> None:
    """``--reader fast|fitsio`` for the commands that read SDSS spectra.

    Parameters
    ----------
    p : argparse.ArgumentParser
    """
    p.add_argument("--reader", choices=sdss.READERS, default="fast",
                   help="SDSS spectrum reader: fast (default) reads DR8+ files of the plain FITS layout with numpy "
                        "and everything else with cfitsio; fitsio reads every file with cfitsio (the same results; "
                        "use it if you distrust the fast path or meet a file it mishandles)")


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
    """Run ``stellarparams prepare`` with parsed arguments (errors raise; :mod:`stellarparams.cli` maps them to
    exit codes).

    Parameters
    ----------
    args : argparse.Namespace

    Returns
    -------
    int
        Exit status.
    """
    config = config_from_args(args, PrepareConfig(min_coverage=args.min_coverage,
                                                  rest_frame=not args.no_rest_frame, rv_column=args.rv_column))
    prepare(args.catalog, args.spectra, args.out, config=config, seed=args.seed,
            fractions=parse_fractions(args.fractions), group_by=args.group_by, split_column=args.split_column,
            wait=args.wait, survey=args.survey, run=Run.from_args(args),
            reader=getattr(args, "reader", "fast"))
    return 0
