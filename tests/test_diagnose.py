"""stellarparams diagnose: ood_score against training, flagged fractions, where a set's spectra depart."""
import json

import numpy as np
import pytest
import torch

from stellarparams.cli import main
from stellarparams.dataset import Grid, write_dataset
from stellarparams.diagnose import diagnose, find_regions
from stellarparams.train import TrainConfig, train

from test_train import TINY, make_dataset

torch.set_num_threads(1)
BAND = (20, 25)   # pixels of the injected absorption band


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    ds = make_dataset(root / "train", n=360)
    train(ds, root / "model", TINY, TrainConfig(epochs=8, batch_size=32, lr=3e-3, seed=1, calib_folds=0),
          progress=False)
    new = make_dataset(root / "new", n=200, seed=7)   # other stars, the same spectra-label relation
    return root, new


def _restandardize(x):
    return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)


def _variant(root, new, name, change):
    x = _restandardize(change(new.flux().astype(np.float64)))
    return write_dataset(root / name, x, new.labels(), new.split).path.parent


def test_in_domain_set_is_like_training(setup, tmp_path):
    root, new = setup
    assert main(["diagnose", str(root / "model"), str(root / "new"), "--out", str(tmp_path / "d"), "--quiet"]) == 0
    r = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert r["n_spectra"] == 200 and r["fraction_flagged"]["flag_unlike_training"] < 0.05
    assert r["worst_regions"] == [] and r["verdict"] == "like the training spectra"
    assert r["ks_vs_training"]["statistic"] < 0.3
    page = (tmp_path / "d" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Verdict" in page


def test_a_fake_absorption_band_is_located(setup, tmp_path):
    root, new = setup

    def band(x):
        x = x.copy()
        x[:, BAND[0]:BAND[1] + 1] -= 1.5
        return x

    r = diagnose(root / "model", _variant(root, new, "band", band), tmp_path / "d", progress=False)
    assert r["worst_regions"], r["max_departure"]
    worst = r["worst_regions"][0]
    assert BAND[0] - 3 <= worst["pix_lo"] <= BAND[0] + 1 and BAND[1] - 1 <= worst["pix_hi"] <= BAND[1] + 3
    assert worst["peak"] < -1   # absorption: the set lies below the training spectra there
    wave = 10 ** Grid(n_pix=48).loglam
    assert wave[BAND[0] - 1] <= worst["wave_peak"] <= wave[BAND[1] + 1]          # the worst pixel is in the band
    assert r["fraction_flagged"]["flag_unlike_training"] > 0.3
    assert r["verdict"].startswith("unlike")


def test_a_smooth_response_raises_the_flagged_fraction(setup, tmp_path):
    root, new = setup
    inside = diagnose(root / "model", root / "new", None, progress=False)
    # a flux-calibration slope acts on the physical flux (continuum + lines: here 3 + the standardized flux)
    response = _variant(root, new, "slope", lambda x: (x + 3.0) * np.linspace(0.6, 1.4, x.shape[1]))
    slope = diagnose(root / "model", response, None, progress=False)
    assert slope["fraction_flagged"]["flag_unlike_training"] > inside["fraction_flagged"]["flag_unlike_training"] + 0.2
    assert slope["ks_vs_training"]["statistic"] > inside["ks_vs_training"]["statistic"] + 0.2
    assert slope["worst_regions"]


def test_regions_need_more_than_sampling_noise():
    rng = np.random.default_rng(0)
    wave = np.linspace(4000, 5000, 400)
    z = rng.normal(0, 1.2533 / np.sqrt(50), 400)      # the noise of a median of 50 in-domain spectra
    assert find_regions(z, wave, 50)[0] == []
    z[100:120] += 2.0
    regions = find_regions(z, wave, 50)[0]
    assert len(regions) == 1 and 98 <= regions[0]["pix_lo"] <= 102 and 117 <= regions[0]["pix_hi"] <= 121


def test_bad_input_exits_2(setup, tmp_path, capsys):
    root, _ = setup
    assert main(["diagnose", str(root / "model"), str(tmp_path / "nothing"), "--out", str(tmp_path / "d")]) == 2
    assert "no usable spectrum" in capsys.readouterr().err    # read through predict's path: a missing file
    assert main(["diagnose", str(tmp_path / "nomodel"), str(root / "new"), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d" / "diagnose.json").exists()


def test_a_folder_from_before_diagnose_falls_back(tmp_path):
    """No training ood distribution and no emulator kept: the set against the training mean spectrum, said so."""
    import warnings
    from pathlib import Path

    data = Path(__file__).parent / "data"
    x = np.load(data / "model_v0_inputs.npy")
    write_dataset(tmp_path / "ds", np.tile(x, (4, 1)), np.full((20, 3), np.nan, np.float32), np.zeros(20, int))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # written by another stellarparams version
        r = diagnose(data / "model_v0", tmp_path / "ds", tmp_path / "d", progress=False)
    assert r["ks_vs_training"] is None and r["training_ood_score_quantiles"] is None
    assert "training mean spectrum" in r["reference_spectrum"]
    assert "keeps no training ood_score distribution" in (tmp_path / "d" / "index.html").read_text()
