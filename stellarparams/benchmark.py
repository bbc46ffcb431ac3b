"""The paper's comparison (docs/method.md, section "Reported results"): baselines and ablations on one split.

Every model is trained on the same train split (validation split for model selection),
evaluated on the same test rows, and timed on the same test flux with the same batch
size and threads:

    OLS, Ridge          scikit-learn on the prepared flux (baselines.py)
    CNN, DNN            the StarNet-like CNN and per-label DNN, trained by ``train``
    proposed            the residual multitask MLP (ModelConfig())
    no_skip             ModelConfig(skip=False)
    no_skip_no_ln       ModelConfig(skip=False, layernorm=False)
    no_multitask        ModelConfig(multitask=False): one network per label

Library::

    from stellarparams.benchmark import benchmark
    res = benchmark("runs/default/dataset", "runs/default/benchmark", quick=True)

Command::

    stellarparams benchmark --dataset D --out REPORT_DIR [--quick] [--models OLS,Ridge,proposed]

``REPORT_DIR`` receives the paper's tables (CSV + markdown): ``table2_mae``,
``table3_params_time``, ``table4_relative_to_dnn``, ``table5_relative_to_proposed``;
``paper_comparison.md`` (each claim of the paper, agrees / disagrees), ``report.md``,
``results.json`` (seed, configs, versions, everything) and ``predictions.csv`` (test rows,
truth and every model's prediction). Each model's finished result is kept in
``models/NAME/`` so a killed benchmark resumes where it stopped; a model that fails is
reported with its error and the others still run.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .context import Run
from .evaluate import dataset_metadata, environment, markdown_table, metrics, predict_rows, write_csv_md, write_json
from .files import atomic_write, write_text
from .outputs import holds_lock

MODELS = ("OLS", "Ridge", "CNN", "DNN", "proposed", "no_skip", "no_skip_no_ln", "no_multitask")
ABLATIONS = {"proposed": {}, "no_skip": {"skip": False}, "no_skip_no_ln": {"skip": False, "layernorm": False},
             "no_multitask": {"multitask": False}}
QUICK_EPOCHS = 1
N_TIMING_RUNS = 10

# docs/method.md, section "Reported results" (SDSS DR12 test set, 15,000 spectra); MAE order teff, feh, logg
PAPER_MAE = {"OLS": (143.75, 0.26, 0.28), "Ridge": (115.24, 0.21, 0.23), "CNN": (81.72, 0.138, 0.166),
             "DNN": (60.51, 0.103, 0.140), "proposed": (59.75, 0.103, 0.130)}
PAPER_PARAMS = {"CNN": 4.13e6, "DNN": 13.66e6, "proposed": 0.54e6}
PAPER_TIME_REL_DNN = {"CNN": 0.50, "DNN": 1.00, "proposed": 0.16}
PAPER_ABLATION_REL = {  # relative to proposed: params, time, MAE (teff, feh, logg)
    "no_skip": (0.99, 0.69, (1.39, 1.24, 1.15)),
    "no_skip_no_ln": (0.98, 0.73, (1.56, 1.17, 1.28)),
    "no_multitask": (2.97, 2.71, (0.99, 1.00, 1.01)),
}
PAPER_LABELS = ("teff", "feh", "logg")


# ----------------------------------------------------------------------------- the models

class _Context:
    """What every model's fit function needs: the dataset, labels, seeds, configs, folders, and the
    :class:`stellarparams.context.Run` (progress, device, precision) as ``run``."""

    def __init__(self, ds, out, seed, epochs, threads, run: Run):
        from .config import ModelConfig, TrainConfig

        self.ds, self.out, self.run = ds, Path(out), run
        self.model_config = ModelConfig()
        self.labels = self.model_config.labels
        missing = [n for n in self.labels if n not in ds.label_names]
        if missing:
            raise ValueError(f"{ds.path}: the benchmark needs the labels {self.labels}; the dataset lacks {missing}")
        self.cols = [ds.label_names.index(n) for n in self.labels]
        self.units = [ds.label_units[c] for c in self.cols]
        # the tables compare accuracy: sigmas are calibrated on val only (no out-of-fold models)
        self.train_config = replace(TrainConfig(), seed=seed, threads=threads, calib_folds=0,
                                    **({"epochs": epochs} if epochs is not None else {}))
        self._arrays = {}

    def arrays(self, split):
        """(flux, labels) of a split, loaded once and shared by the linear models."""
        if split not in self._arrays:
            idx = self.ds.indices(split)
            self._arrays[split] = (self.ds.flux(idx), self.ds.labels(idx)[:, self.cols].astype(np.float64))
        return self._arrays[split]


class _Fitted:
    """A uniform handle: ``predict((B, P) flux) -> (B, L)`` physical units, ``n_params``, ``info``."""

    def __init__(self, predict, n_params, info=None):
        self.predict, self.n_params, self.info = predict, int(n_params), info or {}


def fit_linear(name, ctx) -> _Fitted:
    from .baselines import OLS, RidgeVal

    X, Y = ctx.arrays("train")
    if name == "OLS":
        est = OLS().fit(X, Y)
        return _Fitted(est.predict, est.n_params)
    Xv, Yv = ctx.arrays("val")
    est = RidgeVal().fit(X, Y, Xv, Yv)
    info = {"alpha": dict(zip(ctx.labels, est.alpha_.tolist())), "alphas_tried": list(est.alphas),
            "alpha_at_grid_edge": dict(zip(ctx.labels, est.alpha_at_edge))}
    return _Fitted(est.predict, est.n_params, info)


def fit_network(name, ctx) -> _Fitted:
    from .baselines import CNN, DNN
    from .config import ModelConfig
    from .model import count_parameters
    from .train import train

    import torch

    ctx._arrays.clear()  # the linear models' in-memory copies are no longer needed
    L, P = len(ctx.labels), ctx.ds.n_pix
    mc = ctx.model_config
    net = None
    torch.manual_seed(ctx.train_config.seed)  # the baselines' initial weights follow the seed too
    if name == "CNN":
        net = CNN(P, L)
    elif name == "DNN":
        net = DNN(P, L)
    else:
        mc = ModelConfig(**ABLATIONS[name])
    model = train(ctx.ds, ctx.out / "models" / name / "model", mc, ctx.train_config, net=net, run=ctx.run)
    info = {"model_config": mc.to_dict() if net is None else {"architecture": type(net).__name__, **net.to_dict()},
            "train_metrics": model.metrics}
    return _Fitted(model.predict, count_parameters(model.net), info)


FITTERS = {"OLS": fit_linear, "Ridge": fit_linear, "CNN": fit_network, "DNN": fit_network,
           **{k: fit_network for k in ABLATIONS}}


# ----------------------------------------------------------------------------- timing

def time_inference(predict, X, batch_size: int, n_runs: int = N_TIMING_RUNS) -> dict:
    """Wall time of predicting all rows of X in batches of ``batch_size``, mean/std over n_runs
    (after one untimed warm-up run). X: (N, P) float32 in memory, so no disk time is counted."""
    def once():
        t0 = time.perf_counter()
        for i in range(0, len(X), batch_size):
            predict(X[i:i + batch_size])
        return time.perf_counter() - t0

    once()
    t = np.array([once() for _ in range(n_runs)])
    return {"time_s": float(t.mean()), "time_std_s": float(t.std()), "time_median_s": float(np.median(t)),
            "n_runs": n_runs,
            "spectra_per_s": float(len(X) / t.mean()) if t.mean() > 0 else float("inf")}


# ----------------------------------------------------------------------------- the run

def _signature(ds, seed, epochs, batch_size, threads, labels) -> str:
    from ._version import __version__

    d = {"data": [ds.attrs.get("input_hash") or str(Path(ds.path).resolve()), ds.n], "seed": seed,
         "epochs": epochs, "batch_size": batch_size, "threads": threads, "labels": list(labels),
         "version": __version__}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _error_summary(e: BaseException) -> dict:
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            "where": where, "traceback": "".join(traceback.format_exception(e))[-4000:]}


def run_one(name, fitter, ctx, test_idx, X_test, y_true, batch_size, sig) -> dict:
    """Fit, predict the test rows and time one model; the result (or its error) is stored in
    ``OUT/models/NAME/result.json`` (+ ``test_pred.npy``) and returned."""
    folder = ctx.out / "models" / name
    res_path, pred_path = folder / "result.json", folder / "test_pred.npy"
    if res_path.exists() and pred_path.exists():
        done = json.loads(res_path.read_text())
        if done.get("signature") == sig and not done.get("error"):
            ctx.run.say(f"  {name}: already done in an earlier run (delete {folder} to redo it)")
            done["test_pred"] = np.load(pred_path, allow_pickle=False)
            done["resumed"] = True
            return done
    folder.mkdir(parents=True, exist_ok=True)
    res = {"model": name, "signature": sig, "rows_sha256": hashlib.sha256(test_idx.tobytes()).hexdigest()}
    t0 = time.perf_counter()
    try:
        fitted = fitter(name, ctx)
        res["fit_s"] = time.perf_counter() - t0
        pred = predict_rows(fitted.predict, ctx.ds, test_idx, batch_size, ctx.run.quiet())
        if pred.shape != y_true.shape:
            raise ValueError(f"predictions have shape {pred.shape}, expected {y_true.shape}")
        res.update(n_params=fitted.n_params, info=fitted.info, n_test=int(len(test_idx)),
                   metrics=metrics(y_true, pred, ctx.labels),
                   timing=time_inference(fitted.predict, X_test, batch_size))
        atomic_write(pred_path, lambda tmp: np.save(tmp, pred))
    except Exception as e:  # noqa: BLE001 - one model failing must not stop the others
        res.update(_error_summary(e))
        res["fit_s"] = time.perf_counter() - t0
        pred = None
    write_json(res_path, res)
    res["test_pred"] = pred
    return res


@holds_lock("out_dir")  # one writer per report folder
def benchmark(dataset, out_dir, *, quick: bool = False, seed: int = 0, epochs: int | None = None, models=None,
              threads: int | None = None, progress: bool = True, batch_size: int = 1024, device=None,
              precision: str = "fp32", run: Run | None = None) -> dict:
    """Train, evaluate and time the paper's baselines and ablations on one dataset split.

    dataset: prepared dataset (path or :class:`Dataset`) with labels teff, feh, logg.
    quick: 1 epoch per network (for tests and smoke runs) unless ``epochs`` is given.
    models: names from :data:`MODELS` (default all), or a dict ``{name: fit(name, ctx) -> _Fitted}``
        to add custom entries. threads: torch/BLAS threads for training and timing (default: torch's).
    batch_size: rows per prediction call, the same for every model (timing and evaluation).
    device, precision: where and how the networks train and predict (None: ``"auto"``); the
        linear models stay on the CPU. run: a :class:`stellarparams.context.Run` giving ``progress``,
        ``device`` and ``precision`` at once (then those are not read).
    Returns the content of ``results.json`` (per-model metrics, params, timings, errors, claims).
    """
    import torch

    from .config import TrainConfig
    from .dataset import opened

    run = (run or Run(progress=progress, device=device, precision=precision)).on_device()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with opened(dataset) as ds:
        if threads:
            torch.set_num_threads(int(threads))
        threads = int(threads or torch.get_num_threads())
        if epochs is None and quick:
            epochs = QUICK_EPOCHS
        fitters = _fitters(models)
        ctx = _Context(ds, out, seed, epochs, threads, run)
        test_idx = _test_rows(ds)
        y_true = ds.labels(test_idx)[:, ctx.cols].astype(np.float64)
        X_test = ds.flux(test_idx)
        sig = _signature(ds, seed, ctx.train_config.epochs, batch_size, threads, ctx.labels)
        t_all = time.perf_counter()
        results = _run_all(fitters, ctx, test_idx, X_test, y_true, batch_size, threads, sig)
        tables = make_tables(results, ctx.labels, ctx.units)
        written = {k: write_csv_md(df, out / k) for k, df in tables.items()}
        claims = paper_claims(results, ctx.labels)
        _write_predictions(out, ds, test_idx, y_true, results, ctx.labels)
        summary = {
            "seed": seed, "quick": quick, "epochs": ctx.train_config.epochs, "threads": threads,
            "batch_size": batch_size, "n_timing_runs": N_TIMING_RUNS, "labels": ctx.labels, "units": ctx.units,
            "train_config": ctx.train_config.to_dict(), "default_train_config": TrainConfig().to_dict(),
            "n_test": int(len(test_idx)), "test_rows_sha256": hashlib.sha256(test_idx.tobytes()).hexdigest(),
            "dataset": dataset_metadata(ds), "environment": environment(),
            "models": {k: {kk: vv for kk, vv in r.items() if kk != "test_pred"} for k, r in results.items()},
            "claims": claims, "tables": written, "wall_s": time.perf_counter() - t_all,
        }
        write_json(out / "results.json", summary)
        write_text(out / "paper_comparison.md", claims_markdown(claims, quick))
        write_text(out / "report.md", _report(summary, tables, claims))
        run.say("\n" + markdown_table(tables["table2_mae"]))
        run.say(claims_markdown(claims, quick))
        run.say(f"tables, results.json and report.md written to {out}")
    return summary


def _fitters(models) -> dict:
    """{name: fit function} of the models to run: ``models`` None (all of :data:`MODELS`), names, or a dict."""
    if models is None:
        return {m: FITTERS[m] for m in MODELS}
    if isinstance(models, dict):
        return dict(models)
    unknown = [m for m in models if m not in FITTERS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    return {m: FITTERS[m] for m in models}


def _test_rows(ds) -> np.ndarray:
    """The test split's rows; ValueError unless train, val and test all have rows."""
    test_idx = ds.indices("test")
    if len(test_idx) == 0 or len(ds.indices("train")) == 0 or len(ds.indices("val")) == 0:
        raise ValueError(f"{ds.path}: the benchmark needs train, val and test rows "
                         f"(has {len(ds.indices('train'))}, {len(ds.indices('val'))}, {len(test_idx)})")
    return test_idx


def _run_all(fitters: dict, ctx, test_idx, X_test, y_true, batch_size: int, threads: int, sig) -> dict:
    """Fit, evaluate and time each model in turn (one failing does not stop the others); {name: result}."""
    from threadpoolctl import threadpool_limits

    results = {}
    with threadpool_limits(limits=threads):
        for i, (name, fitter) in enumerate(fitters.items()):
            ctx.run.say(f"[{i + 1}/{len(fitters)}] {name}")
            r = run_one(name, fitter, ctx, test_idx, X_test, y_true, batch_size, sig)
            results[name] = r
            _log_result(name, r, ctx, len(test_idx))
    return results


def _log_result(name: str, r: dict, ctx, n_test: int):
    """One model's MAE, size and time (or its error), and a warning when its alpha is at the grid's end."""
    if r.get("error"):
        ctx.run.say(f"  {name} FAILED: {r['error']} ({r['where']}); continuing with the others")
        return
    maes = ", ".join(f"{l} {r['metrics'][l]['mae']:.4g} {u}" for l, u in zip(ctx.labels, ctx.units))
    ctx.run.say(f"  {name}: MAE {maes}; {r['n_params']:,} params; "
                f"inference {r['timing']['time_s']:.3g} s for {n_test:,} spectra")
    edge = [l for l, e in r.get("info", {}).get("alpha_at_grid_edge", {}).items() if e]
    if edge:
        ctx.run.say(f"  warning: {name}'s best alpha for {edge} is at the end of the grid tried "
                    f"({r['info']['alphas_tried'][0]:g}..{r['info']['alphas_tried'][-1]:g}); "
                    "a wider grid might do better")


def _write_predictions(out: Path, ds, test_idx, y_true, results: dict, labels):
    """``predictions.csv``: truth and every model's prediction, one row per test spectrum."""
    pred_df = pd.DataFrame({"row": test_idx, "object_id": ds.meta(test_idx)["object_id"]})
    for j, l in enumerate(labels):
        pred_df[f"true_{l}"] = y_true[:, j]
    for name, r in results.items():
        if r.get("test_pred") is not None:
            for j, l in enumerate(labels):
                pred_df[f"{name}_{l}"] = r["test_pred"][:, j]
    write_text(out / "predictions.csv", pred_df.to_csv(index=False))


# ----------------------------------------------------------------------------- tables

def make_tables(results: dict, labels, units) -> dict:
    """The paper's Tables 2-5 as DataFrames, one row per model (failed models included, NaN + error)."""
    rows2, rows3 = [], []
    for name, r in results.items():
        err = r.get("error", "")
        m = r.get("metrics", {})
        row = {"model": name, "n_test": r.get("n_test", np.nan)}
        row.update({f"mae_{l} [{u}]": m.get(l, {}).get("mae", np.nan) for l, u in zip(labels, units)})
        row.update({f"mae_{l} [% range]": m.get(l, {}).get("mae_pct_range", np.nan) for l in labels})
        row["error"] = err
        rows2.append(row)
        t = r.get("timing", {})
        rows3.append({"model": name, "params": r.get("n_params", np.nan), "time_s": t.get("time_s", np.nan),
                      "time_std_s": t.get("time_std_s", np.nan), "time_median_s": t.get("time_median_s", np.nan),
                      "spectra_per_s": t.get("spectra_per_s", np.nan),
                      "fit_s": r.get("fit_s", np.nan), "error": err})
    t2, t3 = pd.DataFrame(rows2), pd.DataFrame(rows3)
    return {"table2_mae": t2, "table3_params_time": t3,
            "table4_relative_to_dnn": relative_table(results, labels, "DNN"),
            "table5_relative_to_proposed": relative_table(results, labels, "proposed")}


def _ratio(a, b):
    a, b = (np.nan if v is None else float(v) for v in (a, b))  # None: NaN read back from JSON
    return a / b if np.isfinite(b) and b != 0 else np.nan


def relative_table(results: dict, labels, ref: str) -> pd.DataFrame:
    """params, inference time and MAE per label of every model divided by those of ``ref``."""
    r0 = results.get(ref, {})
    ok = ref in results and not r0.get("error")
    rows = []
    for name, r in results.items():
        good = ok and not r.get("error")
        row = {"model": name,
               "params": _ratio(r.get("n_params"), r0.get("n_params")) if good else np.nan,
               "time": _ratio(r["timing"]["time_s"], r0["timing"]["time_s"]) if good else np.nan}
        for l in labels:
            row[f"mae_{l}"] = _ratio(r["metrics"][l]["mae"], r0["metrics"][l]["mae"]) if good else np.nan
        row["note"] = (r.get("error") or "") if ok else f"reference {ref} " + ("failed" if ref in results else "not run")
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the paper's claims

def _mae_ratio(results, a, b, labels):
    """MAE of model a / model b per label, or None when either is missing or failed."""
    ra, rb = results.get(a), results.get(b)
    if not ra or not rb or ra.get("error") or rb.get("error"):
        return None
    return [_ratio(ra["metrics"][l]["mae"], rb["metrics"][l]["mae"]) for l in labels]


def _paper_ratio(a, b, labels):
    idx = [PAPER_LABELS.index(l) if l in PAPER_LABELS else None for l in labels]
    if a in PAPER_MAE and b in PAPER_MAE:
        return [PAPER_MAE[a][i] / PAPER_MAE[b][i] if i is not None else np.nan for i in idx]
    if b == "proposed" and a in PAPER_ABLATION_REL:
        return [PAPER_ABLATION_REL[a][2][i] if i is not None else np.nan for i in idx]
    return None


def paper_claims(results: dict, labels=PAPER_LABELS) -> list[dict]:
    """Each claim of the paper checked against our numbers: claim, paper, ours, verdict.

    verdict is "agrees", "disagrees" or "not checked: REASON". Ratios are MAE(a)/MAE(b) per label.
    """
    def fmt(v):
        return "/".join(f"{x:.2f}" for x in v)

    claims = []

    def mae_claim(text, a, b, test):
        ours = _mae_ratio(results, a, b, labels)
        paper = _paper_ratio(a, b, labels)
        c = {"claim": text, "paper": fmt(paper) if paper else "", "ours": fmt(ours) if ours else ""}
        if ours is None:
            missing = [m for m in (a, b) if m not in results or results[m].get("error")]
            c["verdict"] = f"not checked: {', '.join(missing)} not run or failed"
        else:
            c["verdict"] = "agrees" if all(test(x) for x in ours) else "disagrees"
        claims.append(c)

    mae_claim("the network more than halves the OLS errors (MAE proposed/OLS < 0.5, every label)",
              "proposed", "OLS", lambda x: x < 0.5)
    mae_claim("the network cuts the Ridge errors by about half (MAE proposed/Ridge < 0.6, every label)",
              "proposed", "Ridge", lambda x: x < 0.6)
    mae_claim("the proposed model beats the CNN (MAE proposed/CNN < 1, every label)", "proposed", "CNN",
              lambda x: x < 1)
    mae_claim("the proposed model matches the DNN (MAE proposed/DNN within 0.9-1.1, every label)",
              "proposed", "DNN", lambda x: 0.9 <= x <= 1.1)
    mae_claim("removing the skip connections hurts (MAE no_skip/proposed > 1, every label)",
              "no_skip", "proposed", lambda x: x > 1)
    mae_claim("removing skips and LayerNorm hurts (MAE no_skip_no_ln/proposed > 1, every label)",
              "no_skip_no_ln", "proposed", lambda x: x > 1)
    mae_claim("single-task networks are no better (MAE no_multitask/proposed >= 0.95, every label)",
              "no_multitask", "proposed", lambda x: x >= 0.95)

    def cost_claim(text, a, b, key, paper, test):
        ra, rb = results.get(a), results.get(b)
        c = {"claim": text, "paper": f"{paper:.2f}"}
        if not ra or not rb or ra.get("error") or rb.get("error"):
            c.update(ours="", verdict=f"not checked: {a} or {b} not run or failed")
        else:
            v = _ratio(key(ra), key(rb))
            c.update(ours=f"{v:.2f}", verdict="agrees" if test(v) else "disagrees")
        claims.append(c)

    params, tm = (lambda r: r["n_params"]), (lambda r: r["timing"]["time_s"])
    cost_claim("the DNN has about 25x the parameters of the proposed model (> 20x)", "DNN", "proposed", params,
               PAPER_PARAMS["DNN"] / PAPER_PARAMS["proposed"], lambda v: v > 20)
    cost_claim("the proposed model is faster than the DNN (time proposed/DNN < 1)", "proposed", "DNN", tm,
               PAPER_TIME_REL_DNN["proposed"], lambda v: v < 1)
    cost_claim("the proposed model is faster than the CNN (time proposed/CNN < 1)", "proposed", "CNN", tm,
               PAPER_TIME_REL_DNN["proposed"] / PAPER_TIME_REL_DNN["CNN"], lambda v: v < 1)
    cost_claim("single-task networks have about 3x the parameters (2.5-3.5x)", "no_multitask", "proposed", params,
               PAPER_ABLATION_REL["no_multitask"][0], lambda v: 2.5 <= v <= 3.5)
    return claims


def claims_markdown(claims, quick: bool = False) -> str:
    df = pd.DataFrame(claims, columns=["claim", "paper", "ours", "verdict"])
    n_ok = int((df["verdict"] == "agrees").sum())
    n_bad = int((df["verdict"] == "disagrees").sum())
    head = (f"## Our numbers against the paper's claims\n\n{n_ok} agree, {n_bad} disagree, "
            f"{len(df) - n_ok - n_bad} not checked. Ratios per label (teff/feh/logg) unless one number.\n\n")
    if quick:
        head += ("**Quick mode: the networks trained for very few epochs, so the accuracy claims below say "
                 "nothing about the paper; only the parameter counts are meaningful.**\n\n")
    return head + markdown_table(df)


def _report(summary, tables, claims) -> str:
    s = summary
    lines = [
        "# Benchmark: the paper's baselines and ablations", "",
        f"- dataset `{s['dataset']['path']}`: splits {s['dataset']['splits']}, {s['dataset']['n_pix']} pixels",
        f"- seed {s['seed']}, epochs {s['epochs']}{' (quick mode)' if s['quick'] else ''}, threads {s['threads']}, "
        f"inference batch {s['batch_size']}, timing = mean of {s['n_timing_runs']} runs over the {s['n_test']:,} test spectra "
        "(wall time; on a shared machine compare time_median_s and mind time_std_s)",
        f"- stellarparams {s['environment']['stellarparams']}, torch {s['environment']['torch']}, "
        f"scikit-learn {s['environment']['scikit-learn']}",
        "- OLS/Ridge are fitted on the unaugmented training split; Ridge's alpha per label is picked on the "
        "validation split. The networks train with the paper's loop (noisy copies, AdamW, Huber).",
    ]
    resumed = [k for k, r in s["models"].items() if r.get("resumed")]
    if resumed:
        lines.append(f"- reused from an earlier run (their timings come from that run): {', '.join(resumed)}")
    lines.append("")
    titles = {"table2_mae": "Table 2: MAE on the test split", "table3_params_time": "Table 3: parameters and inference time",
              "table4_relative_to_dnn": "Table 4: relative to the DNN",
              "table5_relative_to_proposed": "Table 5: relative to the proposed model"}
    for k, df in tables.items():
        lines += [f"## {titles[k]}", "", markdown_table(df)]
    lines.append(claims_markdown(claims, s["quick"]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

def add_arguments(p):
    p.description = ("Train and evaluate the paper's baselines (OLS, Ridge, StarNet-like CNN, per-label DNN), the "
                     "proposed network and its ablations (no skip; no skip + no LayerNorm; no multitask) on one "
                     "split of a prepared dataset; write the paper's Tables 2-5 and say where our numbers agree "
                     "with the paper's claims. The full run trains 6 networks for 30 epochs each (hours on a "
                     "laptop CPU); a killed run resumes where it stopped when started again with the same --out.")
    p.add_argument("--dataset", required=True, metavar="D", help="prepared dataset folder (labels teff, feh, logg)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="folder for tables, results.json, report.md")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epoch per network (smoke test)")
    p.add_argument("--epochs", type=int, help="epochs per network; unset: the paper's 30, or 1 with --quick")
    p.add_argument("--seed", type=int, default=0, help="seed for every model (recorded)")
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}; unset: all")
    p.add_argument("--threads", type=int, help="torch/BLAS threads for training and timing; unset: torch's default")
    p.add_argument("--batch-size", type=int, default=1024, help="spectra per prediction call, same for every model")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    from .devices import add_arguments as add_device_arguments

    add_device_arguments(p)


def run_cli(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    res = benchmark(args.dataset, args.out, quick=args.quick, seed=args.seed, epochs=args.epochs, models=models,
                    threads=args.threads, batch_size=args.batch_size, run=Run.from_args(args))
    failed = [k for k, r in res["models"].items() if r.get("error")]
    print(f"{len(res['models']) - len(failed)} of {len(res['models'])} models finished"
          + (f"; failed: {', '.join(failed)} (see {Path(args.out) / 'results.json'})" if failed else "")
          + f"; report: {Path(args.out) / 'report.md'}")
    return 1 if failed else 0
