"""On-the-fly physical augmentation of prepared spectra, and a continuum-normalised input.

Every function works on a batch ``x`` (B, P) of *standardized* flux on the common
rest-frame grid, uniform in log10(lambda) with pixel step ``dloglam`` (the default
grid: 3.5754-3.9670 in 4000 pixels, step 9.79e-5 dex = 67.6 km/s per pixel).

Multiplicative effects (reddening, flux-calibration / instrument response, tellurics)
act on the *flux*, not on the standardized numbers. A prepared spectrum is
x = (f - m) / s with m, s the mean and std of the resampled flux f over the grid, so
f / s = x + m / s. The functions that multiply take ``offset`` = m / s per row (B,)
(:func:`to_flux` / :func:`restandardize`), apply the effect to x + offset and
standardize the result again, exactly as ``prepare`` would have done with the distorted
spectrum. Without the true offset they cannot know where zero flux is.

All functions are pure: they return new tensors and draw random numbers only from the
``generator`` they are given. Parameters that vary per spectrum are (B,) tensors, so
the caller decides the distributions; the ``draw_*`` helpers give the documented ones.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .physics import doppler

DLOGLAM = (3.9670 - 3.5754) / 3999  # log10 A per pixel of the default grid
TELLURIC_BANDS = (  # (centre A, FWHM A, relative depth): O2 B, H2O, O2 A, H2O, H2O (vacuum, approximate)
    (6880.0, 30.0, 1.0), (7220.0, 120.0, 0.6), (7620.0, 40.0, 1.0), (8230.0, 160.0, 0.5), (9350.0, 250.0, 1.0))


# --------------------------------------------------------------------------- flux <-> standardized

def to_flux(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Standardized flux (B, P) and offset m/s (B,) -> flux in units of the original std, f / s."""
    return x + offset[:, None]


def restandardize(f: torch.Tensor):
    """Flux (B, P) -> (standardized flux (B, P), new offset mean/std (B,)), as ``prepare`` does
    (mean 0 and population std 1 over the P pixels)."""
    m, s = _moments(f)
    return (f - m) / s, (m / s)[:, 0]


def _moments(f: torch.Tensor):
    """Row mean and population std, (B, 1) each: sqrt(E[f^2] - E[f]^2) in float64 accumulators
    (torch's two-pass std is ~10x slower and these are the augmentation's hot path)."""
    m = f.mean(1, keepdim=True, dtype=torch.float64)
    var = (f * f).mean(1, keepdim=True, dtype=torch.float64) - m * m
    return m.to(f.dtype), var.clamp(min=1e-24).sqrt().to(f.dtype)


# --------------------------------------------------------------------------- wavelength shift

def shift(x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Move each spectrum by ``pixels`` (B,) grid pixels toward the red (sub-pixel allowed).

    Physical parameter: a residual radial velocity v = pixels * ln(10) * dloglam * c
    (67.6 km/s per pixel on the default grid) or a wavelength-solution offset of the same
    size. Range used in training: |pixels| <= 1 (catalog RV errors are ~2 km/s = 0.03 px,
    wavelength solutions of another pipeline differ by up to ~0.5 px). Linear interpolation
    between pixels; the ends are clamped (like ``prepare``'s spline clamps). Works on
    standardized flux directly (a shift commutes with the per-spectrum standardization up to
    the edge pixels).
    """
    B, P = x.shape
    d = pixels.to(torch.float64)
    if len(d) and float(d.abs().max()) <= 1:  # the training range: neighbours only, no index arrays
        w = d.to(x.dtype)[:, None]
        left = torch.cat([x[:, :1], x[:, :-1]], 1)     # x[i-1]
        right = torch.cat([x[:, 1:], x[:, -1:]], 1)    # x[i+1]
        return x + w.clamp(min=0) * (left - x) + (-w).clamp(min=0) * (right - x)
    k = torch.floor(d)                                  # x[i - d] = w x[i-k-1] + (1 - w) x[i-k], w = d - k
    w = (d - k).to(x.dtype)[:, None]
    hi = torch.arange(P, device=x.device)[None, :] - k.long()[:, None]
    lo = (hi - 1).clamp(0, P - 1)
    return torch.gather(x, 1, lo) * w + torch.gather(x, 1, hi.clamp(0, P - 1)) * (1 - w)


def velocity_to_pixels(v_kms, dloglam: float = DLOGLAM):
    """Radial velocity (km/s) -> shift in grid pixels (relativistic Doppler)."""
    return np.log10(doppler(v_kms)) / dloglam


# --------------------------------------------------------------------------- smooth distortions

@functools.lru_cache(maxsize=16)
def legendre_basis(n_pix: int, order: int, dtype=torch.float32) -> torch.Tensor:
    """(order, P) Legendre polynomials P_1..P_order over the grid mapped to [-1, 1]."""
    t = np.linspace(-1.0, 1.0, n_pix)
    return torch.tensor(np.polynomial.legendre.legvander(t, order)[:, 1:].T.copy(), dtype=dtype)


def continuum_distortion(x: torch.Tensor, offset: torch.Tensor, coeffs: torch.Tensor):
    """Multiply the flux by 1 + sum_k coeffs[:, k-1] P_k(t), t in [-1, 1] across the grid.

    Physical parameter: a smooth flux-calibration error or instrument response, as
    ``simulate`` step 5 draws it (Legendre P_1..P_3, coefficients N(0, 0.02)); a change of
    spectrograph or reduction is ~0.06 up to order 5. Training range: coefficients
    N(0, sigma) with sigma <= 0.1, order <= 5. The factor is clipped at 0.2 from below.
    ``coeffs`` (B, K). Returns (standardized flux, new offset).
    """
    basis = legendre_basis(x.shape[1], coeffs.shape[1], x.dtype).to(x.device)
    factor = (1.0 + coeffs.to(x.dtype) @ basis).clamp(min=0.2)
    return restandardize(to_flux(x, offset) * factor)


def extinction_curve(loglam, rv_dust: float = 3.1) -> np.ndarray:
    """A(lambda) / E(B-V) of the G23 law (Gordon et al. 2023, ``dust_extinction``) at 10**loglam A,
    the curve ``simulate`` reddens with."""
    from astropy import units as u
    from dust_extinction.parameter_averages import G23

    lam = 10 ** np.asarray(loglam, np.float64)
    return -2.5 * np.log10(G23(Rv=rv_dust).extinguish(lam * u.AA, Ebv=1.0))


def redden(x: torch.Tensor, offset: torch.Tensor, ebv: torch.Tensor, curve: torch.Tensor):
    """Multiply the flux by 10**(-0.4 * ebv * curve): extra reddening of E(B-V) = ``ebv`` (B,) mag.

    ``curve`` (P,) is A(lambda)/E(B-V) on the grid (:func:`extinction_curve`). Negative ebv
    de-reddens. Physical range: the survey has E(B-V) exponential with mean 0.05 mag, clipped
    at 0.5; training uses ebv ~ U(-0.05, 0.15). Returns (standardized flux, new offset).
    """
    factor = torch.pow(10.0, -0.4 * ebv.to(x.dtype)[:, None] * curve.to(x.dtype)[None, :])
    return restandardize(to_flux(x, offset) * factor)


def telluric(x: torch.Tensor, offset: torch.Tensor, depth: torch.Tensor, loglam: torch.Tensor,
             bands=TELLURIC_BANDS):
    """Multiply the flux by 1 - depth * sum_b d_b G_b(lambda): residual telluric absorption
    (depth > 0, under-corrected) or emission (depth < 0, over-corrected) of the O2 and H2O bands.

    ``depth`` (B,) is the residual at the core of a band of relative depth 1; bands are Gaussians of
    the given FWHM (A) at their vacuum centres (rest frame ~ observed: RVs move them < 2 px).
    ``loglam`` (P,) is log10 of the grid wavelengths (A).
    The bands do not overlap, so the product is the sum of the profiles (:func:`telluric_profile`).
    Physical range: an uncorrected O2 B band at airmass 1.2 is ~0.3 deep; partial-correction
    residuals are |depth| <= 0.1. Returns (standardized flux, new offset).
    """
    prof = telluric_profile(loglam, bands).to(x.dtype).to(x.device)
    trans = 1.0 - depth.to(x.dtype)[:, None] * prof[None, :]
    return restandardize(to_flux(x, offset) * trans.clamp(min=0.05))


def telluric_profile(loglam: torch.Tensor, bands=TELLURIC_BANDS) -> torch.Tensor:
    """(P,) sum over bands of relative depth x Gaussian(centre, FWHM) at 10**loglam A (bands do not overlap)."""
    lam = 10 ** loglam.to(torch.float64)
    prof = torch.zeros_like(lam)
    for c, fwhm, d in bands:
        prof = prof + d * torch.exp(-0.5 * ((lam - c) / (fwhm / 2.3548)) ** 2)
    return prof


# --------------------------------------------------------------------------- resolution

def broaden(x: torch.Tensor, sigma_pix: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Convolve each spectrum with a near-Gaussian kernel of std ``sigma_pix`` (B,) pixels (0 = unchanged).

    Physical parameter: extra line-spread width. On the default grid the survey's LSF
    (R = 2000) has sigma = 1/(R ln10 2.3548 dloglam) = 0.94 px; R = 1500 needs an extra
    sqrt(1.25^2 - 0.94^2) = 0.83 px. Training range: U(0, 1) px.
    The kernel is ``passes`` (at least sigma^2) repeated 3-tap blurs [v/2, 1 - v, v/2] with
    v = sigma^2 / passes: its variance is exactly sigma^2 and it tends to a Gaussian (a heat-
    equation step), at a few element-wise operations per pass instead of a per-row convolution.
    Edge pixels are replicated. Linear in the flux; the result is standardized again.
    """
    var = sigma_pix.to(x.dtype).clamp(min=0) ** 2
    passes = max(passes, int(math.ceil(float(var.max()))) if len(var) else passes)  # v <= 1: kernel >= 0
    half_v = (var / passes / 2)[:, None]
    out = x
    for _ in range(passes):
        lap = torch.empty_like(out)                       # discrete Laplacian, edges replicated
        lap[:, 1:-1] = out[:, 2:] + out[:, :-2] - 2 * out[:, 1:-1]
        lap[:, 0] = out[:, 1] - out[:, 0]
        lap[:, -1] = out[:, -2] - out[:, -1]
        out = torch.addcmul(out, half_v, lap)
    m, sd = _moments(out)
    return (out - m) / sd


# --------------------------------------------------------------------------- bad pixels and noise

def mask_runs(x: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, max_len: int = 32) -> torch.Tensor:
    """Replace runs of pixels by the straight line between their neighbours, as ``prepare``'s
    spline bridges pixels it has no good data for (bad columns, sky-line residuals, cosmic rays).

    ``starts``, ``lengths`` (B, R) integers: R runs per spectrum (length 0 = no run; at most
    ``max_len`` pixels). Physical range: cosmic rays 1-3 px, bright sky-line residuals ~5-10 px,
    bad columns up to ~30 px; training uses up to 5 runs of 1-30 px. Only the runs' windows
    are touched, so the cost does not grow with the number of pixels.
    Returns the bridged flux (not restandardized: a few pixels change the moments negligibly).
    """
    B, P = x.shape
    out = x.clone()
    k = torch.arange(max_len, device=x.device)[None, :]
    for r in range(starts.shape[1]):
        a = starts[:, r].clamp(0, P - 1)[:, None]
        n = lengths[:, r].clamp(0, max_len)[:, None]
        b = (a + n).clamp(max=P)                       # exclusive end
        left, right = (a - 1).clamp(min=0), b.clamp(max=P - 1)
        idx = (a + k).clamp(max=P - 1)                 # (B, max_len) the window
        yl, yr = out.gather(1, left), out.gather(1, right)
        line = yl + (yr - yl) * (idx - left).to(x.dtype) / (right - left).clamp(min=1).to(x.dtype)
        inside = (a + k < b)
        out.scatter_(1, idx, torch.where(inside, line, out.gather(1, idx)))
    return out


def add_noise(x: torch.Tensor, sigma: torch.Tensor, scale: torch.Tensor, generator=None) -> torch.Tensor:
    """Add Gaussian noise of std ``scale`` (B,) x ``sigma`` (B, P) to each pixel.

    ``sigma`` is the spectrum's own per-pixel error resampled onto the grid, in standardized
    units (error / s). scale = 1 doubles the variance (S/N / sqrt(2)); the training range
    U(0, 1) spans S/N from the observed one to 0.7 of it.
    """
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # drawn on the CPU
    return x + noise * sigma.to(x.dtype) * scale.to(x.dtype)[:, None]


# --------------------------------------------------------------------------- label-space mixup

def mix(xa: torch.Tensor, oa: torch.Tensor, xb: torch.Tensor, ob: torch.Tensor, lam: torch.Tensor):
    """Blend two batches of spectra: lam * a + (1 - lam) * b of the flux, each divided by its mean.

    A new star between two stars with nearby labels: its labels are the same blend of theirs
    (``lam`` (B,) in [0, 1]). Each spectrum is first divided by its mean flux (f / m = x / offset + 1)
    so that the blend does not depend on how bright either star was, then standardized again.

    Returns
    -------
    (standardized flux (B, P), offset (B,))
    """
    fa = xa / oa.clamp(min=1e-3)[:, None] + 1.0
    fb = xb / ob.clamp(min=1e-3)[:, None] + 1.0
    lam = lam[:, None].to(xa.dtype)
    return restandardize(lam * fa + (1.0 - lam) * fb)


class Neighbours:
    """For every training row, the rows of the ``k`` stars nearest to its star in label space.

    Stars are the distinct ``star_ids``; a star's labels are the mean over its rows (NaN = unknown,
    filled with the label's mean for the distance); distances are in units of each label's spread.
    :meth:`draw` picks, per row, one of its star's k neighbour stars and one of that star's rows.
    Rows of one star share labels, so a partner from another star gives a new point in label space.
    """

    def __init__(self, star_ids, y, k: int = 4):
        from sklearn.neighbors import NearestNeighbors

        stars, self.star_of = np.unique(np.asarray(star_ids), return_inverse=True)
        if len(stars) < 2:
            raise ValueError("label-space mixup needs at least 2 training stars")
        y = np.asarray(y, np.float64)
        mean = np.zeros((len(stars), y.shape[1]))
        for j in range(y.shape[1]):
            ok = np.isfinite(y[:, j])
            s = np.bincount(self.star_of[ok], y[ok, j], len(stars))
            n = np.bincount(self.star_of[ok], minlength=len(stars))
            mean[:, j] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
        mean = (mean - np.nanmean(mean, 0)) / np.maximum(np.nanstd(mean, 0), 1e-12)
        mean = np.nan_to_num(mean)
        self.k = min(int(k), len(stars) - 1)
        _, nbr = NearestNeighbors(n_neighbors=self.k + 1).fit(mean).kneighbors(mean)
        # drop the star itself (normally the first column; duplicates of its labels may come first)
        own = np.arange(len(stars))[:, None]
        nbr = np.array([[m for m in row if m != i][:self.k] for i, row in zip(own[:, 0], nbr)])
        self.nbr = torch.from_numpy(nbr)
        self.order = torch.from_numpy(np.argsort(self.star_of, kind="stable"))
        count = np.bincount(self.star_of, minlength=len(stars))
        self.start = torch.from_numpy(np.concatenate([[0], np.cumsum(count)[:-1]]))
        self.count = torch.from_numpy(count)
        self.star_of = torch.from_numpy(self.star_of)

    def draw(self, rows: torch.Tensor, generator) -> torch.Tensor:
        """A partner row (of a neighbour star) for each of ``rows`` (B,)."""
        B = len(rows)
        pick = torch.randint(0, self.k, (B,), generator=generator)
        star = self.nbr[self.star_of[rows], pick]
        within = (torch.rand(B, generator=generator) * self.count[star]).long()
        return self.order[self.start[star] + within]


# --------------------------------------------------------------------------- continuum normalisation

@functools.lru_cache(maxsize=8)
def _legendre_design(n_pix: int, order: int):
    """(P, K) Legendre design matrix P_0..P_order over [-1, 1] and its (P, K*K) outer products."""
    t = np.linspace(-1.0, 1.0, n_pix)
    V = np.polynomial.legendre.legvander(t, order)
    VV = (V[:, :, None] * V[:, None, :]).reshape(n_pix, -1)
    return torch.tensor(V, dtype=torch.float32), torch.tensor(VV, dtype=torch.float32)


def continuum(f: torch.Tensor, order: int = 10, iters: int = 3, clip: float = 1.0, stride: int = 4) -> torch.Tensor:
    """Smooth pseudo-continuum (B, P) of flux ``f`` (B, P), fitted as a Legendre series of degree
    ``order`` across the grid by iteratively reweighted least squares that drops pixels more than
    ``clip`` robust sigmas below the fit (absorption lines), like The Cannon's continuum pixels
    chosen on the fly. Degree 10 over 3760-9270 A follows structure wider than ~500 A: the SED,
    reddening and calibration, but not the lines (Balmer wings included). Costs two (B, P) x (P, K^2)
    products per iteration, on every ``stride``-th pixel (the fit is smooth; the continuum is then
    evaluated on all pixels)."""
    B, P = f.shape
    K = order + 1
    Vfull, VV = _legendre_design(P, order)
    V, VV = Vfull[::stride].contiguous().to(f.device), VV[::stride].contiguous().to(f.device)
    f32 = f[:, ::stride].to(torch.float32).contiguous()
    w = torch.ones_like(f32)
    eye = 1e-6 * torch.eye(K, dtype=torch.float64, device=f.device)
    for _ in range(iters):
        A = (w @ VV).reshape(B, K, K).to(torch.float64) + eye * V.shape[0]
        rhs = ((w * f32) @ V).to(torch.float64)
        coef = torch.linalg.solve(A, rhs).to(torch.float32)
        cont = coef @ V.T
        r = f32 - cont
        s = 1.2533 * (r.abs() * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)  # ~sigma from mean |r|
        w = (r > -clip * s).to(torch.float32)
    return (coef @ Vfull.T.to(f.device)).to(f.dtype)


def continuum_normalise(x: torch.Tensor, offset: torch.Tensor, order: int = 10, scale: float = 0.1) -> torch.Tensor:
    """Continuum-normalised channel: (f / continuum(f) - 1) / ``scale``, from standardized flux and
    its offset. Independent of any smooth multiplicative factor (reddening, flux calibration,
    instrument response) up to the fit's flexibility. ``scale`` sets the size of the numbers
    (a 10% deep line -> -1)."""
    f = to_flux(x, offset)
    c = continuum(f, order).clamp(min=1e-3 * f.abs().mean(1, keepdim=True))
    return (f / c - 1.0) / scale


# --------------------------------------------------------------------------- a recipe's augmentation

def _times(a, b):
    return b if a is None else a * b


class Augmenter:
    """The physical augmentation a TrainConfig asks for, as one batch transform.

    Applied by the training loop to the noisy copies (k >= 1) of training spectra only, in
    this order: LSF jitter, shift, reddening, calibration distortion, telluric residual,
    masked runs, per-pixel noise. Each step is off when its ``aug_*`` field is 0.

    It runs on the device of ``x`` (the training device): its fixed curves are copied there
    once, and every random number is drawn on the CPU from ``generator`` and moved there, so
    a seed gives the same draws on every device (:mod:`stellarparams.devices`).

    Parameters
    ----------
    config : stellarparams.config.TrainConfig
        Its ``aug_*`` fields (ranges documented there and in each function above).
    loglam : (P,) array
        log10 wavelength (A) of the dataset's grid.
    """

    def __init__(self, config, loglam):
        self.c = config
        loglam = np.asarray(loglam, np.float64)
        self.n_pix = len(loglam)
        self.loglam = torch.tensor(loglam)
        self.curve = torch.tensor(extinction_curve(loglam), dtype=torch.float32) if config.aug_ebv else None
        self.telluric_profile = telluric_profile(self.loglam).float() if config.aug_telluric else None
        self._on = {}

    def _const(self, name, device):
        """The fixed curve ``name`` (``curve``, ``telluric_profile``, ``basis``) on ``device``, cached."""
        if (name, device) not in self._on:
            t = legendre_basis(self.n_pix, self.c.aug_calib_order) if name == "basis" else getattr(self, name)
            self._on[name, device] = t.to(device)
        return self._on[name, device]

    @property
    def needs_offset(self) -> bool:
        """Multiplicative steps need each spectrum's mean/std (the dataset's ``offset``)."""
        return bool(self.c.aug_ebv or self.c.aug_calib_sigma or self.c.aug_telluric)

    def __call__(self, x, offset, sigma, generator):
        """Augment a batch.

        Parameters
        ----------
        x : (B, P) tensor
            Standardized flux.
        offset : (B,) tensor or None
            mean/std of each spectrum before standardization (needed by :attr:`needs_offset`).
        sigma : (B, P) tensor or None
            Per-pixel noise in standardized units (needed by ``aug_pixnoise``); +inf is no data.
        generator : torch.Generator
            The only source of random numbers.

        Returns
        -------
        (B, P) tensor
            The augmented, standardized flux.
        """
        c, B, dev = self.c, x.shape[0], x.device

        def u():
            return torch.rand(B, generator=generator).to(dev)

        if c.aug_lsf_pix:
            x = broaden(x, u() * c.aug_lsf_pix)
        if c.aug_shift_pix:
            x = shift(x, (2 * u() - 1) * c.aug_shift_pix)
        # reddening x calibration x telluric: one factor on the flux, one re-standardization
        factor = None
        if c.aug_ebv:
            curve = self._const("curve", dev)
            factor = _times(factor, torch.pow(10.0, -0.4 * ((u() * 4 / 3 - 1 / 3) * c.aug_ebv)[:, None] * curve))
        if c.aug_calib_sigma:
            coeffs = (torch.randn(B, c.aug_calib_order, generator=generator) * c.aug_calib_sigma).to(dev)
            basis = self._const("basis", dev).to(x.dtype)
            factor = _times(factor, (1.0 + coeffs @ basis).clamp(min=0.2))
        if c.aug_telluric:
            depth = (2 * u() - 1) * c.aug_telluric
            factor = _times(factor, (1.0 - depth[:, None] * self._const("telluric_profile", dev)).clamp(min=0.05))
        if factor is not None:
            x, offset = restandardize(to_flux(x, offset) * factor)
        if c.aug_mask_runs:
            R = c.aug_mask_runs
            starts = torch.randint(0, self.n_pix, (B, R), generator=generator)
            lengths = torch.randint(1, 31, (B, R), generator=generator) * (torch.rand(B, R, generator=generator) < 0.5)
            x = mask_runs(x, starts.to(dev), lengths.to(dev))
        if c.aug_pixnoise:
            finite = torch.where(torch.isfinite(sigma), sigma, torch.zeros((), device=dev))
            x = add_noise(x, finite, u() * c.aug_pixnoise, generator)
        return x
