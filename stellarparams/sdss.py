"""SDSS file formats: spectrum readers and writer, and the SSPP label catalog.

Every reader returns one :class:`Spectrum` record, whatever the release:

- DR8+ ``spec-PLATE-MJD-FIBER.fits`` (full and lite): HDU 1 ``COADD`` table with
  ``loglam``, ``flux``, ``ivar``, ``and_mask``; HDU 2 ``SPECOBJ`` with CLASS, S/N.
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
from functools import lru_cache
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


def read_spectrum(path, plain: bool = True) -> Spectrum:
    """Read an SDSS spectrum (DR8+ spec-*.fits or DR7 spSpec-*.fit), detecting the format.

    Parameters
    ----------
    path : str or Path
        The file; any character is allowed in its name (see :func:`open_fits`).
    plain : bool
        Read a plain DR8+ file with numpy (:func:`read_spec_plain`, same result, ~4x faster);
        False: always with cfitsio.

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
    try:
        spec = read_spec_plain(path) if plain else None
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
    if "SPECOBJ" in f:
        so = f["SPECOBJ"].read(rows=[0])
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


# --- the plain DR8+ file without cfitsio ------------------------------------------------------
# cfitsio costs ~0.5 ms per file to open, index and read a lite file (and check_headers ~0.2 ms),
# several times the work itself. A plain file (uncompressed, complete, every header card well
# formed, the columns read single unscaled numbers) is read here with numpy in ~0.1 ms. Anything
# else goes to the cfitsio path, which reads it or names what is wrong with it; the fuzz tests
# check that both paths give the same answer on damaged files.

_TFORM = re.compile(r"(\d*)([LXBIJKAEDCM])(\d*)$")  # P/Q (heap) columns are not plain
_TFORM_BYTES = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16}
_TFORM_NUMERIC = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}
_KEYWORD = re.compile(r"[A-Z0-9_-]*$")
# a value cfitsio reads without complaint: string, logical, number or complex, then a comment
_CARD_VALUE = re.compile(r" *(?:'(?:[^']|'')*'|[TF]|[-+]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][-+]?\d+)?"
                         r"|\( *[-+.\dEeDd]+ *, *[-+.\dEeDd]+ *\))? *(?:/.*)?$")
_INT = re.compile(r"[-+]?(?:0|[1-9]\d*)$")  # what ast.literal_eval (fitsio's read_header) reads as int
_FLOAT = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$")  # ... and as float
_PRINTABLE = bytes(range(32, 127))
_END_CARD = "END" + " " * 77
_NOT_PLAIN = ("", None)
PLAIN_MAX_BYTES = 1 << 26  # 64 MB: larger files go to cfitsio, which reads only what it needs


def _parse_card(card: str) -> tuple:
    """(keyword, value text or None for a card without a value); ``_NOT_PLAIN`` for a card cfitsio may refuse."""
    key, indicator = card[:8].rstrip(), card[8:10]
    if not _KEYWORD.match(key) or " " in key:
        return _NOT_PLAIN
    if indicator == "= ":
        return (key, card[10:]) if _CARD_VALUE.match(card[10:]) else _NOT_PLAIN
    return (key, None) if key in ("", "COMMENT", "HISTORY", "CONTINUE") else _NOT_PLAIN  # else a value went missing


class _CardCache(dict):
    """card text -> :func:`_parse_card` of it; most cards repeat from file to file, so most are looked up."""

    def __missing__(self, card):
        if len(self) > 100_000:
            self.clear()
        parsed = self[card] = _parse_card(card)
        return parsed


_CARDS = _CardCache()


def _plain_hdus(raw: bytes) -> list | None:
    """Every HDU of a complete FITS file as (cards, keywords in order, data start, data bytes); None when not plain.

    ``cards`` maps each keyword that has a value to its value text (comment included).
    """
    hdus, pos, size = [], 0, len(raw)
    while pos < size:
        lines = []
        while _END_CARD not in lines[-36:]:
            block = raw[pos:pos + FITS_BLOCK]
            pos += FITS_BLOCK
            if len(block) < FITS_BLOCK or block.translate(None, _PRINTABLE):
                return None  # truncated, no END card, or bytes that are not printable ASCII
            text = block.decode("ascii")
            lines += [text[i:i + 80] for i in range(0, FITS_BLOCK, 80)]
        header = lines[:lines.index(_END_CARD)]
        rows = None
        if hdus and len(header) > 4 and header[4].startswith("NAXIS2  = "):
            rows, header[4] = header[4], _ROWS_CARD  # the row count of a table varies from file to file
        parsed = _plain_header(tuple(header), not hdus)
        if parsed is None:
            return None
        cards, order, nbytes = parsed
        if rows is not None:  # the header was parsed with one row
            key, value = _CARDS[rows]
            if key != "NAXIS2" or value is None:
                return None
            cards = {**cards, "NAXIS2": value}
            heap = _plain_int(cards, "PCOUNT")
            nbytes = (nbytes - heap) * int(value.split("/")[0]) + heap
            if not 0 <= nbytes <= MAX_HDU_BYTES:
                return None  # check_headers refuses it
        hdus.append((cards, order, pos, nbytes))
        pos += -(-nbytes // FITS_BLOCK) * FITS_BLOCK
    return hdus if pos == size else None


_ROWS_CARD = "NAXIS2  =                    1 / the row count, parsed apart".ljust(80)


@lru_cache(maxsize=512)
def _plain_header(header: tuple, primary: bool):
    """(cards, keywords in order, data bytes) of one header's cards (END excluded), or None when not plain.

    Cached: the headers of the table HDUs repeat from file to file (their row counts apart: the
    caller puts ``_ROWS_CARD`` in place of NAXIS2).
    """
    parsed = list(map(_CARDS.__getitem__, header))
    if _NOT_PLAIN in parsed:
        return None
    order = [k for k, _ in parsed]
    cards = {k: v for k, v in parsed if v is not None}
    if len(cards) != len(parsed) - [v for _, v in parsed].count(None):
        return None  # a keyword given twice
    naxis, bitpix = _plain_int(cards, "NAXIS"), _plain_int(cards, "BITPIX")
    if order[:3] != ["SIMPLE" if primary else "XTENSION", "BITPIX", "NAXIS"] or not 0 <= naxis <= 9 \
            or order[3:3 + naxis] != [f"NAXIS{k}" for k in range(1, naxis + 1)] \
            or bitpix not in (8, 16, 32, 64, -32, -64):
        return None
    nbytes = abs(bitpix) // 8 if naxis else 0
    for k in range(1, naxis + 1):
        nbytes *= _plain_int(cards, f"NAXIS{k}")
    if not primary:
        if order[3 + naxis:5 + naxis] != ["PCOUNT", "GCOUNT"] or _plain_int(cards, "GCOUNT") != 1:
            return None
        nbytes += _plain_int(cards, "PCOUNT")
    elif _plain_value(cards["SIMPLE"]) is not True:
        return None
    if not 0 <= nbytes <= MAX_HDU_BYTES or not 0 <= _plain_int(cards, "TFIELDS", 0) <= 999 or "HDUNAME" in cards:
        return None  # check_headers refuses the first two
    _plain_int(cards, "EXTVER", 0)  # fitsio reads it: an integer, or not plain (ValueError)
    return cards, order, nbytes


def _plain_int(cards: dict, key: str, default: int | None = None) -> int:
    """An integer keyword's value (``default`` when missing); ValueError when not an integer."""
    if default is not None and key not in cards:
        return default
    return int(cards.get(key, "").split("/")[0])


def _plain_value(text: str):
    """A number or logical value as fitsio's read_header gives it; ValueError for anything else."""
    v = text.split("/")[0].strip()
    if _INT.match(v):
        return int(v)
    if _FLOAT.match(v):
        return float(v)
    if v in ("T", "F"):
        return v == "T"
    raise ValueError(f"not a plain number: {v!r}")


def _plain_string(text: str) -> str:
    """A string value, quotes and trailing blanks removed; ValueError when not a plain string."""
    v = text.lstrip()
    if not v.startswith("'") or "''" in v:
        raise ValueError("not a plain string")
    return v[1:].split("'")[0].rstrip()


def _plain_table(raw: bytes, hdu, want: tuple, rows: int | None = None) -> dict | None:
    """Columns ``want`` (lower-case names; absent ones left out) of a plain binary table HDU.

    Returns {lower-case name: (rows,) array in the file's byte order; text: bytes}, or None when
    the table is not plain: not a BINTABLE, no rows, a heap, a scaled column, a column read that
    is not a single number or text, two columns of one name, ...
    """
    cards, order, start, nbytes = hdu
    n_rows = _plain_int(cards, "NAXIS2")
    layout = _table_layout(tuple(order[:8]), tuple(kv for kv in cards.items() if kv[0] != "NAXIS2"), want)
    if layout is None or n_rows < 1 or layout[0] * n_rows != nbytes:
        return None
    width, found, text = layout
    n_rows = n_rows if rows is None else min(rows, n_rows)
    for at, n in text:  # fitsio decodes every text cell it reads as ASCII, and fails on other bytes
        cells = raw[start + at:start + at + n] if n_rows == 1 else \
            np.ndarray((n_rows,), f"S{n}", raw, start + at, (width,)).tobytes()
        if not cells.isascii():
            return None
    return {name: np.ndarray((n_rows,), dtype, raw, start + at, (width,)) for name, (dtype, at) in found}


@lru_cache(maxsize=256)
def _table_layout(order: tuple, cards: tuple, want: tuple):
    """(row width, ((name, (dtype, offset)), ...) of the columns ``want``, ((offset, bytes), ...) of every text
    column) of a plain table; None if not plain."""
    cards = dict(cards)
    if _plain_string(cards["XTENSION"]) != "BINTABLE" or _plain_int(cards, "BITPIX") != 8 \
            or _plain_int(cards, "NAXIS") != 2 or order[7:8] != ("TFIELDS",) or _plain_int(cards, "PCOUNT") != 0 \
            or "THEAP" in cards:
        return None
    width, n_fields = _plain_int(cards, "NAXIS1"), _plain_int(cards, "TFIELDS")
    if not 0 < n_fields <= 999:
        return None
    offset, found, names, text = 0, {}, set(), []
    for k in range(1, n_fields + 1):
        if f"TSCAL{k}" in cards or f"TZERO{k}" in cards:
            return None
        name = _plain_string(cards[f"TTYPE{k}"]).lower()
        m = _TFORM.match(_plain_string(cards[f"TFORM{k}"]))
        if m is None or not name or name in names or name != name.lstrip() or (m[3] and m[2] != "A"):
            return None
        names.add(name)
        repeat = int(m[1] or 1)
        if not _column_keys_plain(cards, k, repeat):
            return None
        if m[2] == "A" and repeat:
            text.append((offset, repeat))
        if name in want:
            if f"TDIM{k}" in cards or m[2] != "A" and (repeat != 1 or m[2] not in _TFORM_NUMERIC):
                return None
            found[name] = (f"S{repeat}" if m[2] == "A" else _TFORM_NUMERIC[m[2]], offset)
        offset += -(-repeat // 8) if m[2] == "X" else repeat * _TFORM_BYTES[m[2]]
    return (width, tuple(found.items()), tuple(text)) if offset == width else None


_TDIM = re.compile(r"\( *\d+ *(?:, *\d+ *)*\)$")


def _column_keys_plain(cards: dict, k: int, repeat: int) -> bool:
    """Column ``k``'s other keywords are what cfitsio expects: TUNIT/TDISP text, TNULL integer, TDIM '(n, ...)'
    matching the repeat count."""
    try:
        for key in (f"TUNIT{k}", f"TDISP{k}"):
            if key in cards:
                _plain_string(cards[key])
        if f"TNULL{k}" in cards:
            _plain_int(cards, f"TNULL{k}")
        if f"TDIM{k}" in cards:
            dims = _plain_string(cards[f"TDIM{k}"])
            return bool(_TDIM.match(dims)) and int(np.prod([int(d) for d in dims[1:-1].split(",")])) == repeat
    except ValueError:
        return False
    return True


def read_spec_plain(path) -> Spectrum | None:
    """Read a plain DR8+ ``spec-*.fits`` file with numpy alone, exactly as :func:`read_spectrum` would.

    A file is plain when it is uncompressed and complete, every header card is well formed,
    and the columns read are single unscaled numbers (``CLASS``: text). SDSS files are.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Spectrum, or None
        None for any other file (gzip, DR7, damaged, unusual): :func:`read_spectrum` reads it
        with cfitsio or names what is wrong with it.
    """
    with open(path, "rb") as f:
        if not FITS_BLOCK <= os.fstat(f.fileno()).st_size <= PLAIN_MAX_BYTES:
            return None
        raw = f.read()
    hdus = _plain_hdus(raw) if raw.startswith(b"SIMPLE  = ") else None
    if not hdus:
        return None
    names = [_plain_string(c["EXTNAME"]).strip().lower() if "EXTNAME" in c else "" for c, _, _, _ in hdus]
    coadd = hdus[names.index("coadd")] if "coadd" in names else hdus[1] if len(hdus) > 1 else None
    cols = coadd and _plain_table(raw, coadd, ("loglam", "flux", "ivar", "and_mask"))
    if not cols or any(c not in cols or cols[c].dtype.kind not in "fiu" for c in ("loglam", "flux", "ivar")) \
            or "and_mask" in cols and cols["and_mask"].dtype.kind not in "iu":
        return None
    hdr0 = hdus[0][0]
    header = {k: _plain_value(hdr0[k]) for k in ("RA", "DEC", "PLUG_RA", "PLUG_DEC") if k in hdr0}
    plate, mjd, fiber = (_plain_value(hdr0[k]) if k in hdr0 else 0 for k in ("PLATEID", "MJD", "FIBERID"))
    objclass, snr, z = "", float("nan"), float("nan")
    if "specobj" in names:
        so = _plain_table(raw, hdus[names.index("specobj")],
                          ("plate", "mjd", "fiberid", "class", "sn_median_all", "z"), rows=1)
        if not so or any((v.dtype.kind == "S") != (k == "class") for k, v in so.items()):
            return None
        get = {k.upper(): v[0] for k, v in so.items()}
        plate, mjd, fiber = get.get("PLATE", plate), get.get("MJD", mjd), get.get("FIBERID", fiber)
        c = get.get("CLASS", b"")
        if c.translate(None, _PRINTABLE):
            return None  # control or non-ASCII bytes: cfitsio's reading of them decides
        objclass = c.decode("ascii").strip().upper()
        snr, z = _number(get, "SN_MEDIAN_ALL"), _number(get, "Z")
    loglam = cols["loglam"].astype(np.float64)
    flux = cols["flux"].astype(np.float32)
    ivar = cols["ivar"].astype(np.float32)
    and_mask = cols["and_mask"].astype(np.int32) if "and_mask" in cols else np.zeros(len(flux), np.int32)
    if not np.isfinite(snr):
        snr = _median_snr(flux, ivar)
    return Spectrum(loglam, flux, ivar, and_mask, _int(plate), _int(mjd), _int(fiber), objclass, snr, str(path),
                    header, z)


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
