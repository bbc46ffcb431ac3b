"""Any grid: `prepare --grid`, `--grid-from`, and `predict` onto the model's grid, from the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stellarparams.surveys import sdss
from stellarparams.dataset import Dataset, Grid, parse_grid
from stellarparams.preprocess import PrepareConfig, config_from_model, preprocess

REPO = Path(__file__).resolve().parents[1]


def cli(*args, ok=True):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "stellarparams.cli", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_parse_grid_is_uniform_in_log_lambda_between_the_given_angstroms():
    g = parse_grid("3900,5000,1500")
    assert g.n_pix == 1500 and len(g.loglam) == 1500
    assert 10 ** g.loglam[0] == pytest.approx(3900) and 10 ** g.loglam[-1] == pytest.approx(5000)
    assert np.allclose(np.diff(g.loglam), np.diff(g.loglam)[0])
    for bad in ("5000,3900,10", "3900,5000", "a,b,c", "3900,5000,1", "3900,5000,1.5", "-1,5000,10"):
        with pytest.raises(ValueError):
            parse_grid(bad)


def test_config_from_model_takes_grid_and_flux_settings_but_keeps_the_columns(tmp_path):
    grid = Grid.from_angstrom(4000, 6000, 700)
    prep = PrepareConfig(grid=grid, bad_mask=3, rest_frame=False, rv_column="RV_X").to_dict()
    (tmp_path / "model.json").write_text(json.dumps({"grid": grid.to_dict(), "prepare_config": prep}))
    c = config_from_model(tmp_path, PrepareConfig(rv_column="VRAD", min_coverage=0.7))
    assert c.grid == grid and c.bad_mask == 3 and c.rest_frame is False
    assert c.rv_column == "VRAD" and c.min_coverage == 0.7
    with pytest.raises(ValueError, match="model.json"):
        config_from_model(tmp_path / "nothing")


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """simulate -> prepare --grid 3900,5000,1500 -> train -> (evaluate, predict) from the CLI."""
    from stellarparams.simulate import simulate

    out = tmp_path_factory.mktemp("grid")
    catalog = simulate(out / "survey", n=40, seed=3, workers=1, progress=False)
    cli("prepare", "--catalog", catalog, "--spectra", out / "survey" / "spectra", "--out", out / "ds",
        "--grid", "3900,5000,1500", "--workers", "1", "--no-progress")
    (out / "tiny.toml").write_text("[model]\nstem_width = 16\nblock_widths = [8]\n"
                                   "[model.heads]\nteff = [8]\nfeh = [8]\nlogg = [8]\n[train]\nbatch_size = 16\n")
    cli("train", "--dataset", out / "ds", "--out", out / "model", "--config", out / "tiny.toml", "--epochs", "1",
        "--calib-folds", "0", "--threads", "1", "--quiet")
    return out, Path(catalog)


def test_prepare_grid_gives_a_1500_pixel_dataset_that_train_records(grid_run):
    out, _ = grid_run
    with Dataset(out / "ds") as ds:
        assert ds.n_pix == 1500 and ds.grid == Grid.from_angstrom(3900, 5000, 1500)
        assert len(ds) > 0 and ds.attrs["preprocess"]["grid"]["n_pix"] == 1500
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["grid"]["n_pix"] == 1500 and meta["model_config"]["n_in"] == 1500


def test_evaluate_and_predict_use_the_1500_pixel_model_end_to_end(grid_run):
    out, _ = grid_run
    cli("evaluate", out / "model", "--dataset", out / "ds", "--out", out / "report", "--no-progress")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics  # written, for the 1500-pixel dataset
    files = sorted((out / "survey" / "spectra").rglob("spec-*.fits"))[:5]
    cli("predict", out / "model", *files, "--out", out / "pred.csv", "--workers", "1", "--quiet",
        "--catalog", out / "survey" / "sppParams.fits")
    df = pd.read_csv(out / "pred.csv")
    assert len(df) == 5 and not df["flag_rejected"].any()
    assert np.isfinite(df[["teff", "feh", "logg"]].to_numpy()).all()


def test_grid_from_prepares_exactly_like_the_model(grid_run):
    out, catalog = grid_run
    cli("prepare", "--catalog", catalog, "--spectra", out / "survey" / "spectra", "--out", out / "ds2",
        "--grid-from", out / "model", "--workers", "1", "--no-progress")
    with Dataset(out / "ds") as a, Dataset(out / "ds2") as b:
        assert b.grid == a.grid
        assert np.array_equal(a.flux(), b.flux())
    r = cli("prepare", "--catalog", catalog, "--spectra", out / "survey" / "spectra", "--out", out / "ds3",
            "--grid", "3900,5000,100", "--grid-from", out / "model", ok=False)
    assert r.returncode == 2  # one or the other


def test_predict_resamples_onto_the_model_grid_and_names_a_low_coverage_file(grid_run, tmp_path):
    """A native SDSS file (3800-9200 A, 1e-4 dex pixels) becomes a 1500-pixel row; a file covering only
    3900-4150 A of the model's 3900-5000 A is rejected as low_coverage on its own row."""
    out, _ = grid_run
    from stellarparams import load_model

    model = load_model(out / "model")
    src = sorted((out / "survey" / "spectra").rglob("spec-*.fits"))[0]
    spec = sdss.read_spectrum(src)
    flux, valid = preprocess(spec, 0.0, PrepareConfig.from_dict(model.prepare_config))
    assert flux.shape == (1500,) and valid.all()

    keep = (spec.loglam > np.log10(3850)) & (spec.loglam < np.log10(4150))
    narrow = tmp_path / "spec-0001-50000-0001.fits"
    sdss.write_spec_lite(narrow, spec.loglam[keep], spec.flux[keep], spec.ivar[keep], plate=1, mjd=50000, fiberid=1)
    r = cli("predict", out / "model", src, narrow, "--out", tmp_path / "p.csv", "--workers", "1", "--quiet",
            "--catalog", out / "survey" / "sppParams.fits", ok=False)
    df = pd.read_csv(tmp_path / "p.csv")
    assert list(df["file"]) == [str(src), str(narrow)]
    assert not df["flag_rejected"][0] and np.isfinite(df["teff"][0])
    assert df["flag_rejected"][1] and df["reject_reason"][1] == "low_coverage" and np.isnan(df["teff"][1])
    assert r.returncode == 0
    # a lower --min-coverage lets it through
    cli("predict", out / "model", narrow, "--out", tmp_path / "q.csv", "--workers", "1", "--quiet",
        "--min-coverage", "0.1")
    q = pd.read_csv(tmp_path / "q.csv")
    assert not q["flag_rejected"][0], q["reject_detail"][0]


def test_run_grid_passes_the_grid_to_prepare(tmp_path):
    from stellarparams.pipeline import run

    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nstem_width = 16\nblock_widths = [8]\n[train]\nbatch_size = 16\ncalib_folds = 0\n")
    run(tmp_path / "r", n=40, seed=2, epochs=1, workers=1, threads=1, config=cfg, progress=False,
        grid="4000,6000,500")
    with Dataset(tmp_path / "r" / "dataset") as ds:
        assert ds.grid == Grid.from_angstrom(4000, 6000, 500) and ds.n_pix == 500
    assert json.loads((tmp_path / "r" / "model" / "model.json").read_text())["grid"]["n_pix"] == 500
    r = cli("run", "--out", tmp_path / "bad", "--grid", "6000,4000,10", "--quiet", ok=False)
    assert r.returncode != 0 and "MIN" in r.stderr


def test_prepare_cli_reads_a_spectrum_table_without_a_catalog(tmp_path):
    from stellarparams.surveys import tables

    rng = np.random.default_rng(0)
    wave = np.geomspace(3700, 9300, 2000)
    n = 6
    flux = 1 + 0.2 * np.sin(wave / 40) + 0.02 * rng.normal(size=(n, len(wave)))
    tables.write_table(tmp_path / "mine.fits", wave, flux, np.full(flux.shape, 100.0),
                       columns={"ID": np.array([f"s{k}" for k in range(n)]), "TEFF": rng.uniform(4000, 7000, n),
                                "FEH": np.zeros(n), "LOGG": np.full(n, 4.0)}, shared_wave=True)
    cli("prepare", "--spectra", tmp_path / "mine.fits", "--out", tmp_path / "ds", "--no-rest-frame",
        "--grid", "4000,9000,800", "--workers", "1", "--no-progress")
    with Dataset(tmp_path / "ds") as ds:
        assert len(ds) == n and ds.n_pix == 800 and sorted(ds.meta()["object_id"]) == [f"s{k}" for k in range(n)]
    r = cli("prepare", "--spectra", tmp_path / "mine.fits", "--out", tmp_path / "ds2", "--survey", "sdss", ok=False)
    assert r.returncode == 2 and "catalog" in r.stderr
