"""Model folders: the pre-refactor fixture still loads and predicts as it did, the same seed
still gives the same weight bytes, every file is checked against the manifest, and the Python
API answers empty and non-finite input.

The fixtures were written on one machine. Float kernels (oneDNN, MKL, OpenBLAS, numpy's SIMD
loops) round differently on another instruction set or thread count, so values from the fixture
are compared within a tolerance: a forward pass of the fixed weights within ``RTOL_FORWARD``,
a short training run within ``RTOL_TRAINED``. Bit-identity is asserted only between two results
computed in the same test run (the same machine, the same thread count)."""
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stellarparams import load_model
from stellarparams.model import ModelConfig, StellarNet
from stellarparams.model_io import Model, ModelFileError, save_model
from stellarparams.uncertainty import Uncertainty

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import make_fixtures  # noqa: E402  (tests/data/make_fixtures.py: wrote the fixtures before the refactor)

torch.set_num_threads(1)
# Measured against the fixture on AVX2, and with the CI's second pass (ATEN_CPU_CAPABILITY=default,
# SSE4 oneDNN/MKL/OpenBLAS, one thread): the fixed weights' predictions and sigma move by <= 1.1e-6
# relative; the tiny training run's predictions by <= 1e-6 and its sigma by <= 2.1e-5. Its
# calibration coefficients a and b trade off against each other (they move by up to 40% while
# sigma stays put), so the test compares sigma, which they make, not them. A changed seed or
# forward pass moves the predictions by far more (test_a_changed_seed_or_forward_pass_is_caught).
RTOL_FORWARD = 1e-5
RTOL_TRAINED = 1e-4
FILES = ["weights.safetensors", "model.json", "train_log.csv", "uncertainty.json", "uncertainty.safetensors"]


def _load_quiet(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fixture was written by another stellarparams version
        return load_model(folder)


@pytest.fixture()
def folder(tmp_path):
    """The fixture model written again by today's save_model (so it has a manifest)."""
    return save_model(_load_quiet(DATA / "model_v0"), tmp_path / "model")


def test_pre_refactor_folder_loads_and_predicts_as_before():
    model = _load_quiet(DATA / "model_v0")
    assert "manifest" not in json.loads((DATA / "model_v0" / "model.json").read_text())   # written before it
    x = np.load(DATA / "model_v0_inputs.npy")
    pred, sigma = model.predict(x, return_sigma=True)
    np.testing.assert_allclose(pred, np.load(DATA / "model_v0_pred.npy"), rtol=RTOL_FORWARD)
    np.testing.assert_allclose(sigma, np.load(DATA / "model_v0_sigma.npy"), rtol=RTOL_FORWARD)
    np.testing.assert_allclose(model.predict_full(x)["ood_score"], np.load(DATA / "model_v0_ood.npy"), rtol=RTOL_FORWARD)
    assert model.weights_sha256 == json.loads((DATA / "model_v0" / "model.json").read_text())["weights_sha256"]
    again = _load_quiet(DATA / "model_v0").predict(x, return_sigma=True)   # same machine: the same bits
    np.testing.assert_array_equal(again[0], pred)
    np.testing.assert_array_equal(again[1], sigma)


def _assert_close_to_fixture(got, expected, rtol):
    for key in ("pred", "sigma"):
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, err_msg=key)
    assert got["n_oof"] == expected["n_oof"]


@pytest.mark.parametrize("folds", [0, 2])
def test_same_seed_gives_the_same_weight_bytes_here_and_the_same_predictions_as_before(tmp_path, folds):
    expected = json.loads((DATA / "tiny_run.json").read_text())[f"calib_folds={folds}"]
    model, digest = make_fixtures.tiny_run(tmp_path / "a", folds)
    again, digest_again = make_fixtures.tiny_run(tmp_path / "b", folds)
    assert digest == digest_again == model.weights_sha256   # one machine, one thread count: bit for bit
    _assert_close_to_fixture(make_fixtures.record(model, digest), expected, RTOL_TRAINED)


def test_a_changed_seed_or_forward_pass_is_caught(tmp_path, monkeypatch):
    """The tolerances above are far below what a real change does."""
    expected = json.loads((DATA / "tiny_run.json").read_text())["calib_folds=0"]
    tiny_configs = make_fixtures.tiny_configs

    def other_seed(calib_folds=0):
        mc, tc = tiny_configs(calib_folds)
        return mc, tc.__class__(**{**tc.to_dict(), "seed": tc.seed + 1})

    monkeypatch.setattr(make_fixtures, "tiny_configs", other_seed)
    model, digest = make_fixtures.tiny_run(tmp_path, 0)
    with pytest.raises(AssertionError):
        _assert_close_to_fixture(make_fixtures.record(model, digest), expected, RTOL_TRAINED)

    fixture = _load_quiet(DATA / "model_v0")
    x = np.load(DATA / "model_v0_inputs.npy")
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda t, approximate="none": torch.tanh(t))   # another forward pass
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(fixture.predict(x), np.load(DATA / "model_v0_pred.npy"), rtol=RTOL_FORWARD)


def test_resaved_fixture_round_trips_with_a_manifest_of_every_file(folder):
    meta = json.loads((folder / "model.json").read_text())
    assert sorted(meta["manifest"]["files"]) == sorted(set(FILES) - {"model.json"})
    back = load_model(folder)
    x = np.load(DATA / "model_v0_inputs.npy")
    np.testing.assert_allclose(back.predict(x, return_sigma=True)[1], np.load(DATA / "model_v0_sigma.npy"), rtol=RTOL_FORWARD)
    np.testing.assert_array_equal(back.predict(x, return_sigma=True)[1],   # same machine: the same bits as before saving
                                  _load_quiet(DATA / "model_v0").predict(x, return_sigma=True)[1])
    mask = 0o666 & ~_umask()
    assert {f: (folder / f).stat().st_mode & 0o777 for f in FILES} == {f: mask for f in FILES}   # weights were 0600


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("name", FILES)
def test_a_one_byte_change_in_any_file_is_refused_naming_it(folder, name):
    path = folder / name
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    if name.endswith((".json", ".csv")):  # the digit nearest the middle: the text stays valid JSON/CSV
        i = min((j for j in range(len(data)) if chr(data[j]).isdigit()), key=lambda j: abs(j - i))
    data[i] = ord("7") if data[i] != ord("7") else ord("3")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=f"{name}.*(sha256|changed or damaged)"):
        load_model(folder)


def test_edited_scaler_centre_is_refused(folder):
    meta = json.loads((folder / "model.json").read_text())
    meta["scaler"]["center"][0] += 1000
    (folder / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    with pytest.raises(ModelFileError, match="model.json: its content does not match"):
        load_model(folder)


def test_damaged_calibration_of_an_old_folder_is_refused_not_nan(tmp_path):
    old = shutil.copytree(DATA / "model_v0", tmp_path / "old")
    t = old / "uncertainty.safetensors"
    data = bytearray(t.read_bytes())
    data[-3] ^= 0xFF
    t.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="uncertainty.safetensors"):
        _load_quiet(old)


def _hand_built(seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_in=48, stem_width=8, block_widths=(8,), heads={"teff": (4,), "logg": (4,)})
    return Model(StellarNet(cfg), ["teff", "logg"], [6000, 3.5], [1500, 1.2], model_config=cfg)


def test_weights_sha256_of_a_hand_built_model_is_the_saved_file_hash(tmp_path):
    a, b = _hand_built(0), _hand_built(1)
    assert a.fingerprint == ""                                  # why predict cannot key on it
    assert a.weights_sha256 != b.weights_sha256
    save_model(a, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert a.weights_sha256 == meta["weights_sha256"] == load_model(tmp_path / "a").weights_sha256


@pytest.mark.parametrize("calibrated", [True, False])
def test_empty_input_gives_empty_results(calibrated):
    model = _load_quiet(DATA / "model_v0")
    if not calibrated:
        model.uncertainty = None
    empty = np.zeros((0, model.n_in), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "no uncertainty calibration"
        pred, sigma = model.predict(empty, return_sigma=True)
        df = model.predict_full(empty)
    assert pred.shape == sigma.shape == (0, 3) and model.predict(empty).shape == (0, 3)
    assert len(df) == 0 and {"teff", "sigma_teff", "ood_score", "flag_unlike_training"} <= set(df.columns)


def test_a_row_with_nan_or_inf_is_flagged_with_a_warning():
    model = _load_quiet(DATA / "model_v0")
    x = np.load(DATA / "model_v0_inputs.npy")
    bad = x.copy()
    bad[1, 5], bad[3, 0] = np.nan, np.inf
    with pytest.warns(UserWarning, match="2 of 5 spectra have NaN or inf flux"):
        df = model.predict_full(bad)
    assert df["flag_unlike_training"].tolist()[1] and df["flag_unlike_training"].tolist()[3]
    assert np.isinf(df["ood_score"][[1, 3]]).all() and df.loc[[1, 3], "teff"].isna().all()
    good = model.predict_full(x)
    np.testing.assert_array_equal(df.loc[[0, 2, 4], "teff"], good.loc[[0, 2, 4], "teff"])   # others untouched


def test_novelty_sums_squares_in_float64():
    """Flux far from zero: Q is the tiny difference of two ~4000-term sums of squares (float32 gave 0)."""
    P = 4000
    rng = np.random.default_rng(0)
    W = np.linalg.qr(rng.normal(size=(P, 2)))[0].T                     # 2 orthonormal components
    mu = np.full(P, 30.0)
    x = (mu + rng.normal(size=(3, 2)) @ W + 1e-3 * rng.normal(size=(3, P))).astype(np.float32)
    u = Uncertainty(["a"], np.ones(1), np.ones(1), np.ones(1), mu.astype(np.float32), W.astype(np.float32),
                    np.ones(2), 1.0, 1.0, np.zeros((2, 1)))
    q, _, _ = u.novelty(x, noise=np.ones(3))
    xc = x.astype(np.float64) - mu
    np.testing.assert_allclose(q, ((xc - (xc @ W.T) @ W) ** 2).mean(1), rtol=1e-5, atol=0)
