"""The `diagnose` command: before trusting a model's labels on a set of spectra, how unlike its
training spectra is that set, and where?

One self-contained HTML page (figures embedded as PNG) and ``diagnose.json`` in ``--out``:

- the ``ood_score`` distribution of the set against the training one (the quantiles of the
  validation split's scores that `train` keeps in ``uncertainty.json``), with the
  Kolmogorov-Smirnov statistic between them (``scipy.stats.kstest`` against that reference
  distribution);
- the fractions flagged: ``flag_unlike_training`` (0.5% of held-out training-like stars by
  construction), ``flag_out_of_range``, ``flag_label_hull``;
- the wavelength regions where the set departs from the training spectra at the same labels:
  ``z = median_i(flux_i - emulator(pred_i)) / scatter`` per pixel, where the emulator is the
  model's label -> spectrum fit on its training spectra (at the labels the model gave them)
  and ``scatter`` the training spectra's robust scatter about it
  (:func:`stellarparams.uncertainty.fit_emulator`). ``z`` = 1 means the set's typical
  spectrum is off by as much as a typical training star scatters. ``z`` is smoothed over
  ``max(3, P / 100)`` pixels; a region is a run where ``z`` stays beyond +-``--threshold``
  (default 0.5) and five times the sampling noise of a median of N spectra
  (1.2533 / sqrt(N x window)). Models trained before the emulator existed are compared with the
  training mean spectrum (the PCA mean) instead, in units of the PCA's per-pixel spread: not at
  the same labels, so a set of other stars departs too (said on the page).

SPECTRA is what `stellarparams predict` reads (files, folders, catalogs with a FILE column;
the same readers and preprocessing), or a prepared dataset folder (its rows, or one split).
Exit status: 0 done, 2 bad input (unreadable model, no usable spectrum, bad option),
3 the output folder is being written by another process.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import json
from pathlib import Path

import numpy as np

from .context import Run

PAGE = "index.html"
JSON = "diagnose.json"
THRESHOLD = 0.5        # |z| (in training-scatter units) above which a region is reported
MAX_REGIONS = 10
MAX_ROWS = 20_000      # spectra (a seeded random subset) whose median departure is measured


# ---------------------------------------------------------------------- reading
def _is_dataset(path) -> bool:
    p = Path(path)
    return (p / "dataset.h5").is_file() or (p.suffix == ".h5" and p.is_file())


def read_spectra(model, inputs, *, catalog=None, survey=None, split=None, chunk: int = 256) -> tuple[np.ndarray, dict]:
    """SPECTRA -> ((N, P) prepared flux on the model's grid, {"n_inputs", "n_rejected", "rejects"}).

    A prepared dataset folder gives its rows (``split``: one of them); anything else goes
    through `predict`'s reading path (:func:`stellarparams.predict.collect_inputs`, the
    model's own preprocessing), in this process. Rejected inputs are counted by reason.

    Raises
    ------
    ValueError
        No usable spectrum, or a dataset on another grid / preprocessing than the model's.
    """
    from .predict import _read_chunk, collect_inputs

    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if len(inputs) == 1 and _is_dataset(inputs[0]):
        from .dataset import Dataset

        with Dataset(inputs[0]) as ds:
            model.check_dataset(ds)
            flux = ds.flux(ds.indices(split) if split else None)
        info = {"n_inputs": int(len(flux)), "n_rejected": 0, "rejects": {}}
    else:
        items = collect_inputs(inputs, catalog, survey=survey)
        if not items:
            raise ValueError(f"no spectrum files found in {', '.join(map(str, inputs))}")
        parts, rejects = [], {}
        for i in range(0, len(items), chunk):
            r = _read_chunk(items[i:i + chunk], model.prepare_config, model.n_in)
            parts.append(r["flux"])
            for reason in r["reason"]:
                if reason:
                    rejects[reason] = rejects.get(reason, 0) + 1
        flux = np.concatenate(parts)
        info = {"n_inputs": len(items), "n_rejected": int(sum(rejects.values())), "rejects": rejects}
    if len(flux) == 0:
        raise ValueError(f"no usable spectrum in {', '.join(map(str, inputs))} (rejected: {info['rejects'] or 'none'})")
    return flux, info


# ---------------------------------------------------------------------- the diagnosis
def departures(model, flux, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Per-pixel departure of a set from the training spectra at the same predicted labels.

    Parameters
    ----------
    model : Model
        With ``uncertainty`` (its emulator, or for older folders its PCA).
    flux : (N, P) prepared spectra; pred : (N, L) the model's labels for them, physical units.

    Returns
    -------
    (z, reference, median, kind)
        (P,) median departure in training-scatter units (over at most ``MAX_ROWS`` spectra, a
        seeded random subset); (P,) the median reference spectrum it was measured against and
        (P,) the set's median spectrum; a sentence naming the reference.
    """
    u = model.uncertainty
    if len(flux) > MAX_ROWS:   # the median of 20,000 is as good as of all (sampling noise 0.009 scatter)
        keep = np.sort(np.random.default_rng(0).choice(len(flux), MAX_ROWS, replace=False))
        flux, pred = flux[keep], pred[keep]
    x = np.asarray(flux, np.float32)
    if getattr(u, "emu_coef", None) is not None:
        emulated = u.emulate((np.asarray(pred, np.float64) - model.center) / model.scale).astype(np.float32)
        ok = np.isfinite(emulated).all(1)
        z = np.median(x[ok] - emulated[ok], 0) / u.emu_scatter
        return (z, np.median(emulated[ok], 0), np.median(x[ok], 0),
                "the training spectra at the same predicted labels (the model's emulator)")
    spread = np.sqrt((np.asarray(u.pca_var)[:, None] * np.asarray(u.pca_components, np.float64) ** 2).sum(0))
    mean = np.asarray(u.pca_mean, np.float64)
    median = np.median(x, 0)
    return (median - mean) / np.maximum(spread, 1e-6), mean, median, (
        "the training mean spectrum (this model folder predates the label -> spectrum emulator: not at the same "
        "labels, so a set of other stars departs too; retrain to compare at the same labels)")


def find_regions(z, wave, n_spectra: int, threshold: float = THRESHOLD) -> tuple[list, np.ndarray, float]:
    """Runs of pixels where the smoothed ``z`` stays beyond the threshold on one side, worst first.

    Returns (regions, smoothed z (P,), the threshold used): each region a dict with
    ``wave_lo``, ``wave_hi`` (Angstrom), ``pix_lo``, ``pix_hi`` (inclusive), ``peak`` (signed
    smoothed z at the worst pixel), ``wave_peak``, ``mean_abs``.
    """
    from scipy.ndimage import uniform_filter1d

    w = max(3, len(z) // 100)
    zs = uniform_filter1d(np.nan_to_num(np.asarray(z, np.float64)), w, mode="nearest")
    thr = max(threshold, 5 * 1.2533 / np.sqrt(max(n_spectra, 1) * w))
    regions, runs = [], []
    for above in (zs > thr, zs < -thr):   # a run keeps one sign: an excess beside a deficit is two regions
        edges = np.diff(np.r_[0, above.astype(np.int8), 0])
        runs += zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1)
    for lo, hi in runs:
        k = lo + int(np.argmax(np.abs(zs[lo:hi + 1])))
        regions.append({"wave_lo": float(wave[lo]), "wave_hi": float(wave[hi]), "pix_lo": int(lo), "pix_hi": int(hi),
                        "peak": float(zs[k]), "wave_peak": float(wave[k]),
                        "mean_abs": float(np.mean(np.abs(zs[lo:hi + 1])))})
    regions.sort(key=lambda r: -abs(r["peak"]))
    return regions[:MAX_REGIONS], zs, float(thr)


def ood_reference(model):
    """(quantiles at 0..100%) of the validation split's ood_score, or None (a folder from before they were kept)."""
    q = (getattr(model.uncertainty, "stats", None) or {}).get("val_ood_quantiles")
    return None if q is None else np.maximum.accumulate(np.asarray(q, np.float64))


def diagnose(model, inputs, out=None, *, catalog=None, survey=None, split=None, threshold: float = THRESHOLD,
             device="cpu", progress: bool = True, run: Run | None = None) -> dict:
    """Diagnose a model on a set of spectra; write the page and diagnose.json to ``out`` (None: write nothing).

    Parameters
    ----------
    model : Model or path
        A model folder or a loaded model (with its calibration).
    inputs : path or list of paths
        What `predict` reads, or a prepared dataset folder.
    out : str or Path, optional
        Folder for ``index.html`` and ``diagnose.json`` (locked while written).
    catalog, survey : optional
        As for `predict`.
    split : str, optional
        With a prepared dataset: only this split ("train", "val", "test").
    threshold : float
        Smallest smoothed ``|z|`` (training-scatter units) reported as a region.
    device : str
        Where a model folder is loaded to predict.
    progress : bool
        The page's path and verdict on stderr.
    run : stellarparams.context.Run, optional
        ``device`` and ``progress`` as one object; when given, those two are not read.

    Returns
    -------
    dict
        The content of diagnose.json.
    """
    from scipy.stats import kstest

    from .extras import requires
    from .model_io import Model, load_model
    from .outputs import locked_output

    run = run or Run(progress=progress, device=device)
    if out is not None:
        requires("plots", "matplotlib")  # the page's figures; before any work
    with contextlib.ExitStack() as stack:
        if out is not None:  # checked and locked before any work
            out = stack.enter_context(locked_output(out, wait=False))
        name = "" if isinstance(model, Model) else str(model)
        model = model if isinstance(model, Model) else load_model(model, device=run.device)
        if model.uncertainty is None:
            raise ValueError("the model has no calibration (trained before stellarparams had it): no ood_score to "
                             "diagnose with; retrain it")
        flux, info = read_spectra(model, inputs, catalog=catalog, survey=survey, split=split)
        df = model.predict_full(flux)
        pred = df[model.label_names].to_numpy(np.float64)
        ood = df["ood_score"].to_numpy(np.float64)
        good = np.isfinite(pred).all(1)
        if not good.any():
            raise ValueError("no spectrum of the set could be predicted (every row has non-finite flux)")
        z, reference, median, kind = departures(model, flux[good], pred[good])
        wave = 10 ** np.linspace(model.grid["loglam_min"], model.grid["loglam_max"], model.n_in) if model.grid else \
            np.arange(model.n_in, dtype=np.float64)
        regions, zs, thr = find_regions(z, wave, int(good.sum()), threshold)
        ref = ood_reference(model)
        ks = None
        if ref is not None and np.isfinite(ood).any():
            probs = np.linspace(0, 1, len(ref))
            test = kstest(ood[np.isfinite(ood)], lambda x: np.interp(x, ref, probs, left=0.0, right=1.0))
            ks = {"statistic": float(test.statistic), "pvalue": float(test.pvalue)}
        frac = {k: float(df[k].mean()) for k in ("flag_unlike_training", "flag_out_of_range", "flag_label_hull")}
        unlike = frac["flag_unlike_training"] > 0.05 or bool(regions)
        result = {
            "model": name, "model_weights_sha256": model.weights_sha256,
            "inputs": [str(x) for x in ([inputs] if isinstance(inputs, (str, Path)) else inputs)],
            "n_spectra": int(len(flux)), **info,
            "fraction_flagged": frac, "expected_fraction_unlike_training": 0.005,
            "ood_score_quantiles": {str(p): float(np.nanpercentile(ood, p)) for p in (5, 25, 50, 75, 95)},
            "training_ood_score_quantiles": None if ref is None else {str(p): float(ref[p]) for p in (5, 25, 50, 75, 95)},
            "ks_vs_training": ks, "reference_spectrum": kind, "threshold": thr,
            "max_departure": {"z": float(zs[np.argmax(np.abs(zs))]), "wave": float(wave[np.argmax(np.abs(zs))])},
            "worst_regions": regions,
            "verdict": ("unlike the training spectra: check the flagged fraction and the regions before trusting the "
                        "labels" if unlike else "like the training spectra"),
        }
        if out is not None:
            _write(out, result, model, ood, ref, wave, z, zs, reference, median, run)
    return result


# ---------------------------------------------------------------------- the page
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figures(r, ood, ref, wave, z, zs, reference, median) -> dict:
    from . import plots  # noqa: F401  (sets the Agg backend)
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.sort(ood[np.isfinite(ood)])
    ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=f"this set ({len(x)})")
    if ref is not None:
        ax.plot(ref, np.linspace(0, 1, len(ref)), label="training (held-out validation stars)")
    ax.axvline(1, color="k", ls=":", lw=1, label="flag_unlike_training threshold")
    ax.set_xscale("log")
    ax.set(xlabel="ood_score", ylabel="cumulative fraction")
    ax.legend(fontsize=8)
    figs["ood"] = ("Cumulative distribution of ood_score: this set against the training one. Right of the dotted "
                   "line a spectrum is flagged unlike training.", _png(fig))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(1, 1))
    a1.plot(wave, median, lw=0.8, label="median spectrum of this set")
    a1.plot(wave, reference, lw=0.8, label="median reference")
    a1.set_ylabel("prepared flux")
    a1.legend(fontsize=8)
    a2.plot(wave, z, lw=0.5, color="0.6", label="z per pixel")
    a2.plot(wave, zs, lw=1.0, color="tab:red", label="smoothed")
    for t in (-r["threshold"], r["threshold"]):
        a2.axhline(t, color="k", ls=":", lw=1)
    for g in r["worst_regions"]:
        a2.axvspan(g["wave_lo"], g["wave_hi"], color="tab:red", alpha=0.15)
    a2.set(xlabel="wavelength [Angstrom]", ylabel="departure [training scatter]")
    a2.legend(fontsize=8)
    figs["regions"] = ("Top: the set's median spectrum and the reference (" + r["reference_spectrum"] + "). Bottom: "
                       "their departure per pixel in units of the training spectra's scatter; shaded: the regions "
                       "listed above (smoothed |z| beyond the dotted threshold).", _png(fig))
    return figs


def _write(out: Path, r, model, ood, ref, wave, z, zs, reference, median, run: Run):
    from .files import write_text
    from .records import jsonable

    figs = _figures(r, ood, ref, wave, z, zs, reference, median)
    esc = html.escape
    frac = r["fraction_flagged"]
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{100 * v:.1f}%</td></tr>" for k, v in frac.items())
    regs = "".join(f"<tr><td>{i + 1}</td><td>{g['wave_lo']:.1f} - {g['wave_hi']:.1f}</td><td>{g['wave_peak']:.1f}"
                   f"</td><td>{g['peak']:+.2f}</td><td>{g['mean_abs']:.2f}</td></tr>"
                   for i, g in enumerate(r["worst_regions"]))
    ks = r["ks_vs_training"]
    parts = [f"<h1>Diagnosis: {esc(r['model'] or 'model')} on {r['n_spectra']} spectra</h1>",
             f"<p><b>Verdict: {esc(r['verdict'])}.</b></p>",
             f"<p>Inputs: {esc(', '.join(r['inputs']))}; {r['n_inputs']} read, {r['n_rejected']} rejected"
             + (f" ({esc(json.dumps(r['rejects']))})" if r["rejects"] else "") + ".</p>",
             "<h2>Flagged</h2><table><tr><th>flag</th><th>fraction</th></tr>", rows, "</table>",
             "<p>Among held-out stars like the training ones, 0.5% are flagged unlike training by construction.</p>",
             "<h2>ood_score against training</h2>",
             (f"<p>Kolmogorov-Smirnov statistic {ks['statistic']:.3f} (p = {ks['pvalue']:.2g}).</p>" if ks else
              "<p>This model folder keeps no training ood_score distribution (trained before diagnose existed): "
              "only this set's is shown.</p>"),
             "<h2>Where the spectra depart</h2>",
             f"<p>Reference: {esc(r['reference_spectrum'])}. Regions: smoothed |z| above {r['threshold']:.2f} "
             "training scatters.</p>",
             ("<table><tr><th>#</th><th>wavelength [A]</th><th>worst at [A]</th><th>peak z</th>"
              f"<th>mean |z|</th></tr>{regs}</table>" if regs else "<p>No region departs beyond the threshold; "
              f"the largest departure is {r['max_departure']['z']:+.2f} at {r['max_departure']['wave']:.1f} A.</p>")]
    for key, (caption, b64) in figs.items():
        parts.append(f'<figure><img src="data:image/png;base64,{b64}" alt="{key}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ccc;text-align:right}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    write_text(out / JSON, json.dumps(jsonable(r), indent=1) + "\n")
    write_text(out / PAGE, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>stellarparams diagnose"
                           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    run.say(f"{out / PAGE}: {r['verdict']}")


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser):
    p.description = ("Before trusting a model's labels on a set of spectra: one HTML page (OUT/index.html, figures "
                     "embedded) and OUT/diagnose.json with the set's ood_score distribution against the training "
                     "one (Kolmogorov-Smirnov statistic), the fractions flagged (flag_unlike_training, "
                     "flag_out_of_range, flag_label_hull), and the wavelength regions where the set's median spectrum "
                     "departs from the model's training spectra at the same predicted labels, in units of their "
                     "scatter. Exit status: 0 done, 2 bad input or options, 3 OUT is being written by another process.")
    p.add_argument("model", help="model folder (from `stellarparams train` or `stellarparams run`)")
    p.add_argument("inputs", nargs="+", help="what `stellarparams predict` reads (spectrum files, folders, catalogs "
                   "with a FILE column), or a prepared dataset folder")
    p.add_argument("--out", default="diagnose", help="folder for index.html and diagnose.json")
    p.add_argument("--catalog", help="catalog with RV_ADOP (km/s) for the inputs, as for predict")
    from .surveys import registry

    p.add_argument("--survey", choices=registry.names(), default=None,
                   help="format of the inputs (default: detected per file)")
    p.add_argument("--split", choices=("train", "val", "test"), help="with a prepared dataset: only this split")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="smallest smoothed departure, in training-scatter units, reported as a region")
    p.add_argument("--quiet", action="store_true", help="print diagnose.json's summary only")
    from .devices import add_arguments as add_device_arguments

    add_device_arguments(p, precision=False)


def run_cli(args) -> int:
    if not args.threshold > 0:
        raise ValueError(f"--threshold must be > 0, got {args.threshold}")
    r = diagnose(args.model, args.inputs, args.out, catalog=args.catalog, survey=args.survey, split=args.split,
                 threshold=args.threshold, run=Run.from_args(args))
    f = r["fraction_flagged"]
    print(f"{r['n_spectra']} spectra: {r['verdict']}; unlike training {100 * f['flag_unlike_training']:.1f}%, "
          f"out of range {100 * f['flag_out_of_range']:.1f}%, {len(r['worst_regions'])} departing regions"
          + (f" (worst {r['worst_regions'][0]['wave_lo']:.0f}-{r['worst_regions'][0]['wave_hi']:.0f} A)"
             if r["worst_regions"] else ""))
    return 0
