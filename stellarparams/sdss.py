"""SDSS file formats: spectrum readers and writer, and the SSPP label catalog.

Every reader returns one :class:`Spectrum` record, whatever the release:

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
import gzip
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .files import atomic_write

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"

# SDSS SPPIXMASK bits (and_mask) that make a pixel unusable.
PIXMASK_BITS = {
    "NOPLUG": 0, "BADTRACE": 1, "BADFLAT": 2, "BADARC": 3, "MANYBADCOLUMNS": 4,
    "MANYREJECTED": 5, "LARGESHIFT": 6, "BADSKYFIBER": 7, "NEARWHOPPER": 8, "WHOPPER": 9,
    "SMEARIMAGE": 10, "SMEARHIGHSN": 11, "SMEARMEDSN": 12, "NEARBADPIXEL": 16, "LOWFLAT": 17,
    "FULLREJECT": 18, "PARTIALREJECT": 19, "SCATTEREDLIGHT": 20, "CROSSTALK": 21, "NOSKY": 22,
    "BRIGHTSKY": 23, "NODATA": 24, "COMBINEREJ": 25, "BADFLUXFACTOR": 26, "BADSKYCHI": 27,
    "REDMONSTER": 28,
}
BAD_PIXEL_BITS = ("NOPLUG", "BADTRACE", "BADFLAT", "BADARC", "MANYBADCOLUMNS", "MANYREJECTED",
                  "FULLREJECT", "NODATA", "COMBINEREJ", "BADFLUXFACTOR")


def pixmask(*names: str) -> int:
    """Bit mask for the named SPPIXMASK flags, e.g. ``pixmask("NODATA")``."""
    return int(sum(1 << PIXMASK_BITS[n] for n in names))


DEFAULT_BAD_MASK = pixmask(*BAD_PIXEL_BITS)

# DR7 SPEC_CLN codes
_DR7_CLASS = {0: "UNKNOWN", 1: "STAR", 2: "GALAXY", 3: "QSO", 4: "QSO", 5: "SKY", 6: "STAR", 7: "GALAXY"}


class SpectrumError(ValueError):
    """A spectrum file that cannot be used. ``reason`` is a short machine-readable code."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


class NoUsableInput(ValueError):
    """Nothing usable in the input (no spectrum kept, no label, no file); nothing was written."""


@dataclass
class Spectrum:
    """One spectrum as read from disk (native pixel grid, observed frame).

    loglam: (n,) float64, log10 vacuum wavelength in Angstrom
    flux, ivar: (n,) float32, 1e-17 erg/s/cm2/A and its inverse variance (0 = no data)
    and_mask: (n,) int32, SDSS SPPIXMASK bits (0 where the file has none)
    plate, mjd, fiberid: identifiers; objclass: SDSS CLASS (STAR, GALAXY, QSO; DR7 from SPEC_CLN)
    snr: median S/N per pixel (SPECOBJ SN_MEDIAN_ALL, else computed from flux and ivar)
    z: SDSS pipeline redshift (SPECOBJ Z, DR7 header Z; NaN if the file has none)
    """

    loglam: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    and_mask: np.ndarray
    plate: int = 0
    mjd: int = 0
    fiberid: int = 0
    objclass: str = ""
    snr: float = float("nan")
    path: str = ""
    header: dict = field(default_factory=dict)
    z: float = float("nan")

    @property
    def name(self) -> str:
        return f"{self.plate:04d}-{self.mjd:05d}-{self.fiberid:04d}"

    def good(self, bad_mask: int = DEFAULT_BAD_MASK) -> np.ndarray:
        """Pixels with finite flux, positive ivar and no bad mask bit."""
        return (self.ivar > 0) & np.isfinite(self.flux) & np.isfinite(self.ivar) & ((self.and_mask & bad_mask) == 0)


def _median_snr(flux, ivar):
    ok = (ivar > 0) & np.isfinite(flux)
    return float(np.median(flux[ok] * np.sqrt(ivar[ok]))) if ok.any() else 0.0


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


def read_spectrum(path) -> Spectrum:
    """Read an SDSS spectrum (DR8+ spec-*.fits or DR7 spSpec-*.fit), detecting the format.

    Parameters
    ----------
    path : str or Path
        The file; any character is allowed in its name (see :func:`open_fits`).

    Returns
    -------
    Spectrum

    Raises
    ------
    SpectrumError
        ``missing_file``, ``unreadable`` (``empty file`` for 0 bytes), ``not_sdss``,
        ``missing_columns``.
    """
    path = Path(path)
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


def _read_spectrum(path: Path) -> Spectrum:
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


def _number(hdr, key, default=np.nan) -> float:
    """A header value as a float; ``default`` when missing or not a number."""
    v = hdr.get(key, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _int(v) -> int:
    """An identifier as int; 0 (unknown) when it is not a finite number."""
    try:
        f = float(v.decode() if isinstance(v, bytes) else v)
    except (TypeError, ValueError, UnicodeDecodeError):
        return 0
    return int(f) if np.isfinite(f) and abs(f) < 2**31 else 0


MAX_HDU_BYTES = 1 << 28  # 256 MB: an SDSS spectrum file is a few MB
FITS_BLOCK = 2880


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
    with (gzip.open if gz else open)(path, "rb") as f:
        for hdu in range(64):
            cards, end = {}, False
            while not end:
                block = f.read(FITS_BLOCK)
                if len(block) < FITS_BLOCK:
                    return
                for i in range(0, FITS_BLOCK, 80):
                    key = block[i:i + 8].strip()
                    end = key == b"END"
                    if end:
                        break
                    if block[i + 8:i + 10] == b"= ":
                        cards[key] = block[i + 10:i + 80].split(b"/")[0].strip()
            naxis = _card_int(cards, b"NAXIS", 0)
            size = abs(_card_int(cards, b"BITPIX", 8)) // 8 if naxis else 0
            for k in range(1, min(naxis, 999) + 1):
                size *= _card_int(cards, b"NAXIS%d" % k, 0)
            size += _card_int(cards, b"PCOUNT", 0)
            fields = _card_int(cards, b"TFIELDS", 0)
            if not 0 <= size <= max_bytes or not 0 <= fields <= 999 or naxis > 999:
                raise SpectrumError(path, "unreadable", f"HDU {hdu} header declares {size} bytes, {fields} fields: "
                                    "damaged")
            f.seek(-(-size // FITS_BLOCK) * FITS_BLOCK, 1)


def _read_spec(path, f, hdr0) -> Spectrum:
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
            snr, z = _number(get, "SN_MEDIAN_ALL"), _number(get, "Z")
    if not np.isfinite(snr):
        snr = _median_snr(flux, ivar)
    return Spectrum(loglam, flux, ivar, and_mask, _int(plate), _int(mjd), _int(fiber), objclass, snr, str(path),
                    {k: hdr0[k] for k in ("RA", "DEC", "PLUG_RA", "PLUG_DEC") if k in hdr0}, z)


def _read_spspec(path, f, hdr0) -> Spectrum:
    img = f[0].read()
    if img is None or img.ndim != 2 or img.shape[0] < 3:
        raise SpectrumError(path, "missing_columns", "DR7 image needs rows flux, -, error")
    n = img.shape[1]
    c0, c1 = _number(hdr0, "COEFF0"), _number(hdr0, "COEFF1")
    if not (np.isfinite(c0) and np.isfinite(c1)):
        raise SpectrumError(path, "bad_wavelength", f"COEFF0 = {hdr0.get('COEFF0')!r}, COEFF1 = {hdr0.get('COEFF1')!r}")
    loglam = c0 + c1 * np.arange(n, dtype=np.float64)
    flux = img[0].astype(np.float32)
    err = img[2].astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        ivar = np.where(err > 0, 1.0 / err.astype(np.float64) ** 2, 0.0).astype(np.float32)
    and_mask = img[3].astype(np.int32) if img.shape[0] > 3 else np.zeros(n, np.int32)
    objclass = _DR7_CLASS.get(_int(hdr0.get("SPEC_CLN", 0)), "UNKNOWN")
    return Spectrum(loglam, flux, ivar, and_mask, _int(hdr0.get("PLATEID", 0)), _int(hdr0.get("MJD", 0)),
                    _int(hdr0.get("FIBERID", 0)), objclass, _median_snr(flux, ivar), str(path),
                    {k: hdr0[k] for k in ("RAOBJ", "DECOBJ") if k in hdr0}, _number(hdr0, "Z"))


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

SENTINEL = -9000.0  # SSPP writes -9999 (and other values <= -9000) for "missing"
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
    numeric = set(CATALOG_ID_COLUMNS) | {v + e for v in CATALOG_VALUE_COLUMNS for e in ("", "_UNC", "_ERR")}
    for c in numeric & set(df.columns):  # a text or empty cell in a number column is a missing value
        if not pd.api.types.is_numeric_dtype(df[c]):
            df[c] = pd.to_numeric(df[c].map(lambda v: v.decode("ascii", "replace") if isinstance(v, bytes) else v),
                                  errors="coerce")
    for c in df.columns:
        col = df[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            v = col.to_numpy(np.float64, na_value=np.nan)
            if c not in CATALOG_ID_COLUMNS and (v <= SENTINEL).any():
                df[c] = np.where(v <= SENTINEL, np.nan, v)
        else:
            df[c] = col.map(lambda v: (v.decode("ascii", "replace") if isinstance(v, bytes) else v).strip()
                            if isinstance(v, (str, bytes)) else v)
    return df.reset_index(drop=True)


def _read_fits_table(path) -> pd.DataFrame:
    """HDU 1 of a FITS file as a DataFrame: with fitsio when its columns are plain, else with astropy."""
    try:
        df = _read_fits_table_plain(path)
    except (OSError, ValueError, KeyError, IndexError):
        df = None  # astropy reads it, or names what is wrong with it
    return df if df is not None else _read_fits_table_astropy(path)


_NOT_PLAIN_COLUMN = re.compile(r"[XPQ]")  # bits and variable-length arrays: astropy shapes them its own way


def _read_fits_table_plain(path) -> pd.DataFrame | None:
    """What :func:`_read_fits_table_astropy` returns, read with fitsio (importing astropy costs ~0.3 s).

    Only for a binary table whose columns are numbers, logicals or text without TDIM or TSCAL (an
    SSPP catalog's are); None otherwise. Vector columns are dropped, as astropy's reader does.
    """
    with open_fits(path) as f:
        if len(f) < 2 or f[1].get_exttype() != "BINARY_TBL" or f[1].get_nrows() == 0:
            return None
        hdr = f[1].read_header()
        for k in range(1, int(hdr.get("TFIELDS", 0)) + 1):
            form = str(hdr.get(f"TFORM{k}", "")).upper()
            if f"TDIM{k}" in hdr or f"TSCAL{k}" in hdr or _NOT_PLAIN_COLUMN.search(form):
                return None
        data = f[1].read()
    columns = {}
    for name in data.dtype.names:
        v = data[name]
        if v.ndim == 1 and v.dtype.kind == "U":
            columns[name] = np.char.rstrip(v)  # astropy drops trailing blanks of FITS text
        elif v.ndim == 1:
            columns[name] = v.astype(v.dtype.newbyteorder("=")) if v.dtype.byteorder == ">" else v
    return pd.DataFrame(columns)


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
