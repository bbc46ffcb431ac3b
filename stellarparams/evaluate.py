"""Evaluate a trained model on a prepared dataset: metrics, tables, figures, a report page.

Library::

    from stellarparams.evaluate import metrics, evaluate
    m = metrics(y_true, y_pred, ["teff", "feh", "logg"])      # per-label dict
    res = evaluate("runs/default/model", "runs/default/dataset", "runs/default/report")

Command::

    stellarparams evaluate MODEL --dataset D --out REPORT_DIR [--split test]

``REPORT_DIR`` receives ``metrics.json``, ``metrics.{csv,md}``, ``mae_by_snr.{csv,md}``,
``mae_by_teff.{csv,md}``, ``calibration.{csv,md}`` (coverage of the 1- and 2-sigma error
bars per label and S/N bin), ``predictions.csv`` (with sigma_* and ood_score),
``figures/*.png`` (incl. the reliability diagram and (pred - true)/sigma), ``report.md`` and
``report.html`` (figures embedded, the page stands alone).
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import median_abs_deviation

from .context import Run
from .extras import requires
from .files import write_text
from .outputs import holds_lock
from .records import dumps, jsonable

SNR_EDGES = (0, 10, 20, 30, 50, np.inf)
TEFF_EDGES = (0, 4000, 5000, 6000, 7000, 8000, np.inf)
N_EXAMPLE_SPECTRA = 4


# ----------------------------------------------------------------------------- metrics

def metrics(y_true, y_pred, label_names=None) -> dict:
    """Per-label error statistics of predictions against truth.

    y_true, y_pred: (N, L) (or (N,)) in physical units. A row whose true label is NaN is
    left out of that label; a NaN prediction of a known label is counted in ``n_nan_pred``
    and also left out. Returns ``{label: {...}}`` with

    - ``mae``, ``rmse``: mean absolute / root mean square of (pred - true)
    - ``bias``: mean of (pred - true)
    - ``scatter``: robust scatter, 1.4826 x median absolute deviation of the residuals
    - ``range``: max - min of the known true values; ``mae_pct_range``: 100 * mae / range
    - ``n``: number of rows used; ``n_nan_pred``: known labels with no finite prediction
    """
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred.reshape(-1, 1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
    L = y_true.shape[1]
    names = list(label_names) if label_names is not None else [f"label{j}" for j in range(L)]
    if len(names) != L:
        raise ValueError(f"{len(names)} label names for {L} label columns")
    out = {}
    for j, name in enumerate(names):
        known = np.isfinite(y_true[:, j])
        ok = known & np.isfinite(y_pred[:, j])
        t, r = y_true[ok, j], y_pred[ok, j] - y_true[ok, j]
        n = int(ok.sum())
        rng = float(t.max() - t.min()) if n else np.nan
        mae = float(np.mean(np.abs(r))) if n else np.nan
        out[name] = {
            "mae": mae,
            "rmse": float(np.sqrt(np.mean(r ** 2))) if n else np.nan,
            "bias": float(np.mean(r)) if n else np.nan,
            "scatter": float(median_abs_deviation(r, scale="normal")) if n else np.nan,
            "range": rng,
            "mae_pct_range": 100.0 * mae / rng if n and rng > 0 else np.nan,
            "n": n,
            "n_nan_pred": int((known & ~np.isfinite(y_pred[:, j])).sum()),
        }
    return out


def binned_mae(y_true, y_pred, x, edges, label_names, x_name: str = "x") -> pd.DataFrame:
    """MAE per label in bins of ``x`` (e.g. S/N or true Teff); one row per non-empty bin.

    y_true, y_pred: (N, L); x: (N,); edges: increasing bin edges (last may be inf).
    Columns: ``{x_name}_lo``, ``{x_name}_hi``, ``n``, then ``mae_{label}`` per label.
    """
    y_true, y_pred, x = np.asarray(y_true, float), np.asarray(y_pred, float), np.asarray(x, float)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = np.isfinite(x) & (x >= lo) & (x < hi)
        if not sel.any():
            continue
        m = metrics(y_true[sel], y_pred[sel], label_names)
        row = {f"{x_name}_lo": lo, f"{x_name}_hi": hi, "n": int(sel.sum())}
        row.update({f"mae_{k}": v["mae"] for k, v in m.items()})
        rows.append(row)
    cols = [f"{x_name}_lo", f"{x_name}_hi", "n"] + [f"mae_{k}" for k in label_names]
    return pd.DataFrame(rows, columns=cols)


def metrics_table(m: dict, label_units=None) -> pd.DataFrame:
    """The dict of :func:`metrics` as a table, one row per label."""
    rows = []
    for j, (name, v) in enumerate(m.items()):
        rows.append({"label": name, "unit": label_units[j] if label_units else "", **v})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- writing helpers

def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "-" if np.isnan(v) else ("inf" if v > 0 else "-inf")
        return f"{v:.4g}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (numbers to 4 significant digits)."""
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v).replace("|", "/").replace("\n", " ") for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep] + body) + "\n"


def write_csv_md(df: pd.DataFrame, stem) -> dict:
    """Write ``stem.csv`` and ``stem.md``; returns their paths."""
    stem = Path(stem)
    csv = write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    md = write_text(stem.with_suffix(".md"), markdown_table(df))
    return {"csv": str(csv), "md": str(md)}


def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON (numpy types, NaN as null; :func:`stellarparams.records.dumps`) atomically."""
    return write_text(path, dumps(obj, indent=2))


def hash_folder(folder) -> str:
    """sha256 over the names and bytes of every file in a folder (model identity); hidden
    files (``.lock`` of a run writing there) are left out."""
    h = hashlib.sha256()
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*")
                                                     if p.is_file() and not p.name.startswith("."))
    for p in files:
        h.update(str(p.relative_to(folder) if p != folder else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def environment() -> dict:
    """Versions that matter for reproducing a number."""
    import sklearn
    import torch

    from ._version import __version__

    return {"stellarparams": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "scikit-learn": sklearn.__version__, "platform": platform.platform()}


# ----------------------------------------------------------------------------- evaluate

def predict_rows(predict, ds, idx, batch_size: int = 4096, run: Run = Run(), desc: str = "predict"):
    """Run ``predict((B, P) flux) -> (B, L)`` over dataset rows ``idx`` in batches; returns (N, L).
    A progress bar named ``desc`` when ``run.progress``."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(idx), desc=desc, unit="spec", disable=not run.progress, leave=False) as bar:
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            out.append(np.asarray(predict(ds.flux(b)), np.float64))
            bar.update(len(b))
    return np.concatenate(out) if out else np.zeros((0, 0))


def _label_columns(ds, names):
    """Which of the model's labels the dataset has (ValueError when none): metrics come only where truth exists."""
    if not any(n in ds.label_names for n in names):
        raise ValueError(f"{ds.path}: the model predicts {names} but the dataset has none of them (it has "
                         f"{ds.label_names}); evaluate on a dataset prepared with those labels")
    return [n for n in names if n in ds.label_names]


def _example_rows(teff, idx, k=N_EXAMPLE_SPECTRA):
    """Row numbers of k stars spread over the Teff range (or the first k rows)."""
    ok = np.isfinite(teff)
    if ok.sum() >= k:
        order = np.argsort(teff[ok])
        pick = order[np.linspace(0, ok.sum() - 1, k).round().astype(int)]
        return np.unique(idx[ok][pick])
    return idx[:k]


def _resolve(file, ds_path):
    p = Path(file)
    for cand in (p, Path(ds_path).parent / p, Path(ds_path).parent.parent / p):
        if cand.exists():
            return cand
    return p


def model_metadata(model, path=None) -> dict:
    """What a report should say about a model: configs, seed, version, metrics, folder hash."""
    meta = {"path": str(path) if path else None}
    for k in ("label_names", "label_units", "model_config", "train_config", "metrics", "grid", "version"):
        if hasattr(model, k):
            meta[k] = getattr(model, k)
    tc = getattr(model, "train_config", None)
    meta["seed"] = getattr(tc, "seed", tc.get("seed") if isinstance(tc, dict) else None)
    hist = getattr(model, "history", None)
    if hist is not None:
        meta["epochs_trained"] = len(hist)
    if path and Path(path).exists():
        meta["sha256"] = hash_folder(path)
    return jsonable(meta)


def dataset_metadata(ds) -> dict:
    a = ds.attrs
    return jsonable({"path": str(ds.path), "n": ds.n, "n_pix": ds.n_pix, "label_names": ds.label_names,
                      "label_units": ds.label_units, "version": a.get("version"), "input_hash": a.get("input_hash"),
                      "created": a.get("created"), "grid": a.get("grid"), "preprocess": a.get("preprocess"),
                      "splits": {s: int(len(ds.indices(s))) for s in ("train", "val", "test")}})


@holds_lock("out_dir")  # one writer per report folder
def evaluate(model_or_path, dataset, out_dir, *, split: str = "test", progress: bool = True,
             batch_size: int = 4096, device=None, run: Run | None = None) -> dict:
    """Evaluate a model on one split of a prepared dataset and write the report folder.

    model_or_path: a loaded model (anything with ``predict((N, P) flux) -> (N, L)``,
    ``label_names``, ``label_units``) or a model folder. dataset: a :class:`Dataset` or its path.
    device: where the network predicts (``"auto"``, ``"cpu"``, ``"cuda[:N]"``, ``"mps"``); None
    keeps a loaded model where it is and loads a folder onto the CPU. run: a
    :class:`stellarparams.context.Run` giving ``progress`` and ``device`` at once (then those are not read).
    Returns the content of ``metrics.json`` (per-label metrics, binned tables, metadata,
    figure paths, notes about anything skipped).
    """
    from .dataset import opened

    requires("plots", "matplotlib")  # before any work
    run = run or Run(progress=progress, device=device)

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    model, path = _load(model_or_path, run.device)
    with opened(dataset) as ds:
        names = list(model.label_names)
        units = list(getattr(model, "label_units", None) or [ds.label_units[ds.label_names.index(n)]
                                                              if n in ds.label_names else "" for n in names])
        idx = _split_rows(model, ds, names, split)
        notes = []
        y_pred = predict_rows(model.predict, ds, idx, batch_size, run, desc=f"predict {split}")
        if y_pred.shape != (len(idx), len(names)):
            raise ValueError(f"model returned predictions of shape {y_pred.shape}, expected {(len(idx), len(names))}")
        y_true, meta, snr, teff = _truth(ds, idx, names, split, notes)
        tables, m, m_true, by_snr, by_teff = _metric_tables(out, y_true, y_pred, meta, snr, teff, names, units, notes)
        unc = _uncertainty(model, ds, idx, y_true, y_pred, snr, names, split, batch_size, run, notes)
        if unc is not None:
            tables["calibration"] = write_csv_md(unc["calibration"], out / "calibration")
        _write_predictions(out, idx, meta, snr, y_true, y_pred, names, unc)
        figs = _figures(out / "figures", ds, idx, y_true, y_pred, snr, teff, m, names, units, unc, notes)
        result = {
            "split": split, "n": int(len(idx)), "labels": m, "labels_vs_true": m_true,
            "mae_by_snr": by_snr.to_dict("records"), "mae_by_teff": by_teff.to_dict("records"),
            "calibration": unc["calibration"].to_dict("records") if unc is not None else None,
            "ood": ({"n_unlike_training": int((unc["ood"] > 1).sum()),
                     "fraction_unlike_training": float(np.mean(unc["ood"] > 1))} if unc is not None else None),
            "model": model_metadata(model, path), "dataset": dataset_metadata(ds), "environment": environment(),
            "tables": tables, "figures": {k: str(v) for k, v in figs.items()}, "notes": notes,
        }
        write_json(out / "metrics.json", result)
        _write_report(out, result, units)
    return result


def _load(model_or_path, device):
    """(model, its folder or None): a folder is loaded onto ``device`` (None: the CPU); a loaded
    model is moved there when ``device`` is given."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from .model_io import load_model

        path = Path(model_or_path)
        return load_model(path, "cpu" if device is None else device), path
    model = model_or_path
    if device is not None:
        model.to(device)
    return model, getattr(model, "path", None)


def _split_rows(model, ds, names, split) -> np.ndarray:
    """Dataset rows of ``split``, after checking that the model and the dataset fit together."""
    _label_columns(ds, names)
    if hasattr(model, "check_dataset"):  # grid / preprocessing must match the training data's
        model.check_dataset(ds)
    idx = ds.indices(split)
    if len(idx) == 0:
        raise ValueError(f"{ds.path}: the {split!r} split is empty; nothing to evaluate")
    return idx


def _truth(ds, idx, names, split, notes):
    """(y_true (N, L) with NaN where unknown, meta table, snr (N,), true Teff (N,)) of rows ``idx``."""
    from .training import label_matrix

    y_true = label_matrix(ds, idx, names)   # NaN where the catalog has no truth: left out of that label's metrics
    unknown = [n for j, n in enumerate(names) if not np.isfinite(y_true[:, j]).any()]
    if unknown:
        notes.append(f"no {', '.join(unknown)} labels in the {split} split of {ds.path}: no metrics for "
                     f"{'it' if len(unknown) == 1 else 'them'} (n = 0)")
    meta = ds.meta(idx)
    snr = meta["snr"].to_numpy(np.float64)
    teff = y_true[:, names.index("teff")] if "teff" in names else (
        ds.labels(idx)[:, ds.label_names.index("teff")] if "teff" in ds.label_names else np.full(len(idx), np.nan))
    return y_true, meta, snr, teff


def _metric_tables(out: Path, y_true, y_pred, meta, snr, teff, names, units, notes):
    """Per-label metrics (against the catalog, and the noiseless truth when the data carry it) and
    MAE by S/N and by Teff, written as tables; returns (tables, m, m_true, by_snr, by_teff)."""
    m = metrics(y_true, y_pred, names)
    tables = {"metrics": write_csv_md(metrics_table(m, units), out / "metrics")}
    # simulated data carry the noiseless truth as extra columns (TEFF_TRUE, ...): errors against it too
    true_cols = {n: f"{n.upper()}_TRUE" for n in names if f"{n.upper()}_TRUE" in meta}
    m_true = None
    if true_cols:
        y_exact = np.column_stack([meta[true_cols[n]].to_numpy(np.float64) if n in true_cols
                                   else np.full(len(y_true), np.nan) for n in names])
        m_true = metrics(y_exact, y_pred, names)
        tables["metrics_vs_true"] = write_csv_md(metrics_table(m_true, units), out / "metrics_vs_true")
    by_snr = binned_mae(y_true, y_pred, snr, SNR_EDGES, names, "snr")
    by_teff = binned_mae(y_true, y_pred, teff, TEFF_EDGES, names, "teff")
    if by_snr.empty:
        notes.append("no S/N known for these spectra: MAE by S/N not computed")
    if by_teff.empty:
        notes.append("no Teff known: MAE by Teff not computed")
    tables["mae_by_snr"] = write_csv_md(by_snr, out / "mae_by_snr")
    tables["mae_by_teff"] = write_csv_md(by_teff, out / "mae_by_teff")
    return tables, m, m_true, by_snr, by_teff


def _uncertainty(model, ds, idx, y_true, y_pred, snr, names, split, batch_size, run: Run, notes):
    """Calibrated uncertainties of rows ``idx``: {"sigma", "half95" (N, L), "ood" (N,),
    "calibration": coverage at 1 and 2 sigma per label and S/N bin}; None for a model without them."""
    if getattr(model, "uncertainty", None) is None:
        notes.append("the model has no uncertainty calibration (trained before stellarparams had it): "
                     "no sigma, calibration table or reliability figure; retrain it to get them")
        return None
    from .uncertainty import coverage_table

    parts = {"ood": [], "half95": []}

    def run_full(X):
        r = model.predict_arrays(X, batch_size)
        parts["ood"].append(r["ood_score"])
        parts["half95"].append((r["hi95"] - r["lo95"]) / 2)
        return r["sigma"]

    sigma = predict_rows(run_full, ds, idx, batch_size, run, desc=f"sigma {split}")
    half95 = np.concatenate(parts["half95"])
    calib = coverage_table(y_true, y_pred, sigma, snr, names, SNR_EDGES, half95=half95)
    return {"sigma": sigma, "half95": half95, "ood": np.concatenate(parts["ood"]), "calibration": calib}


def _write_predictions(out: Path, idx, meta, snr, y_true, y_pred, names, unc):
    """``predictions.csv``: one row per spectrum, truth, prediction and (with ``unc``) the error bars."""
    pred_df = pd.DataFrame({"row": idx, "object_id": meta["object_id"], "file": meta["file"], "snr": snr})
    for j, n in enumerate(names):
        pred_df[f"true_{n}"] = y_true[:, j]
        pred_df[f"pred_{n}"] = y_pred[:, j]
        if unc is not None:
            pred_df[f"sigma_{n}"] = unc["sigma"][:, j]
            half = unc["half95"][:, j]
            pred_df[f"lo95_{n}"], pred_df[f"hi95_{n}"] = y_pred[:, j] - half, y_pred[:, j] + half
    if unc is not None:
        pred_df["ood_score"] = unc["ood"]
    write_text(out / "predictions.csv", pred_df.to_csv(index=False))


def _figures(fig_dir: Path, ds, idx, y_true, y_pred, snr, teff, m, names, units, unc, notes) -> dict:
    """The report's figures; returns {name: path}; what cannot be drawn goes to ``notes``."""
    from . import plots
    from .training import label_matrix

    figs = {}
    by_split = {s: label_matrix(ds, ds.indices(s), names) for s in ("train", "val", "test") if len(ds.indices(s))}
    figs["label_densities"] = plots.label_densities(by_split, names, units, fig_dir / "label_densities.png")
    ex = _example_rows(teff, idx)
    ex_meta = ds.meta(ex)
    ex_teff = ds.labels(ex)[:, ds.label_names.index("teff")] if "teff" in ds.label_names else np.full(len(ex), np.nan)
    titles = [f"{o}  Teff {t:.0f} K" if np.isfinite(t) else str(o) for o, t in zip(ex_meta["object_id"], ex_teff)]
    spectra, raw_titles = _raw_spectra(ex_meta["file"], titles, ds.path, notes)
    if spectra:
        figs["raw_spectra"] = plots.raw_spectra(spectra, fig_dir / "raw_spectra.png", raw_titles)
    else:
        notes.append("raw-spectra figure skipped: the source FITS files of the example stars are not available")
    figs["normalised_spectra"] = plots.normalised_spectra(ds.grid.loglam, ds.flux(ex), ex_teff,
                                                          fig_dir / "normalised_spectra.png", titles, ds.valid(ex))
    figs["pred_vs_true"] = plots.pred_vs_true(y_true, y_pred, names, units, fig_dir / "pred_vs_true.png", stats=m)
    if np.isfinite(snr).any():
        figs["residuals_vs_snr"] = plots.residuals_vs_snr(y_true, y_pred, snr, names, units,
                                                          fig_dir / "residuals_vs_snr.png")
    else:
        notes.append("residuals-vs-S/N figure skipped: no S/N known for these spectra")
    if unc is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (y_pred - y_true) / unc["sigma"]
        figs["reliability"] = plots.reliability(z, names, fig_dir / "reliability.png")
        figs["z_histograms"] = plots.z_histograms(z, names, fig_dir / "z_histograms.png")
    return figs


def _raw_spectra(files, titles, ds_path, notes):
    """(spectra, titles) of the example stars whose source files can be read; the others go to ``notes``."""
    from .spectrum import SpectrumError
    from .surveys.sdss import read_spectrum

    spectra, raw_titles = [], []
    for f, t in zip(files, titles):
        if not f:
            continue
        try:
            spectra.append(read_spectrum(_resolve(f, ds_path)))
            raw_titles.append(t)
        except SpectrumError as e:
            notes.append(f"raw spectrum not shown: {e}")
    return spectra, raw_titles


# ----------------------------------------------------------------------------- report page

FIG_CAPTIONS = {
    "label_densities": "Label distributions per split (paper Fig. 1).",
    "raw_spectra": "Raw spectra of example stars as read from their files (paper Fig. 2).",
    "normalised_spectra": "Prepared rest-frame spectra, standardized, with the Planck curve of each "
                          "star's Teff standardized the same way (paper Fig. 3).",
    "pred_vs_true": "Predicted against true on the evaluated split, coloured by point density (paper Fig. 5).",
    "residuals_vs_snr": "Residuals against S/N, with binned median and 16-84% band.",
    "reliability": "Reliability of the error bars: observed fraction of |pred - true| within the Gaussian "
                   "interval of each expected coverage; calibrated error bars lie on the diagonal.",
    "z_histograms": "(predicted - true) / sigma per label next to the unit Gaussian.",
}

CALIBRATION_TEXT = ("Fraction of |predicted - label| within 1 sigma (target 68.3%, +- 5 points) and 2 sigma "
                    "(target 95.4%, +- 3 points), for all spectra (snr_lo empty) and per S/N bin; "
                    "median_sigma in the label's units. The error is against the catalog label, "
                    "whose own noise is part of what sigma has to cover.")


def _write_report(out: Path, r: dict, units) -> None:
    m = metrics_table(r["labels"], units)
    by_snr, by_teff = pd.DataFrame(r["mae_by_snr"]), pd.DataFrame(r["mae_by_teff"])
    calib = pd.DataFrame(r["calibration"]) if r.get("calibration") else None
    model, data = r["model"], r["dataset"]
    meta_lines = [
        f"- stellarparams {r['environment']['stellarparams']}, torch {r['environment']['torch']}, "
        f"scikit-learn {r['environment']['scikit-learn']}",
        (f"- model: `{model['path']}` (sha256 {str(model.get('sha256'))[:16]}), " if model.get("path")
         else "- model: in memory, never saved to a folder, ") + f"seed {model.get('seed')}, "
        f"epochs trained {model.get('epochs_trained')}",
        f"- dataset: `{data['path']}`, {data['n']:,} spectra x {data['n_pix']} pixels, splits {data['splits']}, "
        f"input hash {data.get('input_hash')!r}, written by stellarparams {data.get('version')}",
        f"- evaluated split: {r['split']} ({r['n']:,} spectra)",
    ]
    md = [f"# Evaluation report ({r['split']} split)", "", *meta_lines, "",
          "## Metrics per label", "", markdown_table(m),
          *(["## Metrics against the noiseless simulated truth", "",
              markdown_table(metrics_table(r["labels_vs_true"], units))] if r.get("labels_vs_true") else []),
          "## MAE by S/N", "", markdown_table(by_snr) if not by_snr.empty else "(no S/N known)\n",
          "## MAE by true Teff", "", markdown_table(by_teff) if not by_teff.empty else "(no Teff known)\n",
          *(["## Calibration of the error bars", "", CALIBRATION_TEXT, "", markdown_table(calib)]
            if calib is not None else []),
          "## Figures", ""]
    for k, p in r["figures"].items():
        md += [f"![{k}](figures/{Path(p).name})", "", FIG_CAPTIONS.get(k, ""), ""]
    if r["notes"]:
        md += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    md += ["## Configuration", "", "```json", json.dumps(
        {"model_config": model.get("model_config"), "train_config": model.get("train_config")}, indent=2), "```", ""]
    write_text(out / "report.md", "\n".join(md))

    def tbl(df):
        return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0) if not df.empty \
            else "<p>(not available)</p>"

    parts = [f"<h1>Evaluation report ({html.escape(r['split'])} split)</h1><ul>"]
    parts += [f"<li>{html.escape(line[2:])}</li>" for line in meta_lines] + ["</ul>"]
    parts += ["<h2>Metrics per label</h2>", tbl(m)]
    if r.get("labels_vs_true"):
        parts += ["<h2>Metrics against the noiseless simulated truth</h2>",
                  tbl(metrics_table(r["labels_vs_true"], units))]
    parts += ["<h2>MAE by S/N</h2>", tbl(by_snr),
              "<h2>MAE by true Teff</h2>", tbl(by_teff)]
    if calib is not None:
        parts += ["<h2>Calibration of the error bars</h2>", f"<p>{html.escape(CALIBRATION_TEXT)}</p>", tbl(calib)]
    parts += ["<h2>Figures</h2>"]
    for k, p in r["figures"].items():
        b64 = base64.b64encode(Path(p).read_bytes()).decode()
        parts.append(f'<figure><img src="data:image/png;base64,{b64}" alt="{k}">'
                     f"<figcaption>{html.escape(FIG_CAPTIONS.get(k, k))}</figcaption></figure>")
    if r["notes"]:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in r["notes"]] + ["</ul>"]
    parts += ["<h2>Configuration</h2><pre>", html.escape(json.dumps(
        {"model_config": model.get("model_config"), "train_config": model.get("train_config")}, indent=2)), "</pre>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ccc;text-align:right}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>stellarparams evaluation</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    write_text(out / "report.html", page)


# ----------------------------------------------------------------------------- CLI

def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="model folder written by `stellarparams train`")
    p.add_argument("--dataset", required=True, metavar="D", help="prepared dataset folder (from `stellarparams prepare`)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="folder for metrics.json, tables (CSV + markdown), figures/*.png, report.md and report.html")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to evaluate")
    p.add_argument("--batch-size", type=int, default=4096, help="spectra per prediction batch")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device", default="auto",
                   help="where the network predicts: auto (CUDA when present, then MPS, else CPU), cpu, cuda, cuda:N, mps")


def run_cli(args) -> int:
    r = evaluate(args.model, args.dataset, args.out, split=args.split, batch_size=args.batch_size,
                 run=Run.from_args(args))
    print(f"{r['split']} split, {r['n']:,} spectra")
    print(markdown_table(metrics_table(r["labels"], r["model"].get("label_units"))[
        ["label", "unit", "mae", "rmse", "bias", "scatter", "mae_pct_range", "n"]]))
    if r.get("labels_vs_true"):
        print("against the noiseless simulated truth: " + ", ".join(
            f"{k} MAE {v['mae']:.4g}" for k, v in r["labels_vs_true"].items()))
    if r.get("calibration"):
        from .uncertainty import format_coverage

        print(format_coverage(pd.DataFrame(r["calibration"])))
        print(f"{r['ood']['n_unlike_training']} spectra unlike the training spectra (ood_score > 1)")
    for n in r["notes"]:
        print(f"note: {n}")
    print(f"report: {Path(args.out) / 'report.html'} (also report.md, metrics.json, figures/)")
    return 0
