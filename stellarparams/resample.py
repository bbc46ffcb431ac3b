"""Resampling kernels of ``prepare``: the not-a-knot cubic spline of SciPy, without its overhead.

:func:`cubic_spline` gives the values of ``scipy.interpolate.CubicSpline(x, y)`` (not-a-knot
ends) at points inside ``[x[0], x[-1]]``. It builds the same tridiagonal system for the
slopes, solves it with the same LAPACK routine (``gtsv``, what ``scipy.linalg.solve_banded``
calls for one band on each side) and evaluates each cubic with the same formula in the
same order as SciPy's ``PPoly``, so the result equals SciPy's to the last bit (a test checks
it). It costs less than half of ``CubicSpline``: no input checks (the caller guarantees them),
no ``PPoly`` object, and at start-up it loads SciPy's compiled LAPACK module alone (~0.02 s)
instead of importing ``scipy.interpolate`` (~0.25 s) or ``scipy.linalg`` (~0.12 s). It is
loaded when this module is imported, so that forked workers have it.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import numpy as np


def _load_dgtsv():
    """LAPACK ``dgtsv`` from ``scipy.linalg._flapack``, without running ``scipy.linalg``'s imports."""
    if "scipy.linalg._flapack" in sys.modules:
        return sys.modules["scipy.linalg._flapack"].dgtsv
    spec = importlib.util.find_spec("scipy")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES if spec and spec.submodule_search_locations else ():
        path = Path(spec.submodule_search_locations[0], "linalg", "_flapack" + suffix)
        if path.is_file():
            try:
                lapack = importlib.util.spec_from_file_location("scipy.linalg._flapack", path)
                module = importlib.util.module_from_spec(lapack)
                lapack.loader.exec_module(module)
                return module.dgtsv
            except (ImportError, AttributeError):
                break
    from scipy.linalg.lapack import dgtsv  # the ordinary way

    return dgtsv


dgtsv = _load_dgtsv()


def cubic_spline(x: np.ndarray, y: np.ndarray, xnew: np.ndarray) -> np.ndarray:
    """The not-a-knot cubic spline through ``(x, y)`` at ``xnew``, as ``CubicSpline(x, y)(xnew)``.

    Parameters
    ----------
    x : (n,) float64 array
        Knots, finite and strictly increasing, n >= 4.
    y : (n,) float64 array
        Finite values at the knots.
    xnew : (m,) float64 array
        Points inside ``[x[0], x[-1]]`` (clip them first: nothing is extrapolated).

    Returns
    -------
    (m,) float64 array
    """
    n = len(x)
    dx = np.diff(x)
    slope = np.diff(y) / dx
    # slopes s at the knots: SciPy's banded system (rows 0/1/2 = upper/main/lower diagonal)
    du = np.empty(n - 1)
    d = np.empty(n)
    dl = np.empty(n - 1)
    b = np.empty(n)
    d[1:-1] = 2 * (dx[:-1] + dx[1:])
    du[1:] = dx[:-1]
    dl[:-1] = dx[1:]
    b[1:-1] = 3 * (dx[1:] * slope[:-1] + dx[:-1] * slope[1:])
    w = x[2] - x[0]  # not-a-knot at the start
    d[0], du[0] = dx[1], w
    b[0] = ((dx[0] + 2 * w) * dx[1] * slope[0] + dx[0] ** 2 * slope[1]) / w
    w = x[-1] - x[-3]  # and at the end
    d[-1], dl[-1] = dx[-2], w
    b[-1] = (dx[-1] ** 2 * slope[-2] + (2 * w + dx[-1]) * dx[-2] * slope[-1]) / w
    _, _, _, s, info = dgtsv(dl, d, du, b, True, True, True, True)
    if info != 0:
        raise np.linalg.LinAlgError(f"cubic spline: gtsv info {info}")
    # Hermite cubic of interval i, as PPoly coefficients c0..c3 (highest power first)
    i = np.minimum(np.searchsorted(x, xnew, side="right") - 1, n - 2)
    h, sl, s0, s1 = dx[i], slope[i], s[i], s[i + 1]
    t = (s0 + s1 - 2 * sl) / h
    c0 = t / h
    c1 = (sl - s0) / h - t
    u = xnew - x[i]
    u2 = u * u
    return ((y[i] + s0 * u) + c1 * u2) + c0 * (u2 * u)  # PPoly's order of operations
