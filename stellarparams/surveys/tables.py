"""Plain spectrum tables: one row per spectrum, in FITS, Parquet or HDF5.

Layout (column names are matched case-insensitively):

- FLUX, IVAR: array columns, one array per row; MASK optional (nonzero = bad pixel);
- the wavelength (vacuum Angstrom): an array column WAVE (or WAVELENGTH) per row, or one
  shared array: a FITS image HDU named WAVE/WAVELENGTH, or a 1-D HDF5 dataset WAVE;
- optional ID (or TARGETID, OBJID, NAME) naming each spectrum (default ``row N``), RV in
  km/s, and any scalar label columns (TEFF, FEH, LOGG, ...), which ``prepare`` uses as the
  catalog.

FITS: the table is HDU 1. Parquet: list columns. HDF5: datasets at the file's root, 2-D
(N, n_pix) for FLUX/IVAR/MASK/WAVE and 1-D (N,) for the scalar columns.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .base import Survey
from ..spectrum import Record, SpectrumError, make_record

ID_COLUMNS = ("ID", "TARGETID", "OBJID", "OBSID", "NAME", "OBJECT_ID")
ARRAY_COLUMNS = ("WAVE", "WAVELENGTH", "FLUX", "IVAR", "MASK")
LABELS = {"teff": "TEFF", "feh": "FEH", "logg": "LOGG"}
RV_COLUMN = "RV"


def _load(path: Path) -> tuple[dict, np.ndarray | None]:
    """Columns of the table as {UPPER name: array or list of arrays}, and a shared wavelength array."""
    name = path.name.lower()
    shared = None
    if name.endswith((".parquet", ".pq")):
        df = pd.read_parquet(path)
        cols = {str(c).upper(): df[c].to_numpy() for c in df.columns}
    elif name.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as f:
            cols = {k.upper(): f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        for k in ("WAVE", "WAVELENGTH"):
            if k in cols and np.ndim(cols[k]) == 1:
                shared = cols.pop(k)
    else:
        from astropy.io import fits

        with fits.open(path, memmap=False) as h:
            if len(h) < 2 or not isinstance(h[1], fits.BinTableHDU):
                raise SpectrumError(path, "missing_columns", "HDU 1 is not a table")
            data = h[1].data
            cols = {c.upper(): np.array(data[c]) for c in data.columns.names}
            for hdu in h[2:]:
                if hdu.name.upper() in ("WAVE", "WAVELENGTH") and hdu.data is not None:
                    shared = np.array(hdu.data, np.float64)
    return cols, shared


def read_table(path) -> list[Record]:
    """Read every row of a spectrum table as a record.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of Record
        ``ident`` from the ID column (else ``row N``); ``keys["row"]`` = row number; the
        scalar columns in ``labels``; ``rv`` from an RV column. A row whose arrays disagree in
        length gets ``problem`` ("bad_shape") and the other rows are unaffected.

    Raises
    ------
    SpectrumError
        ``missing_columns`` (no FLUX, IVAR or wavelength), ``unreadable``, ``missing_file``.
    """
    path = Path(path)
    if not path.is_file():
        raise SpectrumError(path, "missing_file", f"no such file: {path}")
    try:
        cols, shared = _load(path)
    except SpectrumError:
        raise
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise SpectrumError(path, "unreadable", f"{type(e).__name__}: {e}"[:200]) from e
    wave_col = next((k for k in ("WAVE", "WAVELENGTH") if k in cols), None)
    missing = [c for c in ("FLUX", "IVAR") if c not in cols] + ([] if wave_col or shared is not None else ["WAVE"])
    if missing:
        raise SpectrumError(path, "missing_columns", "the table lacks " + ", ".join(missing))
    n = len(cols["FLUX"])
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    scalar = {k: v for k, v in cols.items() if k not in ARRAY_COLUMNS and np.ndim(v) == 1 and len(v) == n
              and not (len(v) and isinstance(v[0], (np.ndarray, list)))}
    records = []
    for i in range(n):
        ident = _text(cols[id_col][i]) if id_col else f"row {i}"
        labels = {k: _scalar(v[i]) for k, v in scalar.items()}
        rv = labels.get(RV_COLUMN, np.nan)
        rv = float(rv) if isinstance(rv, (int, float, np.number)) else np.nan
        wave = cols[wave_col][i] if wave_col else shared
        mask = cols["MASK"][i] if "MASK" in cols else None
        try:
            rec = make_record(wave, cols["FLUX"][i], cols["IVAR"][i], mask, path=path, ident=ident, survey="table",
                              rv=rv, keys={"row": i}, labels=labels)
        except SpectrumError as e:
            rec = make_record([1.0], [0.0], [0.0], path=path, ident=ident, survey="table", keys={"row": i},
                              labels=labels)
            rec.problem = (e.reason, f"row {i} ({ident}): {e.detail}")
        records.append(rec)
    return records


def catalog(path) -> pd.DataFrame:
    """The scalar columns of a spectrum table (upper-case), one row per spectrum, plus ROW.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    DataFrame
        What ``prepare`` uses as the label catalog of a table given without ``--catalog``.
    """
    recs = read_table(path)
    df = pd.DataFrame([r.labels for r in recs])
    df["ROW"] = [r.keys["row"] for r in recs]
    return df


def write_table(path, wave, flux, ivar, mask=None, columns: dict | None = None, shared_wave: bool = False):
    """Write a spectrum table (FITS, Parquet or HDF5 by suffix), atomically.

    Parameters
    ----------
    path : str or Path
    wave : (n,) or (N, n) array
        One shared wavelength array, or one per row.
    flux, ivar : (N, n) arrays
    mask : (N, n) array, optional
    columns : dict, optional
        Scalar columns (N,) each: ID, labels, RV.
    shared_wave : bool
        Store ``wave`` once (FITS image HDU WAVE / HDF5 1-D dataset); Parquet always stores
        it per row.

    Returns
    -------
    Path
    """
    from ..files import atomic_write

    flux = np.asarray(flux, np.float32)
    wave = np.asarray(wave, np.float64)
    arrays = {"FLUX": flux, "IVAR": np.asarray(ivar, np.float32)}
    if mask is not None:
        arrays["MASK"] = np.asarray(mask, np.int32)
    if not shared_wave or str(path).lower().endswith((".parquet", ".pq")):
        arrays["WAVE"] = np.broadcast_to(wave, flux.shape) if wave.ndim == 1 else wave
        wave = None
    columns = {k: np.asarray(v) for k, v in (columns or {}).items()}
    name = str(path).lower()

    def write(tmp):
        if name.endswith((".parquet", ".pq")):
            df = pd.DataFrame({k: list(v) for k, v in arrays.items()})
            for k, v in columns.items():
                df[k] = v
            df.to_parquet(tmp, index=False)
        elif name.endswith((".h5", ".hdf5")):
            import h5py

            with h5py.File(tmp, "w") as f:
                for k, v in {**arrays, **columns}.items():
                    f[k] = v.astype(h5py.string_dtype()) if v.dtype.kind in "UO" else v
                if wave is not None:
                    f["WAVE"] = wave
        else:
            from astropy.io import fits
            from astropy.table import Table

            t = Table({**{k: np.asarray(v) for k, v in arrays.items()}, **columns})
            hdus = [fits.PrimaryHDU(), fits.table_to_hdu(t)]
            if wave is not None:
                hdus.append(fits.ImageHDU(wave, name="WAVE"))
            fits.HDUList(hdus).writeto(tmp)

    atomic_write(path, write)
    return Path(path)


def _text(v) -> str:
    return v.decode("utf-8", "replace").strip() if isinstance(v, bytes) else str(v).strip()


def _scalar(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace").strip()
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---------------------------------------------------------------------------- the survey (surveys.registry)

TABLE_SUFFIXES = (".parquet", ".pq", ".h5", ".hdf5")
SPECTRUM_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".fts") + TABLE_SUFFIXES


class Tables(Survey):
    """Plain spectrum tables (FITS, Parquet, HDF5), one row per spectrum; they carry their own labels."""

    name, title, priority = "table", "table", 10
    labels, rv_column, id_column = LABELS, RV_COLUMN, "ID"
    catalog_keys = (("ROW",),)
    listed = False              # a folder scan lists a table only when asked for tables
    many_per_file = True
    carries_labels = True
    one_file_is_enough = True

    def matches_name(self, name: str) -> bool:
        return name.lower().endswith(TABLE_SUFFIXES)

    def lists(self, name: str) -> bool:
        return name.lower().endswith(SPECTRUM_SUFFIXES)

    def identify(self, info) -> bool:
        return "FLUX" in info.cols and "IVAR" in info.cols

    def read(self, path, reader="fast") -> list:
        return read_table(path)

    def members(self, path) -> list:
        return [(j, r.ident, r.rv) for j, r in enumerate(read_table(path))]

    def own_catalog(self, files: list) -> pd.DataFrame:
        return pd.concat([catalog(p).assign(FILE=str(p.resolve())) for p in files], ignore_index=True) \
            if files else pd.DataFrame()

    def locate_rows(self, cat, files, row_files) -> list:
        """A row's ROW (else its position) in its FILE, else in the only file."""
        n = len(cat)
        rows = pd.to_numeric(cat["ROW"], errors="coerce").to_numpy() if "ROW" in cat else np.arange(n)
        only = files[0] if len(files) == 1 else None
        loc = [None] * n
        for i in range(n):
            f = row_files[i] or only
            loc[i] = (f, int(rows[i])) if f is not None and np.isfinite(rows[i]) else None
        return loc


SURVEY = Tables()
