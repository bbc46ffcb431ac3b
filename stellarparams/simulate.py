"""Simulate an SDSS DR12-like survey of stars from the MILES empirical library.

MILES (Sanchez-Blazquez et al. 2006; Falcon-Barroso et al. 2011; shipped with the PyPI
package ``sdss-mangadap``) holds 985 real stars observed at 3540-7410 A, FWHM 2.5 A,
air wavelengths, rest frame, with Teff, log g and [Fe/H]. Every simulated spectrum goes
through these steps (defaults in :class:`SimConfig`):

1. Star: a MILES star with all three labels and ``teff_range[0] <= Teff <= teff_range[1]``
   (default 4000-9500 K, the paper's range; 813 stars), drawn uniformly. A star gives many
   realizations; the catalog's ``STAR_ID`` (MILES number) says which.
2. Resolution: MILES air wavelengths -> vacuum (:func:`air_to_vac`), then a Gaussian of
   variable width so the line-spread FWHM becomes lambda / R (R = ``resolution`` = 2000),
   only where SDSS is broader than MILES' 2.5 A (redward of 5000 A); bluer pixels are kept.
   Done once per star (:func:`match_resolution`).
3. Radial velocity: v ~ N(0, ``rv_sigma`` = 150 km/s) clipped to +-``rv_max`` = 500 km/s,
   applied as lambda_obs = lambda_rest * sqrt((1+b)/(1-b)), b = v/c (c from astropy).
4. Reddening: the G23 law of ``dust_extinction`` (Gordon et al. 2023, R_V = ``rv_dust``
   = 3.1), E(B-V) exponential with mean ``ebv_mean`` = 0.05 mag, clipped at ``ebv_max``
   = 0.5, applied at observed wavelengths.
5. Flux calibration error: a factor 1 + sum_k c_k P_k(x), Legendre P_1..P_``calib_order``
   (3) across 3800-9200 A, c_k ~ N(0, ``calib_sigma`` = 0.02).
6. Absolute flux: scaled so the median flux is drawn in ``flux_range`` = 10-300
   (1e-17 erg/s/cm2/A), brighter for higher S/N (log-linear, scatter ``flux_scatter``
   = 0.2 dex), as in a real survey.
7. Rebinning onto the SDSS lattice log10(lambda) = 3.5798 + 1e-4 k (3800-9200 A, vacuum),
   first pixel shifted by up to +-``offset_max`` = 5 pixels, flux-conserving (the
   cumulative integral of the library flux is interpolated at the pixel edges). Pixels
   not wholly covered by MILES (all beyond ~7410 A: the red quarter of the paper's grid;
   also the few zero/negative pixels at the ends of some MILES stars) get flux 0, ivar 0,
   sky 0 and the SDSS ``NODATA`` bit: no flux is invented there.
   Steps 4-6 are smooth factors, applied on the output pixels after rebinning.
8. Noise: S/N per pixel at 5000 A (median over 4950-5050 A) drawn log-uniform in
   ``snr_range`` (5-100). Variance = g * (flux + sky), g set by that S/N; the sky is a
   continuum plus the bright lines ([OI] 5577, NaD 5890/96, [OI] 6300/6363, bright OH lines
   beyond 6800 A) at the SDSS resolution, scaled by a factor log-uniform in ``sky_range``
   (0.5-2). Gaussian noise is added, ``ivar`` = 1/variance is written, and a fraction
   ``bad_frac`` = 0.002 of the pixels become cosmic-ray hits: ivar 0, ``COMBINEREJ`` bit.
   Pixels where a sky line dominates get ``BRIGHTSKY`` (informational, as in SDSS).
9. Catalog: ``*_ADOP`` = truth + N(0, sigma), sigma = ``teff_noise`` 60 K, ``feh_noise``
   0.1 dex, ``logg_noise`` 0.15 dex, ``rv_noise`` 2 km/s (written as ``*_UNC``); the
   truths in ``*_TRUE``.

Instrument and calibration shifts (:class:`Shifts`; off by default, and then the
files are byte-identical to those of the code before them; ranges and sources in
``docs/shifts.md``): ``--lsf`` replaces the Gaussian of step 2 (Gauss-Hermite allowed);
``--wave-offset`` moves all the light (star, tellurics, sky) by a fixed number of pixels
against the written wavelengths (step 7); ``--response`` (one smooth curve for the whole
survey) and ``--telluric`` (O2/H2O bands, optical depth x airmass per plate, partially
corrected) are further smooth factors of steps 4-6; ``--sky-residual`` adds a signed
fraction of the sky lines of step 8 to the flux (no photons of its own: ivar unchanged).
Their values go to ``simulate.json`` (key ``shifts``) and to each file's header (RESPONSE,
TELLURIC, AIRMASS, LSF, WAVEOFF, SKYRESID). Everything redward of ~7410 A is NODATA, so the
O2 A band, the H2O bands at 8200 and 9400 A and the red OH lines change nothing there.

Other surveys (``survey="lamost"`` or ``"desi"``; each survey module's ``Simulated`` part, :mod:`stellarparams.surveys`):
the same steps on that survey's fixed pixels (no start offset) and with its line-spread
function in step 2 (LAMOST R = 1800; DESI is sharper than MILES, so nothing is broadened),
LAMOST with a survey-wide smooth instrument response (relative flux), written in its file
format with a catalog in its column names. SDSS's files stay byte-identical.

Nothing in a spectrum file holds the truth: the COADD ``model`` column is zeros, SPECOBJ
``Z`` is the catalog's (noisy) RV, and the header has only the S/N target ``SNR5000``.

Output, laid out like the SDSS SAS::

    OUT/spectra/lite/PLATE/spec-PLATE-MJD-FIBER.fits   (SDSS spec-lite datamodel)
    OUT/sppParams.fits                                 (written last)
    OUT/simulate.json                                  (seed, settings, version)

Realization i uses its own random streams, ``SeedSequence(seed, spawn_key=(i,))``, so the
output depends on the seed only, not on the number of workers, and a re-run of the same
command skips the spectra already written (writes are atomic) and rewrites the catalog.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, engine
from .context import Run
from .files import write_text
from .outputs import check_disk, locked_output
from .physics import C_KMS, doppler
from .spectrum import pixmask
from .surveys import registry
from .workers import pool as worker_pool

INSTALL_HINT = ("the MILES stellar library comes with the PyPI package sdss-mangadap; install it into this "
                "environment with `pip install sdss-mangadap` (e.g. `.venv/bin/pip install sdss-mangadap`)")
LOGLAM0, LOGLAM1, DLOGLAM = 3.5798, 3.9638, 1e-4  # SDSS lattice: 3800-9200 A, vacuum
PLATE0, MJD0, FIBERS_PER_PLATE = 1000, 53000, 640  # SDSS-I/II plates have 640 fibers
# disk space per simulated spectrum, checked before the work (bytes; an SDSS spec-lite file of 4,620 pixels is
# 164 kB; LAMOST's one-row tables are smaller; DESI's coadds carry a resolution matrix: a generous guess)
SNR_WINDOW = (4950.0, 5050.0)  # A (vacuum, observed): where SNR5000 is defined
SKY_LINES_AIR = {  # A (air): peak height of the unscaled sky, 1e-17 erg/s/cm2/A
    5577.34: 150.0, 5889.95: 40.0, 5895.92: 40.0, 6300.30: 60.0, 6363.78: 20.0,
    # bright OH Meinel-band lines (Osterbrock et al. 1996)
    6863.96: 40.0, 6923.22: 30.0, 7276.41: 30.0, 7316.28: 60.0, 7340.89: 60.0, 7369.25: 50.0,
    7401.69: 40.0, 7750.64: 80.0, 7794.11: 80.0, 7821.50: 60.0, 7913.71: 60.0, 7993.33: 80.0,
    8344.60: 120.0, 8399.17: 100.0, 8430.17: 80.0, 8465.36: 80.0, 8827.10: 120.0, 8885.85: 120.0,
    8919.64: 80.0, 8958.10: 100.0, 9001.36: 80.0,
}
SKY_CONTINUUM = 3.0  # 1e-17 erg/s/cm2/A at 5000 A: dark sky, about 22 mag/arcsec2 in a 3" fiber
TELLURIC_BANDS_AIR = (  # (name, lo A, hi A) in air, zenith band depth at R~2000 (docs/shifts.md)
    ("O2 B", 6867.0, 6884.0, 0.25), ("H2O 7200", 7160.0, 7340.0, 0.10), ("O2 A", 7594.0, 7621.0, 0.55),
    ("H2O 8200", 8130.0, 8350.0, 0.12), ("H2O 9400", 9300.0, 9650.0, 0.40),
)
RESPONSE_STREAM = 2**31 - 1  # spawn key of the instrument-response draw (realizations use (index, 0 or 1))


def _opt(default, help_):
    return field(default=default, metadata={"help": help_})


@dataclass
class SimConfig:
    """Every setting of the simulation; defaults as documented in the module docstring."""

    teff_range: tuple = _opt((4000.0, 9500.0), "K, MILES stars used")
    snr_range: tuple = _opt((5.0, 100.0), "S/N per pixel at 5000 A, log-uniform")
    resolution: float = _opt(2000.0, "SDSS resolving power lambda/FWHM (--lsf replaces it)")
    rv_sigma: float = _opt(150.0, "km/s, heliocentric RV spread (halo-like)")
    rv_max: float = _opt(500.0, "km/s, |RV| clip")
    ebv_mean: float = _opt(0.05, "mag, mean of the exponential E(B-V)")
    ebv_max: float = _opt(0.5, "mag, E(B-V) clip")
    rv_dust: float = _opt(3.1, "R_V of the G23 extinction law")
    calib_sigma: float = _opt(0.02, "spread of each Legendre coefficient of the calibration error")
    calib_order: int = _opt(3, "highest Legendre order of the calibration error")
    flux_range: tuple = _opt((10.0, 300.0), "median flux, 1e-17 erg/s/cm2/A")
    flux_scatter: float = _opt(0.2, "dex, scatter of flux at a given S/N")
    sky_range: tuple = _opt((0.5, 2.0), "sky brightness factor, log-uniform")
    offset_max: int = _opt(5, "pixels, shift of the first pixel on the SDSS lattice")
    bad_frac: float = _opt(0.002, "fraction of pixels hit by cosmic rays (ivar 0)")
    noise: bool = _opt(True, "False: write the noiseless flux (ivar still the noise model's)")
    teff_noise: float = _opt(60.0, "K, catalog TEFF_ADOP error")
    feh_noise: float = _opt(0.1, "dex, catalog FEH_ADOP error")
    logg_noise: float = _opt(0.15, "dex, catalog LOGG_ADOP error")
    rv_noise: float = _opt(2.0, "km/s, catalog RV_ADOP error")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SimConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Shifts:
    """Instrument and calibration shifts; every default is neutral (today's survey).

    Where each range comes from: ``docs/shifts.md``.

    Parameters
    ----------
    response : str or None
        A fixed instrument response multiplying every spectrum (the same for all):
        ``"legendre:AMP[:ORDER]"`` draws exp(AMP * p(x) / rms(p)), p a Legendre series of
        P_1..P_ORDER (default 5) over 3800-9200 A with N(0, 1) coefficients from the survey
        seed, so rms(ln response) = AMP (0 < AMP <= 0.5); any other string is a text file of
        two columns, vacuum wavelength (A) and factor (> 0), covering 3800-9200 A.
    telluric : float
        Fraction of the telluric absorption left after correction, -1 to 1: 0 none (neutral),
        1 uncorrected, negative over-corrected. Multiplies by 1 - telluric * (1 - T),
        T = exp(-airmass * tau_zenith).
    airmass : tuple
        (lo, hi) of the uniform airmass draw, one per plate, 1 to 3 (lo = hi: fixed).
    lsf : str or None
        The line-spread function replacing the Gaussian of ``resolution``:
        ``"gauss:FWHM"`` or ``"gh:FWHM:H3:H4"`` (Gauss-Hermite), FWHM in km/s of the
        Gaussian core (constant in velocity; resolving power R = c / FWHM), 30-600 km/s,
        |H3|, |H4| <= 0.3.
    wave_offset : float
        Systematic wavelength-solution error in pixels (1 pixel = 1e-4 dex = 69.0 km/s),
        |wave_offset| <= 5: every feature lands ``wave_offset`` pixels redward.
    sky_residual : float
        Signed fraction of the sky lines left in the flux after sky subtraction, -1 to 1.
    """

    response: str | None = None
    telluric: float = 0.0
    airmass: tuple = (1.0, 1.5)
    lsf: str | None = None
    wave_offset: float = 0.0
    sky_residual: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "airmass", tuple(float(a) for a in self.airmass))
        parse_lsf(self.lsf)
        if self.response is not None and self.response.startswith("legendre:"):
            parse_legendre(self.response)
        elif self.response is not None:
            read_response(self.response)
        lo, hi = self.airmass
        checks = [(-1 <= self.telluric <= 1, f"--telluric {self.telluric}: a fraction of the bands, -1 to 1"),
                  (1 <= lo <= hi <= 3, f"--airmass {lo} {hi}: 1 <= LO <= HI <= 3"),
                  (abs(self.wave_offset) <= 5, f"--wave-offset {self.wave_offset}: at most 5 pixels either way"),
                  (-1 <= self.sky_residual <= 1, f"--sky-residual {self.sky_residual}: a fraction, -1 to 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        """The non-neutral shifts ({} for today's survey); a response file comes with its sha256."""
        neutral = Shifts()
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "airmass" and getattr(self, f.name) != getattr(neutral, f.name)}
        if self.telluric:
            d["airmass"] = list(self.airmass)
        if self.response is not None and not self.response.startswith("legendre:"):
            import hashlib

            d["response_sha256"] = hashlib.sha256(Path(self.response).read_bytes()).hexdigest()
        return d

    def header(self) -> dict:
        """FITS keywords of the non-neutral shifts (the per-plate AIRMASS is added by the caller)."""
        h = {}
        if self.response is not None:
            h["RESPONSE"] = self.response if self.response.startswith("legendre:") else Path(self.response).name
        if self.telluric:
            h["TELLURIC"] = self.telluric
        if self.lsf is not None:
            h["LSF"] = self.lsf
        if self.wave_offset:
            h["WAVEOFF"] = self.wave_offset
        if self.sky_residual:
            h["SKYRESID"] = self.sky_residual
        return h


def parse_legendre(spec: str):
    """``"legendre:AMP[:ORDER]"`` -> (AMP, ORDER).

    Parameters
    ----------
    spec : str
        The ``--response`` value.

    Returns
    -------
    tuple
        (amplitude: float, rms of ln response; order: int, highest Legendre order, default 5).
    """
    parts = spec.split(":")[1:]
    try:
        amp, order = float(parts[0]), int(parts[1]) if len(parts) > 1 else 5
    except (IndexError, ValueError):
        raise ValueError(f"--response {spec}: write legendre:AMP or legendre:AMP:ORDER, e.g. legendre:0.05") from None
    if len(parts) > 2 or not 0 < amp <= 0.5 or not 1 <= order <= 10:
        raise ValueError(f"--response {spec}: AMP in (0, 0.5] (rms of ln response), ORDER 1-10")
    return amp, order


def parse_lsf(spec):
    """``"gauss:FWHM"`` or ``"gh:FWHM:H3:H4"`` -> (FWHM km/s, h3, h4); None -> None.

    Parameters
    ----------
    spec : str or None
        The ``--lsf`` value.

    Returns
    -------
    tuple or None
        (fwhm_kms, h3, h4); h3 = h4 = 0 for a Gaussian.
    """
    if spec is None:
        return None
    kind, *vals = spec.split(":")
    try:
        vals = [float(v) for v in vals]
    except ValueError:
        vals = []
    if not ((kind == "gauss" and len(vals) == 1) or (kind == "gh" and len(vals) == 3)):
        raise ValueError(f"--lsf {spec}: write gauss:FWHM or gh:FWHM:H3:H4 (FWHM in km/s), e.g. gh:150:0.05:0.03")
    fwhm, h3, h4 = (vals + [0.0, 0.0])[:3]
    if not 30 <= fwhm <= 600 or abs(h3) > 0.3 or abs(h4) > 0.3:
        raise ValueError(f"--lsf {spec}: FWHM 30-600 km/s (R = c / FWHM, 10000-500), |H3|, |H4| <= 0.3")
    return fwhm, h3, h4


# ---------------------------------------------------------------------------- the library

def miles_dir() -> Path:
    """The folder of the MILES FITS files inside the installed ``mangadap`` package."""
    spec = importlib.util.find_spec("mangadap")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("simulate needs the MILES stellar library, which is missing: " + INSTALL_HINT)
    path = Path(spec.origin).parent / "data" / "spectral_templates" / "miles"
    if not (path / "MILES_params.db").exists():
        raise FileNotFoundError(f"{path}: MILES_params.db not found; the sdss-mangadap install looks incomplete. "
                                "Reinstall it: `pip install --force-reinstall sdss-mangadap`")
    return path


def miles_labels(teff_range=(4000.0, 9500.0)):
    """The labels of the MILES stars that :func:`load_miles` returns, without reading the spectra."""
    import pandas as pd

    path = miles_dir()
    labels = pd.read_csv(path / "MILES_params.db", comment="#", sep=r"\s+", header=None,
                         names=["star_id", "teff", "logg", "feh"], dtype={"star_id": int})
    for col, missing in (("teff", 99999), ("logg", 9999), ("feh", 9999)):
        labels[col] = labels[col].where(labels[col] < missing)  # the sentinel -> NaN
    labels["file"] = [str(path / f"MILES_res2.50_star_m{int(i):04d}V.fits") for i in labels.star_id]
    keep = labels[["teff", "logg", "feh"]].notna().all(axis=1) & labels.teff.between(*teff_range)
    keep &= np.array([Path(f).exists() for f in labels.file])  # m0970 sits in omit/ (see the package README)
    labels = labels[keep].sort_values("star_id").reset_index(drop=True)
    labels["star_id"] = labels.star_id.astype(int)
    if len(labels) == 0:
        raise ValueError(f"no MILES star with all three labels and Teff in {teff_range} K")
    return labels


def load_miles(teff_range=(4000.0, 9500.0)):
    """Read the MILES stars that have all three labels and Teff in ``teff_range`` (K, inclusive).

    Returns (wave_air, flux, labels): wave_air (n_pix,) float64 pixel centres, A in AIR (rest
    frame; 3540.5-7409.6 A, step 0.9 A); flux (n_star, n_pix) float64, MILES' relative f_lambda;
    labels a DataFrame with star_id (the MILES number, int), teff (K), logg, feh (dex), file.
    MILES_params.db marks missing labels with 99999 (Teff) and 9999 (log g, [Fe/H]).
    """
    labels = miles_labels(teff_range)  # checks that mangadap is installed, every call
    wave_air, flux, fwhm = _read_miles(tuple(labels.file))
    labels.attrs["fwhm"] = fwhm  # A, MILES line-spread FWHM
    return wave_air.copy(), flux.copy(), labels


@functools.lru_cache(maxsize=2)
def _read_miles(files: tuple):
    import fitsio

    hdr = fitsio.read_header(files[0])
    n_pix, crval, cdelt, crpix = hdr["NAXIS1"], hdr["CRVAL1"], hdr["CDELT1"], hdr.get("CRPIX1", 1)
    flux = np.empty((len(files), n_pix))
    for k, f in enumerate(files):
        data, h = fitsio.read(f, header=True)
        if (h["NAXIS1"], h["CRVAL1"], h["CDELT1"]) != (n_pix, crval, cdelt):
            raise ValueError(f"{f}: wavelength grid differs from the other MILES files")
        flux[k] = data
    return crval + cdelt * (np.arange(n_pix) + 1 - crpix), flux, float(hdr.get("FWHM", 2.5))


def air_to_vac(wave_air):
    """Air -> vacuum wavelength (A), Ciddor (1996) dispersion as in SDSS idlutils ``airtovac``.

    Vacuum wavelengths are what SDSS writes; the refractive index is evaluated at the vacuum
    wavenumber, solved by two fixed-point iterations (converged to < 1e-6 A).
    """
    wave_air = np.asarray(wave_air, np.float64)
    wave = wave_air.copy()
    for _ in range(2):
        sigma2 = (1e4 / wave) ** 2  # (1/micron)^2
        wave = wave_air * (1.0 + 5.792105e-2 / (238.0185 - sigma2) + 1.67917e-3 / (57.362 - sigma2))
    return wave


def sdss_sigma(wave, resolution=2000.0, fwhm_lib=0.0):
    """Gaussian sigma (A) of the line-spread function: FWHM = max(lambda / R, fwhm_lib)."""
    fwhm = np.maximum(np.asarray(wave) / resolution, fwhm_lib)
    return fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def match_resolution(wave, flux, fwhm_lib=2.5, resolution=2000.0, h3=0.0, h4=0.0):
    """Broaden ``flux`` from the library's Gaussian LSF (FWHM ``fwhm_lib`` A) to FWHM lambda / R.

    The kernel of pixel i is a pixel-integrated Gaussian of sigma^2 = sigma_R^2 - sigma_lib^2
    where SDSS is broader, and no change (a delta) where it is sharper. With ``h3`` or ``h4``
    the kernel is the Gauss-Hermite profile of that core sigma (:func:`gauss_hermite`,
    integrated over the pixel on 8 sub-samples); the library's own Gaussian then dilutes
    h3, h4 by about (sigma_kernel / sigma_R)^3 and ^4. Ends are padded with the edge value.

    Parameters
    ----------
    wave : array (n_pix,)
        Wavelength grid, A.
    flux : array (..., n_pix)
        Spectra on ``wave``.
    fwhm_lib : float
        FWHM of the library's Gaussian LSF, A.
    resolution : float
        Resolving power lambda / FWHM of the target LSF's Gaussian core.
    h3, h4 : float
        Gauss-Hermite coefficients of the kernel (0: Gaussian).

    Returns
    -------
    ndarray
        Broadened spectra, like ``flux``.
    """
    from scipy.special import ndtr

    wave = np.asarray(wave, np.float64)
    flux = np.asarray(flux, np.float64)
    to_sigma = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sig = np.sqrt(np.clip((wave / resolution * to_sigma) ** 2 - (fwhm_lib * to_sigma) ** 2, 0.0, None))
    sig_pix = np.maximum(sig / np.gradient(wave), 1e-3)  # (n_pix,)
    h = int(np.ceil(5 * sig_pix.max()))
    k = np.arange(-h, h + 1)[:, None]  # (2h+1, 1)
    if h3 or h4:
        # output[i] takes input[i + k]: a line at input p lands at i = p - k, so the profile is at y = -k / sigma
        weights = sum(gauss_hermite(-(k + (j + 0.5) / 8 - 0.5) / sig_pix, h3, h4) for j in range(8))
        total = weights.sum(axis=0)
        weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), k == 0)  # no width: a delta
    else:
        weights = ndtr((k + 0.5) / sig_pix) - ndtr((k - 0.5) / sig_pix)  # (2h+1, n_pix)
        weights /= weights.sum(axis=0)
    padded = np.concatenate([np.repeat(flux[..., :1], h, -1), flux, np.repeat(flux[..., -1:], h, -1)], -1)
    n = flux.shape[-1]
    return sum(weights[j] * padded[..., j:j + n] for j in range(2 * h + 1))


def gauss_hermite(y, h3=0.0, h4=0.0):
    """Gauss-Hermite line profile per unit y (van der Marel & Franx 1993, as in pPXF).

    Parameters
    ----------
    y : array
        (velocity - centre) / sigma; positive redward.
    h3, h4 : float
        Coefficients of the normalized Hermite polynomials H3, H4 (h3 > 0: a red wing).

    Returns
    -------
    ndarray
        exp(-y^2/2) / sqrt(2 pi) * (1 + h3 H3(y) + h4 H4(y)), like ``y``.
    """
    y = np.asarray(y, np.float64)
    h3_poly = (2 * np.sqrt(2) * y ** 3 - 3 * np.sqrt(2) * y) / np.sqrt(6)
    h4_poly = (4 * y ** 4 - 12 * y ** 2 + 3) / np.sqrt(24)
    return np.exp(-0.5 * y ** 2) / np.sqrt(2 * np.pi) * (1 + h3 * h3_poly + h4 * h4_poly)


def sky_spectrum(wave_vac, resolution=2000.0, continuum=True):
    """Unscaled night-sky spectrum (1e-17 erg/s/cm2/A) at vacuum wavelengths ``wave_vac`` (A).

    A continuum of ``SKY_CONTINUUM`` at 5000 A rising to the red, plus the bright lines of
    ``SKY_LINES_AIR`` as Gaussians at the SDSS resolution.

    Parameters
    ----------
    wave_vac : array
        Vacuum wavelengths, A.
    resolution : float
        Resolving power lambda / FWHM of the sky lines.
    continuum : bool
        False: the lines alone (what a sky-subtraction residual leaves).

    Returns
    -------
    ndarray
        The sky, like ``wave_vac``.
    """
    wave_vac = np.asarray(wave_vac, np.float64)
    sky = SKY_CONTINUUM * (wave_vac / 5000.0) ** 1.5 if continuum else np.zeros_like(wave_vac)
    for w_air, peak in SKY_LINES_AIR.items():
        w = air_to_vac(w_air)
        sky += peak * np.exp(-0.5 * ((wave_vac - w) / sdss_sigma(w, resolution)) ** 2)
    return sky


# ---------------------------------------------------------------------------- instrument shifts

def read_response(path):
    """Read an instrument-response file: two columns, vacuum wavelength (A) and factor.

    Parameters
    ----------
    path : str or Path
        Text file; whitespace or comma separated; ``#`` starts a comment. Wavelengths
        increasing and covering 3800-9200 A; factors finite and > 0.

    Returns
    -------
    tuple
        (wave, factor), two float64 arrays.
    """
    text = Path(path).read_text().replace(",", " ")
    try:
        data = np.loadtxt(text.splitlines(), comments="#", ndmin=2)
    except ValueError as e:
        raise ValueError(f"--response {path}: not two numeric columns (wavelength_A factor): {e}") from None
    if data.shape[1] != 2 or len(data) < 2:
        raise ValueError(f"--response {path}: need two columns, wavelength_A and factor, and at least 2 rows")
    wave, factor = data.T
    if not (np.all(np.diff(wave) > 0) and wave[0] <= 10 ** LOGLAM0 and wave[-1] >= 10 ** LOGLAM1):
        raise ValueError(f"--response {path}: wavelengths must increase and cover "
                         f"{10 ** LOGLAM0:.1f}-{10 ** LOGLAM1:.1f} A (vacuum)")
    if not np.all(np.isfinite(factor) & (factor > 0)):
        raise ValueError(f"--response {path}: every factor must be finite and > 0")
    return wave, factor


def instrument_response(loglam, spec: str, seed: int = 0):
    """The fixed instrument response on the pixels ``loglam``: one curve for the whole survey.

    Parameters
    ----------
    loglam : array
        log10 vacuum wavelength of the pixels.
    spec : str
        ``"legendre:AMP[:ORDER]"``: exp(AMP * p(x) / rms(p)), p = sum_k c_k P_k(x), k = 1..ORDER,
        c_k ~ N(0, 1) drawn from ``seed`` (stream ``RESPONSE_STREAM``), x in [-1, 1] over
        3800-9200 A, rms over that range; otherwise a file for :func:`read_response`,
        interpolated linearly (ends held beyond 3800-9200 A).
    seed : int
        The survey seed.

    Returns
    -------
    ndarray
        The factor multiplying each pixel's flux, like ``loglam``.
    """
    loglam = np.asarray(loglam, np.float64)
    if not spec.startswith("legendre:"):
        wave, factor = read_response(spec)
        return np.interp(10 ** loglam, wave, factor)
    amp, order = parse_legendre(spec)
    coef = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(RESPONSE_STREAM,))).normal(0, 1, order)
    leg = np.polynomial.legendre.Legendre(np.concatenate([[0.0], coef]), domain=[LOGLAM0, LOGLAM1])
    rms = np.sqrt(np.mean(leg(np.linspace(LOGLAM0, LOGLAM1, 3841)) ** 2))
    return np.exp(amp * leg(loglam) / rms)


def telluric_tau(wave_vac, resolution=2000.0):
    """Zenith optical depth of the O2 and H2O bands of ``TELLURIC_BANDS_AIR`` at the SDSS resolution.

    Each band is a box in optical depth, tau = -ln(1 - depth) between its (air -> vacuum)
    edges, smoothed by the Gaussian LSF of ``resolution`` at the band centre.

    Parameters
    ----------
    wave_vac : array
        Vacuum wavelengths, A (observatory frame).
    resolution : float
        Resolving power lambda / FWHM.

    Returns
    -------
    ndarray
        tau at airmass 1, like ``wave_vac``.
    """
    from scipy.special import ndtr

    wave_vac = np.asarray(wave_vac, np.float64)
    tau = np.zeros_like(wave_vac)
    for _, lo, hi, depth in TELLURIC_BANDS_AIR:
        lo, hi = air_to_vac([lo, hi])
        sig = sdss_sigma(0.5 * (lo + hi), resolution)
        tau += -np.log1p(-depth) * (ndtr((wave_vac - lo) / sig) - ndtr((wave_vac - hi) / sig))
    return tau


def telluric_factor(tau, airmass: float, residual: float):
    """What a partial telluric correction leaves: 1 - residual * (1 - exp(-airmass * tau)).

    Parameters
    ----------
    tau : array
        Zenith optical depth (:func:`telluric_tau`); optical depth scales with airmass.
    airmass : float
        Airmass of the exposure.
    residual : float
        Fraction of the absorption left after correction (1: uncorrected; < 0: over-corrected).

    Returns
    -------
    ndarray
        The factor multiplying the flux, like ``tau``.
    """
    return 1.0 - residual * -np.expm1(-airmass * np.asarray(tau))


def plate_airmass(seed: int, plate: int, airmass_range) -> float:
    """The airmass of a plate (all its fibers share it): uniform in ``airmass_range``.

    Parameters
    ----------
    seed : int
        The survey seed.
    plate : int
        Plate number; the draw uses its own stream, spawn key (plate, 2).
    airmass_range : tuple
        (lo, hi).

    Returns
    -------
    float
        The airmass.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(plate, 2)))
    return float(rng.uniform(*airmass_range))


# ---------------------------------------------------------------------------- one realization

def draw_plan(seed: int, index: int, n_star: int, cfg: SimConfig) -> dict:
    """The random choices of realization ``index`` (everything but the pixel noise)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
    lo, hi = np.log(cfg.snr_range)
    log_snr = rng.uniform(lo, hi)
    u = (log_snr - lo) / (hi - lo) if hi > lo else 0.5
    flo, fhi = np.log10(cfg.flux_range)
    plan = dict(
        star=int(rng.integers(n_star)),
        rv=float(np.clip(rng.normal(0.0, cfg.rv_sigma), -cfg.rv_max, cfg.rv_max)),
        ebv=float(min(rng.exponential(cfg.ebv_mean), cfg.ebv_max)) if cfg.ebv_mean > 0 else 0.0,
        snr=float(np.exp(log_snr)),
        flux=float(10 ** np.clip(flo + u * (fhi - flo) + rng.normal(0.0, cfg.flux_scatter), flo, fhi)),
        sky=float(np.exp(rng.uniform(*np.log(cfg.sky_range)))),
        calib=rng.normal(0.0, cfg.calib_sigma, cfg.calib_order).tolist(),
        offset=int(rng.integers(-cfg.offset_max, cfg.offset_max + 1)),
        noise=rng.normal(0.0, 1.0, 4).tolist(),  # catalog errors of teff, feh, logg, rv in sigma units
    )
    plan.update(place(index))
    return plan


def place(index: int) -> dict:
    """Where realization ``index`` is (no random draw): its index, plate, mjd and fiberid, which name its file."""
    plate = PLATE0 + index // FIBERS_PER_PLATE
    return dict(index=index, plate=plate, mjd=MJD0 + plate - PLATE0, fiberid=index % FIBERS_PER_PLATE + 1)


class Simulator:
    """The MILES library made ready for realizations (resolution matched, vacuum, pixel edges).

    flux: (n_star, n_pix) resolution-matched library f_lambda at ``wave`` (vacuum, rest, A);
    cover: (n_star, 2) the wavelength range (vacuum, rest, A) where a star has good flux.
    The SDSS lattice (``loglam``, K pixels) covers every start offset; per-spectrum grids
    are slices of it. ``shifts`` (:class:`Shifts`) are fixed here, once: the LSF, the
    response curve (drawn from ``seed``), the wavelength-solution offset (``lo_true``, ``hi_true``:
    the wavelengths the pixels really see), the telluric optical depth and the sky lines.
    """

    def __init__(self, cfg: SimConfig = SimConfig(), shifts: Shifts = Shifts(), seed: int = 0, survey: str = "sdss"):
        from astropy import units as u
        from dust_extinction.parameter_averages import G23

        self.cfg, self.shifts, self.survey = cfg, shifts, survey
        sim = simulated(survey)
        lsf = parse_lsf(shifts.lsf)
        resolution = cfg.resolution if lsf is None else C_KMS / lsf[0]
        if sim.own_lsf and lsf is None:  # the survey's own LSF: R at each wavelength it is used at
            resolution = sim.resolution
        h3, h4 = (0.0, 0.0) if lsf is None else lsf[1:]
        wave_air, flux, self.labels = load_miles(cfg.teff_range)
        self.fwhm_lib = self.labels.attrs["fwhm"]
        self.wave = air_to_vac(wave_air)
        step = np.diff(wave_air).mean()
        self.edges = air_to_vac(np.append(wave_air - step / 2, wave_air[-1] + step / 2))  # (n_pix+1,)
        # a few MILES stars have zero or negative pixels at their ends: those pixels count as not
        # covered (-> NODATA) and are filled with the nearest good value before broadening
        n_pix = flux.shape[1]
        ends = flux <= 0
        lo = np.where((ends & (wave_air < 3900)).any(1), n_pix - np.argmax((ends & (wave_air < 3900))[:, ::-1], 1), 0)
        hi = np.where((ends & (wave_air > 7300)).any(1), np.argmax(ends & (wave_air > 7300), 1), n_pix)  # exclusive
        self.cover = np.stack([self.edges[lo], self.edges[hi]], 1)  # (n_star, 2) A, vacuum rest frame
        idx = np.clip(np.arange(n_pix), lo[:, None], hi[:, None] - 1)
        flux = np.take_along_axis(flux, idx, 1)
        self.flux = match_resolution(self.wave, flux, self.fwhm_lib, _at(resolution, self.wave), h3, h4)
        # cumulative integral of f_lambda over the library pixels, for flux-conserving rebinning
        self.cum = np.concatenate([np.zeros((len(flux), 1)), np.cumsum(self.flux * np.diff(self.edges), 1)], 1)
        pixels = sim.pixels()
        self.sliding = pixels is None  # SDSS: each spectrum a slice of one lattice; else the survey's fixed pixels
        if self.sliding:
            n_lat = int(round((LOGLAM1 - LOGLAM0) / DLOGLAM)) + 1 + 2 * cfg.offset_max
            self.loglam = LOGLAM0 + DLOGLAM * (np.arange(n_lat) - cfg.offset_max)  # (K,)
            self.lam = 10 ** self.loglam
            lam_edges = 10 ** (self.loglam[0] - DLOGLAM / 2 + DLOGLAM * np.arange(n_lat + 1))
            lo, hi = lam_edges[:-1], lam_edges[1:]
        else:  # the survey's fixed pixels; every spectrum gets all of them
            self.lam, lo, hi = pixels
            self.loglam = np.log10(self.lam)
        # a wavelength solution off by +P pixels: the pixel written at lambda sees lambda * 10^(-P dloglam)
        to_true = 10 ** (-shifts.wave_offset * DLOGLAM)  # exactly 1.0 for P = 0
        self.lo_true, self.hi_true, lam_true = lo * to_true, hi * to_true, self.lam * to_true
        resolution = _at(resolution, lam_true)
        ext = G23(Rv=cfg.rv_dust)
        self.ext_per_ebv = -2.5 * np.log10(ext.extinguish(self.lam * u.AA, Ebv=1.0))  # A(lambda)/E(B-V)
        x = 2 * (self.loglam - LOGLAM0) / (LOGLAM1 - LOGLAM0) - 1  # [-1, 1] over 3800-9200 A
        self.legendre = np.polynomial.legendre.legvander(x, cfg.calib_order)[:, 1:].T  # (order, K)
        self.sky = sky_spectrum(lam_true, resolution)
        self.sky_lines = sky_spectrum(lam_true, resolution, continuum=False) if shifts.sky_residual else None
        self.tau = telluric_tau(lam_true, resolution) if shifts.telluric else None
        response = shifts.response or sim.response
        self.response = None if response is None else instrument_response(self.loglam, response, seed)
        from scipy.ndimage import median_filter
        self.sky_line = self.sky > 1.25 * median_filter(self.sky, 99, mode="nearest")  # SDSS BRIGHTSKY shape test
        self.wdisp = sdss_sigma(self.lam, resolution, self.fwhm_lib) / (self.lam * np.log(10) * DLOGLAM)
        self.in_window = (self.lam >= SNR_WINDOW[0]) & (self.lam <= SNR_WINDOW[1])

    def realize(self, plan: dict, seed: int) -> dict:
        """One spectrum for ``plan`` (from :func:`draw_plan`): loglam, flux, ivar, and_mask, sky, wdisp (n,)."""
        cfg, shifts = self.cfg, self.shifts
        sl = slice(None)  # LAMOST, DESI: fixed pixels
        if self.sliding:
            k0 = cfg.offset_max + plan["offset"]
            sl = slice(k0, k0 + int(round((LOGLAM1 - LOGLAM0) / DLOGLAM)) + 1 - plan["offset"])
        edge_lo, edge_hi = self.lo_true[sl], self.hi_true[sl]
        # steps 3 + 7: Doppler-shift the library pixel edges, rebin conserving flux
        obs_edges = self.edges * doppler(plan["rv"])
        lo, hi = self.cover[plan["star"]] * doppler(plan["rv"])
        covered = (edge_lo >= lo) & (edge_hi <= hi)
        cum = self.cum[plan["star"]]
        flux = (np.interp(edge_hi, obs_edges, cum) - np.interp(edge_lo, obs_edges, cum)) / (edge_hi - edge_lo)
        # steps 4-6: reddening, calibration error, absolute scale (smooth factors)
        flux *= 10 ** (-0.4 * plan["ebv"] * self.ext_per_ebv[sl])
        flux *= np.clip(1.0 + np.asarray(plan["calib"]) @ self.legendre[:, sl], 0.5, None)
        if self.response is not None:  # shifts: the fixed instrument response, telluric residuals
            flux *= self.response[sl]
        if self.tau is not None:
            flux *= telluric_factor(self.tau[sl], plate_airmass(seed, plan["plate"], shifts.airmass), shifts.telluric)
        flux *= plan["flux"] / np.median(flux[covered])
        # step 8: photon + sky noise with S/N = plan["snr"] at 5000 A
        sky = plan["sky"] * self.sky[sl]
        win = self.in_window[sl] & covered
        f5, s5 = np.median(flux[win]), np.median(sky[win])
        gain = f5 ** 2 / (plan["snr"] ** 2 * (f5 + s5))  # variance per unit of (flux + sky)
        var = gain * (np.clip(flux, 0.0, None) + sky)
        if self.sky_lines is not None:  # shift: what sky subtraction left (no photons of its own)
            flux = flux + shifts.sky_residual * plan["sky"] * self.sky_lines[sl]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(plan["index"], 1)))
        sigma = np.sqrt(var)
        noise = rng.normal(0.0, 1.0, len(flux))
        hits = np.flatnonzero(covered & (rng.random(len(flux)) < cfg.bad_frac))
        spikes = rng.uniform(5.0, 50.0, len(hits))
        if cfg.noise:
            flux = flux + sigma * noise
            flux[hits] += spikes * sigma[hits]
        ivar = 1.0 / var
        and_mask = np.zeros(len(flux), np.int32)
        and_mask[self.sky_line[sl] & (sky > flux + 10 * sigma)] |= pixmask("BRIGHTSKY")
        and_mask[hits] |= pixmask("COMBINEREJ")
        ivar[hits] = 0.0
        and_mask[~covered] = pixmask("NODATA")
        flux[~covered], ivar[~covered], sky[~covered] = 0.0, 0.0, 0.0
        return dict(loglam=self.loglam[sl], flux=flux, ivar=ivar, and_mask=and_mask, sky=sky, wdisp=self.wdisp[sl],
                    wave=self.lam[sl])

    def header(self, plan: dict, seed: int) -> dict:
        """FITS keywords of the shifts of ``plan``'s spectrum ({} when every shift is neutral)."""
        h = self.shifts.header()
        if self.shifts.telluric:
            h["AIRMASS"] = round(plate_airmass(seed, plan["plate"], self.shifts.airmass), 4)
        return h


def _at(resolution, wave):
    """The resolving power at ``wave``: a number as it is, a function of wavelength evaluated there."""
    return resolution(wave) if callable(resolution) else resolution


def catalog_row(plan: dict, labels, cfg: SimConfig) -> dict:
    """The sppParams-like row of a realization: ADOP = truth + SSPP-like noise, truths kept."""
    star = labels.iloc[plan["star"]]
    sig = (cfg.teff_noise, cfg.feh_noise, cfg.logg_noise, cfg.rv_noise)
    true = (float(star.teff), float(star.feh), float(star.logg), plan["rv"])
    adop = [t + s * e for t, s, e in zip(true, sig, plan["noise"])]
    row = dict(PLATE=plan["plate"], MJD=plan["mjd"], FIBERID=plan["fiberid"])
    row.update({f"{name}_ADOP": a for name, a in zip(("TEFF", "FEH", "LOGG", "RV"), adop)})
    row.update({f"{name}_ADOP_UNC": s for name, s in zip(("TEFF", "FEH", "LOGG", "RV"), sig)})
    row.update(SNR=plan["snr"], EBV=plan["ebv"], STAR_ID=int(star.star_id))
    row.update(TEFF_TRUE=true[0], FEH_TRUE=true[1], LOGG_TRUE=true[2], RV_TRUE=true[3])
    return row


# ---------------------------------------------------------------------------- the survey

_SIM: Simulator | None = None  # one per worker process


def _init_worker(cfg_dict, shifts: Shifts = Shifts(), seed: int = 0, survey: str = "sdss"):
    global _SIM
    cfg = SimConfig.from_dict(cfg_dict)
    key = (cfg, shifts, seed if shifts.response or simulated(survey).response else None, survey)
    if _SIM is None or _SIM.key != key:  # kept between calls in one process (notebooks, tests)
        _SIM = Simulator(cfg, shifts, seed, survey)
        _SIM.key = key


def _run_chunk(out, seed, indices, survey: str = "sdss", write: bool = True):
    """Draw the plans of realizations ``indices`` and write their spectra, one file per group of plans (a DESI
    coadd: all or nothing); ``write=False``: only their catalog rows (files already there).

    Returns
    -------
    (list, dict, bool)
        [(index, None or error message)]; the survey's catalog rows of the spectra written
        (or already there) as columns {name: ndarray} plus ``_index`` and ``_star`` (STAR_ID):
        the main process keeps arrays, never a dict per spectrum; ``write``.
    """
    sim = simulated(survey)
    plans = [draw_plan(seed, int(i), len(_SIM.labels), _SIM.cfg) for i in indices]
    results, rows = [], []
    groups = {}
    for plan in plans:
        groups.setdefault(sim.spectrum_path(out, plan), []).append(plan)
    header = {"ORIGIN": f"stellarparams {__version__} simulate"
              + (f" --survey {survey}" if registry.get(survey).hashed_name else "")}
    for group in groups.values():
        items, failed = [], {}
        for plan in group:
            try:
                spec = _SIM.realize(plan, seed) if write else None
                items.append((plan["index"], plan, spec, catalog_row(plan, _SIM.labels, _SIM.cfg)))
            except Exception as e:  # recorded, the rest of the batch goes on
                failed[plan["index"]] = f"{type(e).__name__}: {e}"
        try:
            if failed:
                raise RuntimeError(f"{len(failed)} of its spectra failed")
            if write:
                sim.write_files(out, items, {**header, **_SIM.header(group[0], seed)})
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            failed = {p["index"]: failed.get(p["index"], f"not written ({why})") for p in group}
        results += [(p["index"], failed.get(p["index"])) for p in group]
        rows += [(i, row["STAR_ID"], sim.catalog_row(i, row)) for i, _, _, row in items if i not in failed]
    return results, _columns(rows), write


def _columns(rows: list) -> dict:
    """[(index, star, row dict)] -> {"_index", "_star", each row key: ndarray} (numpy's type of each column)."""
    cols = {"_index": np.array([i for i, _, _ in rows], np.int64), "_star": np.array([s for _, s, _ in rows], np.int64)}
    for name in (rows[0][2] if rows else ()):
        cols[name] = np.array([r[name] for _, _, r in rows])
    return cols


def _run_chunk_on_worker(init_args, out, seed, indices, survey: str = "sdss", write: bool = True):
    """:func:`_run_chunk` on a Dask worker: sets up the worker's simulator first (kept between chunks)."""
    _init_worker(*init_args)
    return _run_chunk(out, seed, indices, survey, write)


def simulated(survey: str):
    """The simulated writer of ``survey`` (:class:`stellarparams.surveys.base.Simulated`), else a ValueError."""
    try:
        sim = registry.get(survey).simulated
    except ValueError:  # not a survey at all
        sim = None
    if sim is None:
        raise ValueError(f"--survey {survey}: choose one of {', '.join(simulated_surveys())}")
    return sim


def simulated_surveys() -> tuple:
    """The surveys ``simulate`` can write."""
    return tuple(s for s in registry.names() if registry.get(s).simulated is not None)


def simulate(out, n: int = 20000, seed: int = 0, workers: int | None = None, teff_range=(4000, 9500),
             snr_range=(5, 100), progress: bool = True, wait: bool = False, response: str | None = None,
             telluric: float = 0.0, airmass=(1.0, 1.5), lsf: str | None = None, wave_offset: float = 0.0,
             sky_residual: float = 0.0, survey: str = "sdss", dask=None, run: Run | None = None, **options) -> Path:
    """Simulate ``n`` SDSS-like (or LAMOST-, DESI-like) spectra of MILES stars into folder ``out``; returns the catalog path.

    Resumes: spectra already in ``out`` are kept; the catalog (``out/sppParams.fits`` for
    SDSS; the survey's ``Simulated.catalog``) is (re)written last. A folder made with other settings is refused, so files from two
    settings never mix. One writer at a time (:func:`stellarparams.outputs.locked_output`).

    Parameters
    ----------
    out : str or Path
        Output folder.
    n : int
        Number of spectra.
    seed : int
        Random seed: same seed and settings, same files (any number of workers).
    workers : int or None
        Processes (default: all cores).
    teff_range, snr_range : tuple
        :class:`SimConfig` fields, as (lo, hi).
    progress : bool
        Progress bar and a summary line on stderr.
    wait : bool
        When another process writes to ``out``: False raises :class:`files.OutputBusy`, True waits.
    response, telluric, airmass, lsf, wave_offset, sky_residual
        Instrument and calibration shifts, as in :class:`Shifts`; the defaults are neutral
        and give today's files byte for byte.
    survey : str
        ``"sdss"`` (default: spec-lite files, sppParams), ``"lamost"`` (LRS DR8 files, the
        A/F/G/K catalog) or ``"desi"`` (coadds, an mwsall catalog): each survey's format,
        pixels, resolution and flux convention (the ``Simulated`` part of its module in :mod:`stellarparams.surveys`).
        ``resolution`` is SDSS's: another survey uses its own (``lsf`` still replaces it).
    dask : str or distributed.Client, optional
        Write the spectra on a Dask cluster instead of ``workers`` processes here:
        ``tcp://HOST:PORT``, ``local:N`` or a client (:mod:`stellarparams.engine`); the
        workers must share ``out``'s file system. Same files either way.
    run : Run, optional
        ``progress``, ``workers`` and ``dask`` as one object (:mod:`stellarparams.context`); when
        given, it replaces those three arguments.
    **options
        The other :class:`SimConfig` fields (e.g. ``rv_sigma=0, noise=False``).

    Returns
    -------
    Path
        The catalog: ``out/sppParams.fits``, ``out/LRS_stellar.fits`` or ``out/mwsall.fits``.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1 (got {n})")
    cfg = SimConfig(teff_range=tuple(float(t) for t in teff_range), snr_range=tuple(float(s) for s in snr_range),
                    **options)
    if simulated(survey).own_lsf and cfg.resolution != SimConfig().resolution:
        raise ValueError(f"--resolution is SDSS's; --survey {survey} has its own line-spread function "
                         "(docs/surveys.md); use --lsf to replace it")
    if response is not None and not response.startswith("legendre:"):
        response = str(Path(response).resolve())
    shifts = Shifts(response=response, telluric=float(telluric), airmass=tuple(airmass), lsf=lsf,
                    wave_offset=float(wave_offset), sky_residual=float(sky_residual))
    out = Path(out)
    run = run or Run(progress=progress, workers=workers, dask=dask)
    with run.cluster() as client:
        return _simulate(out, n, seed, cfg, shifts, wait, survey, run, client)


def _simulate(out: Path, n, seed, cfg: SimConfig, shifts: Shifts, wait, survey, run: Run, client) -> Path:
    """:func:`simulate` with checked settings, on ``client``'s cluster when given."""
    workers, progress = run.workers, run.progress
    settings = {"seed": int(seed), "config": cfg.to_dict()}
    if shifts.to_dict():  # absent for today's survey, whose simulate.json stays as it was
        settings["shifts"] = shifts.to_dict()
    sim = simulated(survey)
    if registry.get(survey).hashed_name:  # absent for SDSS, whose simulate.json stays as it was
        settings["survey"] = survey
    meta_path = out / "simulate.json"
    with locked_output(out, wait):
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if {k: old[k] for k in ("seed", "config", "shifts", "survey") if k in old} != settings:
                raise ValueError(f"{out} holds a simulation with other settings ({meta_path}); "
                                 "use a new --out folder or delete this one")
        write_text(meta_path, json.dumps({**settings, "n": int(n), "version": __version__}, indent=1))
        # half-written files of a killed run (we hold the lock: no other writer is at work)
        for tmp in {*out.glob(".*.tmp*"), *(out / "spectra").glob("lite/*/*.tmp"), *(out / "spectra").rglob(".*.tmp*")}:
            tmp.unlink()

        t0 = time.time()
        labels = miles_labels(cfg.teff_range)  # here first: a missing library says how to install it
        todo = _todo(out, n, sim)  # indices (int64): the spectra whose file is not finished
        check_disk(out, len(todo) * sim.file_bytes, f"{len(todo):,} simulated spectra")
        if client is not None:
            workers = max(1, engine.threads(client))
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
        size = max(1, min(200, -(-len(todo) // (4 * workers))))
        chunks = _chunks(out, n, todo, size, sim)
        failed, rows = _run_all(out, seed, survey, chunks, len(todo), workers, client,
                                (cfg.to_dict(), shifts, int(seed), survey), progress)
        meta = {"SEED": int(seed), "VERSION": __version__, "ORIGIN": "stellarparams simulate (MILES)"}
        order = np.argsort(rows.pop("_index"), kind="stable")
        n_rows, n_stars = len(order), len(np.unique(rows.pop("_star")))
        if not rows:  # no spectrum at all: the columns of a row, empty
            rows = {c: np.zeros(0) for c in sim.catalog_row(0, catalog_row(draw_plan(seed, 0, len(labels), cfg), labels,
                                                                           cfg))}
        cat = sim.write_catalog(out, {c: rows.pop(c)[order] for c in list(rows)}, meta)
        problems = out / "simulate_problems.json"
        if failed:
            write_text(problems, json.dumps({str(k): v for k, v in sorted(failed.items())}, indent=1))
        elif problems.exists():
            problems.unlink()
    if progress:
        print(f"simulate: {len(todo) - len(failed)} spectra written, {n - len(todo)} already there, "
              f"{len(failed)} failed{' (see ' + str(problems) + ')' if failed else ''}; "
              f"catalog {cat}: {n_rows} spectra of {n_stars} stars ({time.time() - t0:.0f} s)", file=sys.stderr)
    return cat


def _run_all(out, seed, survey, chunks, n_todo, workers, client, init_args, progress) -> tuple[dict, dict]:
    """Run ``chunks`` ((indices, write) pairs) here, in a pool or on the cluster, at most 2 per worker in flight.

    Returns ({index: error} of the failed spectra, the catalog columns of the others, concatenated, unordered).
    """
    from tqdm.auto import tqdm

    failed, parts = {}, []
    bar = tqdm(total=n_todo, desc="simulate", unit="spec", disable=not progress)

    def take(res):
        results, cols, write = res
        failed.update({i: e for i, e in results if e})
        parts.append(cols)
        if write:
            bar.update(len(results))

    if client is not None:  # on the cluster; the workers write into out (absolute: they may run elsewhere)
        calls = ((init_args, Path(engine.absolute(out)), seed, c, survey, w) for c, w in chunks)
        for res in engine.map_unordered(client, _run_chunk_on_worker, calls):
            take(res)
    elif workers == 1:
        _init_worker(*init_args)
        for c, w in chunks:
            take(_run_chunk(out, seed, c, survey, w))
    else:
        with worker_pool(workers, _init_worker, init_args) as pool:  # Ctrl-C kills the workers; a re-run resumes
            pending = set()
            for c, w in chunks:
                pending.add(pool.submit(_run_chunk, out, seed, c, survey, w))
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        take(f.result())
            for f in as_completed(pending):
                take(f.result())
    bar.close()
    cols = {}
    for name in list(next((p for p in parts if len(p["_index"])), parts[0] if parts else {})):
        cols[name] = np.concatenate([p.pop(name) for p in parts if name in p]) if parts else np.zeros(0)
    return failed, cols or {"_index": np.zeros(0, np.int64), "_star": np.zeros(0, np.int64)}


def _chunks(out, n: int, todo: np.ndarray, size: int, sim):
    """(indices, write) work chunks: the spectra to write (by file for a survey written a file at a time), then the
    ones already there, whose catalog rows are made again (``write`` False)."""
    if sim.chunk_by_file:  # one chunk per file (a DESI coadd): a file is written whole by one worker
        for group in _by_file(out, todo, sim):
            yield group, True
    else:
        for i in range(0, len(todo), size):
            yield todo[i:i + size], True
    there = np.setdiff1d(np.arange(n), todo)
    for i in range(0, len(there), 2000):
        yield there[i:i + 2000], False


def _by_file(out, indices, sim) -> list:
    """``indices`` grouped by the file that holds them (in order), as int64 arrays."""
    groups = {}
    for i in indices:
        groups.setdefault(sim.spectrum_path(out, place(int(i))), []).append(int(i))
    return [np.array(g, np.int64) for g in groups.values()]


def _todo(out, n: int, sim) -> np.ndarray:
    """The indices of the spectra whose file is not finished (missing, or a DESI coadd without all its targets)."""
    if not sim.chunk_by_file:  # one spectrum a file
        return np.array([i for i in range(n) if not sim.is_done(sim.spectrum_path(out, place(i)), 1)], np.int64)
    todo = [g for g in _by_file(out, range(n), sim) if not sim.is_done(sim.spectrum_path(out, place(int(g[0]))), len(g))]
    return np.concatenate(todo) if todo else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser):
    parser.description = ("Simulate an SDSS DR12-like survey from the MILES stars (sdss-mangadap): spectra in "
                          "OUT/spectra/lite/PLATE/spec-PLATE-MJD-FIBER.fits and the label catalog OUT/sppParams.fits "
                          "(noisy *_ADOP labels, true *_TRUE labels, STAR_ID). --survey lamost or desi writes the same "
                          "stars in that survey's files, pixels, resolution and flux convention, with its catalog "
                          "(docs/surveys.md, \"Simulated surveys\"). Re-running resumes.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--survey", choices=simulated_surveys(), default="sdss",
                        help="file format, pixels, resolution and catalog: sdss (spec-lite, R 2000, 3800-9200 A, "
                             "sppParams.fits), lamost (LRS DR8 one-row tables spec-LMJD-PLANID_spSS-FFF.fits, R 1800, "
                             "3700-9100 A, relative flux with a smooth instrument response, LRS_stellar.fits with "
                             "lower-case columns), desi (coadd-main-bright-PIXNUM.fits of 500 targets, B/R/Z arms "
                             "3600-9824 A, MILES' own resolution (DESI's is sharper), mwsall.fits). MILES stops at "
                             "7410 A: redder pixels are written with ivar 0 and a NODATA mask bit")
    parser.add_argument("--n", type=int, default=20000, help="number of spectra")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    engine.add_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    parser.add_argument("--wait", action="store_true", help="if another process writes to --out, wait for it "
                        "(default: stop with a message)")
    for f in dataclasses.fields(SimConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            parser.add_argument(flag, type=float, nargs=2, default=f.default, metavar=("LO", "HI"),
                                help=f.metadata["help"])
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    g = parser.add_argument_group("instrument and calibration shifts (sources of the ranges in "
                                  "docs/shifts.md). The defaults are neutral: today's survey, byte for byte")
    g.add_argument("--response", default=None, metavar="SPEC",
                   help="a fixed smooth instrument response, the same for every spectrum: legendre:AMP[:ORDER] "
                        "(drawn from --seed; AMP = rms of ln response over 3800-9200 A, 0-0.5, physical 0.02-0.2; "
                        "ORDER 1-10, default 5) or FILE (text, two columns: vacuum wavelength_A factor; "
                        "'#' comments; must cover 3800-9200 A)")
    g.add_argument("--telluric", type=float, default=0.0, metavar="FRAC",
                   help="fraction of the telluric O2 (A 7594-7621, B 6867-6884 A, air) and H2O (7160-7340, "
                        "8130-8350, 9300-9650 A) absorption left after correction: 0 none, 1 uncorrected, "
                        "<0 over-corrected; physical 0.05-0.3 for another pipeline's correction")
    g.add_argument("--airmass", type=float, nargs=2, default=(1.0, 1.5), metavar=("LO", "HI"),
                   help="airmass of each plate, uniform in LO-HI (1-3; LO = HI: fixed); telluric optical depth "
                        "scales with it; SDSS plates are observed near the meridian")
    g.add_argument("--lsf", default=None, metavar="SPEC",
                   help="line-spread function replacing --resolution's Gaussian: gauss:FWHM or gh:FWHM:H3:H4 "
                        "(Gauss-Hermite); FWHM in km/s of the Gaussian core, R = c/FWHM (SDSS/BOSS: 110-200 km/s, "
                        "R 2650-1500; allowed 30-600), |H3|, |H4| <= 0.3 (physical <= 0.1)")
    g.add_argument("--wave-offset", type=float, default=0.0, metavar="PIX",
                   help="systematic wavelength-solution error in pixels (1 pixel = 69 km/s), the same for all "
                        "spectra, sub-pixel allowed: features land PIX pixels redward (physical |PIX| <= 0.2; "
                        "allowed 5)")
    g.add_argument("--sky-residual", type=float, default=0.0, metavar="FRAC",
                   help="signed fraction of the sky lines left in the flux after sky subtraction (-1 to 1; "
                        "physical |FRAC| <= 0.05)")


def run_cli(args) -> int:
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig)}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    teff_range, snr_range = options.pop("teff_range"), options.pop("snr_range")
    cat = simulate(args.out, n=args.n, seed=args.seed, teff_range=teff_range, snr_range=snr_range, wait=args.wait,
                   response=args.response, telluric=args.telluric, airmass=tuple(args.airmass), lsf=args.lsf,
                   wave_offset=args.wave_offset, sky_residual=args.sky_residual, survey=args.survey,
                   run=Run.from_args(args), **options)
    print(cat)
    return 1 if (Path(args.out) / "simulate_problems.json").exists() else 0
