"""The per-spectrum transform shared by ``prepare``, ``predict`` and the model folder (docs/method.md steps 1-4).

Per spectrum (:func:`preprocess`):
1. drop pixels with ivar == 0, a bad ``and_mask`` bit or non-finite flux (never zeros);
2. rest frame: loglam_rest = loglam_obs - log10(1+z), 1+z = sqrt((1+b)/(1-b)), b = RV/c;
3. one not-a-knot cubic spline through the good pixels (SciPy's ``CubicSpline``, bit for bit:
   :func:`resample.cubic_spline`), evaluated on the common grid, with the ends clamped
   (nearest available flux outside the spectrum's coverage);
4. standardize: subtract the mean over the P grid pixels, divide by the population std.

:class:`PrepareConfig` holds the options (the grid, the bad-pixel bits, the catalog columns),
and :func:`config_from_model` takes a trained model's grid and flux options (``--grid-from``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .dataset import Grid
from .physics import doppler_log_shift
from .resample import cubic_spline
from .spectrum import DEFAULT_BAD_MASK, SENTINEL, Record, SpectrumError

MAX_GAP_PIX = 2.0  # a grid pixel farther than this many native pixels from good data is not valid
LOGLAM_RANGE = (3.0, 4.7)  # 1000 A - 5 um: anything outside is a damaged wavelength solution


@dataclass
class PrepareConfig:
    """Preprocessing options; the defaults are the paper's (docs/method.md).

    grid: common log10-wavelength grid (4000 pixels, 3.5754-3.9670)
    bad_mask: SPPIXMASK bits that make a pixel unusable (DEFAULT_BAD_MASK)
    min_coverage: fraction of grid pixels that must come from good data, else "low_coverage"
    rest_frame: shift to the rest frame with the catalog RV (km/s) before resampling
    labels: our label name -> catalog column
    rv_column: catalog column with the heliocentric radial velocity, km/s
    reject_classes: spectrum CLASS values rejected as "not_a_star"
    """

    grid: Grid = field(default_factory=Grid)
    bad_mask: int = DEFAULT_BAD_MASK
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
    training data; it is read as JSON (this module sits below the model layer). Label and RV
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


def preprocess(spec: Record, rv_kms: float, config: PrepareConfig = PrepareConfig(),
               return_sigma: bool = False, return_offset: bool = False):
    """Resample one spectrum onto the common rest-frame grid and standardize it.

    Parameters
    ----------
    spec : Record
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
    SpectrumError
        Reasons: missing_rv, bad_wavelength, nonfinite_flux, no_good_pixels, too_few_pixels,
        low_coverage, constant_flux.
    """
    path = spec.path
    problem = getattr(spec, "problem", None)  # found by the reader (spectrum.Record)
    if problem:
        raise SpectrumError(path, *problem)
    loglam = np.asarray(spec.loglam, np.float64)
    flux = np.asarray(spec.flux)
    good = spec.good(config.bad_mask) & np.isfinite(loglam)
    n_nonfinite = int(np.count_nonzero(~np.isfinite(flux) & (spec.ivar > 0)))
    n_good = int(np.count_nonzero(good))
    if n_good == 0:
        if n_nonfinite:
            raise SpectrumError(path, "nonfinite_flux", f"{n_nonfinite} pixels with ivar > 0 have NaN/inf flux")
        raise SpectrumError(path, "no_good_pixels", "every pixel has ivar == 0 or a bad and_mask bit")
    if n_good < 4:
        raise SpectrumError(path, "too_few_pixels", f"{n_good} good pixels, a cubic spline needs 4")
    x = loglam[good]
    y = flux[good].astype(np.float64)
    dx = np.diff(x)
    if not np.isfinite(loglam[[0, -1]]).all() or not (dx > 0).all():
        raise SpectrumError(path, "bad_wavelength", "loglam is not finite and strictly increasing")
    if not (LOGLAM_RANGE[0] < x[0] and x[-1] < LOGLAM_RANGE[1]):
        raise SpectrumError(path, "bad_wavelength", f"loglam {x[0]:.4g}-{x[-1]:.4g} is not an optical spectrum "
                                 f"(log10 Angstrom between {LOGLAM_RANGE[0]} and {LOGLAM_RANGE[1]})")
    if config.rest_frame:
        if rv_kms is None or not np.isfinite(rv_kms) or rv_kms <= SENTINEL:
            raise SpectrumError(path, "missing_rv", f"RV = {rv_kms}")
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
            raise SpectrumError(path, "nonfinite_flux", f"{n_nonfinite} NaN/inf pixels; {why}")
        raise SpectrumError(path, "low_coverage", why)

    mean, std = out.mean(), out.std()
    if not np.isfinite(std) or std <= 1e-12 * max(abs(mean), 1e-30):
        raise SpectrumError(path, "constant_flux", f"std {std:.3g} over the grid")
    result = [((out - mean) / std).astype(np.float32), valid]
    if return_sigma:
        noise = np.interp(at, x, 1.0 / np.sqrt(spec.ivar[good].astype(np.float64))) / std
        result.append(np.where(valid, noise, np.inf).astype(np.float32))
    if return_offset:
        result.append(float(mean / std))
    return tuple(result)
