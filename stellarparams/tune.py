"""Bayesian hyperparameter search on Optuna (docs/method.md, section "Hyperparameter search").

One trial = one run of the plain training loop (``training.fit``) of the configuration the
sampler proposes; its objective is that run's best validation loss (minimised). A trial is
not calibrated (no PCA, no error-bar fit) and writes no model folder.

Search space (the paper's, exactly; ``SearchSpace`` holds it and may only be narrowed):

    stem_width           int 64-128, step 16 (ours)
    n_blocks             1-2 residual blocks
    block_width_i        int 32-64, step 16 (ours), one per block
    head_<label>         one head template per task, from HEAD_TEMPLATES
    stem_dropout         0.0-0.5
    trunk_dropout        0.0-0.4        (inside every residual block)
    head_dropout         0.0-0.4        (one value shared by the heads)
    lr                   log-uniform 1e-4 - 5e-3
    weight_decay         log-uniform 1e-5 - 1e-2

Head templates (ours): the paper says "from a single 16-unit layer up to 48-32-16". We take
every strictly decreasing choice of hidden widths from {48, 32, 16}: 16, 32, 48, 32-16,
48-16, 48-32, 48-32-16. The paper's selected heads (Teff 48-32, [Fe/H] 16, log g 48) are in it.

Sampler: TPE by default (``sampler="gp"`` gives Optuna's Gaussian-process sampler). Why TPE:
the space is conditional (a second block width only exists with two blocks) and half
categorical (head templates), which TPE models natively; TPE also learns from *pruned* trials
(ranked by how far they got), while the GP sampler fits only completed ones, and with
aggressive pruning most trials are pruned; and TPE's constant-liar mode keeps parallel
workers from proposing the same point. GP is better on small, smooth, continuous spaces.

Pruning: asynchronous successive halving (Optuna's SuccessiveHalvingPruner): at epochs
r, 3r, 9r, ... (r = epochs/10, 3 for the paper's 30) a trial goes on only if its best
validation loss so far is in the best third of the trials that reached that epoch. A trial
then costs about 7 of 30 epochs on average, so 100 trials cost ~25 full trainings rather
than 100. It is asynchronous, so parallel workers never wait for each other. The paper's
default configuration is trained first as a reference trial and is never pruned.

Storage: a local SQLite file (OUT/study.db) by default, or any database URL Optuna accepts
(e.g. ``postgresql://user:password@host/db``). Extra workers run the same command with the
same --storage and --study; each runs trials until the study holds the requested number of
finished (complete + pruned) trials. Re-running a killed search continues it. A worker that
died mid-trial leaves it "running"; after GRACE_FACTOR heartbeats without news it is
marked failed and its parameters are queued again (Optuna's heartbeat).

Outputs in OUT: best.toml (``stellarparams train --config``), summary.json, summary.md,
history.png, importance.png.
"""
from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ._version import __version__
from .config import RECIPES, ModelConfig, TrainConfig, config_toml, recipe
from .context import Run
from .dataset import opened
from .devices import add_arguments as add_device_arguments
from .extras import requires
from .files import atomic_write, write_text
from .outputs import check_output_folder
from .records import dumps
from .training import fit

optuna = requires("tune", "optuna")
requires("tune", "matplotlib")  # history.png and importance.png
TrialState = optuna.trial.TrialState

METHOD_REF = 'docs/method.md, section "Hyperparameter search"'
# docs/method.md, section "Hyperparameter search": (low, high) of every range
PAPER_RANGES = {
    "stem_width": (64, 128),
    "n_blocks": (1, 2),
    "block_width": (32, 64),
    "stem_dropout": (0.0, 0.5),
    "trunk_dropout": (0.0, 0.4),
    "head_dropout": (0.0, 0.4),
    "lr": (1e-4, 5e-3),
    "weight_decay": (1e-5, 1e-2),
}
# The default recipe's switches (stellarparams.config.TrainConfig, docs/benchmarks.md "Accuracy"): (low, high) a search may
# use; none is searched unless the space names it (then the recipe's value is left out of the trial).
AUG_RANGES = {
    "aug_shift_pix": (0.0, 3.0),
    "aug_calib_sigma": (0.0, 0.2),
    "aug_ebv": (0.0, 0.5),
    "aug_lsf_pix": (0.0, 2.0),
    "aug_mask_runs": (0, 10),
    "aug_telluric": (0.0, 0.3),
    "aug_pixnoise": (0.0, 2.0),
    "aug_mixup": (0.0, 1.0),
}
WIDTH_STEP = 16  # stem and block widths are searched in steps of 16 units (ours)
# "from a single 16-unit layer up to 48-32-16": every strictly decreasing pick from {48, 32, 16}
HEAD_TEMPLATES = ("16", "32", "48", "32-16", "48-16", "48-32", "48-32-16")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
GRACE_FACTOR = 3  # a running trial without a heartbeat for GRACE_FACTOR x heartbeat seconds is dead

SUMMARY_JSON, SUMMARY_MD, BEST_TOML = "summary.json", "summary.md", "best.toml"
HISTORY_PNG, IMPORTANCE_PNG = "history.png", "importance.png"


def template_widths(name: str) -> tuple:
    """'48-32' -> (48, 32)."""
    return tuple(int(w) for w in name.split("-"))


def template_name(widths) -> str:
    """(48, 32) -> '48-32'."""
    return "-".join(str(int(w)) for w in widths)


@dataclass(frozen=True)
class SearchSpace:
    """The search space; the defaults are the paper's ranges (docs/method.md). Each (low, high) may be narrowed.

    Widths are hidden units, dropouts are probabilities, lr and weight_decay are searched
    log-uniformly. ``head_templates`` are the choices for every task's head (HEAD_TEMPLATES).
    """

    stem_width: tuple = PAPER_RANGES["stem_width"]
    n_blocks: tuple = PAPER_RANGES["n_blocks"]
    block_width: tuple = PAPER_RANGES["block_width"]
    head_templates: tuple = HEAD_TEMPLATES
    stem_dropout: tuple = PAPER_RANGES["stem_dropout"]
    trunk_dropout: tuple = PAPER_RANGES["trunk_dropout"]
    head_dropout: tuple = PAPER_RANGES["head_dropout"]
    lr: tuple = PAPER_RANGES["lr"]
    weight_decay: tuple = PAPER_RANGES["weight_decay"]
    augment: dict = field(default_factory=dict)  # {aug_* switch: (low, high)} within AUG_RANGES; others fixed

    @classmethod
    def from_dict(cls, d: dict, source: str = "search space") -> "SearchSpace":
        """Build and validate from {name: [low, high]} (head_templates: a list of names)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown search-space keys {unknown}; known: {known}")
        space = cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else
                       {a: tuple(r) for a, r in v.items()} if isinstance(v, dict) else v for k, v in d.items()})
        space.validate(source)
        return space

    @classmethod
    def from_toml(cls, path) -> "SearchSpace":
        """Read a TOML file: keys at the top level or in a ``[space]`` table, e.g. ``lr = [3e-4, 2e-3]``."""
        path = Path(path)
        try:
            d = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot read the search space ({e})") from e
        return cls.from_dict(d.get("space", d), source=str(path))

    def validate(self, source: str = "search space"):
        """Raise ValueError naming the first entry that is malformed or outside the paper's ranges."""
        for name, (plo, phi) in PAPER_RANGES.items():
            v = getattr(self, name)
            ok = (isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                               for x in v))
            if not ok:
                raise ValueError(f"{source}: {name} must be a pair [low, high], got {v!r}")
            lo, hi = v
            if not lo <= hi:
                raise ValueError(f"{source}: {name} = [{lo}, {hi}] has low > high")
            if lo < plo or hi > phi:
                raise ValueError(f"{source}: {name} = [{lo}, {hi}] lies outside the paper's range [{plo}, {phi}] "
                                 f"({METHOD_REF}); a search space may only narrow it")
            if name in ("stem_width", "block_width", "n_blocks") and not all(float(x).is_integer() for x in v):
                raise ValueError(f"{source}: {name} = [{lo}, {hi}] must be whole numbers")
            if name in ("stem_width", "block_width") and any(int(x) % WIDTH_STEP for x in v):
                raise ValueError(f"{source}: {name} = [{lo}, {hi}]: widths are searched in steps of {WIDTH_STEP}; "
                                 f"use multiples of {WIDTH_STEP} (e.g. [{plo}, {phi}])")
        t = self.head_templates
        if not isinstance(t, tuple) or not t or not all(isinstance(x, str) for x in t):
            raise ValueError(f"{source}: head_templates must be a non-empty list of names from {list(HEAD_TEMPLATES)}")
        bad = [x for x in t if x not in HEAD_TEMPLATES]
        if bad:
            raise ValueError(f"{source}: head templates {bad} are outside the paper's templates "
                             f"(a single 16-unit layer up to 48-32-16): choose from {list(HEAD_TEMPLATES)}")
        if len(set(t)) != len(t):
            raise ValueError(f"{source}: head_templates lists a template twice: {list(t)}")
        for name, v in self.augment.items():
            if name not in AUG_RANGES:
                raise ValueError(f"{source}: augment.{name} is not a recipe switch; choose from {sorted(AUG_RANGES)}")
            plo, phi = AUG_RANGES[name]
            if not (isinstance(v, tuple) and len(v) == 2 and plo <= v[0] <= v[1] <= phi):
                raise ValueError(f"{source}: augment.{name} = {list(v)} must be [low, high] within [{plo}, {phi}]")

    def to_dict(self) -> dict:
        return {k: {a: list(r) for a, r in v.items()} if isinstance(v, dict) else list(v)
                for k, v in asdict(self).items()}

    def suggest(self, trial, labels) -> dict:
        """Ask an Optuna trial for one point; returns its params (names as in the module docstring)."""
        p = {"stem_width": trial.suggest_int("stem_width", *map(int, self.stem_width), step=WIDTH_STEP),
             "n_blocks": trial.suggest_int("n_blocks", *map(int, self.n_blocks))}
        for i in range(p["n_blocks"]):
            p[f"block_width_{i}"] = trial.suggest_int(f"block_width_{i}", *map(int, self.block_width), step=WIDTH_STEP)
        for label in labels:
            p[f"head_{label}"] = trial.suggest_categorical(f"head_{label}", list(self.head_templates))
        for name in ("stem_dropout", "trunk_dropout", "head_dropout"):
            p[name] = trial.suggest_float(name, *map(float, getattr(self, name)))
        p["lr"] = trial.suggest_float("lr", *map(float, self.lr), log=True)
        p["weight_decay"] = trial.suggest_float("weight_decay", *map(float, self.weight_decay), log=True)
        for name, (lo, hi) in sorted(self.augment.items()):
            p[name] = (trial.suggest_int(name, int(lo), int(hi)) if isinstance(AUG_RANGES[name][0], int)
                       else trial.suggest_float(name, float(lo), float(hi)))
        return p

    def contains(self, params: dict, labels) -> bool:
        """Whether a params dict (as from ``suggest``) lies in this space."""
        def within(name, key):
            lo, hi = getattr(self, name)
            return lo <= params[key] <= hi
        n = params["n_blocks"]
        return (within("stem_width", "stem_width") and within("n_blocks", "n_blocks")
                and all(within("block_width", f"block_width_{i}") for i in range(n))
                and all(params[f"head_{l}"] in self.head_templates for l in labels)
                and all(within(k, k) for k in ("stem_dropout", "trunk_dropout", "head_dropout", "lr", "weight_decay"))
                and all(k in params and lo <= params[k] <= hi for k, (lo, hi) in self.augment.items()))


def configs_from_params(params: dict, labels, n_in: int, epochs: int = 30, seed: int = 0, recipe_name: str = "paper"):
    """Trial params -> (ModelConfig, TrainConfig); everything not searched keeps the recipe's value."""
    mc = ModelConfig(n_in=n_in, stem_width=params["stem_width"],
                     block_widths=tuple(params[f"block_width_{i}"] for i in range(params["n_blocks"])),
                     heads={l: template_widths(params[f"head_{l}"]) for l in labels},
                     stem_dropout=params["stem_dropout"], trunk_dropout=params["trunk_dropout"],
                     head_dropout=params["head_dropout"])
    tc = recipe(recipe_name, lr=params["lr"], weight_decay=params["weight_decay"], epochs=epochs, seed=seed,
                **{k: v for k, v in params.items() if k in AUG_RANGES})
    return mc, tc


def params_from_configs(mc: ModelConfig, tc: TrainConfig) -> dict:
    """(ModelConfig, TrainConfig) -> trial params; inverse of ``configs_from_params``."""
    p = {"stem_width": mc.stem_width, "n_blocks": len(mc.block_widths)}
    p.update({f"block_width_{i}": w for i, w in enumerate(mc.block_widths)})
    p.update({f"head_{l}": template_name(h) for l, h in mc.heads.items()})
    p.update(stem_dropout=mc.stem_dropout, trunk_dropout=mc.trunk_dropout, head_dropout=mc.head_dropout,
             lr=tc.lr, weight_decay=tc.weight_decay)
    return p


def paper_default_params(labels, space: SearchSpace | None = None, recipe_name: str = "paper") -> dict | None:
    """The paper's selected network with the recipe's training as trial params (the searched
    augmentation switches at the recipe's values), or None if a label has no default head."""
    mc = ModelConfig()
    if not set(labels) <= set(mc.heads):
        return None
    mc = ModelConfig(heads={l: mc.heads[l] for l in labels})
    tc = recipe(recipe_name)
    return {**params_from_configs(mc, tc), **{k: getattr(tc, k) for k in (space.augment if space else {})}}


# ------------------------------------------------------------------ small writers
def _save_figure(fig, path: Path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def redact(url: str) -> str:
    """A storage URL with its password hidden (safe to print and save)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: keep only the scheme
        return url.split("://", 1)[0] + "://***"


# ------------------------------------------------------------------ the search
class BudgetTaken(Exception):
    """Raised inside a trial that starts when the requested trials are already finished or running."""


def make_storage(url: str, heartbeat: float = 60.0):
    """Optuna RDB storage with a heartbeat: a trial of a killed worker is failed and re-queued once."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}  # wait for other writers
    from sqlalchemy.exc import DBAPIError

    beat = max(1, int(round(heartbeat)))
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=beat,
                                  grace_period=GRACE_FACTOR * beat,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except DBAPIError as e:  # workers creating the tables of a new database at once collide: retry
            if attempt == 5:
                raise ValueError(f"cannot open the study storage {redact(url)}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0]}; is the database reachable and writable?") from e
            time.sleep(0.2 + secrets.randbelow(1000) / 1000)
        except Exception as e:  # bad URL or missing driver: say which and what to do
            raise ValueError(f"cannot open the study storage {redact(url)}: {type(e).__name__}: "
                             f"{str(e).rstrip('.')}. Give a URL such as sqlite:///path/study.db or "
                             "postgresql://user:password@host/db (PostgreSQL needs a driver: pip install "
                             "psycopg2-binary)") from e


def make_sampler(name: str, seed: int):
    """'tpe' (default, see the module docstring for why) or 'gp'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"sampler {name!r} unknown; choose 'tpe' or 'gp'")


def make_pruner(epochs: int, prune: bool = True):
    """Asynchronous successive halving from epoch max(1, epochs/10), keeping the best third."""
    if not prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, round(epochs / 10)), reduction_factor=3)


def finished_trials(study) -> list:
    """Complete + pruned trials: the ones the requested number counts."""
    return study.get_trials(deepcopy=False, states=DONE)


def _open_study(storage, name, settings, reference):
    """Load the study or create it (then record settings, queue the reference). Returns (study, created)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        created = False
    except KeyError:
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
            created = True
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
            study = optuna.load_study(study_name=name, storage=storage)
            created = False
    if created:
        if reference is not None:
            study.enqueue_trial(reference, user_attrs={"reference": f"paper default ({METHOD_REF})"})
        study.set_user_attr("settings", settings)
        return study, True
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise ValueError(f"study {name!r} exists but is not a minimisation; use another --study name")
    stored = None
    for _ in range(100):  # a worker that just created the study writes its settings within ms
        stored = study.user_attrs.get("settings")
        if stored is not None:
            break
        time.sleep(0.1)
    if stored is None:
        raise ValueError(f"study {name!r} exists but was not made by `stellarparams tune`; use another --study name")
    for key in ("epochs", "space", "labels", "dataset", "recipe"):
        if stored.get(key, "paper" if key == "recipe" else None) != settings[key]:  # old studies: the paper's
            raise ValueError(f"study {name!r} was started with {key} = {stored.get(key, 'paper')}, this run asks for "
                             f"{settings[key]}; use the same settings to join it, or a new --study name")
    return study, False


def tune(dataset, out_dir, *, trials: int = 100, storage: str | None = None, study_name: str = "stellarparams",
         sampler: str = "tpe", epochs: int = 30, seed: int = 0, timeout: float | None = None,
         space: SearchSpace | None = None, prune: bool = True, threads: int | None = None,
         heartbeat: float = 60.0, progress: bool = True, callbacks=(), recipe_name: str = "default",
         device=None, precision: str = "fp32", run: Run | None = None) -> optuna.Study:
    """Run (or continue, or join) a search until the study holds ``trials`` finished trials.

    dataset: prepared dataset folder or Dataset; out_dir: where the summary files go.
    trials: total complete + pruned trials wanted in the study (all workers together).
    storage: Optuna database URL; default ``sqlite:///OUT/study.db``.
    epochs: epochs of every trial (the paper's 30); seed: training seed of every trial and
        sampler seed of the worker that creates the study (joining workers draw their own).
    timeout: seconds after which this worker starts no new trial.
    space: SearchSpace (default: the paper's, docs/method.md); validated against the paper's ranges.
    threads: torch threads per trial; heartbeat: seconds between liveness pings of a trial.
    callbacks: extra Optuna callbacks(study, frozen_trial) run after every trial.
    recipe_name: the training recipe every trial starts from ("default" or "paper"); the space's
        ``augment`` ranges search its switches.
    device, precision: where and how every trial trains (:func:`stellarparams.training.fit`;
        None: ``"auto"``); refused before any work when the machine lacks the device.
    run: a :class:`stellarparams.context.Run` giving ``progress``, ``device`` and ``precision`` at
        once (then those are not read).
    Returns the optuna.Study; writes best.toml, summary.json/.md, history.png, importance.png.
    """
    run = (run or Run(progress=progress, device=device, precision=precision)).on_device()
    space = space or SearchSpace()
    space.validate()
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    own_sampler = make_sampler(sampler, seed)  # refuses an unknown name before touching storage
    out = check_output_folder(out_dir)  # no lock: parallel tune workers share one folder and study
    with opened(dataset) as ds:
        url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        if not run.progress:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        settings = {"epochs": epochs, "space": space.to_dict(), "labels": list(ds.label_names), "seed": seed,
                    "sampler": sampler, "recipe": recipe_name, "prune": prune, "version": __version__,
                    "dataset": {"n": ds.n, "n_pix": ds.n_pix, "input_hash": ds.attrs.get("input_hash", "")}}
        reference = _reference(list(ds.label_names), space, recipe_name, run.say)
        study, created = _open_study(make_storage(url, heartbeat), study_name, settings, reference)
        # the creating worker is reproducible from --seed; joining workers must not repeat its proposals
        study.sampler = own_sampler if created else make_sampler(sampler, secrets.randbits(31))
        study.pruner = make_pruner(epochs, prune)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        objective = _objective(study, ds, space, trials, epochs, seed, recipe_name, threads, run.quiet())
        n_done = len(finished_trials(study))
        remaining = trials - n_done
        run.say(f"study {study_name!r} in {redact(url)}: {n_done} of {trials} trials finished; "
                f"{'created it' if created else 'joined it'}; {max(0, remaining)} to go ({sampler.upper()} sampler, "
                f"{'successive-halving pruning' if prune else 'no pruning'}, {epochs} epochs per trial)")
        if remaining > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(BudgetTaken,),
                               callbacks=[optuna.study.MaxTrialsCallback(trials, states=DONE + (TrialState.RUNNING,)),
                                          *callbacks],
                               gc_after_trial=True, show_progress_bar=run.progress)
        write_report(study, out, storage_url=url)
    return study


def _reference(labels, space: SearchSpace, recipe_name: str, log):
    """The paper's default configuration as a trial's params, or None when the space leaves it out."""
    if recipe_name not in RECIPES:
        raise ValueError(f"unknown recipe {recipe_name!r}; choose one of {sorted(RECIPES)}")
    reference = paper_default_params(labels, space, recipe_name)
    if reference is not None and not space.contains(reference, labels):
        log("the paper's default configuration lies outside this search space: no reference trial")
        reference = None
    return reference


def _objective(study, ds, space: SearchSpace, trials: int, epochs: int, seed: int, recipe_name: str,
               threads, run: Run):
    """Optuna's objective: train one suggested configuration (on ``run.device``, quietly), report the best
    validation loss per epoch to the pruner, return it. Stops the worker once ``trials`` are finished or running."""
    labels, n_in = list(ds.label_names), ds.n_pix
    rows = (ds.indices("train"), ds.indices("val"))

    def objective(trial):
        live = study.get_trials(deepcopy=False, states=DONE + (TrialState.RUNNING,))
        if sum(t.number < trial.number for t in live) >= trials:
            trial.set_user_attr("skipped", "the requested trials were already finished or running elsewhere")
            study.stop()
            raise BudgetTaken(f"all {trials} trials are finished or running in other workers; this worker stops")
        params = space.suggest(trial, labels)
        mc, tc = configs_from_params(params, labels, n_in, epochs, seed, recipe_name)
        tc.threads = threads
        is_reference = "reference" in trial.user_attrs
        best = math.inf

        def on_epoch(epoch, val_loss, metrics):
            nonlocal best
            if not math.isfinite(val_loss) and not is_reference:
                raise optuna.TrialPruned(f"validation loss is {val_loss} at epoch {epoch + 1} (diverged)")
            best = min(best, val_loss)
            trial.report(best, epoch + 1)  # step = epochs done; value = best val loss so far
            # the reference still enters the pruner's rungs (others compete with it) but always goes on
            if trial.should_prune() and not is_reference:
                raise optuna.TrialPruned(f"pruned after {epoch + 1} epochs (best val loss {best:.4g})")

        fitted = fit(ds, rows, mc, replace(tc, calib_folds=0), on_epoch=on_epoch, run=run)
        trial.set_user_attr("val_metrics", {k: v for k, v in fitted.metrics.items() if isinstance(v, (int, float))})
        return fitted.best_val_loss

    return objective


# ------------------------------------------------------------------ report
def _epochs_run(t) -> int:
    return max(t.intermediate_values, default=0)


def write_report(study, out_dir, storage_url: str = "") -> dict:
    """Write best.toml, summary.json, summary.md, history.png, importance.png; return the summary dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = study.user_attrs["settings"]
    labels, epochs, seed = settings["labels"], settings["epochs"], settings["seed"]
    all_trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in all_trials) for s in TrialState}
    counts["skipped"] = sum("skipped" in t.user_attrs for t in all_trials)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    done = [t for t in all_trials if t.state in DONE]
    epochs_run = sum(_epochs_run(t) for t in done)
    ref = next((t for t in complete if "reference" in t.user_attrs), None)
    best = min(complete, key=lambda t: t.value) if complete else None
    s = {"version": __version__, "study": study.study_name, "storage": redact(storage_url) if storage_url else "",
         "settings": settings, "trials": counts,
         "cost": {"epochs_trained": epochs_run, "full_trainings_equivalent": epochs_run / epochs,
                  "fraction_of_unpruned": epochs_run / (epochs * len(done)) if done else None,
                  "seconds": sum(t.duration.total_seconds() for t in done if t.duration is not None)},
         "best": None, "reference": None, "importance": None, "importance_note": ""}
    if best is not None:
        mc, tc = configs_from_params(best.params, labels, settings["dataset"]["n_pix"], epochs, seed,
                                     settings.get("recipe", "paper"))
        s["best"] = {"trial": best.number, "val_loss": best.value, "params": best.params,
                     "model": mc.to_dict(), "train": tc.to_dict(), "val_metrics": best.user_attrs.get("val_metrics")}
        header = (f"best trial {best.number} of study {study.study_name!r}: val loss {best.value:.6g}\n"
                  f"written by stellarparams {__version__}; train it with\n"
                  f"  stellarparams train --dataset DATASET --out MODEL --config {BEST_TOML}")
        write_text(out / BEST_TOML, config_toml(mc, tc, header))
    if ref is not None:
        s["reference"] = {"trial": ref.number, "val_loss": ref.value, "params": ref.params}
    if best is not None and ref is not None:
        s["improvement_over_reference"] = (ref.value - best.value) / ref.value
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():  # "few trials in some regimes": said in the note below instead
                warnings.simplefilter("ignore")
                s["importance"] = optuna.importance.get_param_importances(study)
            if len(complete) < 10:
                s["importance_note"] = f"from only {len(complete)} complete trials: rough"
        except (ValueError, RuntimeError) as e:
            s["importance_note"] = f"not computed: {e}"
    else:
        s["importance_note"] = f"needs at least 2 complete trials, the study has {len(complete)}"
    write_text(out / SUMMARY_JSON, dumps(s, indent=2))
    write_text(out / SUMMARY_MD, summary_markdown(s))
    _plot_history(all_trials, ref, out / HISTORY_PNG)
    _plot_importance(s["importance"], s["importance_note"], out / IMPORTANCE_PNG)
    return s


def summary_line(s: dict) -> str:
    c = s["trials"]
    line = f"{c['complete']} complete, {c['pruned']} pruned, {c['fail'] - c['skipped']} failed trials"
    if s["best"]:
        line += f"; best val loss {s['best']['val_loss']:.4f} (trial {s['best']['trial']})"
    if s["reference"]:
        line += f" vs paper default {s['reference']['val_loss']:.4f}"
    return line


def summary_markdown(s: dict) -> str:
    c, cost = s["trials"], s["cost"]
    L = [f"# Hyperparameter search `{s['study']}`", "",
         f"stellarparams {s['version']}; storage `{s['storage']}`; sampler {s['settings']['sampler'].upper()}, "
         f"{'successive-halving pruning' if s['settings']['prune'] else 'no pruning'}, "
         f"{s['settings']['epochs']} epochs per trial, seed {s['settings']['seed']}.", "",
         f"Trials: {c['complete']} complete, {c['pruned']} pruned, {c['fail'] - c['skipped']} failed, "
         f"{c['running']} running. Epochs trained: {cost['epochs_trained']} "
         f"(= {cost['full_trainings_equivalent']:.1f} full trainings).", ""]
    if s["best"] is None:
        L += ["No complete trial yet.", ""]
    else:
        ref = s["reference"]
        L += ["| | trial | val loss |", "|---|---|---|",
              f"| best | {s['best']['trial']} | {s['best']['val_loss']:.5g} |"]
        if ref:
            L.append(f"| paper default | {ref['trial']} | {ref['val_loss']:.5g} |")
        L += ["", "Best parameters:", "", "| parameter | best | paper default |", "|---|---|---|"]
        names = list(s["best"]["params"]) + [k for k in (ref["params"] if ref else {}) if k not in s["best"]["params"]]
        for k in names:
            b, r = s["best"]["params"].get(k, ""), (ref["params"].get(k, "") if ref else "")
            fmt = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
            L.append(f"| {k} | {fmt(b)} | {fmt(r)} |")
        L += ["", f"Train it: `stellarparams train --dataset DATASET --out MODEL --config {BEST_TOML}`", ""]
    if s["importance"]:
        L += ["Parameter importance (Optuna's default evaluator):", ""]
        L += [f"- {k}: {v:.3f}" for k, v in s["importance"].items()]
    else:
        L.append(f"Parameter importance: {s['importance_note']}")
    L += ["", f"Plots: `{HISTORY_PNG}`, `{IMPORTANCE_PNG}`.", ""]
    return "\n".join(L)


def _plot_history(trials, ref, path: Path):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    comp = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in comp], [t.value for t in comp], s=18, label="complete")
    ax.scatter([t.number for t in pruned], [t.intermediate_values[_epochs_run(t)] for t in pruned], s=14,
               marker="x", color="0.6", label="pruned (last reported)")
    if comp:
        comp = sorted(comp, key=lambda t: t.number)
        best, xs, ys = math.inf, [], []
        for t in comp:
            best = min(best, t.value)
            xs.append(t.number)
            ys.append(best)
        last = max(t.number for t in trials)
        ax.step(xs + [last], ys + [best], where="post", color="C3", label="best so far")
    if ref is not None:
        ax.axhline(ref.value, color="k", ls="--", lw=1, label=f"paper default (trial {ref.number})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation loss")
    ax.set_title("optimization history")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def _plot_importance(importance, note, path: Path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if importance:
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names])
        ax.set_xlabel("importance for the validation loss")
    else:
        ax.text(0.5, 0.5, f"parameter importance {note}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title("parameter importance")
    _save_figure(fig, path)


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser):
    p.description = ("Bayesian hyperparameter search (Optuna, TPE sampler + successive-halving pruning) over "
                     "the paper's space (docs/method.md): stem width 64-128, 1-2 residual blocks of 32-64 units, head templates "
                     "16 ... 48-32-16 per task, dropouts (stem 0-0.5, trunk 0-0.4, heads 0-0.4), lr 1e-4..5e-3 and "
                     "weight decay 1e-5..1e-2 (log). The paper's default configuration is trained first as a "
                     "reference. Re-running the same command continues a killed search; running it again in "
                     "other terminals or machines with the same --storage and --study adds workers.")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (from `stellarparams prepare`)")
    p.add_argument("--out", required=True, help="folder for best.toml, summary.json/.md, history.png, importance.png "
                   "(and study.db with the default storage)")
    p.add_argument("--trials", type=int, default=100,
                   help="total finished (complete + pruned) trials, all workers together")
    p.add_argument("--storage", help="Optuna database URL shared by the workers, e.g. "
                   "postgresql://user:password@host/db (None: the SQLite file OUT/study.db)")
    p.add_argument("--study", default="stellarparams", help="study name inside the storage")
    p.add_argument("--sampler", choices=("tpe", "gp"), default="tpe",
                   help="TPE handles the conditional/categorical space and learns from pruned trials; "
                   "gp: Gaussian process")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="training recipe of every trial; a --space file's [augment] table searches its switches")
    p.add_argument("--epochs", type=int, default=30, help="epochs per trial (the paper's 30)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial and sampler seed")
    p.add_argument("--space", help="TOML file narrowing the search space, e.g. `lr = [3e-4, 2e-3]`, "
                   "`head_templates = [\"16\", \"48-32\"]`; ranges beyond the paper's are refused")
    p.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    p.add_argument("--no-prune", action="store_true", help="train every trial for all epochs")
    p.add_argument("--threads", type=int, help="torch threads per trial (e.g. 1 per worker when running several)")
    p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between a trial's liveness pings; "
                   f"a trial silent for {GRACE_FACTOR}x this long (killed worker) is re-queued")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log")
    add_device_arguments(p)


def run_cli(args) -> int:
    space = SearchSpace.from_toml(args.space) if args.space else SearchSpace()
    s = tune(args.dataset, args.out, trials=args.trials, storage=args.storage, study_name=args.study,
             sampler=args.sampler, epochs=args.epochs, seed=args.seed, timeout=args.timeout, space=space,
             prune=not args.no_prune, threads=args.threads, heartbeat=args.heartbeat, recipe_name=args.recipe,
             run=Run.from_args(args))
    summary = json.loads((Path(args.out) / SUMMARY_JSON).read_text())
    print(summary_line(summary))
    if summary["best"]:
        print(f"best config: {Path(args.out) / BEST_TOML}; summary: {Path(args.out) / SUMMARY_MD}")
    n_done = len(finished_trials(s))
    if n_done < args.trials:
        print(f"{n_done} of {args.trials} trials finished (others still running, stopped by --timeout, or a "
              "killed worker's trial waiting to be re-queued); re-run the same command to continue", file=sys.stderr)
    return 0
