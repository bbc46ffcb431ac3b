"""`stellarparams run`: the main job, end to end on the embedded default data.

    simulate  OUT/survey/     SDSS-like spectra of MILES stars + sppParams.fits catalog
    prepare   OUT/dataset/    prepared dataset (60/10/30 split grouped by star)
    train     OUT/model/      the paper's network, trained with the default recipe (--recipe paper:
                              the paper's schedule exactly)
    evaluate  OUT/report/     report.html with the figures (predicted vs true, ...) of the test split;
              OUT/results.json, OUT/results.md: test-split MAE per label, network vs a Ridge
              baseline (alpha chosen on the validation split) trained on the same split, and
              the coverage of the calibrated 1/2-sigma error bars per label and S/N bin

Every stage skips or resumes when its output is already there, so a killed run continues
where it stopped. The check the job prints: the network's MAE must be at most 0.85 x the
Ridge MAE on every label (the paper's network more than halves the linear errors).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import engine
from ._version import __version__
from .baselines import RIDGE_ALPHAS
from .config import DEFAULT_RECIPE, RECIPE_HELP, RECIPES
from .context import Run
from .files import write_text
from .records import dumps

DEFAULT_N = 50_000       # spectra simulated, as in the paper (812 distinct MILES stars, ~60 spectra each)
MAX_RATIO = 0.85         # network MAE / Ridge MAE must not exceed this on any label


def compare(model, dataset, split="test", alphas=RIDGE_ALPHAS, run: Run = Run()) -> dict:
    """Network vs Ridge (alpha on val, from the benchmark's grid ``baselines.RIDGE_ALPHAS``) MAE per
    label on one split of a prepared dataset (a line about the Ridge fit on stderr when ``run.progress``).

    Returns {"labels": [...], "units": [...], "network": {label: MAE}, "ridge": {...},
    "ratio": {...}, "pass": {...}, "ridge_alpha": {...}, "n_test": N, and, when the dataset
    carries true labels (extra columns TEFF_TRUE, ...), "network_vs_true"/"ridge_vs_true"}.
    """
    from .baselines import RidgeVal

    model.check_dataset(dataset)
    labels = model.label_names
    cols = [dataset.label_names.index(l) for l in labels]
    te, tr, va = dataset.indices(split), dataset.indices("train"), dataset.indices("val")
    y_te = dataset.labels(te)[:, cols].astype(np.float64)
    p_net = model.predict(dataset.flux(te))
    run.say(f"ridge baseline: fitting on {len(tr)} train spectra, alpha from {len(alphas)} values on {len(va)} val")
    t0 = time.perf_counter()
    ridge = RidgeVal(alphas=alphas).fit(dataset.flux(tr), dataset.labels(tr)[:, cols],
                                        dataset.flux(va), dataset.labels(va)[:, cols])
    p_ridge = ridge.predict(dataset.flux(te))
    ridge_s = time.perf_counter() - t0

    def mae(p, y):
        return {l: float(np.nanmean(np.abs(p[:, j] - y[:, j]))) for j, l in enumerate(labels)}

    res = {"split": split, "n_test": int(len(te)), "labels": labels, "units": model.label_units,
           "network": mae(p_net, y_te), "ridge": mae(p_ridge, y_te),
           "ridge_alpha": dict(zip(labels, map(float, ridge.alpha_))), "ridge_alpha_at_edge": ridge.alpha_at_edge,
           "ridge_seconds": round(ridge_s, 1), "max_ratio": MAX_RATIO}
    res["ratio"] = {l: res["network"][l] / res["ridge"][l] for l in labels}
    res["pass"] = {l: bool(res["ratio"][l] <= MAX_RATIO) for l in labels}
    meta = dataset.meta(te)
    true_cols = {l: f"{l.upper()}_TRUE" for l in labels if f"{l.upper()}_TRUE" in meta}
    if true_cols:  # simulated data: also against the noiseless truth
        y_true = np.column_stack([meta[true_cols[l]].to_numpy(np.float64) if l in true_cols else
                                  np.full(len(te), np.nan) for l in labels])
        res["network_vs_true"], res["ridge_vs_true"] = mae(p_net, y_true), mae(p_ridge, y_true)
    return res


def calibration(model, dataset, split="test") -> dict:
    """Coverage of the model's calibrated error bars on one split: {"table": records of
    :func:`stellarparams.uncertainty.coverage_table`, "fraction_unlike_training": float}."""
    from .uncertainty import coverage_table

    if model.uncertainty is None:
        return {"table": [], "fraction_unlike_training": None}
    idx = dataset.indices(split)
    cols = [dataset.label_names.index(l) for l in model.label_names]
    full = model.predict_arrays(dataset.flux(idx))
    table = coverage_table(dataset.labels(idx)[:, cols], full["pred"], full["sigma"],
                           dataset.meta(idx)["snr"].to_numpy(np.float64), model.label_names,
                           half95=(full["hi95"] - full["lo95"]) / 2)
    return {"table": table.replace({np.nan: None}).to_dict("records"),
            "fraction_unlike_training": float(np.mean(full["flag_unlike_training"])),
            "fraction_outside_label_hull": float(np.mean(full["flag_label_hull"]))}


def format_calibration(cal: dict) -> str:
    import pandas as pd

    from .uncertainty import format_coverage

    if not cal or not cal.get("table"):
        return "no uncertainty calibration in this model"
    table = pd.DataFrame(cal["table"]).astype({"snr_lo": float, "snr_hi": float})
    return (format_coverage(table) + f"\nflagged unlike the training spectra (ood_score > 1): "
            f"{100 * cal['fraction_unlike_training']:.1f}%; labels outside the training hull: "
            f"{100 * cal.get('fraction_outside_label_hull', 0):.1f}%")


def format_table(res: dict) -> str:
    lines = [f"test split ({res['n_test']} spectra, stars unseen in training): MAE per label",
             f"{'label':8s} {'network':>10s} {'Ridge':>10s} {'ratio':>6s}  check (ratio <= {res['max_ratio']})"]
    for l, u in zip(res["labels"], res["units"]):
        lines.append(f"{l:8s} {res['network'][l]:10.4g} {res['ridge'][l]:10.4g} {res['ratio'][l]:6.3f}  "
                     f"{'PASS' if res['pass'][l] else 'FAIL'}   ({u})")
    if "network_vs_true" in res:
        lines.append("against the noiseless simulated truth: " + ", ".join(
            f"{l} {res['network_vs_true'][l]:.4g} (Ridge {res['ridge_vs_true'][l]:.4g})" for l in res["labels"]))
    return "\n".join(lines)


def run(out="runs/default", n: int = DEFAULT_N, seed: int = 0, *, epochs: int | None = None,
        workers: int | None = None, threads: int | None = None, config=None, recipe_name: str | None = None,
        progress: bool = True, grid=None, device=None, precision: str = "fp32", dask=None,
        run: Run | None = None) -> dict:
    """Simulate, prepare, train, evaluate; returns the results dict (also OUT/results.json).

    Parameters
    ----------
    out : str or Path
        Output folder: survey/, dataset/, model/, report/, results.json, results.md.
    n : int
        Spectra to simulate.
    seed : int
        Seed of the simulation, the split and the training.
    epochs, threads : int, optional
        Override the recipe's epochs and torch's threads.
    workers : int, optional
        Processes for simulate and prepare (None: all CPUs).
    config : str or Path, optional
        TOML with [model]/[train] tables on top of the recipe.
    recipe_name : str
        "default" or "paper" (stellarparams.config.RECIPES).
    progress : bool
        Progress bars and stage lines.
    grid : dataset.Grid or str, optional
        The common wavelength grid of prepare ("MIN_A,MAX_A,N"; default the paper's).
    device, precision : optional
        Where and how the network trains and predicts (None: ``"auto"``, a GPU when present);
        an unavailable device is refused before any work.
    dask : str or distributed.Client, optional
        Run simulate's and prepare's per-file work on this Dask cluster (``tcp://HOST:PORT`` or
        ``local:N``; :mod:`stellarparams.engine`), connected once for both.
    run : stellarparams.context.Run, optional
        ``progress``, ``device``, ``precision``, ``workers`` and ``dask`` as one object; when given,
        those five are not read.

    Returns
    -------
    dict
        The content of OUT/results.json.
    """
    from .dataset import parse_grid
    from .extras import requires
    from .preprocess import PrepareConfig

    requires("simulate", "mangadap")  # before any work: simulate's MILES stars,
    requires("plots", "matplotlib")   # and the report's figures
    prep = PrepareConfig() if grid is None else PrepareConfig(grid=parse_grid(grid) if isinstance(grid, str) else grid)
    run = (run or Run(progress=progress, device=device, precision=precision, workers=workers, dask=dask)).on_device()
    out = Path(out)
    t_all = time.perf_counter()
    times = _simulate_and_prepare(out, n, seed, prep, run)
    mc, tc = _train_configs(config, recipe_name, seed, threads, epochs)
    stages = _train_and_evaluate(out, mc, tc, run, times)
    times = {k: round(v, 1) for k, v in times.items()}
    results = {"key": stages["key"], "comparison": stages["res"], "calibration": stages["cal"],
               "all_pass": all(stages["res"]["pass"].values()),
               "seconds": times, "total_seconds": round(time.perf_counter() - t_all, 1),
               "n_simulated": n, "n_spectra": stages["n_spectra"], "seed": seed, "model": str(out / "model"),
               "report": str(stages["report"]), "recipe": tc.recipe,
               "model_config": mc.to_dict(), "train_config": tc.to_dict(), "model_metrics": stages["model"].metrics,
               "stellarparams_version": __version__}
    old = stages["old"]
    if old.get("key") == stages["key"]:  # keep the first run's stage timings
        results["seconds"], results["total_seconds"] = old.get("seconds", times), old.get("total_seconds")
    _write_results(out, results, stages, run, times, t_all)
    return results


def _simulate_and_prepare(out: Path, n, seed, prep, run: Run) -> dict:
    """Stages 1-2 of :func:`run`: OUT/survey/ and OUT/dataset/; returns their seconds."""
    from .outputs import check_output_folder
    from .prepare import prepare
    from .simulate import simulate

    times = {}
    with run.cluster() as client:  # before anything is written: a dead address leaves nothing
        check_output_folder(out)
        run.say(f"[1/4] simulate {n} spectra -> {out / 'survey'}")
        t0 = time.perf_counter()
        catalog = simulate(out / "survey", n=n, seed=seed, workers=run.workers, progress=run.progress, dask=client)
        times["simulate"] = time.perf_counter() - t0

        run.say(f"[2/4] prepare -> {out / 'dataset'}")
        t0 = time.perf_counter()
        prepare(catalog, out / "survey" / "spectra", out / "dataset", config=prep, seed=seed, workers=run.workers,
                progress=run.progress, dask=client)
        times["prepare"] = time.perf_counter() - t0
    return times


def _train_configs(config, recipe_name, seed, threads, epochs):
    """(ModelConfig, TrainConfig) of :func:`run`: the recipe or the TOML, with the run's seed and overrides."""
    from .config import ModelConfig, load_config, recipe

    mc, tc = (load_config(config, recipe_name, DEFAULT_RECIPE) if config
              else (ModelConfig(), recipe(recipe_name or DEFAULT_RECIPE)))
    tc = replace(tc, seed=seed, threads=threads or tc.threads or os.cpu_count())
    if epochs is not None:
        tc = replace(tc, epochs=epochs)
    return mc, tc


def _train_and_evaluate(out: Path, mc, tc, run: Run, times: dict) -> dict:
    """Stages 3-4 of :func:`run`: OUT/model/ and OUT/report/, comparison and calibration reused
    from OUT/results.json when its key matches. Adds the stages' seconds to ``times``."""
    from .dataset import Dataset
    from .evaluate import evaluate
    from .train import train

    run.say(f"[3/4] train ({tc.epochs} epochs) -> {out / 'model'}")
    t0 = time.perf_counter()
    with Dataset(out / "dataset") as ds:
        model = train(ds, out / "model", mc, tc, overwrite=True, run=run)
        times["train"] = time.perf_counter() - t0

        run.say("[4/4] evaluate on the test split")
        t0 = time.perf_counter()
        key = hashlib.sha256(json.dumps([model.fingerprint, ds.attrs.get("input_hash"), RIDGE_ALPHAS,
                                         MAX_RATIO]).encode()).hexdigest()[:16]
        res_path = out / "results.json"
        old = json.loads(res_path.read_text()) if res_path.exists() else {}
        if old.get("key") == key:
            run.say(f"{res_path}: up to date; not recomputed")
            res = old["comparison"]
        else:
            res = compare(model, ds, run=run)
        cal = old.get("calibration") if old.get("key") == key and old.get("calibration") else calibration(model, ds)
        report = out / "report" / "report.html"
        if old.get("key") != key or not report.exists():
            evaluate(model, ds, out / "report", split="test", run=replace(run, device=None))  # the model stays put
        times["evaluate"] = time.perf_counter() - t0
        n_spectra = {s: int(len(ds.indices(s))) for s in ("train", "val", "test")}
    return {"model": model, "key": key, "old": old, "res": res, "cal": cal, "report": report,
            "n_spectra": n_spectra}


def _write_results(out: Path, results: dict, stages: dict, run: Run, times: dict, t_all: float):
    """OUT/results.json and OUT/results.md; with ``run.progress`` the table and where things are (stdout)."""
    res_path = out / "results.json"
    write_text(res_path, dumps(results))
    table = format_table(stages["res"]) + "\n\n" + format_calibration(stages["cal"])
    write_text(out / "results.md", "```\n" + table + "\n```\n")
    if run.progress:
        print(table)
        print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
              + f"; total {time.perf_counter() - t_all:.0f} s")
        print(f"model: {out / 'model'}  results: {res_path}")
        print(f"report (predicted vs true, residuals, calibration figures): {stages['report']}")


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser):
    p.description = ("The main job on the embedded default data: simulate an SDSS-like survey from the MILES "
                     "stars, prepare it (split by star), train the paper's network with the default recipe, write "
                     "the evaluation report of the test split (OUT/report/report.html), and compare its test MAE "
                     "with a Ridge baseline (PASS when network MAE <= 0.85 x Ridge on every label). Stages "
                     "that are already complete are skipped; a killed run resumes.")
    p.add_argument("--out", default="runs/default", help="output folder (survey/, dataset/, model/, results.json)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help="spectra to simulate")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation, split and training")
    p.add_argument("--epochs", type=int, help="training epochs (default: the recipe's, 12 default, 30 paper)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help=RECIPE_HELP + f" (default: {DEFAULT_RECIPE}; beats a recipe named in --config)")
    p.add_argument("--config", help="TOML file with [model] and [train] tables on top of the recipe")
    p.add_argument("--workers", type=int, help="processes for simulate/prepare; None: all CPUs")
    p.add_argument("--threads", type=int, help="torch threads for training; None: all CPUs")
    engine.add_argument(p)
    p.add_argument("--quiet", action="store_true", help="only the final table")
    p.add_argument("--grid", metavar="MIN_A,MAX_A,N", help="prepare onto N pixels uniform in log10 wavelength "
                   "from MIN_A to MAX_A Angstrom (default: the paper's 4000-pixel grid)")
    from .devices import add_arguments as add_device_arguments

    add_device_arguments(p)


def run_cli(args) -> int:
    results = run(args.out, n=args.n, seed=args.seed, epochs=args.epochs, threads=args.threads, config=args.config,
                  recipe_name=args.recipe, grid=args.grid, run=Run.from_args(args))
    if args.quiet:
        print(format_table(results["comparison"]))
        print(format_calibration(results.get("calibration")))
    if not results["all_pass"]:
        print("FAIL: the network does not beat Ridge by the required margin on every label", file=sys.stderr)
        return 1
    return 0
