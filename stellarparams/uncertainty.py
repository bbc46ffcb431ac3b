"""Calibrated per-star uncertainties and extrapolation flags (not in the paper; ours): what a
saved model needs to answer, and the fit of the coefficients from held-out residuals.
The out-of-fold models that feed that fit are trained in stellarparams.calibrate (this module
imports no training code).

sigma, per star and label, in physical units::

    sigma^2 = (a * s_mc)^2 + (b * noise)^2 + c^2          (scaled label units, then x IQR)

- ``s_mc``: epistemic part, the std of T Monte-Carlo-dropout passes (Gal & Ghahramani 2016).
  The T passes are the model's own forward pass with T fixed masks at every Dropout
  (``StellarNet.forward(x, dropout=FixedMasks(...))``): rows fan out into T copies at the
  first dropout, so with the paper's dropout (after the stem) the stem (4000 x 128, ~94% of
  the FLOPs) runs once and only blocks + heads run T times. Another architecture (a
  baseline) gets T full passes with hooks on its Dropout layers.
- ``noise``: the spectrum's own noise level from the DER_SNR estimator (Stoehr et al. 2008)
  on the prepared (standardized) flux: 1.482602/sqrt(6) median|2 f_i - f_{i-2} - f_{i+2}|,
  in units of the spectrum's std, i.e. the noise the network sees. Needs no catalog S/N.
- conformal factors: the residuals are not Gaussian (a few stars far off, many close), so no
  Gaussian sigma holds both the 68.3% and the 95.4% band. Per label and per quartile of the
  noise, k68 and k95 are the 68.3% and 95.4% quantiles of |residual| / sigma_raw on the same
  held-out residuals (split-conformal, normalised scores); the reported ``sigma`` is
  k68 x sigma_raw (a 68.3% interval) and the 95.4% interval is pred -+ k95 x sigma_raw
  (``lo95_<label>``, ``hi95_<label>``). Models calibrated before this have k68 = 1, k95 = 2.
- ``a, b, c >= 0`` per label: fitted by the Gaussian negative log-likelihood of residuals on
  stars the predicting model never saw: the validation split (final model) plus, by default,
  every training star predicted by one of K out-of-fold models (stellarparams.calibrate,
  ``calib_folds``). ``c`` absorbs what neither term explains (label noise of the catalog,
  model bias). Why the out-of-fold part: most of the error is per star, so what sets the
  tails is how many distinct stars the fit sees; validation alone (10% of the stars, also
  used to pick the best epoch) gives too-narrow tails.

Extrapolation flags, per spectrum:

- ``ood_score``: PCA (32 components, fitted on training flux) novelty, after the classic
  SIMCA/PCA-MSPC statistics. Q = mean squared reconstruction residual (structure no
  training star has: galaxy, quasar, scrambled flux); Q / noise_i^2, the same relative to
  the spectrum's own noise variance (structure above the noise that no training star has,
  e.g. lines of a much hotter or cooler star, at high S/N); a noise-aware Hotelling T^2,
  component k of spectrum i scaled by max(var_k - <noise^2>, 0) + noise_i^2 (a component
  holding only noise adds ~1, so noisy spectra do not set the threshold for clean ones).
  Each is divided by its 99.5th percentile on the validation split; ``ood_score`` = the
  largest of the three, ``flag_unlike_training`` = ood_score > 1.
- ``flag_label_hull``: the predicted labels (scaled) lie outside the convex hull of the
  training labels (like The Cannon's ``in_convex_hull``); scipy.spatial.Delaunay.

For `diagnose`: the quantiles of ``ood_score`` on the validation split (``stats``), and a
label -> spectrum emulator: a ridge fit of quadratic features of the model's own (scaled)
predictions to the training spectra, with the robust per-pixel scatter about it (what the
training spectra look like at given predicted labels).

Partial catalogs: each label's coefficients are fitted on the held-out rows that know it; the
label hull is the box of the per-label ranges when fewer than half the rows know every label;
a label with no known rows (a head kept from a source model) carries the source's coefficients.

Stored in the model folder: ``uncertainty.json`` (coefficients, thresholds, validation
coverage, the weights' sha256 it belongs to) and ``uncertainty.safetensors`` (PCA mean,
components, variances; training-label hull vertices; emulator). No pickle.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ._version import __version__
from .devices import module_device, to_device
from .files import write_bytes, write_text
from .records import sha256_bytes, sha256_file

UNC_JSON = "uncertainty.json"
UNC_TENSORS = "uncertainty.safetensors"
N_PASSES = 16            # MC-dropout passes (std of a std from 16 draws: ~18%; the fit of a absorbs its mean effect)
N_COMPONENTS = 32        # PCA components of the flux novelty score
OOD_QUANTILE = 99.5      # percentile of the validation scores that maps to ood_score = 1
MAX_PCA_ROWS = 20_000    # training rows used to fit the PCA
EMU_ROWS = 5_000         # ... and the label -> spectrum emulator (10 coefficients per pixel)
SIGNAL_FACTOR = 3.0      # a component counts as signal when its variance > this x the mean noise variance
DER_SNR_FACTOR = 1.482602 / math.sqrt(6.0)   # Stoehr et al. 2008: MAD->sigma for a 1,-2,1 (step 2) difference
SNR_EDGES = (0, 10, 20, 30, 50, np.inf)
NOISE_BINS = 4           # conformal scale factors per quantile bin of the spectrum's noise (a S/N proxy)
Q68, Q95 = 0.6827, 0.9545


# ---------------------------------------------------------------------- ingredients
def der_snr_noise(flux, stride: int = 4) -> np.ndarray:
    """flux (N, P) prepared spectra -> (N,) noise std per pixel, in units of the flux (DER_SNR).

    The median runs over every ``stride``-th pixel triplet (P/stride values: the median's
    relative error is ~1.25/sqrt(P/stride), 4% for 4000 pixels), 4x cheaper than all of them.
    """
    x = torch.as_tensor(np.asarray(flux, np.float32)) if not isinstance(flux, torch.Tensor) else flux.float()
    if x.shape[1] < 5:
        raise ValueError(f"DER_SNR needs at least 5 pixels per spectrum; got {x.shape[1]}")
    d = (2.0 * x[:, 2:-2:stride] - x[:, :-4:stride] - x[:, 4::stride]).abs()
    return (DER_SNR_FACTOR * d.median(dim=1).values).numpy().astype(np.float64)


def _dropouts(net):
    return [m for m in net.modules() if isinstance(m, nn.Dropout) and m.p > 0]


class FixedMasks:
    """T fixed dropout masks per Dropout layer: the ``dropout`` argument of StellarNet.forward.

    Mask t of a layer is the same for every spectrum, so sigma is a function of the
    spectrum alone (not of its batch neighbours) and the same on every run: T fixed
    "thinned" networks, the usual reading of MC dropout. Masks come from ``seed`` and the
    layer's position among the net's Dropout layers with p > 0. Called on (B, d) rows it
    fans them out into (T, B, d); on (T, B, d) it applies mask t to copy t.
    The masks are drawn on the CPU (the same on every device) and kept on the device of the
    rows they multiply, so the T passes run batched there.
    """

    def __init__(self, drops, n_passes, seed):
        self.index = {id(m): i for i, m in enumerate(drops)}
        self.T, self.seed, self.masks = n_passes, seed, {}

    def mask(self, layer, width, device="cpu"):
        """(T, width) mask of a Dropout layer, on ``device``."""
        i, device = self.index[id(layer)], torch.device(device)
        if (i, width, device) not in self.masks:
            g = torch.Generator().manual_seed(self.seed * 1000 + i)
            m = (torch.rand(self.T, width, generator=g) >= layer.p).float() / (1.0 - layer.p)
            self.masks[i, width, device] = m.to(device)
        return self.masks[i, width, device]

    def __call__(self, layer, x):
        if layer.p == 0:
            return x
        return x * self.mask(layer, x.shape[-1], x.device)[:, None, :]


def _hooked_passes(net, x, masks, drops):
    """T full passes of a network that takes no ``dropout`` argument (e.g. a baseline):
    forward hooks multiply each (eval-mode) Dropout output by mask t. (T, B, L)."""
    draws = []
    for t in range(masks.T):
        handles = [m.register_forward_hook(lambda mod, inp, out, t=t: out * masks.mask(mod, out.shape[-1], out.device)[t])
                   for m in drops]
        try:
            draws.append(net(x))
        finally:
            for h in handles:
                h.remove()
    return torch.stack(draws)


@torch.inference_mode()
def mc_predict(net, x, n_passes: int = N_PASSES, seed: int = 0):
    """Deterministic prediction and MC-dropout std, both (B, L) float32 in scaled units.

    Parameters
    ----------
    net : torch.nn.Module
        A :class:`stellarparams.model.StellarNet` (its one forward pass runs the T masked
        passes, fanning out at the first dropout: the stem runs once) or any module
        (then T full passes with hooks on its Dropout layers).
    x : torch.Tensor
        (B, P) float32, on the net's device (the passes run there).

    Returns
    -------
    (pred, std) : torch.Tensor, torch.Tensor
        The usual eval-mode output (dropout off, so predictions do not change when
        uncertainties are on) and the std over the T passes (0 without dropout in the net).
    """
    net.eval()
    drops = _dropouts(net)
    native = hasattr(net, "features") and hasattr(net, "tail")
    h = net.features(x) if native else x
    pred = net.tail(h) if native else net(x)
    if not drops or n_passes < 2:
        return pred, torch.zeros_like(pred)
    masks = FixedMasks(drops, n_passes, seed)
    draws = net.tail(h, masks) if native else _hooked_passes(net, x, masks, drops)
    return pred, draws.std(dim=0)


def fit_variance(resid, s_mc, noise):
    """Fit sigma^2 = (a s_mc)^2 + (b noise)^2 + c^2 to residuals by Gaussian NLL.

    resid, s_mc: (N,) scaled units (NaN residuals are ignored); noise: (N,).
    Returns (a, b, c) >= 0 (parametrised as exp(.), so the fit is unconstrained).
    """
    from scipy.optimize import minimize

    ok = np.isfinite(resid) & np.isfinite(s_mc) & np.isfinite(noise)
    r2, m2, n2 = resid[ok] ** 2, s_mc[ok] ** 2, noise[ok] ** 2
    if len(r2) < 3:
        raise ValueError(f"only {len(r2)} validation rows with a known label; cannot calibrate the uncertainties")
    tiny = 1e-12

    def nll(p):
        a2, b2, c2 = np.exp(2 * p)
        var = a2 * m2 + b2 * n2 + c2 + tiny
        val = 0.5 * np.mean(np.log(var) + r2 / var)
        g = 0.5 * (1 / var - r2 / var ** 2)                  # d nll / d var, per row
        grad = np.array([np.mean(g * m2) * 2 * a2, np.mean(g * n2) * 2 * b2, np.mean(g) * 2 * c2])
        return val, grad

    v = np.mean(r2)   # start: each term explains a third of the variance
    p0 = 0.5 * np.log([v / 3 / max(np.mean(m2), tiny), v / 3 / max(np.mean(n2), tiny), v / 3])
    res = minimize(nll, np.clip(p0, -30, 30), jac=True, method="L-BFGS-B", bounds=[(-30, 30)] * 3)
    a, b, c = np.exp(res.x)
    return float(a), float(b), float(c)


def coverage(y_true, y_pred, sigma, ks=(1, 2)) -> dict:
    """Fraction of known labels with |pred - true| <= k sigma, per label column: {k: (L,) array}."""
    y_true, y_pred, sigma = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (y_true, y_pred, sigma))
    ok = np.isfinite(y_true) & np.isfinite(y_pred) & np.isfinite(sigma)
    z = np.abs(y_pred - y_true) / np.where(ok, sigma, 1.0)
    n = ok.sum(0)
    return {k: np.where(n > 0, ((z <= k) & ok).sum(0) / np.maximum(n, 1), np.nan) for k in ks}


def coverage_table(y_true, y_pred, sigma, snr, label_names, edges=SNR_EDGES, half95=None) -> pd.DataFrame:
    """Coverage at 1 and 2 sigma (and of the 95.4% interval) per label, for all rows and per S/N bin.

    One row per (bin, label): snr_lo, snr_hi (NaN for 'all'), label, n, cov1, cov2, cov95
    (NaN without ``half95``, the (N, L) half-widths of the 95.4% interval), median_sigma
    (physical units). Targets: cov1 0.683, cov95 0.954 (and cov2 0.954 for a Gaussian sigma).
    """
    y_true, y_pred, sigma = (np.asarray(a, np.float64) for a in (y_true, y_pred, sigma))
    half95 = np.full_like(sigma, np.nan) if half95 is None else np.asarray(half95, np.float64)
    snr = np.asarray(snr, np.float64)
    bins = [(np.nan, np.nan, np.ones(len(snr), bool))]
    bins += [(lo, hi, np.isfinite(snr) & (snr >= lo) & (snr < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    rows = []
    for lo, hi, sel in bins:
        if not sel.any():
            continue
        cov = coverage(y_true[sel], y_pred[sel], sigma[sel])
        cov95 = coverage(y_true[sel], y_pred[sel], half95[sel], ks=(1,))[1]
        for j, name in enumerate(label_names):
            n = int((np.isfinite(y_true[sel, j]) & np.isfinite(sigma[sel, j])).sum())
            rows.append({"snr_lo": lo, "snr_hi": hi, "label": name, "n": n, "cov1": cov[1][j], "cov2": cov[2][j],
                         "cov95": cov95[j], "median_sigma": float(np.nanmedian(sigma[sel, j])) if n else np.nan})
    return pd.DataFrame(rows, columns=["snr_lo", "snr_hi", "label", "n", "cov1", "cov2", "cov95", "median_sigma"])


def format_coverage(table: pd.DataFrame) -> str:
    """Plain-text coverage table: one line per S/N bin, coverage of sigma and of the 95.4% interval
    (of 2 sigma for a table without it) per label (targets 68.3% / 95.4%)."""
    labels = list(dict.fromkeys(table["label"]))
    wide = "cov95" in table and table["cov95"].notna().any()
    col = "cov95" if wide else "cov2"
    head = f"{'S/N bin':12s} {'n':>6s} " + " ".join(f"{l + (' 1s/95%' if wide else ' 1s/2s'):>16s}" for l in labels)
    lines = [f"coverage of |pred - label| within sigma and {'the 95% interval' if wide else '2 sigma'} "
             "(target 68.3% +- 5 / 95.4% +- 3)", head]
    for (lo, hi), g in table.groupby(["snr_lo", "snr_hi"], dropna=False, sort=False):
        name = "all" if not np.isfinite(lo) else f"{lo:g}-{hi:g}"
        cells = [f"{100 * r.cov1:6.1f}% /{100 * getattr(r, col):5.1f}%" for r in g.itertuples()]
        lines.append(f"{name:12s} {int(g['n'].max()):6d} " + " ".join(f"{c:>16s}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------- the calibration object
@dataclass
class Uncertainty:
    """What turns a network's output into sigma and flags. Arrays in scaled label units.

    a, b, c: (L,) coefficients of sigma^2 = (a s_mc)^2 + (b noise)^2 + c^2 (scaled units)
    pca_mean (P,), pca_components (K, P), pca_var (K,): flux novelty model
    q_ref, t2_ref, qn_ref: 99.5th percentiles of Q, T^2 and Q/noise^2 on the validation split
    hull_points (M, L): vertices of the convex hull of the scaled training labels
    """

    label_names: list
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    pca_mean: np.ndarray
    pca_components: np.ndarray
    pca_var: np.ndarray
    q_ref: float
    t2_ref: float
    hull_points: np.ndarray
    n_passes: int = N_PASSES
    seed: int = 0
    n_signal: int = 0                              # components in T^2 (0: all)
    noise_var: float = 0.0                         # mean DER_SNR noise variance of the training spectra
    qn_ref: float = 1.0
    stats: dict = field(default_factory=dict)      # validation coverage etc.
    version: str = __version__
    noise_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))   # (NOISE_BINS - 1,) bin edges
    k68: np.ndarray = None                         # (L, NOISE_BINS) conformal factor of the 68.3% interval
    k95: np.ndarray = None                         # (L, NOISE_BINS) ... of the 95.4% interval
    emu_coef: np.ndarray = None                    # (F, P) label -> spectrum emulator (emulator_features), or None
    emu_scatter: np.ndarray = None                 # (P,) robust scatter of the training spectra about it
    _hull: object = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ use
    def novelty(self, flux, noise=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """flux (N, P) -> (Q, Q / noise^2, T2), each (N,): PCA residual power, the same relative
        to the spectrum's own noise variance (DER_SNR; pass ``noise`` (N,) if already known),
        and the noise-aware Hotelling T^2."""
        x = torch.as_tensor(np.asarray(flux, np.float32)) if not isinstance(flux, torch.Tensor) else flux.float()
        W = torch.as_tensor(self.pca_components, dtype=torch.float64)
        mu = torch.as_tensor(self.pca_mean, dtype=torch.float64)
        # components are orthonormal: |x - mu|^2 = |z|^2 + |residual|^2, so no reconstruction is
        # needed; in float64, as Q is the small difference of two sums over ~4000 squares
        xd = x.double()
        z = xd @ W.T - mu @ W.T                                           # (N, K)
        xc2 = xd.pow(2).sum(1) - 2 * (xd @ mu) + mu.pow(2).sum()
        z2 = z.pow(2)
        q = (xc2 - z2.sum(1)).clamp(min=0) / x.shape[1]
        k = self.n_signal or len(self.pca_var)
        noise = der_snr_noise(x) if noise is None else np.asarray(noise, np.float64)
        n2 = torch.as_tensor(noise ** 2)[:, None]
        signal_var = torch.as_tensor(np.maximum(self.pca_var[:k] - self.noise_var, 0.0))
        t2 = (z2[:, :k] / (signal_var + n2 + 1e-12)).sum(1)
        return q.numpy(), (q / (n2[:, 0] + 1e-12)).numpy(), t2.numpy()

    def ood_score(self, flux, noise=None) -> np.ndarray:
        """(N,) novelty score: > 1 means less like the training spectra than 99.5% of held-out stars."""
        q, qn, t2 = self.novelty(flux, noise)
        return np.maximum.reduce([q / self.q_ref, qn / self.qn_ref, t2 / self.t2_ref])

    def in_hull(self, y_scaled) -> np.ndarray:
        """(N, L) scaled labels -> (N,) bool, True inside the training labels' convex hull."""
        y = np.asarray(y_scaled, np.float64).reshape(len(y_scaled), self.hull_points.shape[1])
        ok = np.isfinite(y).all(1)
        inside = np.zeros(len(y), bool)
        if y.shape[1] == 1:
            lo, hi = self.hull_points.min(), self.hull_points.max()
            inside[ok] = (y[ok, 0] >= lo) & (y[ok, 0] <= hi)
            return inside
        if self._hull is None:
            from scipy.spatial import Delaunay, QhullError

            try:
                self._hull = Delaunay(self.hull_points)
            except QhullError:  # degenerate training labels (e.g. a few points): per-label ranges instead
                self._hull = False
        if self._hull is False:
            lo, hi = self.hull_points.min(0), self.hull_points.max(0)
            inside[ok] = ((y[ok] >= lo) & (y[ok] <= hi)).all(1)
        elif ok.any():
            inside[ok] = self._hull.find_simplex(y[ok]) >= 0
        return inside

    def raw_sigma(self, s_mc, noise) -> np.ndarray:
        """(N, L) MC std and (N,) noise -> (N, L) sqrt((a s_mc)^2 + (b noise)^2 + c^2), scaled units."""
        s_mc = np.asarray(s_mc, np.float64)
        noise = np.asarray(noise, np.float64)[:, None]
        return np.sqrt((self.a * s_mc) ** 2 + (self.b * noise) ** 2 + self.c ** 2)

    def _factor(self, k, noise, default: float) -> np.ndarray:
        """(N, L) conformal factor of each row's noise bin (``default`` for a model without them)."""
        noise = np.asarray(noise, np.float64)
        if k is None:
            return np.full((len(noise), len(self.label_names)), default)
        return np.asarray(k)[:, np.searchsorted(self.noise_edges, noise)].T

    def sigma_scaled(self, s_mc, noise) -> np.ndarray:
        """(N, L) MC std and (N,) noise -> (N, L) sigma in scaled units: the 68.3% half-width."""
        return self.raw_sigma(s_mc, noise) * self._factor(self.k68, noise, 1.0)

    def halfwidth95(self, s_mc, noise) -> np.ndarray:
        """(N, L) half-width of the 95.4% interval, scaled units."""
        return self.raw_sigma(s_mc, noise) * self._factor(self.k95, noise, 2.0)

    def emulate(self, y_scaled) -> np.ndarray:
        """(N, L) scaled labels -> (N, P) what training spectra look like there (the emulator's spectrum)."""
        return emulator_features(y_scaled) @ np.asarray(self.emu_coef, np.float64)

    def summary(self, seconds: float) -> str:
        """One line: what the sigmas were fitted on, how long it took, the coverage there."""
        s = self.stats
        return (f"uncertainties calibrated on {s['calibrated_on']} in {seconds:.0f} s; there "
                + ", ".join(f"{n} within sigma {100 * s['cal_cov1'][n]:.0f}%, within the 95% interval "
                            f"{100 * s.get('cal_cov95', s['cal_cov2'])[n]:.0f}%" for n in self.label_names))

    # ------------------------------------------------------------------ files
    def save(self, folder, weights_sha256: str = "") -> list:
        """Write uncertainty.safetensors then uncertainty.json (each atomically) into ``folder``.

        Parameters
        ----------
        folder : str or Path
            The model folder.
        weights_sha256 : str
            sha256 of the weights this calibration belongs to (recorded in the JSON).

        Returns
        -------
        list of str
            The names of the two files written.
        """
        from safetensors.numpy import save

        folder = Path(folder)
        tensors = {"pca_mean": self.pca_mean, "pca_components": self.pca_components, "pca_var": self.pca_var,
                   "hull_points": self.hull_points}
        if self.emu_coef is not None:
            tensors.update(emu_coef=self.emu_coef, emu_scatter=self.emu_scatter)
        data = save({k: np.ascontiguousarray(v, np.float32 if k in ("pca_mean", "pca_components", "emu_coef",
                                                                    "emu_scatter") else np.float64)
                     for k, v in tensors.items()})
        write_bytes(folder / UNC_TENSORS, data)
        meta = {"method": "MC dropout + DER_SNR noise, sigma^2 = (a s_mc)^2 + (b noise)^2 + c^2 (scaled units), "
                          "fitted by Gaussian NLL on the residuals of "
                          + self.stats.get("calibrated_on", "the validation split") + "; flux novelty: PCA Q and T^2",
                "label_names": list(self.label_names), "a": list(map(float, self.a)), "b": list(map(float, self.b)),
                "c": list(map(float, self.c)), "n_passes": self.n_passes, "seed": self.seed,
                "n_components": int(len(self.pca_var)), "n_signal": self.n_signal, "noise_var": self.noise_var,
                "qn_ref": self.qn_ref, "q_ref": self.q_ref, "t2_ref": self.t2_ref,
                "noise_edges": list(map(float, self.noise_edges)),
                "k68": None if self.k68 is None else np.asarray(self.k68).tolist(),
                "k95": None if self.k95 is None else np.asarray(self.k95).tolist(),
                "ood_quantile": OOD_QUANTILE, "stats": self.stats, "stellarparams_version": self.version,
                "weights_sha256": weights_sha256, "tensors_sha256": sha256_bytes(data)}
        write_text(folder / UNC_JSON, json.dumps(meta, indent=1) + "\n")
        return [UNC_TENSORS, UNC_JSON]

    @classmethod
    def load(cls, folder) -> tuple["Uncertainty", dict]:
        """(Uncertainty, its JSON) from a model folder; ValueError naming the file if damaged."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / UNC_JSON).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder / UNC_JSON}: cannot read ({e})") from e
        if not (folder / UNC_TENSORS).exists() or sha256_file(folder / UNC_TENSORS) != meta.get("tensors_sha256"):
            raise ValueError(f"{folder / UNC_TENSORS}: missing or does not match {UNC_JSON}")
        t = load_file(folder / UNC_TENSORS)
        return cls(meta["label_names"], np.array(meta["a"]), np.array(meta["b"]), np.array(meta["c"]),
                   t["pca_mean"], t["pca_components"], t["pca_var"], float(meta["q_ref"]),
                   float(meta["t2_ref"]), t["hull_points"], int(meta["n_passes"]), int(meta["seed"]),
                   int(meta.get("n_signal", 0)), float(meta.get("noise_var", 0.0)), float(meta.get("qn_ref", 1.0)),
                   meta.get("stats", {}), meta.get("stellarparams_version", ""),
                   np.array(meta.get("noise_edges", [])), _array_or_none(meta.get("k68")),
                   _array_or_none(meta.get("k95")), t.get("emu_coef"), t.get("emu_scatter")), meta


def _array_or_none(v):
    return None if v is None else np.array(v, np.float64)


def weighted_quantile(x, w, q) -> np.ndarray:
    """Quantiles ``q`` of the values ``x`` (N,) weighted by ``w`` (N,) >= 0: for each q the smallest x
    whose cumulative weight (in increasing order of x) reaches q of the total."""
    order = np.argsort(x)
    cum = np.cumsum(np.asarray(w, np.float64)[order])
    i = np.searchsorted(cum, np.asarray(q) * cum[-1])
    return np.asarray(x)[order][np.minimum(i, len(x) - 1)]


def conformal_factors(r, sigma_raw, noise, bins: int = NOISE_BINS, min_rows: int = 30, weights=None):
    """Split-conformal scale factors of held-out residuals.

    Parameters
    ----------
    r, sigma_raw : (N, L) arrays
        Residuals and raw sigmas (scaled units); NaN residuals are ignored.
    noise : (N,) array
        Each row's noise (DER_SNR), binned by its quantiles.
    bins : int
        Noise bins.
    min_rows : int
        A bin with fewer known residuals takes the factors of all rows.
    weights : (N,) array, optional
        Weighted split-conformal under covariate shift (Tibshirani et al. 2019): each row's
        weight, e.g. the density ratio p_target(x) / p_source(x); the factors are then weighted
        quantiles (:func:`weighted_quantile`). None: plain quantiles.

    Returns
    -------
    (edges, k68, k95)
        (bins - 1,) noise edges; (L, bins) 68.27% and 95.45% quantiles of |r| / sigma_raw.
    """
    noise = np.asarray(noise, np.float64)
    weights = None if weights is None else np.asarray(weights, np.float64)
    edges = np.quantile(noise[np.isfinite(noise)], np.linspace(0, 1, bins + 1)[1:-1]) if len(noise) else np.zeros(0)
    b = np.searchsorted(edges, noise)
    z = np.abs(np.asarray(r, np.float64)) / np.asarray(sigma_raw, np.float64)
    L = z.shape[1]
    k68, k95 = np.ones((L, bins)), np.full((L, bins), 2.0)
    quantiles = ((lambda sel, j: np.quantile(z[sel, j], [Q68, Q95])) if weights is None else
                 (lambda sel, j: weighted_quantile(z[sel, j], weights[sel], [Q68, Q95])))
    for j in range(L):
        ok = np.isfinite(z[:, j])
        if not ok.any():
            continue
        all68, all95 = quantiles(ok, j)
        for i in range(bins):
            sel = ok & (b == i)
            k68[j, i], k95[j, i] = quantiles(sel, j) if sel.sum() >= min_rows else (all68, all95)
    return edges, k68, k95


def emulator_features(y_scaled) -> np.ndarray:
    """(N, L) scaled labels -> (N, F) quadratic features 1, y_j, y_j y_k (j <= k), labels clipped to +-5."""
    y = np.clip(np.asarray(y_scaled, np.float64), -5, 5)
    L = y.shape[1]
    return np.column_stack([np.ones(len(y)), y] + [y[:, j] * y[:, k] for j in range(L) for k in range(j, L)])


def fit_emulator(flux, y_scaled, alpha: float = 1e-3):
    """Ridge fit of a quadratic label -> spectrum emulator on training spectra.

    flux: (N, P) prepared training spectra; y_scaled: (N, L) the model's own predictions for
    them (scaled units: so the emulator is what training spectra look like *at the labels the
    model assigns*, which every label has, even one the catalog lacks). Returns (coef (F, P),
    scatter (P,)): the robust (1.4826 MAD) scatter of the training spectra about the emulator.
    """
    F = emulator_features(y_scaled)
    X = np.asarray(flux, np.float32)
    coef = np.linalg.solve(F.T @ F + alpha * len(F) * np.eye(F.shape[1]), (F.T @ X).astype(np.float64))
    r = X - (F @ coef).astype(np.float32)
    scatter = 1.482602 * np.median(np.abs(r - np.median(r, 0)), 0)
    return coef.astype(np.float32), np.maximum(scatter, 1e-6).astype(np.float32)


def label_hull(y_scaled, ranges_scaled) -> tuple[np.ndarray, str]:
    """(M, L) hull points of the training labels, and what they are.

    The convex hull of the rows that know every label when they are at least half of the rows
    that know any (and more than L + 1); else (a partial catalog) the box of the per-label
    ranges ``ranges_scaled`` (L, 2): every corner, 2^L points.
    """
    from itertools import product

    from scipy.spatial import ConvexHull, QhullError

    y = np.asarray(y_scaled, np.float64)
    L = y.shape[1]
    full = y[np.isfinite(y).all(1)]
    if len(full) > L + 1 and len(full) >= 0.5 * np.isfinite(y).any(1).sum():
        try:
            return (full[ConvexHull(full).vertices] if L > 1 else np.array([[full.min()], [full.max()]])), "convex hull"
        except QhullError:   # degenerate (e.g. too few points): keep all points
            return full, "convex hull"
    r = np.asarray(ranges_scaled, np.float64)
    return np.array(list(product(*r))), "box of the per-label ranges (a partial catalog)"


def _carried(carry, label: str, edges):
    """(a, b, c, k68 (bins,), k95 (bins,)) of ``label`` in a source calibration ``carry``, its conformal factors
    read at the middle of each of this calibration's noise bins."""
    j = carry.label_names.index(label)
    mids = np.r_[edges[:1], (edges[1:] + edges[:-1]) / 2, edges[-1:]] if len(edges) else np.zeros(NOISE_BINS)
    def at(k, default):
        return np.full(len(mids), default) if k is None else np.asarray(k)[j, np.searchsorted(carry.noise_edges, mids)]
    return carry.a[j], carry.b[j], carry.c[j], at(carry.k68, 1.0), at(carry.k95, 2.0)


# ---------------------------------------------------------------------- fitting
def raw_uncertainty(net, flux, n_passes=N_PASSES, seed=0, batch_size=4096):
    """Run the net with MC dropout over flux (N, P): (pred, s_mc) (N, L) scaled, noise (N,).
    Each batch runs on the net's device."""
    x = torch.as_tensor(np.asarray(flux, np.float32)) if not isinstance(flux, torch.Tensor) else flux.float()
    x, dev = x.cpu(), module_device(net)
    preds, stds = [], []
    for i in range(0, len(x), batch_size):
        p, s = mc_predict(net, to_device(x[i:i + batch_size], dev), n_passes, seed)
        preds.append(p.cpu().numpy())
        stds.append(s.cpu().numpy())
    L = len(getattr(net, "labels", [])) or (preds[0].shape[1] if preds else 0)
    cat = (lambda a: np.concatenate(a).astype(np.float64)) if preds else (lambda a: np.zeros((0, L)))
    return cat(preds), cat(stds), der_snr_noise(x) if len(x) else np.zeros(0)


def fit_uncertainty(model, flux_train, y_train, flux_val, y_val, *, n_passes=N_PASSES, seed=0,
                    n_components=N_COMPONENTS, oof=None, carry=None, conformal_weights=None,
                    rescale_oof: bool = True) -> Uncertainty:
    """Calibrate a trained Model: sigma coefficients on held-out residuals, novelty model on
    train (+ val thresholds), and the label -> spectrum emulator of `diagnose`.

    flux_*: (N, P) prepared flux; y_*: (N, L) physical labels in model.label_names order
    (NaN = missing: each label is calibrated on the rows that know it). oof: optional
    out-of-fold predictions of training stars, dict(pred, s_mc, y) (M, L) physical units and
    noise (M,); their residuals join the validation ones in the sigma fit. With ``rescale_oof``
    and the fold models' predictions of the validation rows (``val_pred``, ``val_fold``, ``fold``,
    as :func:`stellarparams.calibrate.out_of_fold` gives them), each fold model's residuals are
    first multiplied, per label, by the ratio of the final model's 68.3% quantile of |residual|
    on the validation rows to that fold model's on the same rows (clipped to 0.5-2): a fold
    model, trained on fewer stars, errs more than the final one when the training set is small,
    and the same stars make the ratio free of their difficulty (``stats["oof_rescaled"]``). carry: the
    calibration of the model this one was fine-tuned from (same scaler): a label with fewer
    than 3 known held-out residuals takes its coefficients and conformal factors from there
    (``stats["carried_from_source"]``; an approximation: the trunk under that head changed).
    conformal_weights: optional (N_val + M,) weights of the held-out rows (validation first, then
    out-of-fold) for the conformal factors (:func:`conformal_factors`); the sigma coefficients
    are fitted unweighted.
    Returns an :class:`Uncertainty` (also set it as ``model.uncertainty``).
    """
    from sklearn.decomposition import PCA

    y_val = np.asarray(y_val, np.float64)
    pred, s_mc, noise = raw_uncertainty(model.net, flux_val, n_passes, seed)
    resid = pred - (y_val - model.center) / model.scale
    r_fit, m_fit, n_fit = resid, s_mc, noise
    rescaled = None
    if oof is not None:
        r_oof = (np.asarray(oof["pred"]) - np.asarray(oof["y"], np.float64)) / model.scale
        if rescale_oof and "val_pred" in oof:
            r_oof, rescaled = _rescaled_oof(r_oof, oof, resid, y_val, model.scale)
        m_oof = np.asarray(oof["s_mc"]) / model.scale
        r_fit, m_fit, n_fit = np.vstack([resid, r_oof]), np.vstack([s_mc, m_oof]), np.concatenate([noise, oof["noise"]])
    n_known = np.isfinite(r_fit).sum(0)
    carried = [n for j, n in enumerate(model.label_names)
               if n_known[j] < 3 and carry is not None and n in carry.label_names]
    abc = np.array([_carried(carry, n, np.zeros(0))[:3] if n in carried else fit_variance(r_fit[:, j], m_fit[:, j], n_fit)
                    for j, n in enumerate(model.label_names)])
    # flux novelty: PCA on (up to MAX_PCA_ROWS) training spectra, thresholds from held-out val
    flux_train = np.asarray(flux_train, np.float32)
    rows = np.random.default_rng(seed).permutation(len(flux_train))[:MAX_PCA_ROWS]
    k = int(min(n_components, len(rows) - 1, flux_train.shape[1]))
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(flux_train[np.sort(rows)])
    noise_var = float(np.mean(der_snr_noise(flux_train[rows[:5000]]) ** 2))
    n_signal = max(1, int(np.sum(pca.explained_variance_ > SIGNAL_FACTOR * noise_var)))
    # training labels' hull (scaled); the per-label ranges for a partial catalog
    yt = (np.asarray(y_train, np.float64) - model.center) / model.scale
    ranges = [(np.asarray(model.label_ranges.get(n, [np.nan, np.nan]), np.float64) - model.center[j]) / model.scale[j]
              for j, n in enumerate(model.label_names)]
    hull, hull_kind = label_hull(yt, ranges)
    u = Uncertainty(list(model.label_names), abc[:, 0], abc[:, 1], abc[:, 2], pca.mean_.astype(np.float32),
                    pca.components_.astype(np.float32), pca.explained_variance_.astype(np.float64), 1.0, 1.0,
                    hull, n_passes, seed, 0, noise_var)
    u.noise_edges, u.k68, u.k95 = conformal_factors(r_fit, u.raw_sigma(m_fit, n_fit), n_fit, weights=conformal_weights)
    for n in carried:
        j = model.label_names.index(n)
        u.k68[j], u.k95[j] = _carried(carry, n, u.noise_edges)[3:]
    q, qn, t2 = u.novelty(flux_val, noise)
    u.q_ref, u.qn_ref, u.t2_ref = (float(np.percentile(v, OOD_QUANTILE)) for v in (q, qn, t2))
    val_ood = np.maximum.reduce([q / u.q_ref, qn / u.qn_ref, t2 / u.t2_ref])
    # what training spectra look like at the labels the model gives them (stellarparams.diagnose)
    fit_rows = np.sort(rows[:EMU_ROWS])
    u.emu_coef, u.emu_scatter = fit_emulator(flux_train[fit_rows], raw_uncertainty(model.net, flux_train[fit_rows], 0)[0])
    sigma = u.sigma_scaled(s_mc, noise)
    cov = coverage(resid, np.zeros_like(resid), sigma)
    cal = coverage(r_fit, np.zeros_like(r_fit), u.sigma_scaled(m_fit, n_fit))
    cal95 = coverage(r_fit, np.zeros_like(r_fit), u.halfwidth95(m_fit, n_fit), ks=(1,))[1]
    n_oof = 0 if oof is None else len(oof["noise"])
    u.stats = {"calibrated_on": (f"{n_oof} out-of-fold training + " if n_oof else "") + f"{len(y_val)} validation spectra",
               "n_val": int(len(y_val)), "n_oof": int(n_oof),
               "cal_cov1": dict(zip(model.label_names, map(float, cal[1]))),
               "cal_cov2": dict(zip(model.label_names, map(float, cal[2]))),
               "cal_cov95": dict(zip(model.label_names, map(float, cal95))),
               "val_cov1": dict(zip(model.label_names, map(float, cov[1]))),
               "val_cov2": dict(zip(model.label_names, map(float, cov[2]))),
               "val_median_sigma": {n: float(np.nanmedian(sigma[:, j]) * model.scale[j])
                                    for j, n in enumerate(model.label_names)},
               "pca_explained_variance_ratio": float(pca.explained_variance_ratio_.sum()),
               "n_signal_components": n_signal, "label_hull": hull_kind,
               "n_known": dict(zip(model.label_names, map(int, n_known))),
               "val_ood_quantiles": [float(v) for v in np.percentile(val_ood, np.arange(101))]}
    if rescaled is not None:
        u.stats["oof_rescaled"] = dict(zip(model.label_names, rescaled))
        u.stats["calibrated_on"] += ("; the out-of-fold residuals rescaled to the final model's error on the "
                                     "validation stars (x " + ", ".join(f"{v:.2f}" for v in rescaled) + ")")
    if conformal_weights is not None:
        u.stats["calibrated_on"] += "; conformal factors weighted by the given density ratios"
    if carried:
        u.stats["carried_from_source"] = carried
        u.stats["calibrated_on"] += (f"; {', '.join(carried)}: no known labels here, its sigma coefficients are the "
                                     "source model's (carried; the trunk under that head changed)")
    return u


def _rescaled_oof(r_oof, oof, resid_val, y_val, scale):
    """(out-of-fold residuals (M, L) with each fold model's multiplied by its ratio per label, (L,) the mean
    ratio over folds): the final model's 68.3% quantile of |residual| on the validation rows (``resid_val``,
    scaled units) over the fold model's on the same rows (``y_val`` physical; NaN = unknown), clipped to
    [0.5, 2]."""
    import warnings

    r_oof, fold, val_fold = r_oof.copy(), np.asarray(oof["fold"]), np.asarray(oof["val_fold"])
    val_pred = np.asarray(oof["val_pred"], np.float64)
    with warnings.catch_warnings():   # a label no validation row knows: ratio 1
        warnings.simplefilter("ignore", RuntimeWarning)
        q_final = np.nanquantile(np.abs(resid_val), Q68, axis=0)
        q_folds = [np.nanquantile(np.abs((val_pred[val_fold == k] - y_val) / scale), Q68, axis=0)
                   for k in np.unique(fold)]
    ratios = []
    for k, q_fold in zip(np.unique(fold), q_folds):
        ratio = np.clip(q_final / np.where(q_fold > 0, q_fold, np.nan), 0.5, 2.0)
        ratio = np.where(np.isfinite(ratio), ratio, 1.0)
        r_oof[fold == k] *= ratio
        ratios.append(ratio)
    return r_oof, [round(float(v), 3) for v in np.mean(ratios, 0)]


def fit_novelty(u: Uncertainty, flux_ref, flux_held, noise_held=None, *, seed: int = 0,
                n_components: int = N_COMPONENTS):
    """Fit ``u``'s flux novelty model (``ood_score``): PCA on (up to MAX_PCA_ROWS of) ``flux_ref`` (N, P),
    thresholds = the 99.5th percentiles on the held-out ``flux_held`` (M, P) (its DER_SNR noise
    ``noise_held`` (M,) when known). Sets u's PCA fields, noise_var and the thresholds; returns
    (the fitted sklearn PCA, the number of components whose variance is signal)."""
    from sklearn.decomposition import PCA

    flux_ref = np.asarray(flux_ref, np.float32)
    rows = np.random.default_rng(seed).permutation(len(flux_ref))[:MAX_PCA_ROWS]
    k = int(min(n_components, len(rows) - 1, flux_ref.shape[1]))
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(flux_ref[np.sort(rows)])
    u.pca_mean, u.pca_components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
    u.pca_var = pca.explained_variance_.astype(np.float64)
    u.noise_var = float(np.mean(der_snr_noise(flux_ref[rows[:5000]]) ** 2))
    u.n_signal = 0   # T^2 over every component
    q, qn, t2 = u.novelty(flux_held, noise_held)
    u.q_ref, u.qn_ref, u.t2_ref = (float(np.percentile(v, OOD_QUANTILE)) for v in (q, qn, t2))
    return pca, max(1, int(np.sum(pca.explained_variance_ > SIGNAL_FACTOR * u.noise_var)))


def predict_full(net, center, scale, u, flux, batch_size: int = 4096) -> dict:
    """Labels, sigmas and flags for prepared flux; everything in physical units.

    Parameters
    ----------
    net : torch.nn.Module
        (B, P) flux -> (B, L) scaled labels.
    center, scale : (L,) arrays
        The target scaler: label = scaled x scale + center.
    u : Uncertainty or None
        The calibration (None: NaN sigmas and ood_score).
    flux : array or torch.Tensor
        (N, P) prepared flux; N may be 0. A row with a NaN or inf pixel cannot be predicted:
        its labels are NaN, its ood_score inf and flag_unlike_training True (with a warning).

    Returns
    -------
    dict
        "pred" (N, L), "sigma" (N, L) (the 68.3% half-width; NaN without calibration), "lo95" and
        "hi95" (N, L) (the 95.4% interval), "ood_score" (N,),
        "flag_unlike_training" (N,) bool, "flag_label_hull" (N,) bool.
    """
    import warnings

    x = torch.as_tensor(np.asarray(flux, np.float32)) if not isinstance(flux, torch.Tensor) else flux.float().cpu()
    n, L = len(x), len(center)
    if n == 0:
        return {"pred": np.zeros((0, L)), "sigma": np.zeros((0, L)), "lo95": np.zeros((0, L)),
                "hi95": np.zeros((0, L)), "ood_score": np.zeros(0),
                "flag_unlike_training": np.zeros(0, bool), "flag_label_hull": np.zeros(0, bool)}
    bad = ~torch.isfinite(x).all(1).numpy()
    if bad.any():
        warnings.warn(f"{int(bad.sum())} of {n} spectra have NaN or inf flux: their labels are NaN and they are "
                      "flagged unlike training (flag_unlike_training)", stacklevel=3)
    if u is None:
        pred = forward(net, x, L, batch_size).astype(np.float64)
        return {"pred": pred * scale + center, "sigma": np.full((n, L), np.nan),
                "lo95": np.full((n, L), np.nan), "hi95": np.full((n, L), np.nan),
                "ood_score": np.where(bad, np.inf, np.nan), "flag_unlike_training": bad,
                "flag_label_hull": np.zeros(n, bool)}
    pred, s_mc, noise = raw_uncertainty(net, x, u.n_passes, u.seed, batch_size)
    ood = u.ood_score(x, noise)
    ood[bad] = np.inf
    half95 = u.halfwidth95(s_mc, noise) * scale
    pred = pred * scale + center
    return {"pred": pred, "sigma": u.sigma_scaled(s_mc, noise) * scale, "lo95": pred - half95, "hi95": pred + half95,
            "ood_score": ood, "flag_unlike_training": ood > 1,
            "flag_label_hull": ~u.in_hull((pred - center) / scale) & np.isfinite(pred).all(1)}


@torch.inference_mode()
def forward(net, x: torch.Tensor, n_out: int, batch_size: int = 4096) -> np.ndarray:
    """(N, P) float32 flux (CPU) -> (N, n_out) float32 scaled labels: ``net`` in eval mode, on its own device."""
    net.eval()
    dev = module_device(net)
    out = np.empty((x.shape[0], n_out), np.float32)
    for i in range(0, x.shape[0], batch_size):
        out[i:i + batch_size] = net(to_device(x[i:i + batch_size], dev)).cpu().numpy()
    return out
