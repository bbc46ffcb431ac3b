"""Training: target scaling, loss weights, LR schedule, learning, best weights, resume."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.preprocessing import RobustScaler

from stellarparams import load_model
from stellarparams.config import ModelConfig
from stellarparams.train import TrainConfig, load_config, train
from stellarparams.training import lr_factor, masked_huber

from helpers import TINY, tiny_dataset

torch.set_num_threads(1)
def test_lr_schedule_warmup_peak_and_floor():
    total = 1000  # warm-up = 50 steps
    assert lr_factor(0, total) == pytest.approx(1 / 50)
    assert lr_factor(49, total) == pytest.approx(1.0)   # end of warm-up: peak
    assert lr_factor(50, total) == pytest.approx(1.0)   # cosine starts at the peak
    assert lr_factor(999, total) == pytest.approx(0.01)  # last step: the floor
    mid = 50 + (999 - 50) / 2
    assert lr_factor(int(mid), total) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 50) / 949)))
    assert all(lr_factor(s, total) >= lr_factor(s + 1, total) for s in range(50, 999))


def test_masked_huber_ignores_missing_labels():
    pred = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([[0.5, float("nan")], [3.0, 2.0]])
    w = torch.tensor([2.0, 1.0])
    # label 0: mean(0.5*0.25, 3-0.5) ; label 1: only row 2: 2-0.5
    expect = 2.0 * (0.125 + 2.5) / 2 + 1.0 * 1.5
    assert float(masked_huber(pred, target, w)) == pytest.approx(expect)


def test_tiny_training_learns_and_uses_paper_weights(tmp_path):
    ds = tiny_dataset(tmp_path / "ds", missing=20)
    tc = TrainConfig(epochs=12, batch_size=32, lr=3e-3, seed=1, calib_folds=0)
    model = train(ds, None, TINY, tc, progress=False)
    h = model.history
    assert len(h) == 12 and h[-1]["val_loss"] < h[0]["val_loss"]
    # best-validation weights are the ones kept
    best = min(r["val_loss"] for r in h)
    assert model.best_val_loss == pytest.approx(best)
    assert model.metrics["best_epoch"] == 1 + int(np.argmin([r["val_loss"] for r in h]))
    # RobustScaler fitted on the train split only; loss weights = 1 / var(scaled train labels)
    ytr = ds.labels(ds.indices("train")).astype(np.float64)
    sc = RobustScaler().fit(ytr)
    np.testing.assert_allclose(model.center, sc.center_)
    np.testing.assert_allclose(model.scale, sc.scale_)
    w = 1 / np.nanvar(sc.transform(ytr), axis=0)
    np.testing.assert_allclose([model.metrics["loss_weights"][l] for l in ("teff", "feh", "logg")], w, rtol=1e-5)
    # LR at the very end of training is the floor
    assert h[-1]["lr"] == pytest.approx(tc.lr * tc.lr_floor)
    # beats predicting the training median on the test split, for every label
    te = ds.indices("test")
    y, p = ds.labels(te), model.predict(ds.flux(te))
    mae = np.abs(p - y).mean(0)
    mae_median = np.abs(np.nanmedian(ytr, axis=0) - y).mean(0)
    assert np.all(mae < 0.6 * mae_median), (mae, mae_median)


def test_deterministic_with_seed(tmp_path):
    ds = tiny_dataset(tmp_path / "ds", n=200)
    tc = TrainConfig(epochs=2, batch_size=32, seed=3, calib_folds=0)
    a = train(ds, None, TINY, tc, progress=False)
    b = train(ds, None, TINY, tc, progress=False)
    X = ds.flux(ds.indices("test"))
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    c = train(ds, None, TINY, TrainConfig(epochs=2, batch_size=32, seed=4, calib_folds=0), progress=False)
    assert not np.array_equal(a.predict(X), c.predict(X))


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    ds = tiny_dataset(tmp_path / "ds", n=200)
    tc = TrainConfig(epochs=4, batch_size=32, seed=5, calib_folds=0)
    full = train(ds, tmp_path / "full", TINY, tc, progress=False)

    def kill(epoch, val_loss, metrics):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train(ds, tmp_path / "m", TINY, tc, on_epoch=kill, progress=False)
    assert (tmp_path / "m" / "checkpoint.safetensors").exists() and not (tmp_path / "m" / "model.json").exists()
    seen = []
    resumed = train(ds, tmp_path / "m", TINY, tc, on_epoch=lambda e, v, m: seen.append(e), progress=False)
    assert seen == [2, 3]  # only the missing epochs ran
    assert [r["val_loss"] for r in resumed.history] == pytest.approx([r["val_loss"] for r in full.history])
    X = ds.flux()
    np.testing.assert_allclose(resumed.predict(X), full.predict(X), rtol=1e-5, atol=1e-3)
    assert not (tmp_path / "m" / "checkpoint.safetensors").exists()
    # a finished folder is not retrained; another config there is refused
    again = train(ds, tmp_path / "m", TINY, tc, on_epoch=lambda *a: seen.append("ran"), progress=False)
    assert "ran" not in seen and np.array_equal(again.predict(X), resumed.predict(X))
    with pytest.raises(ValueError, match="another config"):
        train(ds, tmp_path / "m", TINY, TrainConfig(epochs=5, batch_size=32, seed=5, calib_folds=0), progress=False)
    other = train(ds, tmp_path / "m", TINY, TrainConfig(epochs=1, batch_size=32, seed=5, calib_folds=0), overwrite=True,
                  progress=False)
    assert len(other.history) == 1 and len(load_model(tmp_path / "m").history) == 1


def test_killed_during_calibration_resumes_without_retraining(tmp_path, monkeypatch):
    from stellarparams import calibrate

    ds = tiny_dataset(tmp_path / "ds", n=200)
    tc = TrainConfig(epochs=3, batch_size=32, seed=6, calib_folds=2)
    real, calls = calibrate.raw_uncertainty, []

    def dies_in_fold_2(*a, **k):   # each fold model predicts its held-out stars, then the validation stars
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(calibrate, "raw_uncertainty", dies_in_fold_2)
    m = tmp_path / "m"
    with pytest.raises(Killed):
        train(ds, m, TINY, tc, progress=False)
    assert (m / "checkpoint.safetensors").exists() and not (m / "model.json").exists()
    assert len(list(m.glob("oof_*_fold0.npz"))) == 1 and not list(m.glob("oof_*_fold1.npz"))
    monkeypatch.setattr(calibrate, "raw_uncertainty", real)
    seen = []
    model = train(ds, m, TINY, tc, on_epoch=lambda *a: seen.append(a), progress=False)
    assert seen == []                                      # the final model is not trained again
    assert model.uncertainty.stats["n_oof"] == len(ds.indices("train"))
    assert not list(m.glob("oof_*")) and not (m / "checkpoint.safetensors").exists()
    full = train(ds, None, TINY, tc, progress=False)       # uninterrupted: the same calibration
    np.testing.assert_allclose(model.uncertainty.a, full.uncertainty.a, rtol=1e-4)
    np.testing.assert_allclose(model.uncertainty.c, full.uncertainty.c, rtol=1e-4)


def test_custom_net_and_label_subset(tmp_path):
    ds = tiny_dataset(tmp_path / "ds", n=120)
    net = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    cfg = ModelConfig(heads={"logg": (8,), "teff": (8,)})
    model = train(ds, None, cfg, TrainConfig(epochs=1, batch_size=32, calib_folds=0), net=net, progress=False)
    assert model.net is net and model.label_names == ["logg", "teff"] and model.label_units == ["dex", "K"]
    assert model.predict(ds.flux([0, 1])).shape == (2, 2)
    with pytest.raises(ValueError, match="not in the dataset"):
        train(ds, None, ModelConfig(heads={"mgfe": (8,)}), TrainConfig(epochs=1), progress=False)


def test_toml_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[model]\nstem_width = 96\nblock_widths = [64, 32]\n[model.heads]\nteff = [48, 32]\n"
                 "[train]\nepochs = 7\nlr = 1e-3\n")
    mc, tc = load_config(p)
    assert mc.stem_width == 96 and mc.block_widths == (64, 32) and mc.heads == {"teff": (48, 32)}
    assert tc.epochs == 7 and tc.lr == 1e-3 and tc.batch_size == 256
    p.write_text("[train]\nepoch = 7\n")
    with pytest.raises(ValueError, match="epoch"):
        load_config(p)


def test_output_that_cannot_be_a_model_folder_is_refused_before_any_work(tmp_path, tiny_ds, capsys):
    from stellarparams.cli import main

    tiny_ds.close()  # the command opens tmp_path/ds itself
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "model"):
        assert main(["train", "--dataset", str(tmp_path / "ds"), "--out", str(out), "--epochs", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "file" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_output_is_refused_before_any_work(tmp_path, tiny_ds, monkeypatch):
    from stellarparams import train as train_mod

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: let access() answer as for an ordinary user
        monkeypatch.setattr(train_mod.os, "access", lambda p, mode: Path(p) != ro)
    try:
        with pytest.raises(ValueError, match="not writable"):
            train(tiny_ds, ro / "model", TINY, TrainConfig(epochs=1), progress=False)
        assert not (ro / "model").exists()
    finally:
        ro.chmod(0o755)


def test_a_second_train_on_a_busy_folder_fails_at_once_or_waits(tmp_path, tiny_ds, monkeypatch):
    """The folder's lock held by another writer: the CLI fails at once naming the folder and the
    holder's PID, having written nothing; train(wait=True) waits, then trains."""
    from stellarparams import files
    from stellarparams.files import output_lock

    ds = tiny_ds
    out, tc = tmp_path / "m", TrainConfig(epochs=1, batch_size=32, calib_folds=0)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stellarparams.cli", "train", "--dataset", str(tmp_path / "ds"), "--out", str(out),
           "--epochs", "1", "--calib-folds", "0", "--quiet"]
    with output_lock(out):
        busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 3 and f"PID {os.getpid()}" in busy.stderr and str(out) in busy.stderr, busy.stderr
        assert "--wait" in busy.stderr and sorted(p.name for p in out.iterdir()) == [".lock"]
    # --wait: the holder finishes while the waiter sleeps (the sleep is where the lock is released)
    held = output_lock(out)
    held.__enter__()
    naps = []

    def nap(s):
        naps.append(s)
        held.__exit__(None, None, None)

    monkeypatch.setattr(files.time, "sleep", nap)
    model = train(ds, out, TINY, tc, progress=False, wait=True)
    assert len(naps) == 1 and (out / "model.json").exists() and len(model.history) == 1


def test_paper_recipe_is_the_papers_schedule_on_the_542771_parameter_network():
    from stellarparams.config import RECIPES, recipe
    from stellarparams.model import StellarNet, count_parameters

    tc = recipe("paper")
    assert (tc.lr, tc.weight_decay, tc.batch_size, tc.epochs, tc.warmup_frac, tc.huber_delta, tc.n_augment,
            tc.noise_min, tc.noise_max) == (7e-4, 0.01, 256, 30, 0.05, 1.0, 2, 0.01, 0.05)
    assert not tc.augments and tc == TrainConfig()
    assert count_parameters(StellarNet(ModelConfig())) == 542_771
    assert recipe("default").augments and set(RECIPES) == {"paper", "default"}


def test_two_concurrent_trains_on_one_folder_one_proceeds_and_equals_a_solo_run(tmp_path, tiny_ds):
    """Ten races of two train() calls on one --out (threads: each holds its own lock file
    description, so they exclude each other as two processes would): exactly one trains, the
    other fails at once naming the folder, and the model equals a solo run's."""
    import threading

    from stellarparams.files import OutputBusy

    ds = tiny_ds
    tc = TrainConfig(epochs=1, batch_size=32, calib_folds=0)
    solo = train(ds, tmp_path / "solo", TINY, tc, progress=False).weights_sha256
    for i in range(10):
        out, results, go = tmp_path / f"race{i}", [], threading.Barrier(2)

        def race():
            go.wait()
            try:
                results.append(train(ds, out, TINY, tc, progress=False).weights_sha256)
            except OutputBusy as e:
                results.append(e)

        threads = [threading.Thread(target=race) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = [r for r in results if isinstance(r, str)]
        busy = [r for r in results if isinstance(r, OutputBusy)]
        # either one waits out the other's lock (then it loads the finished model) or it is refused
        assert len(done) >= 1 and len(done) + len(busy) == 2 and all(d == solo for d in done)
        assert all(str(out) in str(b) for b in busy)
        assert load_model(out).weights_sha256 == solo


def test_ensemble_averages_its_members_and_its_sigma_holds_their_spread(tmp_path):
    from stellarparams.uncertainty import raw_uncertainty

    ds = tiny_dataset(tmp_path / "ds", n=200)
    ens = train(ds, tmp_path / "ens", TINY, TrainConfig(epochs=2, batch_size=32, seed=3, calib_folds=0, ensemble=2),
                progress=False)
    members = [train(ds, None, TINY, TrainConfig(epochs=2, batch_size=32, seed=s, calib_folds=0), progress=False)
               for s in (3, 4)]
    X = ds.flux(ds.indices("test"))
    np.testing.assert_allclose(ens.predict(X), np.mean([m.predict(X) for m in members], 0), rtol=1e-5, atol=1e-3)
    back = load_model(tmp_path / "ens")  # one folder: both members, no checkpoints left
    np.testing.assert_array_equal(back.predict(X), ens.predict(X))
    assert sorted(p.name for p in (tmp_path / "ens").glob("checkpoint*")) == []
    assert back.train_config.ensemble == 2 and back.metrics["members"] == 2
    # the MC spread of the ensemble includes the members' disagreement: wider than either member's
    _, s_ens, _ = raw_uncertainty(ens.net, X)
    spread = np.abs(members[0].predict_scaled(X) - members[1].predict_scaled(X)) / 2
    _, s0, _ = raw_uncertainty(members[0].net, X)
    assert np.median(s_ens) > np.median(s0)
    assert np.corrcoef(s_ens.ravel() ** 2 - s0.ravel() ** 2, spread.ravel() ** 2)[0, 1] > 0.3
    assert np.isfinite(ens.predict_full(X).filter(like="sigma_").to_numpy()).all()

