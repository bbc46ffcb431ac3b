"""Run a trained model on new SDSS spectra: files, folders or a catalog with a FILE column.

Files are read and preprocessed in a pool of processes (chunks of ``chunk_size`` files,
at most 2 chunks per worker in flight), the network runs in the main process, and rows
are appended to the output as they come, so memory stays flat for any number of files.
Finished parts go to ``.OUT.partial/`` (so a killed run resumes), and the output (CSV,
Parquet or FITS by suffix) is assembled from them under a temporary name and renamed. One row per input file, in input order::

    file, plate, mjd, fiberid, <label columns (teff, feh, logg)>, sigma_<label> ...,
    ood_score, snr, rv, flag_rejected, reject_reason, reject_detail, flag_out_of_range,
    flag_label_hull, flag_unlike_training, flag_low_snr

Rejected inputs (unreadable, not a star, too little good data, ...) keep their row with
NaN labels and the reason. ``sigma_<label>``: calibrated 1-sigma uncertainty (same units;
NaN for a model trained without calibration); ``ood_score``: how unlike the training
spectra the flux is (> 1: less alike than 99.5% of held-out training-like stars;
``flag_unlike_training``); ``flag_out_of_range``: a label outside the range seen in
training; ``flag_label_hull``: the labels outside the convex hull of the training labels;
``flag_low_snr``: median S/N per pixel below ``min_snr``. See stellarparams.uncertainty.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from . import sdss

CATALOG_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq", ".txt")
_STR_WIDTHS = {"reject_reason": 24, "reject_detail": 160}


# ---------------------------------------------------------------------- inputs
def _is_catalog(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(CATALOG_SUFFIXES):
        return True
    if name.endswith((".fits", ".fit", ".fits.gz")) and not name.startswith(("spec-", "spspec-")):
        try:  # a FITS table with a FILE column is a catalog; anything else is taken as a spectrum
            import fitsio

            with fitsio.FITS(str(path)) as f:
                return len(f) > 1 and f[1].get_exttype() == "BINARY_TBL" and \
                    "FILE" in [c.upper() for c in f[1].get_colnames()]
        except (OSError, ValueError):
            return False
    return False


def _catalog_items(path, rv_column="RV_ADOP") -> list[tuple[str, float]]:
    cat = sdss.read_catalog(path)
    if "FILE" not in cat.columns:
        raise ValueError(f"{path}: a catalog given as input needs a FILE column with spectrum paths "
                         f"(it has {', '.join(cat.columns[:20])})")
    base = Path(path).parent if not isinstance(path, pd.DataFrame) else Path(".")
    rv = cat[rv_column].to_numpy(np.float64) if rv_column in cat.columns else np.full(len(cat), np.nan)
    items = []
    for f, v in zip(cat["FILE"].astype(str), rv):
        p = Path(f.strip())
        if not p.is_absolute() and not p.exists() and (base / p).exists():
            p = base / p
        items.append((str(p), float(v)))
    return items


def collect_inputs(inputs, catalog=None, rv_column="RV_ADOP") -> list[tuple[str, float]]:
    """Spectrum files, folders (searched recursively) and catalogs -> [(file, rv_kms or NaN)].

    ``catalog`` (path or DataFrame) may carry RV_ADOP for files given otherwise, matched by
    FILE or by (PLATE, MJD, FIBERID) parsed from the file name; NaN RV -> the file's redshift.
    """
    from .prepare import find_spectra, parse_spectrum_name

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    items = []
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            items += [(str(f), np.nan) for f in find_spectra(p)]
        elif p.exists() and _is_catalog(p):
            items += _catalog_items(p, rv_column)
        else:  # a missing file is kept: it becomes a rejected row, not a crash
            items.append((str(p), np.nan))
    if catalog is not None:
        cat = sdss.read_catalog(catalog)
        if rv_column in cat.columns:
            rv_by = {}
            if "FILE" in cat.columns:
                rv_by.update({Path(str(f).strip()).name: v for f, v in zip(cat["FILE"], cat[rv_column])})
            if all(c in cat.columns for c in sdss.CATALOG_ID_COLUMNS):
                ids = cat[list(sdss.CATALOG_ID_COLUMNS)].to_numpy(np.int64)
                rv_by.update({tuple(k): v for k, v in zip(map(tuple, ids), cat[rv_column])})
            items = [(f, v if np.isfinite(v) else
                      float(rv_by.get(Path(f).name, rv_by.get(parse_spectrum_name(Path(f).name), np.nan))))
                     for f, v in items]
        if not items and "FILE" in cat.columns:
            items = _catalog_items(catalog, rv_column)
    return items


# ---------------------------------------------------------------------- workers
def _read_chunk(items, prepare_config: dict, n_pix: int) -> dict:
    """Read + preprocess a list of (file, rv). Never raises: problems become reasons."""
    from .model_io import rv_from_z
    from .prepare import PrepareConfig, preprocess

    config = PrepareConfig.from_dict(prepare_config) if prepare_config else PrepareConfig()
    n = len(items)
    flux = np.zeros((n, n_pix), np.float32)
    ok = np.zeros(n, bool)
    info = {k: np.zeros(n, np.int32) for k in ("plate", "mjd", "fiberid")}
    snr, rv_used = np.full(n, np.nan), np.full(n, np.nan)
    reason, detail = [""] * n, [""] * n
    for i, (path, rv) in enumerate(items):
        try:
            spec = sdss.read_spectrum(path)
            info["plate"][i], info["mjd"][i], info["fiberid"][i] = spec.plate, spec.mjd, spec.fiberid
            snr[i] = spec.snr
            if spec.objclass and spec.objclass in config.reject_classes:
                raise sdss.SpectrumError(path, "not_a_star", f"CLASS {spec.objclass}")
            if not np.isfinite(rv):
                rv = rv_from_z(getattr(spec, "z", np.nan))
            rv_used[i] = rv
            flux[i], _ = preprocess(spec, rv, config)
            ok[i] = True
        except sdss.SpectrumError as e:
            reason[i], detail[i] = e.reason, e.detail
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the batch
            reason[i], detail[i] = "error", f"{type(e).__name__}: {e}"[:300]
    return {"flux": flux[ok], "ok": ok, "snr": snr, "rv": rv_used, "reason": reason, "detail": detail, **info}


# ---------------------------------------------------------------------- output
class TableWriter:
    """Append DataFrames to OUT.tmp (CSV, Parquet or FITS by suffix); ``close`` renames it to OUT."""

    def __init__(self, path, file_width: int = 256):
        self.path = Path(path)
        name = self.path.name.lower()
        self.kind = ("parquet" if name.endswith((".parquet", ".pq")) else
                     "fits" if name.endswith((".fits", ".fit")) else "csv" if name.endswith((".csv", ".txt")) else None)
        if self.kind is None:
            raise ValueError(f"{path}: output must end in .csv, .parquet or .fits")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.tmp.unlink(missing_ok=True)
        self.file_width, self._w, self.n = max(8, file_width), None, 0

    def append(self, df: pd.DataFrame):
        if self.kind == "csv":
            df.to_csv(self.tmp, mode="a", header=self.n == 0, index=False)
        elif self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._w is None:
                self._w = pq.ParquetWriter(self.tmp, table.schema)
            self._w.write_table(table.cast(self._w.schema))
        else:
            import fitsio

            if self._w is None:
                self._w = fitsio.FITS(str(self.tmp), "rw", clobber=True)
            rec = self._records(df)
            if self.n == 0:
                self._w.write(rec, extname="PREDICTIONS")
            else:
                self._w[-1].append(rec)
        self.n += len(df)

    def _records(self, df):
        cols = []
        for c in df.columns:
            v = df[c].to_numpy()
            if v.dtype == object:
                w = self.file_width if c == "file" else _STR_WIDTHS.get(c, 64)
                v = np.array([str(s)[:w] for s in v], dtype=f"U{w}")
            cols.append((c, v))
        return np.rec.fromarrays([v for _, v in cols], names=[c for c, _ in cols])

    def close(self):
        if self._w is not None:
            self._w.close()
        if not self.tmp.exists():  # nothing appended: still write an empty table with a header
            raise ValueError(f"{self.path}: nothing to write")
        os.replace(self.tmp, self.path)

    def abort(self):
        if self._w is not None:
            self._w.close()
        self.tmp.unlink(missing_ok=True)


def _rows(model, items, r, min_snr, batch_size) -> pd.DataFrame:
    n, ok = len(items), r["ok"]
    pred, sigma = np.full((n, len(model.label_names)), np.nan), np.full((n, len(model.label_names)), np.nan)
    ood, unlike, hull = np.full(n, np.nan), np.zeros(n, bool), np.zeros(n, bool)
    if ok.any():
        full = model._full(r["flux"], batch_size)
        pred[ok], sigma[ok], ood[ok] = full["pred"], full["sigma"], full["ood_score"]
        unlike[ok], hull[ok] = full["flag_unlike_training"], full["flag_label_hull"]
    df = pd.DataFrame({"file": [f for f, _ in items], "plate": r["plate"], "mjd": r["mjd"], "fiberid": r["fiberid"]})
    for j, name in enumerate(model.label_names):
        df[name] = pred[:, j]
    for j, name in enumerate(model.label_names):
        df[f"sigma_{name}"] = sigma[:, j]
    df["ood_score"] = ood.astype(np.float32)
    df["snr"] = r["snr"].astype(np.float32)
    df["rv"] = r["rv"].astype(np.float32)
    df["flag_rejected"] = ~r["ok"]
    df["reject_reason"] = r["reason"]
    df["reject_detail"] = r["detail"]
    df["flag_out_of_range"] = model.out_of_range(pred) & r["ok"]
    df["flag_label_hull"] = hull
    df["flag_unlike_training"] = unlike
    with np.errstate(invalid="ignore"):
        df["flag_low_snr"] = r["snr"] < min_snr
    return df


def _job_key(model, items, min_snr) -> str:
    h = hashlib.sha256(json.dumps([model.fingerprint, model.label_names, model.center.tolist(), min_snr,
                                  "sigma", getattr(model, "uncertainty", None) is not None]).encode())
    for f, rv in items:
        h.update(f"{f}|{rv}\n".encode())
    return h.hexdigest()[:24]


def predict(model, inputs, out, *, catalog=None, batch_size: int = 1024, workers: int | None = None,
            min_snr: float = 5.0, chunk_size: int = 128, part_chunks: int = 32, progress: bool = True) -> dict:
    """Predict labels for every input spectrum and write one table row per file.

    model: a Model or a model folder; inputs: spectrum files, folders, catalogs with FILE
    (see :func:`collect_inputs`); out: .csv / .parquet / .fits; workers: reading
    processes (default: all CPUs; 0 or 1 reads in this process).
    Finished parts (``part_chunks`` x ``chunk_size`` files) are kept in ``.OUT.partial/``;
    killed and run again with the same inputs, only the missing parts are read.
    Returns a summary dict: counts by outcome, rejection reasons, seconds, spectra/s.
    """
    from tqdm.auto import tqdm

    from .model_io import Model, load_model

    t0 = time.perf_counter()
    model = model if isinstance(model, Model) else load_model(model)
    items = collect_inputs(inputs, catalog)
    if not items:
        raise ValueError(f"no spectrum files found in {inputs}")
    out = Path(out)
    writer = TableWriter(out, file_width=max(len(f) for f, _ in items))  # checks the suffix early
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    parts = [chunks[i:i + part_chunks] for i in range(0, len(chunks), part_chunks)]
    partial = out.parent / f".{out.name}.partial"
    key = _job_key(model, items, min_snr)
    if partial.exists() and _read_key(partial) != key:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "job.json").write_text(json.dumps({"key": key, "n_files": len(items)}))
    part_file = [partial / f"part-{k:05d}.parquet" for k in range(len(parts))]
    todo = [k for k in range(len(parts)) if not part_file[k].exists()]
    n_done = sum(len(c) for k in range(len(parts)) if k not in todo for c in parts[k])
    if n_done and progress:
        print(f"resuming: {n_done} of {len(items)} spectra already predicted in {partial}", file=sys.stderr)
    workers = (os.cpu_count() or 1) if workers is None else workers
    args = (model.prepare_config, model.n_in)
    buffers = {k: [] for k in todo}
    bar = tqdm(total=len(items) - n_done, desc="predict", unit="spec", disable=not progress, smoothing=0.1)

    def consume(k, chunk, r):
        buffers[k].append(_rows(model, chunk, r, min_snr, batch_size))
        if len(buffers[k]) == len(parts[k]):  # part complete: publish it
            tmp = part_file[k].with_suffix(".tmp")
            pd.concat(buffers.pop(k), ignore_index=True).to_parquet(tmp, index=False)
            os.replace(tmp, part_file[k])
        bar.update(len(chunk))

    jobs = [(k, chunk) for k in todo for chunk in parts[k]]
    try:
        if workers <= 1 or len(jobs) <= 1:
            for k, chunk in jobs:
                consume(k, chunk, _read_chunk(chunk, *args))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                pending = deque()
                for k, chunk in jobs:  # keep <= 2 chunks per worker in flight; consume in input order
                    pending.append((k, chunk, pool.submit(_read_chunk, chunk, *args)))
                    if len(pending) >= 2 * workers:
                        k0, c0, fut = pending.popleft()
                        consume(k0, c0, fut.result())
                while pending:
                    k0, c0, fut = pending.popleft()
                    consume(k0, c0, fut.result())
    finally:
        bar.close()

    # assemble the parts, in input order, into the requested format
    counts = {"rejected": 0, "out_of_range": 0, "low_snr": 0, "unlike_training": 0, "label_hull": 0}
    reasons = {}
    try:
        for f in part_file:
            df = pd.read_parquet(f)
            writer.append(df)
            counts["rejected"] += int(df["flag_rejected"].sum())
            counts["out_of_range"] += int(df["flag_out_of_range"].sum())
            counts["low_snr"] += int(df["flag_low_snr"].sum())
            counts["unlike_training"] += int(df["flag_unlike_training"].sum()) if "flag_unlike_training" in df else 0
            counts["label_hull"] += int(df["flag_label_hull"].sum()) if "flag_label_hull" in df else 0
            for reason, v in df.loc[df["flag_rejected"], "reject_reason"].value_counts().items():
                reasons[reason] = reasons.get(reason, 0) + int(v)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - t0
    summary = {"out": str(out), "n_files": len(items), "n_predicted": len(items) - counts["rejected"],
               "n_rejected": counts["rejected"], "rejected_by_reason": dict(sorted(reasons.items())),
               "n_out_of_range": counts["out_of_range"], "n_low_snr": counts["low_snr"],
               "n_unlike_training": counts["unlike_training"], "n_outside_label_hull": counts["label_hull"],
               "calibrated": model.uncertainty is not None, "resumed_from": n_done,
               "seconds": round(seconds, 2), "spectra_per_s": round((len(items) - n_done) / max(seconds, 1e-9), 1)}
    if progress:
        print(format_summary(summary), file=sys.stderr)
    return summary


def _read_key(partial: Path):
    try:
        return json.loads((partial / "job.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def format_summary(s: dict) -> str:
    lines = [f"{s['out']}: {s['n_predicted']} of {s['n_files']} spectra predicted in {s['seconds']:.1f} s "
             f"({s['spectra_per_s']:.0f}/s); {s['n_out_of_range']} outside the training label range, "
             f"{s['n_low_snr']} with low S/N"]
    if s.get("calibrated", True):
        lines.append(f"{s.get('n_unlike_training', 0)} unlike the training spectra (ood_score > 1), "
                     f"{s.get('n_outside_label_hull', 0)} with labels outside the training labels' hull")
    else:
        lines.append("this model has no uncertainty calibration: sigma_* and ood_score are NaN (retrain it to get them)")
    if s["n_rejected"]:
        lines.append(f"rejected {s['n_rejected']}: " + ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items())
                     + " (see the reject_reason/reject_detail columns)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser):
    p.description = ("Predict Teff, [Fe/H], log g (the model's labels) for SDSS spectra. Each file is "
                     "preprocessed exactly as the model's training data (rest frame from RV_ADOP in --catalog, "
                     "else from the file's redshift Z). One output row per input, with flags for rejected "
                     "inputs (and why), labels outside the training range, and low S/N. Every row also "
                     "carries calibrated 1-sigma uncertainties (sigma_teff, ...) and ood_score / "
                     "flag_unlike_training (flux unlike the training spectra: cut on ood_score) and "
                     "flag_label_hull (labels outside the training labels' convex hull).")
    p.add_argument("model", help="model folder (from `stellarparams train` or `stellarparams run`)")
    p.add_argument("inputs", nargs="+", help="spectrum files, folders (searched recursively), or catalogs "
                   "(.csv/.parquet/.fits) with a FILE column and optional RV_ADOP")
    p.add_argument("--out", required=True, help="output table: .csv, .parquet or .fits")
    p.add_argument("--catalog", help="catalog with RV_ADOP (km/s) for the inputs, matched by FILE or PLATE/MJD/FIBERID")
    p.add_argument("--batch-size", type=int, default=1024, help="spectra per network batch")
    p.add_argument("--workers", type=int, default=None, help="reading processes; None: all CPUs")
    p.add_argument("--min-snr", type=float, default=5.0, help="flag_low_snr below this median S/N per pixel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    from .model_io import ModelFileError

    try:
        summary = predict(args.model, args.inputs, args.out, catalog=args.catalog, batch_size=args.batch_size,
                          workers=args.workers, min_snr=args.min_snr, progress=not args.quiet)
    except (ModelFileError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.quiet:
        print(format_summary(summary))
    return 0 if summary["n_predicted"] else 1
