"""Tests of the hyperparameter search (stellarparams.tune) on a tiny dataset, 2 epochs per trial."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from stellarparams.cli import main
from stellarparams.config import ModelConfig, config_toml
from stellarparams.train import TrainConfig, load_config, train
from stellarparams.tune import (HEAD_TEMPLATES, SearchSpace, configs_from_params, finished_trials,
                                paper_default_params, params_from_configs, tune)

from helpers import tiny_dataset

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The tiny dataset, 160 spectra x 32 pixels, with a reddening offset (the default recipe reddens)."""
    path = tmp_path_factory.mktemp("tune") / "ds"
    tiny_dataset(path, n=160, n_pix=32, offset=np.full(160, 2.0, np.float32)).close()
    return path


def _study(out, name="stellarparams"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(out).resolve()}/study.db")


def test_paper_default_maps_to_model_and_train_defaults():
    p = paper_default_params(["teff", "feh", "logg"])
    mc, tc = configs_from_params(p, ["teff", "feh", "logg"], n_in=4000)
    assert mc == ModelConfig()
    assert (tc.lr, tc.weight_decay, tc.epochs) == (TrainConfig().lr, TrainConfig().weight_decay, 30)
    assert params_from_configs(mc, tc) == p
    assert SearchSpace().contains(p, ["teff", "feh", "logg"])
    # the space proposes exactly these names: a FixedTrial with the default params is accepted as is
    assert SearchSpace().suggest(optuna.trial.FixedTrial(p), ["teff", "feh", "logg"]) == p
    assert HEAD_TEMPLATES[0] == "16" and HEAD_TEMPLATES[-1] == "48-32-16"
    assert paper_default_params(["teff", "alpha"]) is None  # no paper head for alpha: no reference


def test_config_toml_roundtrip(tmp_path):
    mc = ModelConfig(n_in=64, stem_width=80, block_widths=(48, 32), heads={"teff": (48, 32, 16), "logg": (16,)},
                     stem_dropout=0.123456789, trunk_dropout=0.0, head_dropout=0.4)
    tc = TrainConfig(lr=1.2345678e-4, weight_decay=3e-5, epochs=7, seed=3, threads=2)
    (tmp_path / "c.toml").write_text(config_toml(mc, tc, header="a comment\nover two lines"))
    mc2, tc2 = load_config(tmp_path / "c.toml")
    assert mc2 == mc
    assert tc2 == TrainConfig(lr=1.2345678e-4, weight_decay=3e-5, epochs=7, seed=3)  # threads is per machine


def test_three_trial_search_writes_config_that_trains(dataset, tmp_path):
    out = tmp_path / "search"
    study = tune(dataset, out, trials=3, epochs=2, progress=False)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    ref = trials[0]
    assert ref.state == TrialState.COMPLETE and "reference" in ref.user_attrs
    assert ref.params == paper_default_params(["teff", "feh", "logg"])
    for t in trials:
        p = t.params
        assert 64 <= p["stem_width"] <= 128 and p["n_blocks"] in (1, 2)
        assert 1e-4 <= p["lr"] <= 5e-3 and 1e-5 <= p["weight_decay"] <= 1e-2
        assert all(p[f"head_{l}"] in HEAD_TEMPLATES for l in ("teff", "feh", "logg"))
    for name in ("best.toml", "summary.json", "summary.md", "history.png", "importance.png"):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert s["best"]["trial"] == best.number and s["best"]["val_loss"] == best.value
    assert s["reference"]["val_loss"] == ref.value and s["trials"]["complete"] + s["trials"]["pruned"] == 3
    assert "paper default" in (out / "summary.md").read_text()

    # the exported config reproduces the best trial: same architecture, same val loss
    mc, tc = load_config(out / "best.toml")
    assert mc.stem_width == best.params["stem_width"] and len(mc.block_widths) == best.params["n_blocks"]
    model = train(dataset, None, mc, tc, progress=False)
    assert model.best_val_loss == pytest.approx(best.value, rel=1e-4)
    # and `stellarparams train --config best.toml` accepts it
    assert main(["train", "--dataset", str(dataset), "--out", str(tmp_path / "model"),
                 "--config", str(out / "best.toml"), "--quiet"]) == 0
    assert (tmp_path / "model" / "weights.safetensors").exists()

    # re-running a finished search trains nothing more and keeps the count
    again = tune(dataset, out, trials=3, epochs=2, progress=False)
    assert len(again.get_trials()) == 3


KILL_IN_THIRD_TRIAL = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import stellarparams.tune as T
    real_fit, calls = T.fit, []
    def fit(*args, on_epoch=None, **kw):  # SIGKILL this worker after the 1st epoch of its 3rd trial
        calls.append(1)
        def hook(epoch, val_loss, metrics):
            on_epoch(epoch, val_loss, metrics)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_fit(*args, on_epoch=hook, **kw)
    T.fit = fit
    T.tune(sys.argv[1], sys.argv[2], trials=4, epochs=2, heartbeat=1, progress=False, prune=False)
""")


def test_killed_study_resumes_with_trial_count_intact(dataset, tmp_path):
    out = tmp_path / "search"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_THIRD_TRIAL, str(dataset), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    study = _study(out)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]  # killed mid-trial
    killed = study.get_trials()[2]

    # the killed worker's last heartbeat, moved an hour into the past: stale for any grace period,
    # whatever the wall clock does (no sleeping for it to age)
    with sqlite3.connect(out / "study.db") as db:
        n = db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') WHERE trial_id = "
                       "(SELECT trial_id FROM trials WHERE number = ?)", (killed.number,)).rowcount
    assert n == 1
    study = tune(dataset, out, trials=4, epochs=2, heartbeat=1, progress=False, prune=False)
    trials = study.get_trials()
    assert len(finished_trials(study)) == 4  # not 2 + 4
    assert trials[2].state == TrialState.FAIL  # the killed one, declared dead ...
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == killed.params  # ... and trained again with its parameters
    assert sum("reference" in t.user_attrs for t in trials if t.state == TrialState.COMPLETE) == 1


def test_two_workers_share_one_sqlite_study(dataset, tmp_path):
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "stellarparams.cli", "tune", "--dataset", str(dataset), "--out", str(out),
           "--trials", "4", "--epochs", "2", "--threads", "1", "--quiet"]
    workers = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    results = [w.communicate(timeout=180) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], results
    study = _study(out)
    trials = study.get_trials()
    done = finished_trials(study)
    assert len(done) == 4
    assert len({t.number for t in trials}) == len(trials)
    assert sum("reference" in t.user_attrs for t in trials) == 1  # queued once, by the worker that made the study
    keys = [json.dumps(t.params, sort_keys=True) for t in done]
    assert len(set(keys)) == 4  # no configuration trained twice
    # a worker that found the budget taken by the other's running trial records that, nothing else fails
    assert all("skipped" in t.user_attrs for t in trials if t.state == TrialState.FAIL)
    assert all(t.state != TrialState.RUNNING for t in trials)
    s = json.loads((out / "summary.json").read_text())
    assert s["trials"]["complete"] + s["trials"]["pruned"] == 4


@pytest.mark.parametrize("text, key", [
    ("stem_width = [32, 128]", "stem_width"),
    ("n_blocks = [1, 3]", "n_blocks"),
    ("block_width = [32, 128]", "block_width"),
    ("[space]\nlr = [1e-5, 1e-3]", "lr"),
    ("weight_decay = [1e-5, 0.1]", "weight_decay"),
    ("stem_dropout = [0.0, 0.6]", "stem_dropout"),
    ("head_dropout = [-0.1, 0.2]", "head_dropout"),
    ('head_templates = ["16", "64-32"]', "64-32"),
    ("trunk_dropout = [0.3, 0.1]", "low > high"),
    ("stem_width = [70, 128]", "steps of 16"),
    ("momentum = [0.8, 0.9]", "unknown"),
])
def test_space_outside_paper_ranges_is_refused(tmp_path, text, key):
    path = tmp_path / "space.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError) as e:
        SearchSpace.from_toml(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_cli_refuses_wide_space_before_touching_storage(dataset, tmp_path, capsys):
    (tmp_path / "space.toml").write_text("lr = [1e-4, 1e-2]\n")
    out = tmp_path / "search"
    rc = main(["tune", "--dataset", str(dataset), "--out", str(out), "--space", str(tmp_path / "space.toml"),
               "--trials", "2", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lr = [0.0001, 0.01] lies outside the paper's range [0.0001, 0.005]" in err and 'docs/method.md, section "Hyperparameter search"' in err
    assert not (out / "study.db").exists()


def test_narrowed_space_is_searched_and_mismatched_join_refused(dataset, tmp_path):
    space = SearchSpace.from_dict({"lr": [1e-3, 2e-3], "n_blocks": [2, 2], "head_templates": ["16", "48-32-16"]})
    out = tmp_path / "search"
    study = tune(dataset, out, trials=2, epochs=1, space=space, progress=False)
    trials = study.get_trials()
    assert len(trials) == 2 and not any("reference" in t.user_attrs for t in trials)  # default lr 7e-4 is outside
    for t in trials:
        assert 1e-3 <= t.params["lr"] <= 2e-3 and t.params["n_blocks"] == 2
        assert t.params["head_teff"] in ("16", "48-32-16")
    assert json.loads((out / "summary.json").read_text())["reference"] is None
    with pytest.raises(ValueError, match="epochs"):  # joining the study with other settings
        tune(dataset, out, trials=3, epochs=5, space=space, progress=False)
    with pytest.raises(ValueError, match="space"):
        tune(dataset, out, trials=3, epochs=1, progress=False)
    assert len(_study(out).get_trials()) == 2


def test_trials_skip_calibration(dataset, tmp_path, monkeypatch):
    """A trial is judged by its validation loss: no PCA, no error-bar fit (they were thrown away)."""
    from stellarparams import calibrate, train as train_mod, uncertainty

    def no_calibration(*a, **k):
        raise AssertionError("a trial was calibrated")

    for module, name in ((train_mod, "calibrate"), (calibrate, "fit_uncertainty"), (uncertainty, "fit_uncertainty")):
        monkeypatch.setattr(module, name, no_calibration)
    study = tune(dataset, tmp_path / "search", trials=1, epochs=1, progress=False, prune=False)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_recipe_switches_are_searched(dataset, tmp_path, monkeypatch):
    """A space's [augment] ranges become trial parameters and reach the training config."""
    from stellarparams import tune as T

    seen = []
    real_fit = T.fit
    monkeypatch.setattr(T, "fit", lambda ds, rows, mc, tc, **kw: seen.append(tc) or real_fit(ds, rows, mc, tc, **kw))
    space = SearchSpace.from_dict({"augment": {"aug_shift_pix": [0.5, 2.0], "aug_mask_runs": [0, 4]}})
    study = tune(dataset, tmp_path / "search", trials=3, epochs=1, space=space, progress=False, prune=False)
    ref, *others = study.get_trials()
    assert ref.params["aug_shift_pix"] == 1.0 and "reference" in ref.user_attrs   # the default recipe's value
    for t, tc in zip(study.get_trials(), seen):
        assert 0.5 <= t.params["aug_shift_pix"] <= 2.0 and t.params["aug_mask_runs"] in range(5)
        assert (tc.aug_shift_pix, tc.aug_mask_runs, tc.recipe) == (t.params["aug_shift_pix"], t.params["aug_mask_runs"],
                                                                   "default")
    with pytest.raises(ValueError, match="within"):
        SearchSpace.from_dict({"augment": {"aug_ebv": [0, 2]}})
    with pytest.raises(ValueError, match="not a recipe switch"):
        SearchSpace.from_dict({"augment": {"lr": [0, 1]}})
