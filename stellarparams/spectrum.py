"""The spectrum record every reader returns (see :mod:`stellarparams.readers`), and its builder."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import sdss


@dataclass
class Record(sdss.Spectrum):
    """One spectrum of any survey (see the module docstring for the fields it adds)."""

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
        return self.ident or super().name

    def good(self, bad_mask: int = sdss.DEFAULT_BAD_MASK) -> np.ndarray:
        """Pixels with finite flux, positive ivar and no bad mask bit (the survey's own mask when it has one)."""
        if self.bad is None:
            return super().good(bad_mask)
        return (self.ivar > 0) & np.isfinite(self.flux) & np.isfinite(self.ivar) & ~np.asarray(self.bad, bool)


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
    sdss.SpectrumError
        ``bad_shape``: the arrays are not 1-D of one length.
    """
    wave = np.asarray(wave, np.float64)
    flux = np.asarray(flux, np.float32)
    ivar = np.asarray(ivar, np.float32)
    mask = np.zeros(len(flux), np.int64) if mask is None else np.asarray(mask)
    if not (wave.ndim == flux.ndim == ivar.ndim == mask.ndim == 1 and len(wave) == len(flux) == len(ivar) == len(mask)):
        raise sdss.SpectrumError(path, "bad_shape", f"wave {wave.shape}, flux {flux.shape}, ivar {ivar.shape}, "
                                 f"mask {mask.shape}: need four 1-D arrays of one length")
    with np.errstate(divide="ignore", invalid="ignore"):
        loglam = np.log10(wave)
    if snr is None:
        snr = sdss._median_snr(flux, ivar)
    return Record(loglam, flux, ivar, np.zeros(len(flux), np.int32), objclass=objclass, snr=float(snr),
                  path=str(path), header=dict(header or {}), z=float(z), ident=str(ident), survey=survey,
                  wave=wave, bad=mask != 0, rv=float(rv), keys=dict(keys or {}), labels=dict(labels or {}))
