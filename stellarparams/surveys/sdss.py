"""SDSS file formats: spectrum readers and writer, and the SSPP label catalog.

Every reader returns one :class:`stellarparams.spectrum.Record` record, whatever the release:

- DR8+ ``spec-PLATE-MJD-FIBER.fits`` (full and lite): HDU 1 ``COADD`` table with
  ``loglam``, ``flux``, ``ivar``, ``and_mask`` (also ``or_mask``, ``wdisp``, ``sky``, ``model``,
  not used); HDU 2 ``SPECOBJ`` (``SPALL`` in the current data model) with CLASS, Z, S/N; HDU 3
  ``SPZLINE``; the full files add one HDU per exposure and camera (B1, R1, ...), not read.
- DR7 ``spSpec-MJD-PLATE-FIBER.fit``: primary image, row 0 flux, row 2 error (sigma),
  row 3 pixel mask; wavelength from ``COEFF0`` + ``COEFF1`` * pixel (log10 A).

Flux is in 1e-17 erg/s/cm2/A, wavelengths are vacuum, log10(lambda/A).
Problems raise :class:`SpectrumError`, whose ``reason`` is a short code that
``prepare`` and ``predict`` record per file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from .. import fastfits, matching
from ..files import atomic_write
from ..physics import doppler
from .base import Simulated as SimulatedBase
from .base import Located, Survey
from ..spectrum import SENTINEL, Record, SpectrumError, header_number, median_snr, to_int

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


# DR7 SPEC_CLN codes
_DR7_CLASS = {0: "UNKNOWN", 1: "STAR", 2: "GALAXY", 3: "QSO", 4: "QSO", 5: "SKY", 6: "STAR", 7: "GALAXY"}


_PROC_FD = os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def open_fits(path):
    """Open a FITS file for reading with fitsio so that no character of its path has meaning.

    cfitsio reads ``[...]``, ``(...)``, ``+N``, a leading ``!`` or ``-`` and ``mem://`` in a file
    name as extended-filename syntax. We open the file ourselves and give cfitsio
    ``/proc/self/fd/N`` (Linux), a name with no such characters; gzip files still work.
    Elsewhere the path is passed as is.

    Parameters
    ----------
    path : str or Path
        Any file name (brackets, spaces, non-ASCII characters).

    Returns
    -------
    context manager yielding fitsio.FITS
    """
    import fitsio

    if not _PROC_FD:
        with fitsio.FITS(str(path)) as f:
            yield f
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        with fitsio.FITS(f"/proc/self/fd/{fd}") as f:
            yield f
    finally:
        os.close(fd)


READERS = ("fast", "fitsio")  # the spectrum readers (--reader): the plain-layout reader first, or cfitsio only


def read_spectrum(path, reader: str = "fast") -> Record:
    """Read an SDSS spectrum (DR8+ spec-*.fits or DR7 spSpec-*.fit), detecting the format.

    Parameters
    ----------
    path : str or Path
        The file; any character is allowed in its name (see :func:`open_fits`).
    reader : str
        ``"fast"``: a DR8+ file of the plain layout (:mod:`stellarparams.fastfits`) is read with
        numpy (the same result as cfitsio, ~5x faster); any other file, and any file numpy
        does not take, with cfitsio. ``"fitsio"``: every file with cfitsio.

    Returns
    -------
    Record

    Raises
    ------
    SpectrumError
        ``missing_file``, ``unreadable`` (``empty file`` for 0 bytes), ``not_sdss``,
        ``missing_columns``.
    """
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    path = Path(path)
    if reader == "fast":
        try:
            spec = read_spec_fast(path)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            spec = None  # cfitsio below reads it, or names what is wrong with it
        if spec is not None:
            return spec
    if path.is_file() and path.stat().st_size == 0:
        raise SpectrumError(path, "unreadable", "empty file (0 bytes)")
    for _ in range(3):
        # fitsio decodes cfitsio's error-message stack, which may still hold raw bytes from an
        # earlier damaged file; the failed decode drains it, so a second try sees only this file
        try:
            return _read_spectrum(path)
        except UnicodeDecodeError:
            continue
    raise SpectrumError(path, "unreadable", "a header holds bytes that are not ASCII text")


def _read_spectrum(path: Path) -> Record:
    try:
        check_headers(path)
        with open_fits(path) as f:
            hdr0 = f[0].read_header()
            if "COADD" in f or len(f) > 1 and f[1].get_exttype() == "BINARY_TBL":
                return _read_spec(path, f, hdr0)
            if "COEFF0" in hdr0:
                return _read_spspec(path, f, hdr0)
            raise SpectrumError(path, "not_sdss", "neither a COADD table nor a DR7 image with COEFF0/COEFF1")
    except (SpectrumError, UnicodeDecodeError):
        raise
    except (OSError, ValueError, KeyError, IndexError) as e:
        if not path.exists():
            raise SpectrumError(path, "missing_file") from e
        raise SpectrumError(path, "unreadable", str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__) from e


MAX_HDU_BYTES = fastfits.MAX_HDU_BYTES  # 256 MB: an SDSS spectrum file is a few MB
FITS_BLOCK = fastfits.FITS_BLOCK


def _card_int(cards: dict, key: bytes, default: int) -> int:
    try:
        return int(float(cards.get(key, default)))
    except (TypeError, ValueError, OverflowError):
        return default


def check_headers(path, max_bytes: int = MAX_HDU_BYTES) -> None:
    """Walk the raw header cards of every HDU before cfitsio reads them.

    cfitsio trusts a header: a damaged one that declares 10**8 table fields or terabytes of
    data makes it allocate gigabytes and take minutes. Such a file is refused here with a
    :class:`SpectrumError` ("unreadable"); anything else (truncated, not FITS) is left to
    cfitsio to report. Gzip files are read through :mod:`gzip`.

    Parameters
    ----------
    path : str or Path
    max_bytes : int
        Largest HDU accepted (default 256 MB; a DESI coadd holds larger ones).

    Returns
    -------
    None

    Raises
    ------
    SpectrumError
        A header declares more than ``max_bytes`` of data or more than 999 fields.
    """
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    try:
        _walk_headers(path, gz, max_bytes)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return  # a damaged gzip stream: cfitsio reports it


def _walk_headers(path, gz: bool, max_bytes: int = MAX_HDU_BYTES) -> None:
    def describe(hdu, header):
        cards = fastfits.loose_cards(header)
        naxis = _card_int(cards, b"NAXIS", 0)
        size = abs(_card_int(cards, b"BITPIX", 8)) // 8 if naxis else 0
        for k in range(1, min(naxis, 999) + 1):
            size *= _card_int(cards, b"NAXIS%d" % k, 0)
        size += _card_int(cards, b"PCOUNT", 0)
        fields = _card_int(cards, b"TFIELDS", 0)
        if not 0 <= size <= max_bytes or not 0 <= fields <= fastfits.MAX_FIELDS or naxis > fastfits.MAX_FIELDS:
            raise SpectrumError(path, "unreadable", f"HDU {hdu} header declares {size} bytes, {fields} fields: "
                                "damaged")
        return size, None

    with (gzip.open if gz else open)(path, "rb") as f:
        for _ in fastfits.walk(f, describe):
            pass


def _read_spec(path, f, hdr0) -> Record:
    hdu = f["COADD"] if "COADD" in f else f[1]
    data = hdu.read()  # the whole table: faster with fitsio than picking columns
    names = {n.lower(): n for n in data.dtype.names or ()}
    missing = [c for c in ("loglam", "flux", "ivar") if c not in names]
    if missing:
        raise SpectrumError(path, "missing_columns", "COADD lacks " + ", ".join(missing))
    loglam = data[names["loglam"]].astype(np.float64)
    flux = data[names["flux"]].astype(np.float32)
    ivar = data[names["ivar"]].astype(np.float32)
    and_mask = data[names["and_mask"]].astype(np.int32) if "and_mask" in names else np.zeros(len(flux), np.int32)
    plate, mjd, fiber = hdr0.get("PLATEID", 0), hdr0.get("MJD", 0), hdr0.get("FIBERID", 0)
    objclass, snr, z = "", float("nan"), float("nan")
    meta = next((h for h in ("SPECOBJ", "SPALL") if h in f), None)  # HDU 2: SPECOBJ, or SPALL (current data model)
    if meta is not None:
        so = f[meta].read(rows=[0])
        if so is not None and so.dtype.names and len(so):  # a damaged SPECOBJ only loses the extras
            get = {n.upper(): so[0][n] for n in so.dtype.names}
            plate, mjd, fiber = get.get("PLATE", plate), get.get("MJD", mjd), get.get("FIBERID", fiber)
            c = get.get("CLASS", b"")
            objclass = (c.decode("ascii", "replace") if isinstance(c, bytes) else str(c)).strip().upper()
            snr, z = header_number(get, "SN_MEDIAN_ALL"), header_number(get, "Z")
    if not np.isfinite(snr):
        snr = median_snr(flux, ivar)
    return Record(loglam, flux, ivar, and_mask, to_int(plate), to_int(mjd), to_int(fiber), objclass, snr, str(path),
                    {k: hdr0[k] for k in ("RA", "DEC", "PLUG_RA", "PLUG_DEC") if k in hdr0}, z)


def read_spec_fast(path) -> Record | None:
    """Read a DR8+ ``spec-*.fits`` file of the plain layout with numpy alone, exactly as cfitsio would.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Record, or None
        None for any file not of the plain layout (:mod:`stellarparams.fastfits`: gzip, DR7,
        damaged, unusual); may also raise OSError/ValueError/KeyError for such a file.
        :func:`read_spectrum` then reads it with cfitsio or names what is wrong with it:
        this function never rejects a file by itself.
    """
    got = fastfits.read_plain(path)
    if got is None:
        return None
    raw, hdus = got
    names = [fastfits.extname(c) for c, _, _, _ in hdus]
    coadd = hdus[names.index("coadd")] if "coadd" in names else hdus[1] if len(hdus) > 1 else None
    cols = coadd and fastfits.plain_table(raw, coadd, ("loglam", "flux", "ivar", "and_mask"))
    if not cols or any(c not in cols or cols[c].dtype.kind not in "fiu" for c in ("loglam", "flux", "ivar")) \
            or "and_mask" in cols and cols["and_mask"].dtype.kind not in "iu":
        return None
    hdr0 = hdus[0][0]
    header = {k: fastfits.plain_value(hdr0[k]) for k in ("RA", "DEC", "PLUG_RA", "PLUG_DEC") if k in hdr0}
    plate, mjd, fiber = (fastfits.plain_value(hdr0[k]) if k in hdr0 else 0 for k in ("PLATEID", "MJD", "FIBERID"))
    objclass, snr, z = "", float("nan"), float("nan")
    meta = next((h for h in ("specobj", "spall") if h in names), None)  # HDU 2 (SPALL in the current data model)
    if meta:
        so = fastfits.plain_table(raw, hdus[names.index(meta)],
                                  ("plate", "mjd", "fiberid", "class", "sn_median_all", "z"), rows=1)
        if not so or any((v.dtype.kind == "S") != (k == "class") for k, v in so.items()):
            return None
        get = {k.upper(): v[0] for k, v in so.items()}
        plate, mjd, fiber = get.get("PLATE", plate), get.get("MJD", mjd), get.get("FIBERID", fiber)
        c = get.get("CLASS", b"")
        if not fastfits.is_printable(c):
            return None  # control or non-ASCII bytes: cfitsio's reading of them decides
        objclass = c.decode("ascii").strip().upper()
        snr, z = header_number(get, "SN_MEDIAN_ALL"), header_number(get, "Z")
    loglam = cols["loglam"].astype(np.float64)
    flux = cols["flux"].astype(np.float32)
    ivar = cols["ivar"].astype(np.float32)
    and_mask = cols["and_mask"].astype(np.int32) if "and_mask" in cols else np.zeros(len(flux), np.int32)
    if not np.isfinite(snr):
        snr = median_snr(flux, ivar)
    return Record(loglam, flux, ivar, and_mask, to_int(plate), to_int(mjd), to_int(fiber), objclass, snr, str(path),
                    header, z)


def _read_spspec(path, f, hdr0) -> Record:
    img = f[0].read()
    if img is None or img.ndim != 2 or img.shape[0] < 3:
        raise SpectrumError(path, "missing_columns", "DR7 image needs rows flux, -, error")
    n = img.shape[1]
    c0, c1 = header_number(hdr0, "COEFF0"), header_number(hdr0, "COEFF1")
    if not (np.isfinite(c0) and np.isfinite(c1)):
        raise SpectrumError(path, "bad_wavelength", f"COEFF0 = {hdr0.get('COEFF0')!r}, COEFF1 = {hdr0.get('COEFF1')!r}")
    loglam = c0 + c1 * np.arange(n, dtype=np.float64)
    flux = img[0].astype(np.float32)
    err = img[2].astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        ivar = np.where(err > 0, 1.0 / err.astype(np.float64) ** 2, 0.0).astype(np.float32)
    and_mask = img[3].astype(np.int32) if img.shape[0] > 3 else np.zeros(n, np.int32)
    objclass = _DR7_CLASS.get(to_int(hdr0.get("SPEC_CLN", 0)), "UNKNOWN")
    return Record(loglam, flux, ivar, and_mask, to_int(hdr0.get("PLATEID", 0)), to_int(hdr0.get("MJD", 0)),
                    to_int(hdr0.get("FIBERID", 0)), objclass, median_snr(flux, ivar), str(path),
                    {k: hdr0[k] for k in ("RAOBJ", "DECOBJ") if k in hdr0}, header_number(hdr0, "Z"))


def spec_filename(plate: int, mjd: int, fiberid: int) -> str:
    return f"spec-{plate:04d}-{mjd:05d}-{fiberid:04d}.fits"


def write_spec_lite(path, loglam, flux, ivar, and_mask=None, *, plate: int, mjd: int, fiberid: int,
                    objclass: str = "STAR", subclass: str = "", z: float = 0.0, sky=None, model=None,
                    wdisp=None, header: dict | None = None):
    """Write a DR8+ lite spectrum file (SDSS datamodel: primary, COADD, SPECOBJ, SPZLINE).

    The file is written atomically (:func:`files.atomic_write`), so a reader never sees half a
    file. ``model`` defaults to zeros: it must never carry a noiseless truth.
    """
    from astropy.io import fits

    n = len(flux)
    zeros = np.zeros(n, np.float32)
    and_mask = np.zeros(n, np.int32) if and_mask is None else np.asarray(and_mask, np.int32)
    ivar = np.asarray(ivar, np.float32)
    flux = np.asarray(flux, np.float32)
    good = ivar > 0
    snr = float(np.median(flux[good] * np.sqrt(ivar[good]))) if good.any() else 0.0
    primary = fits.PrimaryHDU()
    h = primary.header
    h["TELESCOP"] = "SDSS 2.5-M"
    h["PLATEID"], h["MJD"], h["FIBERID"] = plate, mjd, fiberid
    h["BUNIT"] = FLUX_UNIT
    h["VACUUM"] = (True, "wavelengths are in vacuum")
    for k, v in (header or {}).items():
        h[k] = v
    coadd = fits.BinTableHDU.from_columns([
        fits.Column("flux", "E", array=flux),
        fits.Column("loglam", "E", array=np.asarray(loglam, np.float32)),
        fits.Column("ivar", "E", array=ivar),
        fits.Column("and_mask", "J", array=and_mask),
        fits.Column("or_mask", "J", array=and_mask),
        fits.Column("wdisp", "E", array=zeros if wdisp is None else np.asarray(wdisp, np.float32)),
        fits.Column("sky", "E", array=zeros if sky is None else np.asarray(sky, np.float32)),
        fits.Column("model", "E", array=zeros if model is None else np.asarray(model, np.float32)),
    ], name="COADD")
    specobj = fits.BinTableHDU.from_columns([
        fits.Column("PLATE", "J", array=[plate]), fits.Column("MJD", "J", array=[mjd]),
        fits.Column("FIBERID", "J", array=[fiberid]), fits.Column("CLASS", "6A", array=[objclass]),
        fits.Column("SUBCLASS", "21A", array=[subclass]), fits.Column("Z", "E", array=[z]),
        fits.Column("ZWARNING", "J", array=[0]), fits.Column("SN_MEDIAN_ALL", "E", array=[snr]),
    ], name="SPECOBJ")
    spzline = fits.BinTableHDU.from_columns([fits.Column("LINENAME", "13A", array=[])], name="SPZLINE")
    return atomic_write(path, fits.HDUList([primary, coadd, specobj, spzline]).writeto)


def write_spspec_dr7(path, loglam0: float, flux, err, mask=None, *, plate: int, mjd: int, fiberid: int,
                     spec_cln: int = 1, z: float | None = None):
    """Write a DR7 spSpec image file (rows: flux, continuum-subtracted flux, error, mask), atomically."""
    from astropy.io import fits

    n = len(flux)
    img = np.zeros((4, n), np.float32)
    img[0], img[2] = flux, err
    img[3] = 0 if mask is None else mask
    hdu = fits.PrimaryHDU(img)
    h = hdu.header
    h["COEFF0"], h["COEFF1"] = loglam0, 1e-4
    h["PLATEID"], h["MJD"], h["FIBERID"], h["SPEC_CLN"] = plate, mjd, fiberid, spec_cln
    if z is not None:
        h["Z"] = z
    h["BUNIT"] = FLUX_UNIT
    return atomic_write(path, hdu.writeto)


# ---------------------------------------------------------------------------------------------
# SSPP label catalog (sppParams)

CATALOG_ID_COLUMNS = ("PLATE", "MJD", "FIBERID")
CATALOG_VALUE_COLUMNS = ("TEFF_ADOP", "FEH_ADOP", "LOGG_ADOP", "RV_ADOP")


def error_column(df: pd.DataFrame, column: str) -> str | None:
    """Name of the uncertainty column of ``column`` in ``df`` (``X_UNC`` or ``X_ERR``), or None."""
    for c in (column + "_UNC", column + "_ERR"):
        if c in df.columns:
            return c
    return None


def read_catalog(path, columns: dict | None = None) -> pd.DataFrame:
    """Read an SSPP ``sppParams`` label catalog (FITS, CSV or Parquet) as a DataFrame.

    Column names come back upper-case. ``columns`` maps our names to the catalog's where
    they differ, e.g. ``{"TEFF_ADOP": "teff_spec", "FIBERID": "fiber"}``; a plain SSPP
    ``FIBER`` column is renamed ``FIBERID``. Missing values (-9999 and any value <= -9000)
    become NaN in every numeric column except PLATE/MJD/FIBERID; text or empty cells in the
    standard number columns below become NaN too. Multi-dimensional FITS
    columns are dropped, string columns are stripped. Standard columns: PLATE, MJD, FIBERID,
    TEFF_ADOP, FEH_ADOP, LOGG_ADOP, RV_ADOP and their ``_UNC``/``_ERR`` uncertainties;
    an optional FILE column names the spectrum file of a row directly.
    """
    if isinstance(path, pd.DataFrame):
        df = path.copy()
        source = "<DataFrame>"
    else:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: catalog not found")
        name = path.name.lower()
        try:
            if name.endswith((".csv", ".csv.gz", ".txt")):
                df = pd.read_csv(path)
            elif name.endswith((".parquet", ".pq")):
                df = pd.read_parquet(path)
            elif name.endswith((".fits", ".fit", ".fits.gz", ".fit.gz", ".fts")):
                df = _read_fits_table(path)
            else:
                raise ValueError("unknown catalog format; use .fits, .csv or .parquet")
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise ValueError(f"{path}: cannot read the catalog: {e}") from e
    df.columns = [str(c).strip().upper() for c in df.columns]
    if columns:
        # our name -> catalog name; catalog names are matched case-insensitively
        ren = {str(theirs).strip().upper(): str(ours).strip().upper() for ours, theirs in columns.items()}
        missing = [t for t in ren if t not in df.columns]
        if missing:
            raise ValueError(f"{source}: catalog has no column(s) {', '.join(missing)} "
                             f"(it has {', '.join(df.columns[:30])})")
        df = df.drop(columns=[o for t, o in ren.items() if o in df.columns and o != t]).rename(columns=ren)
    if "FIBERID" not in df.columns and "FIBER" in df.columns:
        df = df.rename(columns={"FIBER": "FIBERID"})
    numeric = set(CATALOG_ID_COLUMNS) | _STANDARD_VALUES
    for c in numeric & set(df.columns):  # a text or empty cell in a number column is a missing value
        if not pd.api.types.is_numeric_dtype(df[c]):
            df[c] = pd.to_numeric(df[c].map(lambda v: v.decode("ascii", "replace") if isinstance(v, bytes) else v),
                                  errors="coerce")
    return _missing_values(df).reset_index(drop=True)


_STANDARD_VALUES = {v + e for v in CATALOG_VALUE_COLUMNS for e in ("", "_UNC", "_ERR")}


def is_number(col: pd.Series) -> bool:
    """Whether a catalog column holds numbers (not logicals)."""
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _missing_values(df: pd.DataFrame, sentinel: set | None = None) -> pd.DataFrame:
    """:func:`read_catalog`'s last step: -9999 (<= SENTINEL) -> NaN in the number columns but PLATE/MJD/FIBERID
    that hold one (``sentinel``: those columns, when known for the whole table), text stripped."""
    for c in df.columns:
        col = df[c]
        if is_number(col):
            v = col.to_numpy(np.float64, na_value=np.nan)
            if c not in CATALOG_ID_COLUMNS and (c in sentinel if sentinel is not None else (v <= SENTINEL).any()):
                df[c] = np.where(v <= SENTINEL, np.nan, v)
        else:
            df[c] = col.map(lambda v: (v.decode("ascii", "replace") if isinstance(v, bytes) else v).strip()
                            if isinstance(v, (str, bytes)) else v)
    return df


def _catalog_names(names) -> list | None:
    """A catalog's column names as :func:`read_catalog` gives them (upper case, FIBER named FIBERID), or None
    when two of them become one (the block readers then leave the catalog to :func:`read_catalog`)."""
    columns = [str(c).strip().upper() for c in names]
    if "FIBERID" not in columns and "FIBER" in columns:
        columns[columns.index("FIBER")] = "FIBERID"
    return columns if len(set(columns)) == len(columns) else None


class FitsCatalog:
    """A FITS catalog of the plain layout (:func:`_read_fits_table_plain`) read a block of rows at a time.

    Each block is what :func:`read_catalog` gives for those rows (the same columns, types and
    values, the row numbers as index); the whole table is never in memory. :meth:`open` returns
    None for a file that is not of this layout, or whose standard number columns hold text
    (their type would depend on the rows read).

    Attributes
    ----------
    path : Path
    n : int
        Rows.
    columns : list of str
        Upper-case names, as :func:`read_catalog` gives them (FIBER named FIBERID).
    numbers : set of str
        The columns that are numbers (not logicals) once read.
    """

    def __init__(self, path: Path, names: list, columns: list, numbers: set, sentinel: set, n: int):
        self.path, self.names, self.columns, self.numbers, self.sentinel, self.n = \
            path, names, columns, numbers, sentinel, n

    @classmethod
    def open(cls, path) -> "FitsCatalog | None":
        """The catalog at ``path`` (.fits, .fit, .fts), or None when it is not a plain FITS table."""
        path = Path(path)
        if not path.name.lower().endswith((".fits", ".fit", ".fts")) or not path.is_file():
            return None
        try:
            first = _read_fits_table_plain(path, slice(0, 1))
            if first is None:
                return None
            with open_fits(path) as f:
                n = f[1].get_nrows()
                names = list(first.columns)
                columns = _catalog_names(names)
                if columns is None:
                    return None
                numbers = {c for c, m in zip(columns, names) if is_number(first[m])}
                if any(c not in numbers for c in (set(CATALOG_ID_COLUMNS) | _STANDARD_VALUES) & set(columns)):
                    return None
                sentinel = {c for c, m in zip(columns, names) if c in numbers and c not in CATALOG_ID_COLUMNS
                            and (f[1].read_column(m).astype(np.float64) <= SENTINEL).any()}
        except (OSError, ValueError, KeyError, IndexError):
            return None
        return cls(path, names, columns, numbers, sentinel, n)

    def read(self, rows, columns: list | None = None) -> pd.DataFrame:
        """Rows ``rows`` (a slice, or row numbers) of ``columns`` (default all), as :func:`read_catalog` gives them."""
        columns = self.columns if columns is None else list(columns)
        order = None
        if not isinstance(rows, slice):
            rows = np.asarray(rows, np.int64)
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
        names = [self.names[self.columns.index(c)] for c in columns]
        df = _read_fits_table_plain(self.path, rows, names)
        df.columns = columns
        index = np.arange(self.n)[rows] if isinstance(rows, slice) else rows
        df = _missing_values(df, self.sentinel).set_index(pd.Index(index))
        if order is not None:
            df = df.iloc[np.argsort(order, kind="stable")]
        return df

    def blocks(self, rows: int = 1 << 16):
        """Every row, ``rows`` at a time: a generator of DataFrames."""
        for lo in range(0, self.n, rows):
            yield self.read(slice(lo, min(lo + rows, self.n)))


PARQUET_BATCH = 1 << 14  # rows :class:`ParquetCatalog` decodes at a time (pyarrow's buffers grow with larger ones)


class ParquetCatalog:
    """A Parquet catalog read a block of rows at a time, as :class:`FitsCatalog` reads a FITS one.

    Each block is what :func:`read_catalog` (``pd.read_parquet``) gives for those rows: the same
    columns, types and values, the row numbers as index. The types are those of the whole file: an
    integer column with a null anywhere is float64 in every block, a logical one object, a text one
    float64 when it holds no text at all (bytes: object); -9999 makes a column NaN where any row holds
    it. The file's statistics say where the nulls and the lowest values are; a column without them is
    scanned once. :meth:`open` returns None for a file with columns that are not numbers, logicals,
    text or bytes (dates, lists, categories, pandas' nullable types), or whose standard number columns
    hold text. Attributes: ``path``, ``n``, ``columns`` and ``numbers``, as :class:`FitsCatalog`'s.
    """

    def __init__(self, path: Path, meta, metadata: dict, names: list, columns: list, dtypes: dict, sentinel: set):
        self.path, self.meta, self.metadata, self.names, self.columns, self.dtypes, self.sentinel = \
            path, meta, metadata, names, columns, dtypes, sentinel
        self.n = meta.num_rows
        self.numbers = {c for c in columns if is_number(dtypes[c])}
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])

    @classmethod
    def open(cls, path) -> "ParquetCatalog | None":
        """The catalog at ``path`` (.parquet, .pq), or None when its blocks could differ from :func:`read_catalog`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.name.lower().endswith((".parquet", ".pq")) or not path.is_file():
            return None
        try:
            with pq.ParquetFile(path) as f:
                schema, meta = f.schema_arrow, f.metadata
                index = [c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
                names = [x.name for x in schema if x.name not in index]  # read_catalog drops the index
                empty = _arrow_frame(schema.empty_table().select(names), schema.metadata)
                columns = _catalog_names(empty.columns)
                if meta.num_rows == 0 or columns is None or len(columns) != len(names):
                    return None
                dtypes, sentinel = {}, set()
                for c, name, dt in zip(columns, names, empty.dtypes):
                    text = isinstance(dt, pd.StringDtype) and dt.na_value is np.nan  # str, not "string"
                    typ = schema.field(name).type
                    raw = (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)) and dt == object  # bytes: decoded
                    if not text and not raw and not (isinstance(dt, np.dtype) and dt.kind in "iufb"):
                        return None
                    if c in set(CATALOG_ID_COLUMNS) | _STANDARD_VALUES and not is_number(dt):
                        return None
                    nulls = _parquet_nulls(f, name) if text or raw or dt.kind in "iub" else 0
                    if text or raw:  # read_catalog's strip makes text str, a column of nulls only float64 or object
                        dt = pd.StringDtype(na_value=np.nan) if nulls < meta.num_rows else \
                            np.dtype(np.float64 if text else object)
                    elif dt.kind == "b" and nulls:
                        dt = np.dtype(object)
                    elif dt.kind in "iu" and nulls:
                        dt = np.dtype(np.float64)
                    if is_number(dt) and c not in CATALOG_ID_COLUMNS and not (text or raw) and _parquet_low(f, name):
                        dt = np.dtype(np.float64)
                        sentinel.add(c)
                    dtypes[c] = dt
        except (OSError, ValueError, KeyError, IndexError, TypeError, NotImplementedError):  # pyarrow's errors too
            return None
        return cls(path, meta, schema.metadata, names, columns, dtypes, sentinel)

    def read(self, rows, columns: list | None = None) -> pd.DataFrame:
        """Rows ``rows`` (a slice, or row numbers in any order) of ``columns`` (default all), as
        :func:`read_catalog` gives them. The row groups holding them are read a batch at a time."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = self.columns if columns is None else list(columns)
        names = [self.names[self.columns.index(c)] for c in columns]
        rows = np.arange(self.n)[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        group = np.searchsorted(self.starts, rows[order], "right") - 1
        groups, size = np.unique(group), np.diff(self.starts)
        first = np.zeros(len(size), np.int64)  # where each row group read begins among the rows read
        first[groups] = np.cumsum(size[groups]) - size[groups]
        at = first[group] + rows[order] - self.starts[group]  # the rows among those read, sorted
        pieces, lo = [], 0
        with pq.ParquetFile(self.path, metadata=self.meta) as f:
            batches = f.iter_batches(PARQUET_BATCH, row_groups=groups.tolist(), columns=names) if len(rows) else ()
            for batch in batches:
                i, j = np.searchsorted(at, [lo, lo + batch.num_rows])
                pieces.append(batch.take(at[i:j] - lo))
                lo += batch.num_rows
            table = pa.Table.from_batches(pieces, f.schema_arrow.empty_table().select(names).schema)
        return self._frame(table.take(np.argsort(order, kind="stable")), columns, rows)

    def blocks(self, rows: int = 1 << 16):
        """Every row, ``rows`` (at most :data:`PARQUET_BATCH`) at a time: a generator of DataFrames."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        lo = 0
        with pq.ParquetFile(self.path, metadata=self.meta) as f:
            for batch in f.iter_batches(batch_size=min(rows, PARQUET_BATCH), columns=self.names):
                yield self._frame(pa.Table.from_batches([batch]), self.columns, np.arange(lo, lo + batch.num_rows))
                lo += batch.num_rows

    def _frame(self, table, columns: list, rows: np.ndarray) -> pd.DataFrame:
        df = _arrow_frame(table, self.metadata)
        df.columns = columns
        df = _missing_values(df, self.sentinel)
        for c in columns:  # the whole file's types (a block without nulls would keep ints, logicals or float64)
            if df[c].dtype != self.dtypes[c]:
                df[c] = df[c].astype(self.dtypes[c])
        return df.set_index(pd.Index(rows))


def _arrow_frame(table, metadata) -> pd.DataFrame:
    """A pyarrow table as ``pd.read_parquet`` converts it (with the file's pandas metadata)."""
    return table.replace_schema_metadata(metadata).to_pandas()


def _parquet_stats(f, name: str) -> list:
    """The statistics of column ``name`` in each row group of the ParquetFile ``f`` (None where absent)."""
    meta = f.metadata
    j = [meta.schema.column(k).path for k in range(meta.num_columns)].index(name)
    return [meta.row_group(g).column(j).statistics for g in range(meta.num_row_groups)]


def _parquet_nulls(f, name: str) -> int:
    """The nulls in column ``name`` of the ParquetFile ``f``: from its statistics, else counted."""
    stats = _parquet_stats(f, name)
    if all(s is not None and s.has_null_count for s in stats):
        return sum(s.null_count for s in stats)
    return sum(b.column(0).null_count for b in f.iter_batches(columns=[name]))


def _parquet_low(f, name: str) -> bool:
    """Whether a value of the number column ``name`` of the ParquetFile ``f`` is a missing value (<= SENTINEL):
    from the row groups' minima, else scanned."""
    stats = _parquet_stats(f, name)
    if all(s is not None and s.has_min_max and isinstance(s.min, (int, float)) and s.min == s.min for s in stats):
        return min(s.min for s in stats) <= SENTINEL
    return any((b.column(0).to_numpy(zero_copy_only=False).astype(np.float64) <= SENTINEL).any()
               for b in f.iter_batches(columns=[name]))


def open_catalog(path) -> "FitsCatalog | ParquetCatalog | None":
    """``path`` as a catalog read in blocks (:class:`FitsCatalog`, :class:`ParquetCatalog`), or None: read it whole."""
    return FitsCatalog.open(path) or ParquetCatalog.open(path)


def _read_fits_table(path) -> pd.DataFrame:
    """HDU 1 of a FITS file as a DataFrame: with fitsio when its columns are plain, else with astropy."""
    try:
        df = _read_fits_table_plain(path)
    except (OSError, ValueError, KeyError, IndexError):
        df = None  # astropy reads it, or names what is wrong with it
    return df if df is not None else _read_fits_table_astropy(path)


_NOT_PLAIN_COLUMN = re.compile(r"[XPQ]")  # bits and variable-length arrays: astropy shapes them its own way


def _read_fits_table_plain(path, rows=None, names: list | None = None) -> pd.DataFrame | None:
    """What :func:`_read_fits_table_astropy` returns, read with fitsio (importing astropy costs ~0.3 s).

    Only for a binary table whose columns are numbers, logicals or text without TDIM or TSCAL (an
    SSPP catalog's are); None otherwise. Vector columns are dropped, as astropy's reader does.
    ``rows``: a slice or sorted row numbers (default all); ``names``: the columns (default all).
    """
    with open_fits(path) as f:
        if len(f) < 2 or f[1].get_exttype() != "BINARY_TBL" or f[1].get_nrows() == 0:
            return None
        hdr = f[1].read_header()
        for k in range(1, int(hdr.get("TFIELDS", 0)) + 1):
            form = str(hdr.get(f"TFORM{k}", "")).upper()
            if f"TDIM{k}" in hdr or f"TSCAL{k}" in hdr or _NOT_PLAIN_COLUMN.search(form):
                return None
        columns = {}
        for name in names or f[1].get_colnames():  # a column at a time, each its own block: one copy in memory
            v = f[1][name][rows] if isinstance(rows, slice) else f[1].read_column(name, rows=rows)
            if v.ndim == 1 and v.dtype.kind == "U":
                columns[name] = np.char.rstrip(v)  # astropy drops trailing blanks of FITS text
            elif v.ndim == 1:
                columns[name] = v.byteswap().view(v.dtype.newbyteorder("=")) if v.dtype.byteorder == ">" else v
    return pd.DataFrame(columns, copy=False)


def _read_fits_table_astropy(path) -> pd.DataFrame:
    from astropy.table import Table

    t = Table.read(path, hdu=1, format="fits", character_as_bytes=False)
    keep = [c for c in t.colnames if t[c].ndim == 1]
    t = t[keep]
    for c in keep:
        if hasattr(t[c], "mask"):
            t[c] = t[c].filled(np.nan if t[c].dtype.kind == "f" else t[c].fill_value)
    df = t.to_pandas()
    for c in df.columns:  # FITS is big-endian; pandas prefers native
        dt = df[c].dtype
        if isinstance(dt, np.dtype) and dt.byteorder == ">":
            df[c] = df[c].astype(dt.newbyteorder("="))
    return df


# ---------------------------------------------------------------------------- simulate (the default survey)

def write_simulated(path, spec: dict, *, plate: int, mjd: int, fiberid: int, z: float = 0.0, header=None):
    """Write a spec-lite file with fitsio (3-4x faster than astropy), same datamodel as
    :func:`write_spec_lite`: primary header, COADD, SPECOBJ, SPZLINE.
    Atomic (:func:`stellarparams.files.atomic_write`). ``model`` is zeros (never the truth)."""
    import fitsio

    n = len(spec["flux"])
    coadd = np.zeros(n, dtype=[("flux", "f4"), ("loglam", "f4"), ("ivar", "f4"), ("and_mask", "i4"),
                               ("or_mask", "i4"), ("wdisp", "f4"), ("sky", "f4"), ("model", "f4")])
    for c in ("flux", "loglam", "ivar", "and_mask", "sky", "wdisp"):
        coadd[c] = spec[c]
    coadd["or_mask"] = spec["and_mask"]
    good = coadd["ivar"] > 0
    snr = float(np.median(coadd["flux"][good] * np.sqrt(coadd["ivar"][good]))) if good.any() else 0.0
    specobj = np.zeros(1, dtype=[("PLATE", "i4"), ("MJD", "i4"), ("FIBERID", "i4"), ("CLASS", "S6"),
                                 ("SUBCLASS", "S21"), ("Z", "f4"), ("ZWARNING", "i4"), ("SN_MEDIAN_ALL", "f4")])
    specobj[0] = (plate, mjd, fiberid, "STAR", "", z, 0, snr)
    hdr = [dict(name="TELESCOP", value="SDSS 2.5-M"), dict(name="PLATEID", value=plate),
           dict(name="MJD", value=mjd), dict(name="FIBERID", value=fiberid),
           dict(name="BUNIT", value=FLUX_UNIT),
           dict(name="VACUUM", value=True, comment="wavelengths are in vacuum")]
    hdr += [dict(name=k, value=v) for k, v in (header or {}).items()]

    def write(tmp):
        with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
            f.write(None, header=hdr)
            f.write(coadd, extname="COADD")
            f.write(specobj, extname="SPECOBJ")
            f.write(np.zeros(0, dtype=[("LINENAME", "S13")]), extname="SPZLINE")

    return atomic_write(path, write, durable=False)  # thousands of small files a re-run can remake


def simulated_path(out, plate: int, mjd: int, fiberid: int) -> Path:
    """``OUT/spectra/lite/PLATE/spec-PLATE-MJD-FIBER.fits`` (SDSS SAS layout)."""
    return Path(out) / "spectra" / "lite" / f"{plate:04d}" / spec_filename(plate, mjd, fiberid)


class Simulated(SimulatedBase):
    """The files of ``simulate``: spec-lite files in the SAS layout and an sppParams catalog."""

    catalog, file_bytes, own_lsf = "sppParams.fits", 170e3, False

    def spectrum_path(self, out, plan):
        return simulated_path(out, plan["plate"], plan["mjd"], plan["fiberid"])

    def write_files(self, out, items, header):
        for index, plan, spec, row in items:  # SPECOBJ Z: the measured RV, not the true one
            write_simulated(self.spectrum_path(out, plan), spec, plate=plan["plate"], mjd=plan["mjd"],
                            fiberid=plan["fiberid"], z=float(doppler(row["RV_ADOP"]) - 1.0),
                            header={"SNR5000": round(plan["snr"], 4), **header})

    def write_catalog(self, out, columns, meta):
        from astropy.table import Table

        table = Table(columns, copy=False)
        table.meta.update(meta)
        return atomic_write(Path(out) / self.catalog, lambda tmp: table.write(tmp, format="fits"))


# ---------------------------------------------------------------------------- the survey (surveys.registry)

NAME_RE = re.compile(r"^(?:spec-(\d+)-(\d+)-(\d+)\.fits|spSpec-(\d+)-(\d+)-(\d+)\.fits?)(\.gz)?$", re.I)


def parse_name(name: str):
    """The key of an SDSS spectrum file name.

    Parameters
    ----------
    name : str
        ``spec-PLATE-MJD-FIBER.fits(.gz)`` or ``spSpec-MJD-PLATE-FIBER.fit(s)(.gz)``.

    Returns
    -------
    tuple of int or None
        (plate, mjd, fiberid), or None for any other name.
    """
    m = NAME_RE.match(name)
    if m is None:
        return None
    if m[1] is not None:
        return int(m[1]), int(m[2]), int(m[3])
    return int(m[5]), int(m[4]), int(m[6])


def find_spectra(folder) -> list[Path]:
    """All spec-*.fits(.gz) and spSpec-*.fit(s)(.gz) files under ``folder``, recursively, sorted.

    Raises
    ------
    FileNotFoundError
        ``folder`` is not a folder.
    """
    from ..files import check_readable

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: spectra folder not found")
    check_readable(folder)
    return sorted(p for p in folder.rglob("*") if parse_name(p.name) and p.is_file())


def _file_keys(files: list) -> tuple[np.ndarray, np.ndarray]:
    """(m, 3) int64 (plate, mjd, fiberid) from each file's name, and (m,) bool: the name has one."""
    keys, ok = np.zeros((len(files), 3), np.int64), np.zeros(len(files), bool)
    names = files.names() if isinstance(files, matching.FileIndex) else (p.name for p in files)
    for j, name in enumerate(names):
        k = parse_name(name)
        if k is not None:
            keys[j], ok[j] = k, True
    return keys, ok


def _number_column(col: pd.Series) -> np.ndarray:
    """A catalog column as numbers: its own array when it is one (no copy), else float64 (NaN where missing)."""
    a = col.to_numpy()
    return a if a.dtype.kind in "iuf" else col.to_numpy(np.float64, na_value=np.nan)


MATCH_BLOCK = 1 << 16  # catalog rows matched at a time


def _match_keys(files, cols: list | None, has_key: np.ndarray):
    """The files' keys, which have one, and the catalog rows' keys (None without key columns): each packed
    into one int64 when every key fits (:func:`matching.pack`), else (n, 3) on both sides."""
    file_keys, has_file_key = _file_keys(files)
    packed = matching.pack(file_keys, has_file_key)
    if packed is not None:
        file_keys = packed  # the three columns are freed before the catalog's are made
    if cols is None:
        return file_keys, has_file_key, None
    keys = _int_keys(cols, has_key)
    if packed is None:
        return file_keys, has_file_key, keys
    rows = matching.pack(keys, has_key)
    if rows is None:  # a row's key too large to pack: three columns on both sides
        return _file_keys(files)[0], has_file_key, keys
    return file_keys, has_file_key, rows


def _int_keys(cols: list, ok: np.ndarray) -> np.ndarray:
    """(n, k) int64 of the columns ``cols`` (0 where not ``ok``), truncated as ``int()`` does."""
    keys = np.zeros((len(ok), len(cols)), np.int64)
    for j, c in enumerate(cols):
        keys[ok, j] = c[ok]
    return keys


class SDSS(Survey):
    """DR8+ spec-PLATE-MJD-FIBER.fits and DR7 spSpec files; catalog: SSPP sppParams."""

    name, title, priority, name_re = "sdss", "SDSS", 20, NAME_RE
    labels = {"teff": "TEFF_ADOP", "feh": "FEH_ADOP", "logg": "LOGG_ADOP"}
    rv_column = "RV_ADOP"
    catalog_keys = (CATALOG_ID_COLUMNS,)
    catalog_columns = CATALOG_ID_COLUMNS
    hashed_name = False
    plate_keys = True

    def identify(self, info) -> bool:
        return "COADD" in info.names or "COEFF0" in info.header

    def prepare_files(self, spectra, find_files):
        if not Path(spectra).is_dir():
            return find_spectra(spectra)  # says what is wrong
        from ..files import check_readable

        check_readable(spectra)
        return matching.FileIndex.scan(spectra, lambda name: parse_name(name) is not None)

    def read(self, path, reader="fast") -> list:
        spec = read_spectrum(path, reader)
        return [dataclasses.replace(spec, ident=spec.name, survey="sdss",
                                    wave=10.0 ** np.asarray(spec.loglam, np.float64),
                                    keys={"plate_mjd_fiber": (spec.plate, spec.mjd, spec.fiberid)})]

    def read_one(self, path, index, cache, reader="fast"):
        return read_spectrum(path, reader)  # one spectrum per file: nothing to cache, no record fields to add

    def locate(self, cat, files, row_files):
        n = len(cat)
        cols, has_key = None, np.zeros(n, bool)
        if all(c in cat.columns for c in CATALOG_ID_COLUMNS):
            cols = [_number_column(cat[c]) for c in CATALOG_ID_COLUMNS]  # the catalog's own arrays: no copy
            has_key = np.ones(n, bool)
            for c in cols:
                has_key &= np.abs(c.astype(np.float64)) < 2**62  # finite and an int64
        file_keys, has_file_key, keys = _match_keys(files, cols, has_key)
        table = matching.file_table(file_keys, has_file_key)
        twin = matching.first_match(file_keys, table, has_file_key)
        del file_keys, has_file_key
        match = np.full(n, -1, np.int32 if len(files) < 2**31 else np.int64)
        for lo in range(0, n if keys is not None else 0, MATCH_BLOCK):  # a block at a time: bounded temporaries
            match[lo:lo + MATCH_BLOCK] = matching.first_match(keys[lo:lo + MATCH_BLOCK], table,
                                                              has_key[lo:lo + MATCH_BLOCK])
        del table
        with_file = np.array([f is not None for f in row_files], bool)
        if with_file.any():  # a row's FILE is its identity: text, as before
            ident = [str(f) if f is not None else None if not k else str(tuple(int(c[i]) for c in cols))
                     for i, (k, f) in enumerate(zip(has_key, row_files))]
            return Located(twin, match, files, row_files, cols, has_key, ident=ident)
        dup = matching.duplicates(keys, has_key) if keys is not None else np.zeros(n, bool)  # the first keeps it
        return Located(twin, match, files, row_files, cols, has_key, dup=dup)

    def rv_keys(self, cat) -> list:
        if not all(c in cat.columns for c in CATALOG_ID_COLUMNS):
            return []
        ids = cat[list(CATALOG_ID_COLUMNS)].to_numpy(np.float64)
        return [[tuple(int(v) for v in k) if np.isfinite(k).all() else None for k in ids]]

    def name_keys(self, name) -> list:
        return [parse_name(name)]

    def reject_unused(self, files, twin, is_used, rejects) -> None:
        for j in range(len(files)):
            if not is_used(j):
                p = files[j]
                k = parse_name(p.name)
                first = files[twin[j]]
                reason, detail = (("duplicate_file", f"another file of the same spectrum was used: {first}")
                                  if first != p and is_used(twin[j]) else
                                  ("no_catalog_row", "file has no matching catalog row"))
                rejects.append({"file": str(p), "plate": k[0], "mjd": k[1], "fiberid": k[2],
                                "reason": reason, "detail": detail, "id": f"{k[0]:04d}-{k[1]:05d}-{k[2]:04d}"})


    simulated = Simulated()


SURVEY = SDSS()
