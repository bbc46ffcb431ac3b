"""Physics shared by every stage: the relativistic Doppler shift (one formula, one place).

1 + z = lambda_obs / lambda_rest = sqrt((1 + b) / (1 - b)),  b = v / c,
c = 299,792.458 km/s (exact: it defines the metre).
"""
from __future__ import annotations

import numpy as np

C_KMS = 299_792.458  # astropy.constants.c in km/s; a literal, so importing this costs no astropy (~0.2 s)


def doppler(rv_kms):
    """Relativistic Doppler factor 1+z = lambda_obs / lambda_rest for a radial velocity.

    Parameters
    ----------
    rv_kms : float or array
        Line-of-sight velocity in km/s (positive = receding).

    Returns
    -------
    float or ndarray
        1 + z, the same shape as ``rv_kms``.
    """
    b = np.asarray(rv_kms, np.float64) / C_KMS
    return np.sqrt((1.0 + b) / (1.0 - b))


def doppler_log_shift(rv_kms) -> float:
    """log10(1 + z): the shift of a log10-wavelength grid for a velocity in km/s."""
    return float(np.log10(doppler(float(rv_kms))))


def rv_from_z(z) -> float:
    """Radial velocity in km/s from a redshift z: the inverse of :func:`doppler` (NaN stays NaN)."""
    z = float(z)
    if not np.isfinite(z):
        return float("nan")
    a = (1.0 + z) ** 2
    return float((a - 1.0) / (a + 1.0) * C_KMS)
