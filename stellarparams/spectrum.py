"""The spectrum record every survey's reader returns, its builder, and the errors of reading.

Generic: nothing here belongs to one survey. The pixel-mask bits of ``and_mask`` follow SDSS's
SPPIXMASK (the one bit convention a record carries; other surveys set ``bad`` instead).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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

SENTINEL = -9000.0  # a survey catalog (SSPP) writes -9999 (and other values <= -9000) for "missing"


class SpectrumError(ValueError):
    """A spectrum file that cannot be used. ``reason`` is a short machine-readable code."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


class NoUsableInput(ValueError):
    """Nothing usable in the input (no spectrum kept, no label, no file); nothing was written."""


def median_snr(flux, ivar) -> float:
    """Median S/N per pixel, flux * sqrt(ivar) over the pixels with ivar > 0 and finite flux (0 when none)."""
    ok = (ivar > 0) & np.isfinite(flux)
    return float(np.median(flux[ok] * np.sqrt(ivar[ok]))) if ok.any() else 0.0


def to_int(v) -> int:
    """An identifier (a header or catalog value, bytes or text too) as int; 0 (unknown) when it is not a
    finite number."""
    try:
        f = float(v.decode() if isinstance(v, bytes) else v)
    except (TypeError, ValueError, UnicodeDecodeError):
        return 0
    return int(f) if np.isfinite(f) and abs(f) < 2**31 else 0


def header_number(hdr, key, default=np.nan) -> float:
    """A header value as a float; ``default`` when missing or not a number."""
    v = hdr.get(key, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


@dataclass
class Record:
    """One spectrum of any survey, as read from disk (native pixel grid, observed frame).

    loglam: (n,) float64, log10 vacuum wavelength in Angstrom
    flux, ivar: (n,) float32, the file's flux and its inverse variance (0 = no data)
    and_mask: (n,) int32, SPPIXMASK bits (0 where the file has none)
    plate, mjd, fiberid: SDSS identifiers (0 for other surveys); objclass: CLASS (STAR, GALAXY, QSO)
    snr: median S/N per pixel; path: the file; header: its metadata
    z: the pipeline's redshift (NaN if the file has none)
    ident: the survey's identifier (SDSS PLATE-MJD-FIBER, LAMOST OBSID, DESI TARGETID, a table's ID)
    survey: the format's name; wave: (n,) vacuum Angstrom, exactly as written
    bad: (n,) bool, the survey's own mask (None: use ``and_mask``)
    rv: km/s given by the file, else NaN; keys: what a catalog row is matched with
    labels: label columns a table row carries
    problem: (reason, detail) when the reader found this one spectrum unusable
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
    ident: str = ""
    survey: str = ""
    wave: np.ndarray = None
    bad: np.ndarray = None
    rv: float = float("nan")
    keys: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    problem: tuple = None

    @property
    def name(self) -> str:
        return self.ident or f"{self.plate:04d}-{self.mjd:05d}-{self.fiberid:04d}"

    def good(self, bad_mask: int = DEFAULT_BAD_MASK) -> np.ndarray:
        """Pixels with finite flux, positive ivar and no bad mask bit (the survey's own mask when it has one)."""
        ok = (self.ivar > 0) & np.isfinite(self.flux) & np.isfinite(self.ivar)
        if self.bad is None:
            return ok & ((self.and_mask & bad_mask) == 0)
        return ok & ~np.asarray(self.bad, bool)


def make_record(wave, flux, ivar, mask=None, *, path="", ident="", survey="", rv=float("nan"), z=float("nan"),
                header=None, keys=None, labels=None, objclass="", snr=None) -> Record:
    """Build a :class:`Record` from arrays; the shared step of every reader.

    Parameters
    ----------
    wave : (n,) array
        Vacuum wavelength, Angstrom, increasing.
    flux, ivar : (n,) arrays
        Flux (any unit: each spectrum is standardized) and its inverse variance (0 = no data).
    mask : (n,) array, optional
        Nonzero = unusable pixel.
    path, ident, survey, rv, z, header, keys, labels, objclass
        See :class:`Record`.
    snr : float, optional
        Median S/N per pixel (default: computed from flux and ivar).

    Returns
    -------
    Record

    Raises
    ------
    SpectrumError
        ``bad_shape``: the arrays are not 1-D of one length.
    """
    wave = np.asarray(wave, np.float64)
    flux = np.asarray(flux, np.float32)
    ivar = np.asarray(ivar, np.float32)
    mask = np.zeros(len(flux), np.int64) if mask is None else np.asarray(mask)
    if not (wave.ndim == flux.ndim == ivar.ndim == mask.ndim == 1 and len(wave) == len(flux) == len(ivar) == len(mask)):
        raise SpectrumError(path, "bad_shape", f"wave {wave.shape}, flux {flux.shape}, ivar {ivar.shape}, "
                                 f"mask {mask.shape}: need four 1-D arrays of one length")
    with np.errstate(divide="ignore", invalid="ignore"):
        loglam = np.log10(wave)
    if snr is None:
        snr = median_snr(flux, ivar)
    return Record(loglam, flux, ivar, np.zeros(len(flux), np.int32), objclass=objclass, snr=float(snr),
                  path=str(path), header=dict(header or {}), z=float(z), ident=str(ident), survey=survey,
                  wave=wave, bad=mask != 0, rv=float(rv), keys=dict(keys or {}), labels=dict(labels or {}))
