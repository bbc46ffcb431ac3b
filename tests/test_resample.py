"""The resampling kernel gives SciPy's CubicSpline values: knots, edges, gaps of masked pixels."""
import numpy as np
import pytest
from scipy.interpolate import CubicSpline

from stellarparams.spectrum import Record, pixmask
from stellarparams.dataset import Grid
from stellarparams.physics import doppler_log_shift
from stellarparams.preprocess import PrepareConfig, preprocess
from stellarparams.resample import cubic_spline


def _close(a, b):
    """Equal to rounding (on the development machine they are equal bit for bit)."""
    tol = 1e-6 if b.dtype == np.float32 else 1e-13
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b[np.isfinite(b)]).max())


@pytest.mark.parametrize("n", [4, 5, 7, 50, 4600])
def test_matches_scipy_on_random_knots(n):
    rng = np.random.default_rng(n)
    x = np.cumsum(rng.uniform(0.1, 2.0, n))
    y = rng.normal(0, 1, n)
    inside = np.sort(rng.uniform(x[0], x[-1], 3 * n))
    at = np.concatenate([[x[0]], inside, x, [x[-1]]])  # both edges and every knot exactly
    _close(cubic_spline(x, y, at), CubicSpline(x, y)(at))


def test_matches_scipy_on_a_spectrum_with_masked_pixels():
    n = 3800  # 3.5790-3.9589: inside the grid at both ends
    loglam = 3.5790 + 1e-4 * np.arange(n)
    lam = 10 ** loglam
    flux = 100 * (lam / 5000) ** -2 * (1 - 0.6 * np.exp(-0.5 * ((lam - 6564.6) / 4) ** 2))
    flux += np.random.default_rng(0).normal(0, 1, n)
    good = np.ones(n, bool)
    good[[0, 1, 500, 1200, n - 1]] = False       # single masked pixels, at both ends too
    good[2000:2040] = False                      # a gap wider than the validity reach
    x, y = loglam[good] - 2e-4, flux[good]       # a rest-frame shift off the pixel grid
    at = np.clip(Grid().loglam, x[0], x[-1])     # the grid reaches past both ends: clamped
    assert (at == x[0]).sum() > 10 and (at == x[-1]).sum() > 10
    _close(cubic_spline(x, y, at), CubicSpline(x, y)(at))


def test_preprocess_equals_the_scipy_reference():
    """preprocess with the kernel = the documented recipe written with CubicSpline (flux, validity, sigma)."""
    n = 3900
    rng = np.random.default_rng(1)
    loglam = 3.5790 + 1e-4 * np.arange(n)
    flux = (50 + 10 * np.sin(loglam * 300) + rng.normal(0, 1, n)).astype(np.float32)
    ivar = rng.uniform(0.5, 2, n).astype(np.float32)
    mask = np.zeros(n, np.int32)
    mask[300:310] = pixmask("NODATA")
    ivar[1000] = 0
    flux[1500] = np.nan
    spec = Record(loglam, flux, ivar, mask, 1, 2, 3, "STAR")
    got, valid, sigma = preprocess(spec, 37.0, PrepareConfig(), return_sigma=True)

    good = spec.good()
    x = loglam[good] - doppler_log_shift(37.0)
    at = np.clip(Grid().loglam, x[0], x[-1])
    ref = CubicSpline(x, flux[good].astype(np.float64), extrapolate=False)(at)
    _close(got, ((ref - ref.mean()) / ref.std()).astype(np.float32))
    noise = np.interp(at, x, 1 / np.sqrt(ivar[good].astype(np.float64))) / ref.std()
    _close(sigma, np.where(valid, noise, np.inf).astype(np.float32))

