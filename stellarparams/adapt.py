"""Learning from a target survey's unlabeled spectra (``train --adapt-to``; docs/method.md, "Domain adaptation").

The labelled spectra (the source) and the target's spectra differ by the instrument: a smooth
response (flux calibration, reddening), the resolution, a wavelength offset. Input-space
matching estimates that difference from the two populations and applies it to the source,
so the network trains on source spectra that look as the target's do:

1. Each spectrum is taken back to flux over its own mean, g = (x + offset) / offset (``x`` is
   the standardized flux, ``offset`` its mean/std before standardization, so mean(x + offset)
   = offset), and averaged over the source (S) and the target (T) spectra. With
   ``adapt_bins`` = C > 1 (default 16) the averages are per group of stars: labels are
   predicted for both sets and k-means on the source's scaled predictions makes C groups
   (S_c, T_c), so that two sets of different stars are not read as an instrument difference.
   ``adapt_group`` says what predicts: "ridge" (default), a ridge regression on each
   spectrum's ln flux less its own smooth fit (:func:`high_pass`), blind to the response, so
   the groups cannot absorb it; "net", a first-pass network (the ``--init-from`` model, or one
   trained on the source as it is), which reads part of the response as a change of Teff.
2. For every candidate wavelength shift (pixels) and extra Gaussian LSF (pixels) applied to
   the S_c (means commute with these linear operations, so the means stand for every
   spectrum), the log ratio ln(T_c / S'_c), averaged over groups (weights min(n_s, n_t)), is
   fitted by a Legendre series of order ``adapt_order`` in log wavelength: the response. The
   candidate whose groups' ratios depart least from that smooth curve wins; ``adapt_narrow``
   also keeps narrow features every group shares.
3. The source spectra are transformed (shift, LSF, times the response) and standardized
   again. With groups, ``adapt_match`` = K rounds predict the groups anew: with "ridge" from
   the source seen through the last shift and LSF (the first from one group), with "net"
   from a network retrained on the transformed source.

4. Also estimated (:func:`excess_residuals`): what each group's log ratio keeps beyond the fit
   and beyond the noise of the group means (``Match.excess``; :meth:`MatchedDataset.for_calibration`,
   compared in bench/adapt.py, not used by ``train``), and the per-pixel variance the target has
   beyond the source (``Match.excess_var``; noise on the source with ``adapt_noise``).

5. After calibration, the sigmas are widened by how much the network's error grows on the target,
   estimated from its disagreement with a response-blind ridge (:func:`widen_for_target`,
   ``adapt_widen``).

The target is a prepared dataset, or a folder, spectrum file or catalog read here as
``prepare`` would (:func:`read_target`). What the model learns from it is only this transform
(a few numbers and smooth curves, recorded in model.json's metrics under ``adapt``) and the
widening factors (uncertainty.json); the target's labels are never read.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .context import Run
from .dataset import Dataset

SHIFTS_PX = tuple(np.round(np.arange(-0.5, 0.51, 0.1), 2))   # candidate wavelength shifts, grid pixels
LSF_PX = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)             # candidate extra Gaussian LSF sigma, grid pixels
MIN_GROUP = 10          # spectra of each set a group needs to count
MAX_ROWS = 20_000       # source / target rows used by the estimate


@dataclass
class Match:
    """Source -> target transform: f_t(k) = R(k) * (G_lsf * f_s)(k - shift); flux in grid pixels k.

    shift: pixels; lsf: extra Gaussian sigma in pixels; log_response: (P,) ln R or None.
    """

    shift: float = 0.0
    lsf: float = 0.0
    log_response: np.ndarray | None = None
    stats: dict = field(default_factory=dict)
    excess: np.ndarray | None = None          # (C, P) what each group's ln ratio keeps beyond the fit and its noise
    excess_weight: np.ndarray | None = None   # (C,) target spectra per group, summing to 1
    excess_var: np.ndarray | None = None      # (P,) within-group variance of flux/mean the target has beyond the source

    def draw(self, seed, row: int, noise: float = 1.0, group: int = -1) -> np.ndarray:
        """(P,) ln factor for one source spectrum (``row``): ``group``'s excess residual (< 0: none) plus, times
        ``noise``, a Gaussian draw of the target's excess per-pixel variance."""
        P = len(self.excess_var)
        rng = np.random.default_rng([seed, row])
        out = self.excess[group] if group >= 0 else np.zeros(P)
        if noise > 0:
            out = out + np.log(np.clip(1 + noise * np.sqrt(self.excess_var) * rng.standard_normal(P), 0.05, None))
        return out

    def flux_ratio(self, g: np.ndarray) -> np.ndarray:
        """(N, P) flux (any scale) -> the same after the LSF and the shift (not the response)."""
        from scipy.ndimage import gaussian_filter1d, shift

        g = np.asarray(g, np.float64)
        if self.lsf > 0:
            g = gaussian_filter1d(g, self.lsf, axis=1, mode="nearest")
        if self.shift:
            g = shift(g, (0, self.shift), order=3, mode="nearest")
        return g

    def apply(self, flux, offset, sigma=None, block: int = 4096, extra=None):
        """Standardized source flux (N, P), its offsets (N,) [and noise (N, P)] -> the same for the target's instrument.

        extra: optional (N, P) ln factor applied on top of the response (the calibration's
        perturbations, :meth:`MatchedDataset.for_calibration`). Float32 out; computed in float64
        blocks of ``block`` rows (memory stays at a few blocks).
        """
        if len(flux) > block:
            cut = lambda a, i: None if a is None else a[i:i + block]  # noqa: E731
            parts = [self.apply(flux[i:i + block], offset[i:i + block], cut(sigma, i), block, cut(extra, i))
                     for i in range(0, len(flux), block)]
            return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    None if sigma is None else np.concatenate([p[2] for p in parts]))
        f = self.flux_ratio(np.asarray(flux, np.float64) + np.asarray(offset, np.float64)[:, None])
        r = 1.0 if self.log_response is None else np.exp(self.log_response)[None, :]
        if extra is not None:
            r = r * np.exp(extra)
        f = f * r
        m, s = f.mean(1), f.std(1)
        s = np.where(s > 0, s, 1.0)
        x = ((f - m[:, None]) / s[:, None]).astype(np.float32)
        sig = None if sigma is None else (np.asarray(sigma, np.float64) * r / s[:, None]).astype(np.float32)
        return x, (m / s).astype(np.float32), sig

    def to_dict(self) -> dict:
        return {"shift_px": float(self.shift), "lsf_px": float(self.lsf),
                "response_rms": float(np.std(self.log_response)) if self.log_response is not None else 0.0,
                "log_response": None if self.log_response is None else np.round(self.log_response, 5).tolist(),
                **self.stats}


class MatchedDataset(Dataset):
    """A prepared dataset whose flux, offset and noise come back through a :class:`Match`; the rest is the dataset's.

    perturbed: {row: group} of rows that are also multiplied by exp of that group's
    ``match.excess`` (:meth:`for_calibration`); none by default.
    """

    def __init__(self, ds, match: Match, perturbed: dict | None = None, noise: float = 0.0, seed: int = 0):
        # no file of its own: every other attribute is ``ds``'s. noise > 0: every row also gets Gaussian noise of
        # variance noise^2 x match.excess_var (relative flux), drawn once per row (seed, row)
        self._ds, self.match, self._perturbed, self._noise, self._seed = ds, match, perturbed or {}, noise, seed

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def for_calibration(self, rows, seed: int = 0) -> "MatchedDataset":
        """The same, with each of ``rows`` (the validation rows the sigmas would be calibrated on) also multiplied
        by exp of one group's excess residual (``match.excess``: what the matching leaves on target stars of that
        group beyond the noise of the group means), the group drawn in proportion to the target's spectra, and
        by noise of the target's excess per-pixel variance (``match.excess_var``). bench/adapt.py compares this
        calibration with the plain one; ``train`` does not use it (docs/benchmarks.md, "Coverage")."""
        m = self.match
        if m.excess is None or not len(rows):
            return self
        draw = np.random.default_rng(seed).choice(len(m.excess), len(rows), p=m.excess_weight)
        return MatchedDataset(self._ds, m, dict(zip(np.asarray(rows).tolist(), draw.tolist())), self._noise,
                              self._seed)

    def _extra(self, idx):
        """(N, P) ln factor of rows ``idx`` beyond the match (the calibration's excess, the noise), or None."""
        noisy = self._noise > 0 and self.match.excess is not None
        if not self._perturbed and not noisy:
            return None
        rows = (np.arange(len(self._ds)) if idx is None else np.asarray(idx).reshape(-1)).tolist()
        if not noisy and not any(r in self._perturbed for r in rows):
            return None
        base = self._noise if noisy else 0.0   # the calibration's rows get the target's excess variance at least once
        return np.stack([self.match.draw(self._seed, r, max(base, 1.0) if r in self._perturbed else base,
                                         self._perturbed.get(r, -1)) for r in rows])

    def flux_offset(self, idx=None):
        """(flux, offsets) of rows ``idx`` through the match, from one pass (:meth:`flux` and :meth:`offset`
        each make both)."""
        x, o, _ = self.match.apply(self._ds.flux(idx), self._offset(idx), extra=self._extra(idx))
        return x, o

    def flux(self, idx=None):
        return self.flux_offset(idx)[0]

    def offset(self, idx=None):
        return self.flux_offset(idx)[1]

    def sigma(self, idx=None):
        s = self._ds.sigma(idx)
        return None if s is None else self.match.apply(self._ds.flux(idx), self._offset(idx), s,
                                                       extra=self._extra(idx))[2]

    def _offset(self, idx):
        o = self._ds.offset(idx)
        if o is None:
            raise ValueError(f"{self._ds.path}: input matching needs each spectrum's flux offset, which datasets "
                             "prepared before stellarparams stored them lack; prepare the dataset again")
        return o


def normalised(flux, offset) -> np.ndarray:
    """(N, P) standardized flux and (N,) offsets -> (N, P) flux over its own mean, g = 1 + x / offset."""
    o = np.asarray(offset, np.float64)[:, None]
    return 1.0 + np.asarray(flux, np.float64) / o


def nearest(pred, centers) -> np.ndarray:
    """(N, L) scaled predictions, (C, L) centers -> (N,) index of each row's nearest center."""
    return ((pred[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)


def group_means(g, pred, centers, var: bool = False):
    """(N, P) flux, (N, L) scaled predictions, (C, L) centers -> (C, P) mean flux and (C,) counts per nearest
    center [and (C, P) the variance of each group's mean, within-group variance / count, with ``var``]."""
    lab = nearest(pred, centers)
    n = np.bincount(lab, minlength=len(centers))
    means, sq = np.zeros((len(centers), g.shape[1])), np.zeros((len(centers), g.shape[1]))
    np.add.at(means, lab, g)
    means /= np.maximum(n, 1)[:, None]
    if not var:
        return means, n
    np.add.at(sq, lab, (g - means[lab]) ** 2)
    return means, n, sq / np.maximum(n - 1, 1)[:, None] / np.maximum(n, 1)[:, None]


def estimate_match(src_flux, src_offset, src_pred, tgt_flux, tgt_offset, tgt_pred, *, order: int = 10,
                   bins: int = 16, shifts=SHIFTS_PX, lsfs=LSF_PX, seed: int = 0, narrow: float = 0.0,
                   src_stars=None) -> Match:
    """Estimate the source -> target transform from the two unlabeled populations.

    Parameters
    ----------
    src_flux, tgt_flux : (N_s, P), (N_t, P) standardized flux on one grid.
    src_offset, tgt_offset : (N_s,), (N_t,) mean/std of each spectrum before standardization (> 0).
    src_pred, tgt_pred : (N_s, L), (N_t, L) predicted labels in scaled units (any common scale).
    order : Legendre order of ln response over the grid (0: no response).
    bins : groups in predicted-label space (k-means on the source's predictions); 1 = one group.
    shifts, lsfs : candidate shifts and extra LSF sigmas, grid pixels.
    narrow : > 0 also keeps, on top of the smooth response, the pixels where the groups' mean log
        ratio departs from it by more than ``narrow`` times its standard error (narrow features
        every group shares: uncorrected telluric bands, sky residuals); 0 = smooth only.
    src_stars : (N_s,) star of each source row, optional: the noise of the group means is then
        measured between two star-disjoint halves of the source (:func:`excess_residuals`).

    Returns
    -------
    Match, whose ``stats`` hold the groups used and the objective of the chosen candidate, and
    whose ``excess`` holds each group's leftover ln ratio beyond its noise.
    """
    from numpy.polynomial import legendre
    from sklearn.cluster import KMeans

    ok_s, ok_t = np.asarray(src_offset) > 0.05, np.asarray(tgt_offset) > 0.05
    gs, gt = normalised(src_flux[ok_s], src_offset[ok_s]), normalised(tgt_flux[ok_t], tgt_offset[ok_t])
    ps, pt = np.asarray(src_pred, np.float64)[ok_s], np.asarray(tgt_pred, np.float64)[ok_t]
    if bins > 1:
        centers = KMeans(bins, random_state=seed, n_init=3).fit(ps).cluster_centers_
    else:
        centers = ps.mean(0, keepdims=True)
    S, ns = group_means(gs, ps, centers)
    T, nt = group_means(gt, pt, centers)
    use = (ns >= MIN_GROUP) & (nt >= MIN_GROUP)
    if not use.any():
        raise ValueError(f"no group of predicted labels holds {MIN_GROUP} source and {MIN_GROUP} target spectra; "
                         "give more target spectra or fewer adapt_bins")
    S, T, w = S[use], T[use], np.minimum(ns, nt)[use].astype(np.float64)
    w /= w.sum()
    P = S.shape[1]
    xg = np.linspace(-1, 1, P)
    best = None
    for lsf in lsfs:
        for sh in shifts:
            Sm = Match(sh, lsf).flux_ratio(S)
            r = np.log(np.clip(T, 1e-3, None) / np.clip(Sm, 1e-3, None))          # (C, P)
            rbar = (w[:, None] * r).sum(0)
            smooth = legendre.legval(xg, legendre.legfit(xg, rbar, order)) if order > 0 else np.zeros(P)
            obj = float((w[:, None] * (r - smooth) ** 2).sum(0).mean())
            if best is None or obj < best[0]:
                best = (obj, sh, lsf, smooth, r, rbar)
    obj, sh, lsf, smooth, r, rbar = best
    n_narrow = 0
    if narrow > 0 and len(w) > 2:
        se = np.sqrt((w[:, None] * (r - rbar) ** 2).sum(0) / (1 - (w ** 2).sum()) * (w ** 2).sum())  # (P,)
        keep = np.abs(rbar - smooth) > narrow * se
        smooth = smooth + np.where(keep, rbar - smooth, 0.0)
        n_narrow = int(keep.sum())
    match = Match(float(sh), float(lsf), smooth if order > 0 else None,
                  {"groups": int(use.sum()), "objective": obj, "n_source": int(len(gs)), "n_target": int(len(gt)),
                   "narrow_pixels": n_narrow})
    stars = None if src_stars is None else np.asarray(src_stars)[ok_s]
    excess_residuals(match, gs, ps, gt, pt, centers[use], smooth, order, stars, seed)
    return match


def _leftover(A, B, w, order: int, smooth=None):
    """(C, P) group means of two sets, (C,) weights -> (C, P) ln(B / A) less the smooth fit of its weighted
    mean (``smooth`` when given), each row less its own mean (a constant factor, which standardization removes)."""
    from numpy.polynomial import legendre

    r = np.log(np.clip(B, 1e-3, None) / np.clip(A, 1e-3, None))
    if smooth is None:
        xg = np.linspace(-1, 1, r.shape[1])
        rbar = (w[:, None] * r).sum(0) / w.sum()
        smooth = legendre.legval(xg, legendre.legfit(xg, rbar, order)) if order > 0 else np.zeros(r.shape[1])
    d = r - smooth
    return d - d.mean(1, keepdims=True)


def _centred_log(g) -> np.ndarray:
    """(N, P) flux over its mean -> ln of it less its own mean over pixels (a star's constant factor drops out)."""
    lg = np.log(np.clip(g, 1e-3, None))
    return lg - lg.mean(1, keepdims=True)


def excess_residuals(match: Match, gs, ps, gt, pt, centers, smooth, order: int, stars=None, seed: int = 0):
    """Set ``match.excess``: per group c, the leftover ln ratio d_c = ln(T_c / S'_c) - smooth (each row less its
    mean), (C, P), shrunk to what exceeds the noise of the group means, d_c sqrt(max(0, 1 - phi E_c / D_c)),
    with D_c = sum_k d_c^2 and E_c = sum_k (v_s,c / n_s,c + v_t,c / n_t,c) the variance the group sizes
    explain (v: within-group variance of ln flux less its mean over pixels). phi >= 1 corrects E for what the
    counts miss (several spectra of one star, pixels that move together): D / E between two star-disjoint
    halves of the source, where no excess can be; 1 without ``stars``. Also sets ``match.excess_var`` (P,):
    the weighted mean over groups of v_t,c - v_s,c where it exceeds 3 standard errors (pixels the target
    varies at more than the source: telluric depth, sky residuals). gs, gt: (N, P) flux over its mean; ps,
    pt: (N, L) predictions; centers: (C, L)."""
    gs = match.flux_ratio(gs)                              # the source through the chosen shift and LSF
    hs, ht = _centred_log(gs), _centred_log(gt)
    S, ns = group_means(gs, ps, centers)
    T, nt = group_means(gt, pt, centers)
    _, _, vs = group_means(hs, ps, centers, var=True)      # variances of the group means (within / count)
    _, _, vt = group_means(ht, pt, centers, var=True)
    ok = (ns >= MIN_GROUP) & (nt >= MIN_GROUP)
    if not ok.any():
        return
    S, T, vs, vt, ns, nt = S[ok], T[ok], vs[ok], vt[ok], ns[ok], nt[ok]
    d = _leftover(S, T, None, order, smooth)
    D, E = (d ** 2).sum(1), (vs + vt).sum(1)
    phi = 1.0
    if stars is not None:
        uniq, inv = np.unique(np.asarray(stars).astype(str), return_inverse=True)
        a = (np.random.default_rng(seed).permutation(len(uniq)) % 2 == 0)[inv.reshape(-1)]
        (A, na), (B, nb) = group_means(gs[a], ps[a], centers), group_means(gs[~a], ps[~a], centers)
        va, vb = group_means(hs[a], ps[a], centers, var=True)[2], group_means(hs[~a], ps[~a], centers, var=True)[2]
        k = (na >= MIN_GROUP) & (nb >= MIN_GROUP)
        if k.any():
            d0 = _leftover(A[k], B[k], np.minimum(na, nb)[k].astype(np.float64), order)
            phi = max(1.0, float((d0 ** 2).sum() / max((va[k] + vb[k]).sum(), 1e-30)))
    keep = np.sqrt(np.clip(1 - phi * E / np.maximum(D, 1e-30), 0, 1))
    match.excess, match.excess_weight = keep[:, None] * d, nt / nt.sum()
    w = match.excess_weight[:, None]
    Vs, Vt = vs * ns[:, None], vt * nt[:, None]            # within-group variances
    dv = (w * (Vt - Vs)).sum(0)
    se = np.sqrt(phi * (w ** 2 * 2 * (Vt ** 2 / np.maximum(nt - 1, 1)[:, None]
                                      + Vs ** 2 / np.maximum(ns - 1, 1)[:, None])).sum(0))
    match.excess_var = np.where(dv > 3 * se, dv, 0.0)
    match.stats.update({"excess_rms": float(np.sqrt((match.excess_weight * (match.excess ** 2).mean(1)).sum())),
                        "excess_groups": int((keep > 0).sum()), "noise_factor": round(phi, 3),
                        "excess_noise_pixels": int((match.excess_var > 0).sum()),
                        "excess_noise_rms": float(np.sqrt(match.excess_var.mean()))})


def high_pass(flux, offset, order: int) -> np.ndarray:
    """(N, P) standardized flux, (N,) offsets -> (N, P) ln flux less its own least-squares Legendre fit of ``order``.

    Any smooth response of that order (flux calibration, reddening) drops out of it.
    """
    from numpy.polynomial import legendre

    lg = np.log(np.clip(normalised(flux, offset), 1e-3, None))
    V = legendre.legvander(np.linspace(-1, 1, lg.shape[1]), max(order, 1))        # (P, order + 1)
    return lg - (lg @ np.linalg.pinv(V).T) @ V.T


def ridge_groups(src_flux, src_offset, src_labels, tgt_flux, tgt_offset, match: Match, order: int, seed: int = 0):
    """Predicted labels (scaled) for grouping, blind to any smooth response: a ridge regression on the
    high-passed ln flux (:func:`high_pass`) of the source seen through ``match``'s shift and LSF.

    src_labels: (N_s, L) with NaN where unknown. Returns (source out-of-fold predictions (N_s, L'),
    target predictions (N_t, L')), L' the labels known for at least 50 source rows, each over its std.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_predict

    g = match.flux_ratio(normalised(src_flux, src_offset))        # the source through the shift and the LSF
    m, s = g.mean(1), g.std(1)
    hs = high_pass((g - m[:, None]) / s[:, None], m / s, order)
    ht = high_pass(tgt_flux, tgt_offset, order)
    mu, sd = hs.mean(0), hs.std(0) + 1e-6
    hs, ht = (hs - mu) / sd, (ht - mu) / sd
    ps, pt = [], []
    for y in np.asarray(src_labels, np.float64).T:
        ok = np.isfinite(y)
        if ok.sum() < 50:
            continue
        y = (y - np.nanmean(y)) / (np.nanstd(y) + 1e-12)
        r = RidgeCV(alphas=np.logspace(-1, 4, 11))
        p = np.full(len(y), np.nan)
        p[ok] = cross_val_predict(r, hs[ok], y[ok], cv=3)
        p[~ok] = r.fit(hs[ok], y[ok]).predict(hs[~ok]) if (~ok).any() else p[~ok]
        ps.append(p)
        pt.append(r.fit(hs[ok], y[ok]).predict(ht))
    if not ps:
        raise ValueError("adapt_group 'ridge' needs a label known for at least 50 source training rows; "
                         "set adapt_group = net (or adapt_bins = 1)")
    return np.stack(ps, 1), np.stack(pt, 1)


# ---------------------------------------------------------------------- the target and the rounds
def _check_grid(t, ds) -> None:
    if t.n_pix != ds.n_pix or not np.allclose(t.grid.loglam, ds.grid.loglam, rtol=0, atol=1e-9):
        raise ValueError(f"{t.path}: its wavelength grid ({t.n_pix} pixels) is not the training dataset's "
                         f"({ds.n_pix}); prepare the target with --grid-from the source model")


def _target_items(path) -> list:
    """[(file, rv, ids)] of a folder of spectra, a spectrum file or a catalog with FILE (``predict``'s inputs)."""
    from pathlib import Path

    from .predict import collect_inputs

    if not Path(path).exists():
        raise ValueError(f"{path}: no such file or folder; --adapt-to takes a prepared dataset, a folder of "
                         "spectra, a spectrum file or a catalog with a FILE column")
    items = collect_inputs(path)
    if not items:
        raise ValueError(f"{path}: no spectrum file found (--adapt-to takes a prepared dataset, a folder of "
                         "spectra, a spectrum file or a catalog with a FILE column)")
    return items


def target_hash(path, ds) -> str:
    """The identity of an ``--adapt-to`` input, without reading a spectrum: a prepared dataset's input hash
    (its grid checked against ``ds``'s), else a hash of the files' paths, sizes and times and the RVs given."""
    import hashlib
    import os

    from .dataset import dataset_file

    if dataset_file(path).exists():
        with Dataset(path) as t:
            _check_grid(t, ds)
            return t.attrs.get("input_hash", "")
    h = hashlib.sha256()
    for f, rv, ids in _target_items(path):
        st = os.stat(f) if f and os.path.exists(f) else None
        h.update(f"{f}|{rv}|{ids}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_target(path, ds, progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """A folder of spectra, a spectrum file or a catalog with FILE -> (flux (N, P), offsets (N,), rejects).

    Every spectrum is read and preprocessed as ``prepare`` does, with ``ds``'s grid and preprocessing
    (its ``preprocess`` attribute); labels are not read. RV: the catalog's, else the file's own
    RV or redshift. A spectrum that cannot be used is skipped with a line on stderr naming the file
    and the reason; rejects = {reason: count}.
    """
    from .predict import _read_chunk

    if not ds.attrs.get("preprocess"):
        raise ValueError(f"{ds.path}: has no record of its preprocessing; --adapt-to a folder of spectra needs "
                         "it (prepare the target yourself with the source dataset's --grid)")
    items = _target_items(path)
    r = _read_chunk(items, ds.attrs["preprocess"], ds.n_pix, offset=True)  # as predict reads: one bad file skipped
    ok, rejects = r["ok"], {}
    for (f, _, _), reason, detail in zip(items, r["reason"], r["detail"]):
        if reason:
            rejects[reason] = rejects.get(reason, 0) + 1
            print(f"--adapt-to: skipped {f or path}: {reason}" + (f" ({detail})" if detail else ""), file=sys.stderr)
    if not ok.any():
        raise ValueError(f"{path}: no usable target spectrum (rejected: {rejects})")
    if progress:
        print(f"--adapt-to: {int(ok.sum())} target spectra read from {path}"
              + (f", {sum(rejects.values())} skipped ({rejects})" if rejects else ""), file=sys.stderr)
    return r["flux"], r["offset"], rejects


def load_target(path, ds, progress: bool = False) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """(flux (N, P), offsets (N,), input hash, rejects) of the target's spectra on ``ds``'s grid; their labels
    are not read. ``path``: a prepared dataset (on the same grid), or what :func:`read_target` reads.

    Raises ValueError (naming the file and what to do) for a dataset on another grid or without
    the flux offsets, or when no spectrum is usable.
    """
    from .dataset import dataset_file

    if not dataset_file(path).exists():
        flux, off, rejects = read_target(path, ds, progress)
        return flux, off, target_hash(path, ds), rejects
    with Dataset(path) as t:
        _check_grid(t, ds)
        o = t.offset()
        if o is None:
            raise ValueError(f"{t.path}: has no flux offsets (prepared by an older stellarparams); prepare it again")
        return t.flux(), o, t.attrs.get("input_hash", ""), {}


def _predict(net, X, batch: int = 4096) -> np.ndarray:
    """(N, P) flux -> (N, L) scaled predictions of ``net`` (eval mode, on its device)."""
    import torch

    from .devices import module_device

    dev = module_device(net)
    net.eval()
    with torch.inference_mode():
        return torch.cat([net(torch.from_numpy(np.ascontiguousarray(X[i:i + batch])).to(dev)).float().cpu()
                          for i in range(0, len(X), batch)]).numpy()


def match_source(ds, rows, mc, tc, target_flux, target_offset, first_net, *, init=None,
                 run: Run = Run(progress=False)) -> MatchedDataset:
    """``tc.adapt_match`` rounds of estimate -> (retrain): the source dataset seen through the estimated transform.

    Parameters
    ----------
    ds : Dataset
        The labelled (source) dataset; ``rows`` = (train rows, val rows) of it.
    mc, tc : ModelConfig, TrainConfig
        The run's configs (``adapt_bins``, ``adapt_order``, ``adapt_match``, seed).
    target_flux, target_offset : (N_t, P), (N_t,)
        The target's spectra (standardized) and offsets.
    first_net : torch.nn.Module or None
        The first-pass network (scaled outputs): the ``--init-from`` model or one trained on
        the source as it is; unused (None will do) with ``tc.adapt_bins`` = 1.
    init : finetune.Init, optional
        Where the intermediate rounds' networks start.
    run : Run
        Where those networks train (device, precision); ``progress``: one line per round.

    Returns
    -------
    MatchedDataset
        Pass it to :func:`stellarparams.training.fit` (and the calibration) instead of ``ds``.
    """
    from dataclasses import replace

    from .training import fit

    rng = np.random.default_rng(tc.seed)
    itr = np.sort(rng.permutation(rows[0])[:MAX_ROWS])
    it = np.sort(rng.permutation(len(target_flux))[:MAX_ROWS])
    Xt, Ot = target_flux[it], target_offset[it]
    Xs, Os = ds.flux(itr), ds.offset(itr)
    if Os is None:
        raise ValueError(f"{ds.path}: input matching needs each spectrum's flux offset; prepare the dataset again")
    meta = ds.meta(itr)
    stars = meta["object_id"].to_numpy() if "object_id" in meta else None
    grouped = tc.adapt_bins > 1        # one group needs no predictions, so no first pass and one round
    net, match, history = first_net, Match(), []
    if grouped and getattr(tc, "adapt_group", "net") == "ridge":   # no network: ridge on continuum-free flux
        Ys = ds.labels(itr)
        match = estimate_match(Xs, Os, np.zeros((len(Xs), 1)), Xt, Ot, np.zeros((len(Xt), 1)),
                               order=tc.adapt_order, bins=1, seed=tc.seed)     # shift and LSF from one group
        history.append({k: v for k, v in match.to_dict().items() if k != "log_response"})
        for r in range(max(1, int(tc.adapt_match))):
            ps, pt = ridge_groups(Xs, Os, Ys, Xt, Ot, match, tc.adapt_order, tc.seed)
            match = estimate_match(Xs, Os, ps, Xt, Ot, pt, order=tc.adapt_order, bins=tc.adapt_bins, seed=tc.seed,
                                   narrow=tc.adapt_narrow, src_stars=stars)
            _record(history, match, f"input matching (ridge groups), round {r + 1}", run)
        match.stats["rounds"] = history
        return MatchedDataset(ds, match, noise=tc.adapt_noise, seed=tc.seed)
    for r in range(max(1, int(tc.adapt_match)) if grouped else 1):
        if r > 0:
            sub = replace(tc, adapt_match=0, adapt_to=None, ensemble=1)
            net = fit(MatchedDataset(ds, match), rows, mc, sub, init=init, run=run.quiet()).net
        xs = match.apply(Xs, Os)[0]                            # the source as the current net was trained on it
        ps, pt = (_predict(net, xs), _predict(net, Xt)) if grouped else (np.zeros((len(xs), 1)), np.zeros((len(Xt), 1)))
        match = estimate_match(Xs, Os, ps, Xt, Ot, pt, order=tc.adapt_order, bins=tc.adapt_bins, seed=tc.seed,
                               narrow=tc.adapt_narrow, src_stars=stars)
        _record(history, match, f"input matching, round {r + 1}", run)
    match.stats["rounds"] = history
    return MatchedDataset(ds, match, noise=tc.adapt_noise, seed=tc.seed)


def _record(history: list, match, what: str, run: Run) -> None:
    """Append one round's estimate (without the response curve) to ``history``; one line on stderr."""
    h = {k: v for k, v in match.to_dict().items() if k != "log_response"}
    history.append(h)
    run.say(f"{what}: shift {h['shift_px']:+.1f} px, extra LSF {h['lsf_px']:.1f} px, "
            f"response rms {h['response_rms']:.3f} ({h['groups']} groups)")


def source_for_target(ds, mc, tc, init=None, *, run: Run = Run(progress=False)):
    """What `train --adapt-to` trains on: (MatchedDataset, target flux (N_t, P)) for ``tc.adapt_to``.

    The first-pass network is the ``--init-from`` model when there is one, else a network
    trained on ``ds`` as it is (one extra training).
    """
    from dataclasses import replace

    from .training import fit

    Xt, Ot, _, rejects = load_target(tc.adapt_to, ds, run.progress)
    rows = (ds.indices("train"), ds.indices("val"))
    if tc.adapt_bins <= 1 or tc.adapt_group == "ridge":
        first = None
    elif tc.init_from:
        from .model_io import load_model

        first = load_model(tc.init_from).net
    else:
        run.say("input matching: training the first-pass network on the source as it is")
        first = fit(ds, rows, mc, replace(tc, adapt_to=None, ensemble=1), run=run.quiet()).net
    matched = match_source(ds, rows, mc, tc, Xt, Ot, first, init=init, run=run)
    matched.match.stats.update({"target_spectra": int(len(Xt)), "target_rejected": rejects})
    matched.target_offset = Ot
    return matched, Xt


def pseudo_refit(fitted, matched, target_flux, mc, tc, rows=None, **fit_kw):
    """Confident pseudo-labels (``tc.adapt_pseudo`` = q > 0): ``fitted`` (the adapted network) labels the q
    of the target's spectra (N_t, P) with the smallest MC-dropout spread (mean over labels, scaled units),
    and a network is trained again, from where ``fit_kw`` says (``init``), on the matched source training
    stars plus those, selected on the matched validation stars. Returns the new Fitted; its metrics record
    how many target spectra it was trained on (``pseudo_labelled``). rows: (train rows, validation rows) of
    ``matched``; its train and val splits by default.
    """
    import tempfile

    from .dataset import write_dataset
    from .training import fit_ensemble, label_matrix
    from .uncertainty import raw_uncertainty

    pred, s_mc, _ = raw_uncertainty(fitted.net, target_flux, seed=tc.seed)
    sel = np.sort(np.argsort(s_mc.mean(1), kind="stable")[: int(tc.adapt_pseudo * len(target_flux))])
    itr, iva = rows or (matched.indices("train"), matched.indices("val"))
    labels = list(fitted.labels)
    (Xtr, Otr), (Xva, Ova) = matched.flux_offset(itr), matched.flux_offset(iva)
    X = np.concatenate([Xtr, target_flux[sel], Xva])
    off = np.concatenate([Otr, matched.target_offset[sel], Ova])
    y = np.concatenate([label_matrix(matched, itr, labels), pred[sel] * fitted.scale + fitted.center,
                        label_matrix(matched, iva, labels)])
    split = np.repeat([0, 0, 1], [len(itr), len(sel), len(iva)])
    with tempfile.TemporaryDirectory() as tmp, \
            write_dataset(tmp, X, y, split, label_names=labels, attrs={"grid": matched.attrs["grid"]},
                          offset=off) as ds:
        out = fit_ensemble(ds, (ds.indices("train"), ds.indices("val")), mc, tc, **fit_kw)
    out.metrics["pseudo_labelled"] = int(len(sel))
    return out


def reference_target(model, source_train, source_val, target_flux, seed: int = 0):
    """Refit ``model.uncertainty``'s novelty model on the (matched) source training spectra plus half the
    target's, thresholds on the source validation spectra plus the other half: ``flag_unlike_training``
    then marks spectra unlike both. All flux (N, P) standardized; records the reference in the stats."""
    from .uncertainty import fit_novelty

    u = model.uncertainty
    if u is None:
        return
    perm = np.random.default_rng(seed).permutation(len(target_flux))
    a, b = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
    fit_novelty(u, np.concatenate([source_train, target_flux[a]]), np.concatenate([source_val, target_flux[b]]),
                seed=seed)
    u.stats["ood_reference"] = (f"{len(source_train)} source training + {len(a)} target spectra; thresholds on "
                                f"{len(source_val)} source validation + {len(b)} target spectra")


def _robust_scale(x) -> np.ndarray:
    """(N, L) -> (L,) 68.3% quantile of |x - median| per column, NaN ignored (1 sigma for a Gaussian)."""
    from .uncertainty import Q68

    return np.nanquantile(np.abs(x - np.nanmedian(x, 0)), Q68, axis=0)


def _star_bootstrap(star, seed: int = 0, n: int = 200) -> list:
    """``n`` resamples of the rows: stars drawn with replacement, each with all its rows."""
    uniq, inv = np.unique(np.asarray(star).astype(str), return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n)]


def widen_for_target(model, matched, rows, target_flux, target_offset, *, order: int = 10, seed: int = 0) -> dict:
    """Widen the calibrated sigmas of an adapted ``model`` by what its errors grow on the target, estimated
    without a target label from its disagreement with a second predictor.

    The second predictor is a ridge regression on each spectrum's ln flux less its own smooth fit
    (:func:`high_pass`), trained on the matched source training stars: blind to any smooth
    difference (response, reddening, star by star too) that the network may still read. Per label,
    D = network - ridge on the matched source validation stars (D_s) and on the target's spectra
    (D_t); if the two predictors' errors on the target grow independently, the network's error
    variance grows by at most s(D_t)^2 - s(D_s)^2 (s: the 68.3% quantile of |D - median D|), and
    sigma and the 95.4% interval are multiplied by f = sqrt(1 + max(0, s(D_t)^2 - s(D_s)^2 - se) / s(e)^2),
    e the network's residuals on those validation stars and se the standard error of s(D_s)^2 (a
    bootstrap over the validation stars), so that the noise of a few dozen stars does not widen a
    target like the source. f >= 1: it only widens.

    matched: the MatchedDataset the model trained on; rows: (train rows, validation rows), each
    subsampled to :data:`MAX_ROWS` as the estimate of the match is;
    target_flux, target_offset: (N_t, P), (N_t,) the target's spectra. Sets ``model.uncertainty``'s
    conformal factors and ``stats["target_widening"]``; returns {label: f}.
    """
    from sklearn.linear_model import RidgeCV

    from .training import label_matrix

    u = model.uncertainty
    if u is None or u.k68 is None:
        return {}
    rng = np.random.default_rng(seed)
    itr, iva, it = (np.sort(rng.permutation(r)[:MAX_ROWS]) for r in (rows[0], rows[1], len(target_flux)))
    hs = high_pass(*matched.flux_offset(itr), order)
    mu, sd = hs.mean(0), hs.std(0) + 1e-6
    hs = (hs - mu) / sd
    h = lambda X, O: (high_pass(X, O, order) - mu) / sd  # noqa: E731
    ytr, yva = label_matrix(matched, itr, model.label_names), label_matrix(matched, iva, model.label_names)
    Xva, Ova = matched.flux_offset(iva)
    meta = matched.meta(iva)
    star = meta["object_id"].to_numpy() if "object_id" in meta else np.arange(len(iva))
    boot = _star_bootstrap(star, seed)
    Hva, Ht = h(Xva, Ova), h(target_flux[it], target_offset[it])
    net = lambda X: _predict(model.net, X) * model.scale + model.center  # noqa: E731
    pva, pt = net(Xva), net(target_flux[it])
    out = {}
    for j, name in enumerate(model.label_names):
        ok = np.isfinite(ytr[:, j])
        if ok.sum() < 50 or np.isfinite(yva[:, j]).sum() < 10:
            continue
        r = RidgeCV(alphas=np.logspace(-1, 4, 11)).fit(hs[ok], ytr[ok, j])
        ds_, dt = pva[:, j] - r.predict(Hva), pt[:, j] - r.predict(Ht)
        e = pva[:, j] - yva[:, j]
        s_s, s_t, s_e = (float(_robust_scale(x[:, None])[0]) for x in (ds_, dt, e))
        se = float(np.std([_robust_scale(ds_[b][:, None])[0] ** 2 for b in boot]))
        f = float(np.sqrt(1 + max(0.0, s_t ** 2 - s_s ** 2 - se) / max(s_e, 1e-12) ** 2))
        u.k68[j] = u.k68[j] * f
        u.k95[j] = u.k95[j] * f
        out[name] = round(f, 3)
    u.stats["target_widening"] = out
    return out


def shift_weights(source_x, target_x, *, components: int = 10, clip: float = 20.0, seed: int = 0):
    """Density ratio p_target(x) / p_source(x) at each source row, from a domain classifier.

    For weighted split-conformal calibration under covariate shift (Tibshirani et al. 2019;
    compared in bench/adapt.py, not used by ``train``): PCA (``components``, fitted on both
    sets) of the rows, then a logistic regression telling target from source; the odds
    p / (1 - p), times n_source / n_target, estimate the ratio, clipped to [1/clip, clip].

    Parameters
    ----------
    source_x, target_x : (N, D), (M, D) arrays
        A representation of the source (calibration) rows and of the target's rows, e.g.
        the matched standardized flux.

    Returns
    -------
    (w, info)
        (N,) weights; {"auc": the classifier's (in-sample) ROC AUC, "n": N, "n_eff": (sum w)^2 / sum w^2,
        "clipped": the fraction of weights clipped}.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    X = np.concatenate([source_x, target_x]).astype(np.float64)
    d = np.r_[np.zeros(len(source_x)), np.ones(len(target_x))]
    k = int(min(components, X.shape[1], len(X) - 1))
    Z = StandardScaler().fit_transform(PCA(k, random_state=seed).fit_transform(X))
    p = LogisticRegression(max_iter=1000).fit(Z, d).predict_proba(Z)[:, 1]
    raw = p[: len(source_x)] / np.maximum(1 - p[: len(source_x)], 1e-12) * len(source_x) / len(target_x)
    w = np.clip(raw, 1 / clip, clip)
    return w, {"auc": float(roc_auc_score(d, p)), "n": len(w), "n_eff": float(w.sum() ** 2 / (w ** 2).sum()),
               "clipped": float(np.mean(w != raw))}


# ---------------------------------------------------------------------- losses on the target's spectra
def coral(a, b):
    """Deep CORAL (Sun & Saenko 2016): squared Frobenius distance of the (D, D) feature covariances of
    ``a`` (B1, D) and ``b`` (B2, D), over 4 D^2."""
    import torch

    def cov(x):
        x = x - x.mean(0, keepdim=True)
        return x.T @ x / max(1, len(x) - 1)

    d = a.shape[1]
    return (cov(a) - cov(b)).pow(2).sum() / (4 * d * d) + torch.zeros(())


class TargetLoss:
    """The unlabeled target's term of the training loss, per batch (``tc.adapt_coral``, ``tc.adapt_consistency``).

    - CORAL: ``adapt_coral`` x the CORAL distance between the shared representations (the
      trunk's output) of the source batch and of as many target spectra;
    - consistency (mean teacher): ``adapt_consistency`` x the mean squared difference, in
      scaled label units, between the network on a noisy target spectrum (Gaussian noise of
      1-5% of its std) and the EMA of the weights (the teacher; the network itself, without
      gradient, when ``ema`` is 0) on the clean one.

    target_flux: (N_t, P) standardized. Called as ``loss(net, teacher, x_source, g, dev)``.
    """

    def __init__(self, target_flux, tc):
        import torch

        self.X = torch.from_numpy(np.ascontiguousarray(target_flux, np.float32))
        self.coral, self.consistency = float(tc.adapt_coral), float(tc.adapt_consistency)
        self.noise = (tc.noise_min, tc.noise_max)

    def __call__(self, net, teacher, x_source, g, dev):
        import torch

        from .devices import to_device

        j = torch.randint(len(self.X), (len(x_source),), generator=g)
        xt = to_device(self.X[j], dev)
        loss = torch.zeros((), device=xt.device)
        trunk = net.trunks[0]
        if self.coral:
            loss = loss + self.coral * coral(trunk(x_source), trunk(xt))
        if self.consistency:
            lo, hi = self.noise
            level = lo + (hi - lo) * torch.rand(len(j), 1, generator=g)
            noisy = xt + to_device(torch.randn(xt.shape, generator=g) * level, dev) * xt.std(1, keepdim=True)
            with torch.no_grad():
                ref = teacher or net
                mode = ref.training
                ref.eval()
                y_ref = ref(xt)
                ref.train(mode)
            loss = loss + self.consistency * (net(noisy) - y_ref).pow(2).mean()
        return loss

