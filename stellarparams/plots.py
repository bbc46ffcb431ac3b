"""The figures of the paper and of the evaluation report (matplotlib, Agg backend).

Every function draws one PNG, writes it atomically (temporary file + rename) and returns
its path. Axes carry units; labels are drawn with their usual symbols.

- :func:`label_densities`      label distributions per split            (paper Fig. 1)
- :func:`raw_spectra`          a few spectra as read, absolute flux     (paper Fig. 2)
- :func:`normalised_spectra`   prepared rest-frame spectra + Planck     (paper Fig. 3)
- :func:`pred_vs_true`         density-coloured predicted vs true       (paper Fig. 5)
- :func:`residuals_vs_snr`     residual against S/N, binned median and 16-84%
- :func:`reliability`          expected vs observed coverage of the sigmas
- :func:`z_histograms`         (pred - true) / sigma next to a unit Gaussian
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_write  # noqa: E402

SYMBOLS = {"teff": r"$T_\mathrm{eff}$", "feh": "[Fe/H]", "logg": r"$\log g$"}
SPLIT_COLORS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
FLUX_LABEL = r"flux [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ $\mathrm{\AA}^{-1}$]"
DPI = 110


def label_text(name: str, unit: str = "") -> str:
    """'teff', 'K' -> '$T_eff$ [K]' for axis labels."""
    s = SYMBOLS.get(name, name)
    return f"{s} [{unit}]" if unit else s


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def label_densities(labels_by_split: dict, label_names, label_units, path, bins: int = 40) -> Path:
    """Normalised histograms of each label, one curve per split (paper Fig. 1).

    labels_by_split: {"train": (N_train, L), "val": ..., "test": ...}, physical units, NaN = missing.
    """
    L = len(label_names)
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 3.4), squeeze=False)
    for j, (name, unit) in enumerate(zip(label_names, label_units)):
        ax = axes[0, j]
        cols = {s: np.asarray(y)[:, j] for s, y in labels_by_split.items()}
        cols = {s: v[np.isfinite(v)] for s, v in cols.items()}
        allv = np.concatenate([v for v in cols.values()] + [np.zeros(0)])
        if allv.size == 0:
            ax.text(0.5, 0.5, "no known values", ha="center", transform=ax.transAxes)
        else:
            lo, hi = allv.min(), allv.max()
            edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
            for s, v in cols.items():
                if v.size:
                    ax.hist(v, edges, density=True, histtype="step", lw=1.6,
                            color=SPLIT_COLORS.get(s), label=f"{s} (n={v.size:,})")
            ax.legend(fontsize=8)
        ax.set_xlabel(label_text(name, unit))
        ax.set_ylabel("density [1/unit]" if not unit else f"density [1/{unit}]")
    fig.suptitle("Label distributions per split")
    fig.tight_layout()
    return _save(fig, path)


def raw_spectra(spectra, path, titles=None) -> Path:
    """A few spectra as read from their files: observed frame, absolute flux (paper Fig. 2).

    spectra: list of :class:`stellarparams.spectrum.Record` (loglam log10 A, flux 1e-17 erg/s/cm2/A).
    Pixels flagged bad (``Record.good``) are left out.
    """
    n = max(len(spectra), 1)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.9 * n + 0.6), sharex=True, squeeze=False)
    for i, sp in enumerate(spectra):
        ax = axes[i, 0]
        good = sp.good()
        flux = np.where(good, sp.flux, np.nan)
        ax.plot(10 ** sp.loglam, flux, lw=0.5, color="k")
        ax.set_title(titles[i] if titles else sp.name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(r"observed vacuum wavelength [$\mathrm{\AA}$]")
    fig.supylabel(FLUX_LABEL, fontsize=9)
    fig.suptitle("Raw spectra (as read)")
    fig.tight_layout()
    return _save(fig, path)


def planck_standardized(loglam, teff) -> np.ndarray:
    """Planck B_lambda(Teff) on a log10(lambda/A) grid, standardized like the spectra (mean 0, std 1).

    loglam: (P,); teff: scalar in K. Uses astropy.modeling.models.BlackBody per unit wavelength.
    """
    import astropy.units as u
    from astropy.modeling.models import BlackBody

    bb = BlackBody(temperature=teff * u.K, scale=1.0 * u.erg / (u.cm ** 2 * u.s * u.AA * u.sr))
    b = bb((10 ** np.asarray(loglam)) * u.AA).value
    return (b - b.mean()) / b.std()


def normalised_spectra(loglam, flux, teff, path, titles=None, valid=None) -> Path:
    """Prepared (rest-frame, standardized) spectra with the standardized Planck curve of each
    star's Teff over-plotted (paper Fig. 3).

    loglam: (P,) log10 rest wavelength [A]; flux: (K, P) standardized; teff: (K,) K;
    valid: optional (K, P) bool, False where the pixel was filled in (clamped/masked): drawn grey.
    """
    flux = np.atleast_2d(flux)
    K = len(flux)
    lam = 10 ** np.asarray(loglam)
    fig, axes = plt.subplots(K, 1, figsize=(9, 1.9 * K + 0.6), sharex=True, squeeze=False)
    for i in range(K):
        ax = axes[i, 0]
        if valid is None:
            ax.plot(lam, flux[i], lw=0.5, color="k", label="spectrum")
        else:
            ax.plot(lam, flux[i], lw=0.5, color="0.75", label="filled-in pixels")
            ax.plot(lam, np.where(valid[i], flux[i], np.nan), lw=0.5, color="k", label="spectrum")
        if np.isfinite(teff[i]) and teff[i] > 0:
            ax.plot(lam, planck_standardized(loglam, teff[i]), lw=1.4, color="tab:red",
                    label=f"Planck {teff[i]:.0f} K")
        ax.set_title(titles[i] if titles else "", fontsize=9, loc="left")
        ax.set_ylabel("std. flux", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel(r"rest-frame vacuum wavelength [$\mathrm{\AA}$]")
    fig.suptitle("Normalised rest-frame spectra (mean 0, std 1) and the Planck curve of each Teff")
    fig.tight_layout()
    return _save(fig, path)


def _density(x, y, seed=0, max_fit=2000):
    """Gaussian-KDE density at each (x, y) (scipy), fitted on at most ``max_fit`` points."""
    from scipy.stats import gaussian_kde

    xy = np.vstack([x, y])
    if xy.shape[1] < 3:
        return np.ones(xy.shape[1])
    rng = np.random.default_rng(seed)
    fit = xy[:, rng.choice(xy.shape[1], min(max_fit, xy.shape[1]), replace=False)]
    try:
        return gaussian_kde(fit)(xy)
    except (np.linalg.LinAlgError, ValueError):  # degenerate cloud, e.g. a constant prediction
        return np.ones(xy.shape[1])


def pred_vs_true(y_true, y_pred, label_names, label_units, path, max_points: int = 5000, seed: int = 0,
                 stats: dict | None = None) -> Path:
    """Predicted against true per label, coloured by point density, identity line (paper Fig. 5).

    y_true, y_pred: (N, L) physical units. ``stats``: optional {label: {"mae":..,"bias":..}} printed
    in each panel. At most ``max_points`` random points are drawn (for speed).
    """
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    L = len(label_names)
    fig, axes = plt.subplots(1, L, figsize=(4.3 * L, 4.2), squeeze=False)
    rng = np.random.default_rng(seed)
    for j, (name, unit) in enumerate(zip(label_names, label_units)):
        ax = axes[0, j]
        ok = np.flatnonzero(np.isfinite(y_true[:, j]) & np.isfinite(y_pred[:, j]))
        if ok.size > max_points:
            ok = np.sort(rng.choice(ok, max_points, replace=False))
        x, y = y_true[ok, j], y_pred[ok, j]
        if x.size:
            d = _density(x, y, seed)
            d = d / d.max() if d.max() > 0 else d
            order = np.argsort(d)  # densest points drawn last, on top
            sc = ax.scatter(x[order], y[order], c=d[order], s=4, cmap="viridis", rasterized=True)
            lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
            ax.plot([lo, hi], [lo, hi], "r--", lw=1, label="identity")
            cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
            cb.set_label("relative point density (KDE)", fontsize=8)
            ax.legend(fontsize=8, loc="lower right")
        if stats and name in stats:
            s = stats[name]
            ax.text(0.03, 0.97, f"MAE {s['mae']:.3g} {unit}\nbias {s['bias']:+.3g} {unit}\nN {s['n']:,}",
                    transform=ax.transAxes, va="top", fontsize=8,
                    bbox=dict(boxstyle="round", fc="white", alpha=0.8))
        ax.set_xlabel("true " + label_text(name, unit))
        ax.set_ylabel("predicted " + label_text(name, unit))
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle("Predicted against true")
    fig.tight_layout()
    return _save(fig, path)


def residuals_vs_snr(y_true, y_pred, snr, label_names, label_units, path, max_points: int = 5000,
                     n_bins: int = 8, seed: int = 0) -> Path:
    """Residual (predicted - true) against S/N per label, with the binned median and 16-84% band.

    y_true, y_pred: (N, L) physical units; snr: (N,) median S/N per pixel. Log S/N axis.
    """
    y_true, y_pred, snr = np.asarray(y_true, float), np.asarray(y_pred, float), np.asarray(snr, float)
    L = len(label_names)
    fig, axes = plt.subplots(1, L, figsize=(4.3 * L, 3.6), squeeze=False)
    rng = np.random.default_rng(seed)
    for j, (name, unit) in enumerate(zip(label_names, label_units)):
        ax = axes[0, j]
        r = y_pred[:, j] - y_true[:, j]
        ok = np.isfinite(r) & np.isfinite(snr) & (snr > 0)
        s, r = snr[ok], r[ok]
        if s.size:
            show = rng.choice(s.size, min(max_points, s.size), replace=False)
            ax.scatter(s[show], r[show], s=3, color="0.6", alpha=0.5, rasterized=True, label="spectra")
            edges = np.unique(np.quantile(s, np.linspace(0, 1, n_bins + 1)))
            if edges.size >= 2:
                k = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, edges.size - 2)
                mid, med, p16, p84 = [], [], [], []
                for b in range(edges.size - 1):
                    rb = r[k == b]
                    if rb.size:
                        mid.append(np.sqrt(edges[b] * edges[b + 1]))
                        med.append(np.median(rb))
                        p16.append(np.percentile(rb, 16))
                        p84.append(np.percentile(rb, 84))
                ax.fill_between(mid, p16, p84, color="tab:blue", alpha=0.25, label="16-84%")
                ax.plot(mid, med, "o-", color="tab:blue", ms=3, label="median")
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no S/N known", ha="center", transform=ax.transAxes)
        ax.axhline(0, color="r", lw=1, ls="--")
        ax.set_xlabel("S/N per pixel (median)")
        ax.set_ylabel(r"predicted $-$ true " + label_text(name, unit))
    fig.suptitle("Residuals against S/N")
    fig.tight_layout()
    return _save(fig, path)


def reliability(z, label_names, path) -> Path:
    """Expected vs observed coverage of the sigmas: for p in (0, 1), the fraction of
    |pred - true| / sigma within the Gaussian p-interval (+-Phi^-1((1+p)/2)). On the diagonal
    when sigma is calibrated; below it means too small error bars.

    z: (N, L) (pred - true) / sigma; NaN rows are left out per label.
    """
    from scipy.stats import norm

    z = np.asarray(z, float)
    p = np.linspace(0.01, 0.99, 99)
    k = norm.ppf(0.5 + p / 2)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    for j, name in enumerate(label_names):
        a = np.abs(z[:, j][np.isfinite(z[:, j])])
        if a.size:
            ax.plot(p, (a[:, None] <= k[None]).mean(0), lw=1.8, label=SYMBOLS.get(name, name))
    for target in (0.683, 0.954):
        ax.axvline(target, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("expected coverage (Gaussian)")
    ax.set_ylabel("observed coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Reliability of the error bars")
    fig.tight_layout()
    return _save(fig, path)


def z_histograms(z, label_names, path, lim: float = 5.0) -> Path:
    """Histogram of (pred - true) / sigma per label next to the unit Gaussian; z: (N, L)."""
    from scipy.stats import norm

    z = np.asarray(z, float)
    L = len(label_names)
    fig, axes = plt.subplots(1, L, figsize=(4.0 * L, 3.4), squeeze=False)
    x = np.linspace(-lim, lim, 200)
    for j, name in enumerate(label_names):
        ax = axes[0, j]
        v = z[:, j][np.isfinite(z[:, j])]
        if v.size:
            ax.hist(np.clip(v, -lim, lim), bins=60, range=(-lim, lim), density=True, color="tab:blue", alpha=0.6,
                    label=f"std {np.std(v):.2f}, |z|>3: {100 * np.mean(np.abs(v) > 3):.1f}%")
        ax.plot(x, norm.pdf(x), "r-", lw=1.5, label="N(0, 1)")
        ax.set_xlabel(r"(predicted $-$ true) / $\sigma$  " + SYMBOLS.get(name, name))
        ax.legend(fontsize=7)
    fig.suptitle("Normalised residuals (values beyond +-%g piled at the edges)" % lim)
    fig.tight_layout()
    return _save(fig, path)
