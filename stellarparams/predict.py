"""Run a trained model on new spectra of any survey: files, folders or a catalog with a FILE column.

Inputs are SDSS, LAMOST, DESI coadd files or spectrum tables (:mod:`stellarparams.readers`;
detected per file, or ``survey=``); each is resampled onto the model's grid with the model's
own preprocessing, and one covering less than ``min_coverage`` of that grid is rejected
(``low_coverage``).

The inputs are listed as a stream (folders walked one folder at a time) into a spool,
``.OUT.partial/inputs.arrow``, hashing the job key as they pass; files are read and
preprocessed in a pool of processes (chunks of ``chunk_size`` files, at most 2 chunks per
worker in flight), the network runs in the main process, and finished parts go to
``.OUT.partial/`` (so a killed run resumes; its ``.lock`` lets one process at a time write
OUT). The output (CSV, Parquet or FITS by suffix) is assembled from the parts one at a
time, read back and checked, then renamed into place: the main process holds no Python
object per input, so its memory stays flat for any number of files (docs/design.md). One row per input spectrum (a
file; each target of a DESI coadd, each row of a table), in input order (``id``: the
survey's identifier: PLATE-MJD-FIBER, LAMOST OBSID, DESI TARGETID, a table's ID)::

    file, plate, mjd, fiberid, id, <label columns (teff, feh, logg)>, sigma_<label> ...,
    lo95_<label>, hi95_<label> ...,
    ood_score, snr, rv, flag_rejected, reject_reason, reject_detail, flag_out_of_range,
    flag_label_hull, flag_unlike_training, flag_low_snr

Rejected inputs (unreadable, not a star, too little good data, ...) keep their row with
NaN labels, the reason and its detail, and plate/mjd/fiberid from the catalog or the file
name. Text in the FITS output is UTF-8 (any path fits; astropy reads it back as text).
``sigma_<label>``: calibrated uncertainty, the half-width of a 68.3% interval (same units;
NaN for a model trained without calibration); ``lo95_<label>``, ``hi95_<label>``: the 95.4%
interval (conformal; not 2 sigma: the errors are heavy-tailed); ``ood_score``: how unlike the training
spectra the flux is (> 1: less alike than 99.5% of held-out training-like stars;
``flag_unlike_training``); ``flag_out_of_range``: a label outside the range seen in
training; ``flag_label_hull``: the labels outside the convex hull of the training labels;
``flag_low_snr``: median S/N per pixel below ``min_snr``. See stellarparams.uncertainty.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import engine
from .context import Run
from .files import LOCK_NAME, atomic_write, write_text
from .matching import resolve_file
from .outputs import check_output_folder, locked_output
from .physics import rv_from_z
from .spectrum import NoUsableInput, SpectrumError
from .surveys import registry, sdss
from .surveys.sdss import parse_name
from .workers import pool as worker_pool

CATALOG_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq", ".txt")


# ---------------------------------------------------------------------- inputs
def _is_catalog(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):  # a catalog has FILE; a spectrum table has FLUX
        import pyarrow.parquet as pq

        try:
            cols = {c.upper() for c in pq.read_schema(path).names}
        except (OSError, ValueError):
            return True
        return "FILE" in cols or "FLUX" not in cols
    if name.endswith(CATALOG_SUFFIXES):
        return True
    if name.endswith((".fits", ".fit", ".fits.gz")) and not name.startswith(("spec-", "spspec-")):
        try:  # a FITS table with a FILE column is a catalog; anything else is taken as a spectrum
            with sdss.open_fits(path) as f:
                return len(f) > 1 and f[1].get_exttype() == "BINARY_TBL" and \
                    "FILE" in [c.upper() for c in f[1].get_colnames()]
        except (OSError, ValueError):
            return False
    return False


def _catalog_items(path, rv_column="RV_ADOP"):
    """Rows of a catalog with a FILE column -> (file, rv, ids) one at a time; relative FILE: from the catalog's folder.

    ``ids``: (plate, mjd, fiberid) when the catalog has them, finite, else None. Only FILE, the
    RV column and the identifier columns are kept once read (as arrays).
    """
    cat = sdss.read_catalog(path)
    if "FILE" not in cat.columns:
        raise ValueError(f"{path}: a catalog given as input needs a FILE column with spectrum paths "
                         f"(it has {', '.join(cat.columns[:20])})")
    base = Path.cwd() if isinstance(path, pd.DataFrame) else Path(path).parent
    rv = cat[rv_column].to_numpy(np.float64) if rv_column in cat.columns else np.full(len(cat), np.nan)
    ids = (cat[list(sdss.CATALOG_ID_COLUMNS)].to_numpy(np.float64)
           if all(c in cat.columns for c in sdss.CATALOG_ID_COLUMNS) else None)
    files = cat["FILE"].to_numpy(object)
    del cat
    for i, (f, v) in enumerate(zip(files, rv)):
        p = resolve_file(f, base)
        k = ids[i] if ids is not None and np.isfinite(ids[i]).all() else None
        yield ("" if p is None else str(p), float(v), None if k is None else tuple(int(x) for x in k))


def _expand(items, survey=None):
    """One item per spectrum, as a stream: a file of a survey whose files hold many spectra (DESI targets,
    table rows) becomes (file, rv, member) items, one per spectrum, ``member`` = {"survey", "index", "id"};
    a file of a survey named by (plate, mjd, fiberid) (SDSS) stays (file, rv, ids)."""
    for f, rv, ids in items:
        try:  # detect() names most files from their name alone, without touching the disk
            s = survey or (registry.detect(f) if f else registry.names()[0])
        except SpectrumError:
            s = registry.names()[0]  # not recognised: read as SDSS, which names what is wrong with it
        fmt = registry.get(s)
        if fmt.plate_keys:
            yield f, rv, ids
            continue
        try:
            members = fmt.members(f)
        except (SpectrumError, OSError, ValueError, KeyError):
            members = None  # rejected, with its reason, when read
        if members is None:
            yield f, rv, {"survey": s, "index": None, "id": ""}
        else:
            for j, ident, mrv in members:
                yield f, rv if np.isfinite(rv) else mrv, {"survey": s, "index": j, "id": ident}


def iter_inputs(inputs, catalog=None, rv_column="RV_ADOP", survey=None):
    """:func:`collect_inputs` as a stream of items, in the same order, never all of them at once.

    Folders are walked one folder's entries at a time (:func:`surveys.registry.iter_files`),
    catalogs given as inputs yield their rows; with ``catalog``, its RV lookup is built first.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]

    def listed(rv_column=rv_column):  # inputs' own catalogs: the RV column as asked
        for x in inputs:
            p = Path(x)
            if p.is_dir():
                yield from ((f, np.nan, None) for f in registry.iter_files(p, survey))
            elif p.exists() and _is_catalog(p):
                yield from _catalog_items(p, rv_column)
            else:  # a missing file is kept: it becomes a rejected row, not a crash
                yield str(p), np.nan, None

    if catalog is None:
        yield from _expand(listed(), survey)
        return
    cat = _without_bad_labels(sdss.read_catalog(catalog), catalog)
    rv_column = next((c for c in _rv_columns(rv_column) if c in cat.columns), rv_column)
    has_file = "FILE" in cat.columns
    rv_of = _rv_lookup(cat, rv_column, catalog) if rv_column in cat.columns else None
    del cat
    n = 0
    for f, v, k in _expand(listed(), survey):
        n += 1
        yield (f, v if np.isfinite(v) or rv_of is None else rv_of(f, k), k)
    if not n and has_file:
        yield from _expand(_catalog_items(catalog, rv_column), survey)


def collect_inputs(inputs, catalog=None, rv_column="RV_ADOP", survey=None) -> list[tuple]:
    """Spectrum files, folders (searched recursively) and catalogs -> [(file, rv_kms or NaN, ids)].

    The whole list: for a few files (``diagnose``, tests); :func:`predict` streams
    :func:`iter_inputs` instead.

    Parameters
    ----------
    inputs : path or list of paths
        Spectrum files, folders and catalogs with a FILE column (absolute paths, or paths
        relative to the catalog's folder: the rule of ``prepare`` too).
    catalog : path or DataFrame, optional
        Carries RV_ADOP for files given otherwise, matched by FILE name or by (PLATE, MJD,
        FIBERID) parsed from the file name; NaN RV -> the file's redshift.
    rv_column : str
        The catalog's RV column; when it has none, VRAD (DESI) or RV (LAMOST, tables).
    survey : str, optional
        Read every file as this survey (:func:`surveys.registry.names`); default: detected per file.

    Returns
    -------
    list of (str, float, tuple or dict or None)
        File, RV in km/s (NaN: the file's own RV or redshift) and, for SDSS, (plate, mjd,
        fiberid) from a catalog row (None: from the file); for the spectra of other surveys a
        dict {"survey", "index" (position in the file: DESI target, table row), "id"}, one
        item per spectrum.
    """
    return list(iter_inputs(inputs, catalog, rv_column, survey))


def _rv_lookup(cat: pd.DataFrame, rv_column: str, catalog):
    """rv_of(file, ids) -> the catalog's RV for an item (NaN: none), matched by FILE name, else by the keys each
    survey declares (:meth:`surveys.base.Survey.rv_keys`: SDSS PLATE/MJD/FIBERID, LAMOST LMJD/PLANID/SPID/FIBERID,
    TARGETID, OBSID, ID) against those of the file's name or header."""
    surveys = [registry.get(s) for s in registry.names()]
    rv = cat[rv_column].to_numpy()
    kinds = [[Path(str(f).strip()).name for f in cat["FILE"]]] if "FILE" in cat.columns else []
    kinds += [keys for s in surveys for keys in s.rv_keys(cat)]
    rv_by, n_dup = {}, 0  # the first row of a spectrum wins, as in prepare
    for keys in kinds:
        first = {}
        for key, r in zip(keys, rv):
            if key is not None:
                n_dup += key in first
                first.setdefault(key, r)
        rv_by.update(first)
    if n_dup:
        print(f"warning: {_name(catalog)}: {n_dup} duplicate rows (a spectrum named twice); "
              "the first row's RV is used", file=sys.stderr)

    def rv_of(f, k):
        name = Path(f).name
        keys = [name] + [x for s in surveys for x in s.name_keys(name)]
        if isinstance(k, dict):
            keys.insert(0, ("id", k["id"]))
        hit = next((x for x in keys if x is not None and x in rv_by), None)
        if hit is None and isinstance(k, dict) and f:  # a file not named after its keys: from its header
            hit = next((x for x in registry.get(k["survey"]).file_keys(f) if x is not None and x in rv_by), None)
        return float(rv_by[hit]) if hit is not None else np.nan

    return rv_of


def _rv_columns(rv_column: str) -> list:
    """The RV columns a --catalog is searched for: ``rv_column``, then each survey's (highest priority first)."""
    by_priority = sorted((registry.get(s) for s in registry.names()), key=lambda s: -s.priority)
    return [rv_column] + [s.rv_column for s in by_priority if s.rv_column]


def _name(catalog) -> str:
    return "<DataFrame>" if isinstance(catalog, pd.DataFrame) else str(catalog)


def _label_columns() -> dict:
    """{label: catalog columns} checked against the physical limits in a --catalog: every survey's label columns."""
    from .preprocess import PrepareConfig

    cols = {}
    for labels in [PrepareConfig().labels] + [registry.get(s).labels or {} for s in registry.names()]:
        for name, c in labels.items():
            cols.setdefault(name, [])
            if c.upper() not in cols[name]:
                cols[name].append(c.upper())
    return cols


def _without_bad_labels(cat: pd.DataFrame, catalog) -> pd.DataFrame:
    """``cat`` without the rows whose labels are outside :data:`config.LABEL_LIMITS`, with a warning."""
    from .config import label_outside_limits

    bad = np.zeros(len(cat), bool)
    for name, cols in _label_columns().items():
        for c in cols:
            if c in cat.columns:
                bad |= label_outside_limits(name, pd.to_numeric(cat[c], errors="coerce").to_numpy(np.float64, na_value=np.nan))
    if bad.any():
        print(f"warning: {_name(catalog)}: {int(bad.sum())} rows with labels outside the physical limits "
              f"(first: row {int(np.flatnonzero(bad)[0])}) are ignored (stellarparams.config.LABEL_LIMITS)",
              file=sys.stderr)
    return cat[~bad].reset_index(drop=True)


# ---------------------------------------------------------------------- workers
def _read_chunk(items, prepare_config: dict, n_pix: int, reader: str = "fast", offset: bool = False) -> dict:
    """Read + preprocess a list of (file, rv, ids), SDSS files with ``reader`` (:data:`sdss.READERS`).
    Never raises: problems become reasons. ``offset``: also each kept spectrum's flux offset
    (:func:`preprocess.preprocess`'s ``return_offset``) as "offset"."""
    from .preprocess import PrepareConfig, preprocess

    config = PrepareConfig.from_dict(prepare_config) if prepare_config else PrepareConfig()
    n = len(items)
    flux = np.zeros((n, n_pix), np.float32)
    offsets = np.zeros(n, np.float32)
    ok = np.zeros(n, bool)
    info = {k: np.zeros(n, np.int32) for k in ("plate", "mjd", "fiberid")}
    snr, rv_used = np.full(n, np.nan), np.full(n, np.nan)
    reason, detail, ident = [""] * n, [""] * n, [""] * n
    cache = {}
    for i, (path, rv, ids) in enumerate(items):
        member = ids if isinstance(ids, dict) else None  # a spectrum of another survey (collect_inputs)
        ids = None if member else ids or parse_name(os.path.basename(path))  # identity even when rejected
        if ids:
            info["plate"][i], info["mjd"][i], info["fiberid"][i] = ids
            ident[i] = f"{ids[0]:04d}-{ids[1]:05d}-{ids[2]:04d}"
        if member:
            ident[i] = member["id"]
        try:
            if not path:
                raise SpectrumError(path, "no_file", "the catalog's FILE cell is empty")
            if not os.path.exists(path):
                raise SpectrumError(path, "missing_file", f"no such file: {path}")
            if member:
                spec = registry.read_record(path, member["index"], member["survey"], cache)
                ident[i] = spec.ident
            else:
                spec = sdss.read_spectrum(path, reader)
                info["plate"][i], info["mjd"][i], info["fiberid"][i] = spec.plate, spec.mjd, spec.fiberid
                ident[i] = spec.name
            snr[i] = spec.snr
            if spec.objclass and spec.objclass in config.reject_classes:
                raise SpectrumError(path, "not_a_star", f"CLASS {spec.objclass}")
            if not np.isfinite(rv):
                rv = getattr(spec, "rv", np.nan)  # LAMOST c Z, DESI Redrock c Z, a table's RV column
            if not np.isfinite(rv):
                rv = rv_from_z(getattr(spec, "z", np.nan))
            rv_used[i] = rv
            if offset:
                flux[i], _, offsets[i] = preprocess(spec, rv, config, return_offset=True)
            else:
                flux[i], _ = preprocess(spec, rv, config)
            ok[i] = True
        except SpectrumError as e:
            reason[i], detail[i] = e.reason, e.detail
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the batch
            reason[i], detail[i] = "error", f"{type(e).__name__}: {e}"[:300]
    return {"flux": flux[ok], "ok": ok, "snr": snr, "rv": rv_used, "reason": reason, "detail": detail, "id": ident,
            **info, **({"offset": offsets[ok]} if offset else {})}


# ---------------------------------------------------------------------- output
def output_kind(path) -> str:
    """The output format from the file's suffix.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str
        'csv' (.csv, .txt), 'parquet' (.parquet, .pq) or 'fits' (.fits, .fit); ValueError otherwise.
    """
    name = Path(path).name.lower()
    kind = ("parquet" if name.endswith((".parquet", ".pq")) else "fits" if name.endswith((".fits", ".fit")) else
            "csv" if name.endswith((".csv", ".txt")) else None)
    if kind is None:
        raise ValueError(f"{path}: output must end in .csv, .parquet or .fits")
    return kind


def check_output_file(path) -> Path:
    """Check, before any work, that ``path`` can be written: a known suffix, not a folder, a writable folder.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        With a one-line reason.
    """
    path = Path(path)
    output_kind(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; --out must name a table file (.csv, .parquet or .fits)")
    check_output_folder(path.parent)
    return path


def _fits_records(df: pd.DataFrame, width: dict) -> np.ndarray:
    """DataFrame -> a record array for fitsio: text columns as UTF-8 bytes of the fixed ``width`` {column: bytes}."""
    cols = [df[c].to_numpy() for c in df.columns]
    cols = [np.array([str(v).encode("utf-8") for v in x], dtype=f"S{width[c]}") if c in width else x
            for c, x in zip(df.columns, cols)]
    return np.rec.fromarrays(cols, names=list(df.columns))


def _write_fits(tmp, frames) -> int:
    """Write the blocks of ``frames`` as the table PREDICTIONS of a FITS file, a block at a time (fitsio appends
    rows); a first pass finds each text column's widest UTF-8 value. Returns the rows written."""
    import fitsio

    width = {}
    for get in frames:  # text columns: the widest value, in UTF-8 bytes (at least 1)
        df = get()
        for c in df.columns:
            if df[c].to_numpy().dtype == object:  # text (pandas' str columns too)
                width[c] = max(width.get(c, 1), max((len(str(v).encode("utf-8")) for v in df[c]), default=1))
    # cfitsio reads [...], (...) and more in a path as syntax: it writes a plain name, reached through the
    # folder's descriptor (/proc/self/fd/N/NAME on Linux), renamed to ``tmp`` after
    fd, plain = tempfile.mkstemp(dir=Path(tmp).parent, prefix=".predict-", suffix=".fits")
    os.close(fd)
    folder = os.open(Path(tmp).parent, os.O_RDONLY)
    try:
        name = f"/proc/self/fd/{folder}/{Path(plain).name}" if os.path.isdir("/proc/self/fd") else plain
        n = 0
        with fitsio.FITS(name, "rw", clobber=True) as f:
            for get in frames:
                rec = _fits_records(get(), width)
                if n == 0:
                    f.write(rec, extname="PREDICTIONS")
                    f[-1].write_comment("text columns (file, reject_reason, reject_detail) are UTF-8")
                else:
                    f[-1].append(rec)
                n += len(rec)
        os.replace(plain, tmp)
    finally:
        os.close(folder)
        Path(plain).unlink(missing_ok=True)
    return n


def write_frames(path, frames, n_rows: int | None = None) -> int:
    """Write DataFrames as one table (CSV, Parquet or FITS by suffix), verified, atomically.

    Parameters
    ----------
    path : str or Path
        The output; any characters in its name.
    frames : list of callables
        Each returns the next block of rows (read lazily, so memory stays at one block; for
        FITS each is called twice: once for the width of the text columns, once to write).
    n_rows : int, optional
        Rows the table must have.

    Returns
    -------
    int
        Rows written. The file is read back and its row count checked before it is renamed
        into place; on any failure nothing is published.
    """
    path = Path(path)
    kind = output_kind(path)

    def write(tmp):
        n = 0
        if kind == "csv":
            for get in frames:
                df = get()
                df.to_csv(tmp, mode="a", header=n == 0, index=False)
                n += len(df)
            back = sum(len(b) for b in pd.read_csv(tmp, chunksize=1 << 16, usecols=[0]))
        elif kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            w = None
            for get in frames:
                table = pa.Table.from_pandas(get(), preserve_index=False)
                w = w or pq.ParquetWriter(tmp, table.schema)
                w.write_table(table.cast(w.schema))
                n += table.num_rows
            w.close()
            back = pq.ParquetFile(tmp).metadata.num_rows
        else:
            from astropy.io import fits

            n = _write_fits(tmp, frames)
            with fits.open(tmp) as h:
                back = len(h["PREDICTIONS"].data)
        if back != n or n_rows is not None and n != n_rows:
            raise RuntimeError(f"wrote {n} rows and read back {back}, expected {n_rows}; nothing was published")
        return n

    try:
        rows = []
        atomic_write(path, lambda tmp: rows.append(write(tmp)))
    except (OSError, ValueError, UnicodeError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot write the {kind} output: {e}") from e
    return rows[0]


def _rows(model, items, r, min_snr, batch_size) -> pd.DataFrame:
    n, ok = len(items), r["ok"]
    pred, sigma, lo95, hi95 = (np.full((n, len(model.label_names)), np.nan) for _ in range(4))
    ood, unlike, hull = np.full(n, np.nan), np.zeros(n, bool), np.zeros(n, bool)
    if ok.any():
        full = model.predict_arrays(r["flux"], batch_size)
        pred[ok], sigma[ok], ood[ok] = full["pred"], full["sigma"], full["ood_score"]
        lo95[ok], hi95[ok] = full["lo95"], full["hi95"]
        unlike[ok], hull[ok] = full["flag_unlike_training"], full["flag_label_hull"]
    cols = {"file": [f for f, _, _ in items], "plate": r["plate"], "mjd": r["mjd"], "fiberid": r["fiberid"],
            "id": r.get("id", [""] * n)}
    for j, name in enumerate(model.label_names):
        cols[name] = pred[:, j]
    for j, name in enumerate(model.label_names):
        cols[f"sigma_{name}"] = sigma[:, j]
    for j, name in enumerate(model.label_names):
        cols[f"lo95_{name}"], cols[f"hi95_{name}"] = lo95[:, j], hi95[:, j]
    cols["ood_score"] = ood.astype(np.float32)
    cols["snr"] = r["snr"].astype(np.float32)
    cols["rv"] = r["rv"].astype(np.float32)
    cols["flag_rejected"] = ~r["ok"]
    cols["reject_reason"] = r["reason"]
    cols["reject_detail"] = r["detail"]
    cols["flag_out_of_range"] = model.out_of_range(pred) & r["ok"]
    cols["flag_label_hull"] = hull
    cols["flag_unlike_training"] = unlike
    with np.errstate(invalid="ignore"):
        cols["flag_low_snr"] = r["snr"] < min_snr
    return pd.DataFrame(cols)  # built once: inserting 22 columns one by one costs ~10 ms per chunk


# ---------------------------------------------------------------------- the spool of inputs
SPOOL = "inputs.arrow"  # in .OUT.partial/: every input item, one Arrow record batch per part
_SPOOL_SCHEMA = None


def _spool_schema():
    import pyarrow as pa

    global _SPOOL_SCHEMA
    if _SPOOL_SCHEMA is None:  # kind: 0 no ids, 1 (plate, mjd, fiberid), 2 a member of a file (survey, index, id)
        _SPOOL_SCHEMA = pa.schema([("file", pa.string()), ("rv", pa.float64()), ("kind", pa.int8()),
                                   ("plate", pa.int64()), ("mjd", pa.int64()), ("fiberid", pa.int64()),
                                   ("survey", pa.string()), ("index", pa.int64()), ("id", pa.string())])
    return _SPOOL_SCHEMA


def _job_hash(model, min_snr, prepare_config=None):
    """sha256 of what every finished part depends on besides the inputs: weights, scaler, preprocessing, options."""
    return hashlib.sha256(json.dumps([model.weights_sha256, model.label_names, model.center.tolist(),
                                      model.scale.tolist(), prepare_config or model.prepare_config, min_snr, "sigma",
                                      "lo95", getattr(model, "uncertainty", None) is not None], default=str).encode())


def _input_line(f, rv, ids) -> bytes:
    """An input's line of the job key: its path, RV, identity, and its file's size and modification time."""
    try:
        st = os.stat(f)
        stamp = f"{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    return f"{f}|{rv}|{ids}|{stamp}\n".encode()


def _to_batch(items: list):
    """(file, rv, ids) items -> an Arrow record batch of :func:`_spool_schema` (no Python object per row kept)."""
    import pyarrow as pa

    kind = [0 if k is None else 2 if isinstance(k, dict) else 1 for _, _, k in items]
    tup = [k if c == 1 else (-1, -1, -1) for (_, _, k), c in zip(items, kind)]
    mem = [k if c == 2 else {} for (_, _, k), c in zip(items, kind)]
    cols = [[f for f, _, _ in items], [float(v) for _, v, _ in items], kind,
            [t[0] for t in tup], [t[1] for t in tup], [t[2] for t in tup],
            [m.get("survey") for m in mem], [-1 if m.get("index") is None else m["index"] for m in mem],
            [None if m.get("id") is None else str(m["id"]) for m in mem]]
    return pa.record_batch(cols, schema=_spool_schema())


def _from_batch(batch) -> list:
    """The items of :func:`_to_batch`'s record batch, as they were."""
    c = batch.to_pydict()
    out = []
    for i, (f, rv, kind) in enumerate(zip(c["file"], c["rv"], c["kind"])):
        ids = (None if kind == 0 else (c["plate"][i], c["mjd"][i], c["fiberid"][i]) if kind == 1 else
               {"survey": c["survey"][i], "index": None if c["index"][i] < 0 else c["index"][i], "id": c["id"][i]})
        out.append((f, rv, ids))
    return out


def spool_inputs(items, path, rows_per_part: int, job) -> int:
    """Write a stream of input items to an Arrow IPC file, ``rows_per_part`` rows per record batch.

    Parameters
    ----------
    items : iterable of (file, rv, ids)
        From :func:`iter_inputs`.
    path : Path
        The spool (``.OUT.partial/inputs.arrow``), overwritten.
    rows_per_part : int
        Rows per batch: batch k is part k of the output.
    job : hashlib hash
        Updated with each item's line (:func:`_input_line`): the job key, hashed as the inputs stream by.

    Returns
    -------
    int
        Number of items. Memory: one batch of items, whatever their number.
    """
    import pyarrow as pa

    n, block = 0, []
    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _spool_schema()) as w:
            for item in items:
                job.update(_input_line(*item))
                block.append(item)
                if len(block) == rows_per_part:
                    w.write_batch(_to_batch(block))
                    n, block = n + len(block), []
            if block:
                w.write_batch(_to_batch(block))
                n += len(block)
    except BaseException:  # a bad catalog, Ctrl-C: no half spool left behind
        Path(path).unlink(missing_ok=True)
        raise
    return n


def _spooled_chunks(path, parts, chunk_size: int):
    """(part, chunk of items) for each part in ``parts``, read back from the spool one part at a time."""
    import pyarrow as pa

    with pa.OSFile(str(path)) as src, pa.ipc.open_file(src) as r:  # read, not mapped: no page of it stays resident
        for k in parts:
            items = _from_batch(r.get_batch(k))
            for i in range(0, len(items), chunk_size):
                yield k, items[i:i + chunk_size]


def predict(model, inputs, out, *, catalog=None, batch_size: int = 1024, workers: int | None = None,
            min_snr: float = 5.0, chunk_size: int = 128, part_chunks: int = 32, progress: bool = True,
            wait: bool = False, min_coverage: float | None = None, survey: str | None = None,
            device=None, dask=None, reader: str = "fast", run: Run | None = None) -> dict:
    """Predict labels for every input spectrum and write one table row per file.

    Parameters
    ----------
    model : Model or str or Path
        A Model or a model folder.
    inputs : path or list of paths
        Spectrum files, folders, catalogs with FILE (see :func:`collect_inputs`).
    out : str or Path
        .csv / .parquet / .fits; checked before any work. One writer at a time: the lock is
        ``.OUT.partial/.lock``.
    catalog : path or DataFrame, optional
        RV_ADOP for the inputs.
    batch_size : int
        Spectra per network batch.
    workers : int, optional
        Reading processes (default: all CPUs; 0 or 1 reads in this process).
    min_snr : float
        ``flag_low_snr`` below this median S/N per pixel.
    chunk_size, part_chunks : int
        Finished parts (``part_chunks`` x ``chunk_size`` files) are kept in ``.OUT.partial/``;
        killed and run again with the same inputs, only the missing parts are read.
    progress : bool
    wait : bool
        When another process is writing ``out``: wait (True) or raise
        :class:`files.OutputBusy` (False).
    min_coverage : float, optional
        Fraction of the model's grid an input must cover with good pixels (after the shift to
        the rest frame); less is the reject ``low_coverage`` on that file's row. Default: the
        model's training value (0.5).
    survey : str, optional
        Read every input as this survey's format (``sdss``, ``lamost``, ``desi``, ``table``);
        default: detected per file. A DESI coadd or a table gives one row per spectrum.
    device : str, optional
        Where the network runs for a model given as a folder ("auto": a GPU when present);
        files are read and resampled on the CPU.
    dask : str or distributed.Client, optional
        Read and resample the files on a Dask cluster instead of ``workers`` processes here:
        ``tcp://HOST:PORT``, ``local:N`` or a client (:mod:`stellarparams.engine`); the
        network still runs in this process, and the output is the same. Connected before
        anything is written.
    reader : str
        ``"fast"`` (default): SDSS DR8+ files of the plain layout are read with numpy, the rest
        with cfitsio; ``"fitsio"``: every file with cfitsio. The output is the same.
    run : Run, optional
        ``progress``, ``device``, ``workers`` and ``dask`` as one object (:mod:`stellarparams.context`);
        when given, it replaces those four arguments.

    Returns
    -------
    dict
        Counts by outcome, rejection reasons, seconds, spectra/s.

    Raises
    ------
    NoUsableInput
        No input file at all.
    ValueError
        Bad output location or suffix, bad catalog; :class:`engine.DaskError` when ``dask``
        names no scheduler that answers.
    """
    from .model_io import Model, load_model

    if reader not in sdss.READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(sdss.READERS)}")
    run = (run or Run(progress=progress, device=device, workers=workers, dask=dask)).on_device()
    out = check_output_file(out)
    with run.cluster() as client, locked_output(out.parent / f".{out.name}.partial", wait, remove=True) as partial:
        model = model if isinstance(model, Model) else load_model(model, device=run.device)
        prep = dict(model.prepare_config or {})
        if min_coverage is not None:
            if not 0 <= min_coverage <= 1:
                raise ValueError(f"--min-coverage must be between 0 and 1, got {min_coverage}")
            prep["min_coverage"] = float(min_coverage)
        t0 = time.perf_counter()
        job = _job_hash(model, min_snr, prep)  # hashed as the inputs stream into the spool
        n = spool_inputs(iter_inputs(inputs, catalog, survey=survey), partial / SPOOL, chunk_size * part_chunks, job)
        if not n:
            (partial / SPOOL).unlink()
            names = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
            raise NoUsableInput(f"no spectrum files found in {', '.join(map(str, names))}")
        summary = _predict(_Job(model, n, out, partial, batch_size, min_snr, chunk_size, chunk_size * part_chunks,
                                (prep, model.n_in, reader), run, client), job.hexdigest()[:24])
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        summary["spectra_per_s"] = round((n - summary["resumed_from"]) / max(summary["seconds"], 1e-9), 1)
        run.say(format_summary(summary))
        return summary


@dataclass
class _Job:
    """One predict job: the model, the ``n`` spooled inputs in ``partial``, how they are cut and read, where they go."""

    model: object
    n: int
    out: Path
    partial: Path
    batch_size: int
    min_snr: float
    chunk_size: int  # files per chunk read by one worker
    rows: int  # files per part (a resume unit)
    read_args: tuple  # (prepare config, pixels, reader): the arguments of _read_chunk after the chunk
    run: Run
    client: object = None  # a Dask client, or None for the process pool


def _predict(job: _Job, key: str) -> dict:
    """Predict the spooled inputs (``partial/SPOOL``) part by part, then assemble ``out``; the summary."""
    model, n, partial, rows = job.model, job.n, job.partial, job.rows
    n_parts = -(-n // rows)
    if _read_key(partial) != key:  # another job's parts: remove them (the lock file and the new spool stay)
        for f in partial.iterdir():
            if f.name not in (LOCK_NAME, SPOOL):
                f.unlink()
    write_text(partial / "job.json", json.dumps({"key": key, "n_files": n}))
    part_file = [partial / f"part-{k:05d}.parquet" for k in range(n_parts)]
    todo = [k for k in range(n_parts) if not part_file[k].exists()]
    n_done = n - sum(min(rows, n - k * rows) for k in todo)
    if n_done:
        job.run.say(f"resuming: {n_done} of {n} spectra already predicted in {partial}")
    _run_parts(job, todo, n_done, part_file)
    counts, reasons = _assemble(job.out, part_file, n)
    for f in part_file:
        f.unlink()
    (partial / "job.json").unlink()
    (partial / SPOOL).unlink()
    return {"out": str(job.out), "n_files": n, "n_predicted": n - counts["rejected"],
            "n_rejected": counts["rejected"], "rejected_by_reason": dict(sorted(reasons.items())),
            "n_out_of_range": counts["out_of_range"], "n_low_snr": counts["low_snr"],
            "n_unlike_training": counts["unlike_training"], "n_outside_label_hull": counts["label_hull"],
            "calibrated": model.uncertainty is not None, "resumed_from": n_done}


def _run_parts(job: _Job, todo, n_done, part_file) -> None:
    """Read the spooled inputs of parts ``todo`` (a chunk at a time, in order), predict them, write each part."""
    from tqdm.auto import tqdm

    n, rows, chunk_size, args, client = job.n, job.rows, job.chunk_size, job.read_args, job.client
    workers = (os.cpu_count() or 1) if job.run.workers is None else job.run.workers
    n_chunks = {k: -(-min(rows, n - k * rows) // chunk_size) for k in todo}
    buffers = {}
    kept = [n_done]
    bar = tqdm(total=n - n_done, desc="predict", unit="spec", disable=not job.run.progress, smoothing=0.1)

    def consume(k, chunk, r):
        buffers.setdefault(k, []).append(_rows(job.model, chunk, r, job.min_snr, job.batch_size))
        if len(buffers[k]) == n_chunks[k]:  # part complete: publish it
            df = pd.concat(buffers.pop(k), ignore_index=True)
            atomic_write(part_file[k], lambda tmp: df.to_parquet(tmp, index=False))
            kept[0] += len(df)
        bar.update(len(chunk))

    jobs = _spooled_chunks(job.partial / SPOOL, todo, chunk_size)
    try:
        if client is not None:  # read on the cluster (absolute paths: workers may run elsewhere), in input order
            order = deque()

            def calls():
                for k, chunk in jobs:
                    order.append((k, chunk))
                    yield [(engine.absolute(f), rv, ids) for f, rv, ids in chunk], *args

            for r in engine.map_ordered(client, _read_chunk, calls()):
                consume(*order.popleft(), r)
        elif workers <= 1 or sum(n_chunks.values()) <= 1:
            for k, chunk in jobs:
                consume(k, chunk, _read_chunk(chunk, *args))
        else:
            with worker_pool(workers) as pool:
                pending = deque()
                for k, chunk in jobs:  # keep <= 2 chunks per worker in flight; consume in input order
                    pending.append((k, chunk, pool.submit(_read_chunk, chunk, *args)))
                    if len(pending) >= 2 * workers:
                        k0, c0, fut = pending.popleft()
                        consume(k0, c0, fut.result())
                while pending:
                    k0, c0, fut = pending.popleft()
                    consume(k0, c0, fut.result())
    except KeyboardInterrupt:
        if kept[0]:
            raise KeyboardInterrupt(f"interrupted; {kept[0]} of {n} spectra are kept in {job.partial}: "
                                    "re-run the same command to resume") from None
        raise KeyboardInterrupt(f"interrupted before the first {min(rows, n)} spectra were "
                                "finished; nothing was kept") from None
    finally:
        bar.close()


def _assemble(out, part_file, n) -> tuple[dict, dict]:
    """Write the parts, in input order, as ``out`` (streamed for CSV and Parquet); (counts by flag, rejects by reason)."""
    counts = {"rejected": 0, "out_of_range": 0, "low_snr": 0, "unlike_training": 0, "label_hull": 0}
    reasons = {}

    counted = set()

    def read_part(f):
        def get():
            df = pd.read_parquet(f)
            if f in counted:  # FITS reads each part twice
                return df
            counted.add(f)
            counts["rejected"] += int(df["flag_rejected"].sum())
            counts["out_of_range"] += int(df["flag_out_of_range"].sum())
            counts["low_snr"] += int(df["flag_low_snr"].sum())
            counts["unlike_training"] += int(df["flag_unlike_training"].sum())
            counts["label_hull"] += int(df["flag_label_hull"].sum())
            for reason, v in df.loc[df["flag_rejected"], "reject_reason"].value_counts().items():
                reasons[reason] = reasons.get(reason, 0) + int(v)
            return df
        return get

    n_rejected = sum(int(pd.read_parquet(f, columns=["flag_rejected"])["flag_rejected"].sum()) for f in part_file)
    if n_rejected == n:  # nothing usable: nothing is published (the parts stay for a re-run)
        why = pd.concat([pd.read_parquet(f, columns=["reject_reason"]) for f in part_file])["reject_reason"]
        raise NoUsableInput(f"every one of the {n} inputs was rejected ("
                            + ", ".join(f"{k} {v}" for k, v in why.value_counts().items())
                            + f"); nothing was written to {out}")
    write_frames(out, [read_part(f) for f in part_file], n_rows=n)
    return counts, reasons


def _read_key(partial: Path):
    try:
        return json.loads((partial / "job.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def format_summary(s: dict) -> str:
    lines = [f"{s['out']}: {s['n_predicted']} of {s['n_files']} spectra predicted in {s['seconds']:.1f} s "
             f"({s['spectra_per_s']:.0f}/s); {s['n_out_of_range']} outside the training label range, "
             f"{s['n_low_snr']} with low S/N"]
    if s.get("calibrated", True):
        lines.append(f"{s.get('n_unlike_training', 0)} unlike the training spectra (ood_score > 1), "
                     f"{s.get('n_outside_label_hull', 0)} with labels outside the training labels' hull")
    else:
        lines.append("this model has no uncertainty calibration: sigma_* and ood_score are NaN (retrain it to get them)")
    if s["n_rejected"]:
        lines.append(f"rejected {s['n_rejected']}: " + ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items())
                     + " (see the reject_reason/reject_detail columns)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser):
    p.description = ("Predict Teff, [Fe/H], log g (the model's labels) for SDSS spectra. Each file is "
                     "preprocessed exactly as the model's training data (rest frame from RV_ADOP in --catalog, "
                     "else from the file's redshift Z). One output row per input, with flags for rejected "
                     "inputs (and why), labels outside the training range, and low S/N. Every row also "
                     "carries calibrated 1-sigma uncertainties (sigma_teff, ...) and ood_score / "
                     "flag_unlike_training (flux unlike the training spectra: cut on ood_score) and "
                     "flag_label_hull (labels outside the training labels' convex hull). A catalog's FILE "
                     "column holds absolute paths or paths relative to the catalog's folder. Exit status: 0 done, "
                     "1 nothing predicted (no input, or every input rejected), 2 bad input or options, "
                     "3 the output is being written by another process.")
    p.add_argument("model", help="model folder (from `stellarparams train` or `stellarparams run`)")
    p.add_argument("inputs", nargs="+", help="spectrum files, folders (searched recursively), or catalogs "
                   "(.csv/.parquet/.fits) with a FILE column and optional RV_ADOP")
    p.add_argument("--out", required=True, help="output table: .csv, .parquet or .fits")
    p.add_argument("--catalog", help="catalog with RV_ADOP, VRAD or RV (km/s) for the inputs, matched by FILE, "
                   "SDSS PLATE/MJD/FIBERID, LAMOST LMJD/PLANID/SPID/FIBERID (from the file name or header), "
                   "TARGETID or OBSID")
    p.add_argument("--batch-size", type=int, default=1024, help="spectra per network batch")
    p.add_argument("--workers", type=int, default=None, help="reading processes (default: all CPUs)")
    p.add_argument("--min-snr", type=float, default=5.0, help="flag_low_snr below this median S/N per pixel")
    p.add_argument("--survey", choices=registry.names(), default=None,
                   help="format of the inputs (default: detected per file; docs/surveys.md)")
    p.add_argument("--min-coverage", type=float, default=None, help="fraction of the model's grid an input must "
                   "cover with good pixels, else the row is rejected as low_coverage (default: the model's, 0.5)")
    p.add_argument("--wait", action="store_true", help="if another process is writing OUT, wait for it instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .prepare import add_reader_argument

    add_reader_argument(p)
    engine.add_argument(p)
    from .devices import add_arguments as add_device_arguments  # here: reading workers need no torch

    add_device_arguments(p, precision=False)


def run_cli(args) -> int:
    summary = predict(args.model, args.inputs, args.out, catalog=args.catalog, batch_size=args.batch_size,
                      min_snr=args.min_snr, wait=args.wait, min_coverage=args.min_coverage, survey=args.survey,
                      reader=getattr(args, "reader", "fast"), run=Run.from_args(args))
    if args.quiet:
        print(format_summary(summary))
    return 0
