"""evaluate.py and plots.py: metrics by hand, every figure a real PNG, the report folder."""
import json
import math
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from stellarparams import plots
from stellarparams.dataset import write_dataset
from stellarparams.evaluate import binned_mae, evaluate, markdown_table, metrics
from stellarparams.surveys.sdss import write_spec_lite

torch.set_num_threads(1)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the PNG header; fails unless the file is a PNG."""
    data = path.read_bytes() if hasattr(path, "read_bytes") else open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path):
    import matplotlib.image

    w, h = png_size(path)
    assert 300 <= w <= 4000 and 150 <= h <= 4000, (path, w, h)
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (h, w)
    assert img[..., :3].std() > 0.02, f"{path} looks blank"


def test_metrics_by_hand():
    y_true = np.array([[1, 10], [2, np.nan], [3, 30], [5, 40]], float)
    y_pred = np.array([[2, 12], [2, 0], [1, 30], [5, 44]], float)
    m = metrics(y_true, y_pred, ["a", "b"])
    # label a: residuals 1, 0, -2, 0
    a = m["a"]
    assert a["n"] == 4
    assert a["mae"] == pytest.approx(0.75)
    assert a["rmse"] == pytest.approx(math.sqrt(5 / 4))
    assert a["bias"] == pytest.approx(-0.25)
    assert a["scatter"] == pytest.approx(1.4826 * 0.5, rel=1e-4)  # median |r - 0| = 0.5
    assert a["range"] == pytest.approx(4.0)
    assert a["mae_pct_range"] == pytest.approx(100 * 0.75 / 4)
    # label b: the NaN truth row is ignored; residuals 2, 0, 4
    b = m["b"]
    assert b["n"] == 3
    assert b["mae"] == pytest.approx(2.0)
    assert b["rmse"] == pytest.approx(math.sqrt(20 / 3))
    assert b["bias"] == pytest.approx(2.0)
    assert b["scatter"] == pytest.approx(1.4826 * 2.0, rel=1e-4)  # |r - 2| = 0, 2, 2
    assert b["mae_pct_range"] == pytest.approx(100 * 2 / 30)


def test_metrics_counts_missing_predictions_and_checks_shapes():
    m = metrics([1.0, 2.0, 3.0], [1.5, np.nan, 2.0])
    assert m["label0"]["n"] == 2 and m["label0"]["n_nan_pred"] == 1
    assert m["label0"]["mae"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shape"):
        metrics(np.zeros((3, 2)), np.zeros((3, 3)))


def test_binned_mae_by_hand():
    y_true = np.array([[0.0], [0.0], [0.0], [0.0], [0.0]])
    y_pred = np.array([[1.0], [3.0], [-2.0], [10.0], [7.0]])
    x = np.array([5, 8, 15, 60, np.nan])
    t = binned_mae(y_true, y_pred, x, (0, 10, 20, 50, np.inf), ["a"], "snr")
    assert list(t["snr_lo"]) == [0, 10, 50]  # the empty 20-50 bin and the NaN S/N row drop out
    assert list(t["n"]) == [2, 1, 1]
    assert list(t["mae_a"]) == pytest.approx([2.0, 2.0, 10.0])


def test_markdown_table():
    md = markdown_table(pd.DataFrame({"model": ["a"], "mae": [0.123456], "x": [np.nan]}))
    assert md.splitlines() == ["| model | mae | x |", "|---|---|---|", "| a | 0.1235 | - |"]


def make_dataset(tmp_path, n=48, n_pix=4000, with_files=True):
    """Tiny prepared dataset whose first pixels carry the labels; half the FITS files exist."""
    rng = np.random.default_rng(1)
    Y = np.c_[rng.uniform(4000, 9000, n), rng.uniform(-3, 0.5, n), rng.uniform(1, 5, n)]
    X = rng.normal(size=(n, n_pix))
    X[:, :3] = 3 * (Y - Y.mean(0)) / Y.std(0)
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    files = []
    for i in range(n):
        path = tmp_path / "spectra" / f"spec-0001-50000-{i:04d}.fits"
        if with_files and i % 2 == 0:
            loglam = np.arange(3.58, 3.96, 1e-4)
            flux = 50 + 100 * np.exp(-((10 ** loglam - 5000) / 2000) ** 2) + rng.normal(0, 3, loglam.size)
            write_spec_lite(path, loglam, flux, np.full(loglam.size, 0.1), plate=1, mjd=50000, fiberid=i)
        files.append(str(path))
    meta = pd.DataFrame({"plate": 1, "mjd": 50000, "fiberid": np.arange(n), "rv": 0.0,
                         "snr": rng.uniform(5, 80, n), "object_id": [f"star{i}" for i in range(n)], "file": files})
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 6) + ["test"] * (n - n // 2 - n // 6))
    extra = pd.DataFrame({"TEFF_TRUE": Y[:, 0] + 25.0})  # a simulation's noiseless truth
    return write_dataset(tmp_path / "dataset", X, Y, split, meta=meta, extra=extra), Y


def train_model(ds, out):
    """A real, small network trained for a few seconds by the project's own loop."""
    from stellarparams.model import ModelConfig
    from stellarparams.train import TrainConfig, train

    mc = ModelConfig(stem_width=16, block_widths=(8,), heads={"teff": (8,), "feh": (8,), "logg": (8,)},
                     trunk_dropout=0.0)
    tc = TrainConfig(epochs=25, batch_size=32, lr=3e-3, seed=7, threads=1, calib_folds=0)
    return train(ds, out, mc, tc, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    ds, Y = make_dataset(tmp)
    model = train_model(ds, tmp / "model")
    return tmp, ds, Y, model


def test_evaluate_writes_tables_figures_and_report(trained):
    tmp, ds, Y, model = trained
    out = tmp / "report"
    r = evaluate(tmp / "model", tmp / "dataset", out, progress=False)

    idx = ds.indices("test")
    expect = metrics(ds.labels(idx), model.predict(ds.flux(idx)), ["teff", "feh", "logg"])
    assert r["n"] == len(idx)
    for name in expect:
        for k in ("mae", "rmse", "bias", "scatter", "mae_pct_range"):
            assert r["labels"][name][k] == pytest.approx(expect[name][k], rel=1e-5)
    vs_true = metrics(ds.labels(idx)[:, :1] + 25.0, model.predict(ds.flux(idx))[:, :1], ["teff"])["teff"]
    assert r["labels_vs_true"]["teff"]["mae"] == pytest.approx(vs_true["mae"], rel=1e-5)
    assert r["labels_vs_true"]["feh"]["n"] == 0  # no FEH_TRUE column
    assert (out / "metrics_vs_true.csv").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["labels"]["feh"]["mae"] == pytest.approx(expect["feh"]["mae"], rel=1e-5)
    assert saved["model"]["seed"] == 7 and len(saved["model"]["sha256"]) == 64
    assert saved["model"]["train_config"]["epochs"] == 25
    assert saved["dataset"]["splits"]["test"] == len(idx)
    assert saved["environment"]["stellarparams"]

    for stem in ("metrics", "mae_by_snr", "mae_by_teff"):
        assert (out / f"{stem}.csv").stat().st_size > 0 and (out / f"{stem}.md").read_text().startswith("| ")
    assert pd.read_csv(out / "mae_by_snr.csv")["n"].sum() == len(idx)
    assert pd.read_csv(out / "mae_by_teff.csv")["n"].sum() == len(idx)
    assert len(pd.read_csv(out / "predictions.csv")) == len(idx)

    # calibration of the error bars: table = coverage recomputed from predictions.csv
    from stellarparams.uncertainty import coverage

    pred = pd.read_csv(out / "predictions.csv")
    labels = ["teff", "feh", "logg"]
    cov = coverage(pred[[f"true_{n}" for n in labels]], pred[[f"pred_{n}" for n in labels]],
                   pred[[f"sigma_{n}" for n in labels]])
    calib = pd.read_csv(out / "calibration.csv")
    overall = calib[calib["snr_lo"].isna()].set_index("label")
    np.testing.assert_allclose(overall.loc[labels, "cov1"], cov[1])
    np.testing.assert_allclose(overall.loc[labels, "cov2"], cov[2])
    assert calib[calib["snr_lo"].notna()]["n"].sum() == 3 * len(idx)
    assert "## Calibration of the error bars" in (out / "report.md").read_text() and "ood_score" in pred
    assert r["ood"]["n_unlike_training"] == int((pred["ood_score"] > 1).sum())

    names = {"label_densities", "raw_spectra", "normalised_spectra", "pred_vs_true", "residuals_vs_snr",
             "reliability", "z_histograms"}
    assert set(r["figures"]) == names
    for name in names:
        path = out / "figures" / f"{name}.png"
        assert path.exists()
        assert_sensible_png(path)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(names)
    md = (out / "report.md").read_text()
    for name in names:
        assert f"(figures/{name}.png)" in md
    assert "| teff | K |" in md
    # half of the example stars have no FITS file: each is named in a note, the figure still shows the others
    assert any("missing_file" in n for n in r["notes"])


def test_evaluate_without_source_files_skips_raw_figure(tmp_path, trained):
    _, _, _, model = trained
    ds, Y = make_dataset(tmp_path, with_files=False)
    r = evaluate(model, ds, tmp_path / "report", progress=False)
    assert "raw_spectra" not in r["figures"]
    assert any("raw-spectra figure skipped" in n for n in r["notes"])
    assert_sensible_png(tmp_path / "report" / "figures" / "normalised_spectra.png")
    assert_sensible_png(tmp_path / "report" / "figures" / "pred_vs_true.png")


def test_evaluate_cli(trained, tmp_path, capsys):
    from stellarparams.cli import main

    tmp = trained[0]
    rc = main(["evaluate", str(tmp / "model"), "--dataset", str(tmp / "dataset"),
               "--out", str(tmp_path / "rep"), "--no-progress"])
    assert rc == 0
    assert "report.html" in capsys.readouterr().out
    assert (tmp_path / "rep" / "report.html").exists()
    rc = main(["evaluate", str(tmp / "model"), "--dataset", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")])
    assert rc == 2  # bad input
    assert "no prepared dataset" in capsys.readouterr().err


def test_planck_standardized_peaks_where_wien_says(tmp_path):
    from astropy.constants import b_wien

    loglam = np.linspace(3.0, 4.5, 3000)  # 1000 - 31600 A
    b = plots.planck_standardized(loglam, 5000.0)
    assert b.mean() == pytest.approx(0, abs=1e-9) and b.std() == pytest.approx(1)
    peak = 10 ** loglam[np.argmax(b)]
    assert peak == pytest.approx((b_wien / (5000 * __import__("astropy.units").units.K)).to_value("AA"), rel=0.01)


def test_pred_vs_true_with_degenerate_predictions(tmp_path):
    y = np.c_[np.linspace(4000, 8000, 50), np.linspace(-2, 0, 50)]
    p = np.c_[np.full(50, 6000.0), np.full(50, -1.0)]  # a constant model: KDE is singular
    path = plots.pred_vs_true(y, p, ["teff", "feh"], ["K", "dex"], tmp_path / "pvt.png")
    assert_sensible_png(path)


def test_evaluate_refuses_a_dataset_on_another_grid(trained, tmp_path):
    _, _, _, model = trained
    ds, _ = make_dataset(tmp_path, n_pix=500, with_files=False)
    with pytest.raises(ValueError, match="grid"):
        evaluate(model, ds, tmp_path / "report", progress=False)
