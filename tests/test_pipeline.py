"""`stellarparams run` end to end at toy size: every stage, results, resume/skip, PASS/FAIL."""
import json

import pytest
import torch

from stellarparams import load_model
from stellarparams.cli import main
from stellarparams.pipeline import MAX_RATIO, format_table, run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = out / "tiny.toml"
    cfg.write_text("[model]\nstem_width = 16\nblock_widths = [8]\n[train]\nbatch_size = 32\ncalib_folds = 0\n")
    res = run(out, n=120, seed=1, epochs=2, workers=1, threads=1, config=cfg, progress=False)
    return out, cfg, res


def test_run_writes_every_stage(toy_run):
    out, _, res = toy_run
    assert (out / "survey" / "sppParams.fits").exists()
    assert (out / "dataset" / "dataset.h5").exists()
    model = load_model(out / "model")
    assert model.label_names == ["teff", "feh", "logg"] and len(model.history) == 2
    saved = json.loads((out / "results.json").read_text())
    c = saved["comparison"]
    assert c["n_test"] == res["n_spectra"]["test"] > 0
    for l in ("teff", "feh", "logg"):
        assert c["network"][l] > 0 and c["ridge"][l] > 0
        assert c["ratio"][l] == pytest.approx(c["network"][l] / c["ridge"][l])
        assert c["pass"][l] == (c["ratio"][l] <= MAX_RATIO)
    assert saved["all_pass"] == all(c["pass"].values())
    assert saved["seed"] == 1 and saved["stellarparams_version"] and saved["train_config"]["epochs"] == 2
    assert "network_vs_true" in c  # simulated data carry the noiseless truth


def test_rerun_skips_finished_stages(toy_run, capsys):
    out, cfg, res = toy_run
    weights = (out / "model" / "weights.safetensors").stat().st_mtime_ns
    again = run(out, n=120, seed=1, epochs=2, workers=1, threads=1, config=cfg, progress=True)
    err = capsys.readouterr().err
    assert "already prepared" in err and "already trained" in err and "up to date" in err
    assert (out / "model" / "weights.safetensors").stat().st_mtime_ns == weights
    assert again["comparison"] == res["comparison"]


def test_table_says_pass_and_fail_and_cli_exit_code(toy_run, capsys):
    out, cfg, res = toy_run
    c = dict(res["comparison"])
    c["ratio"] = {"teff": 0.5, "feh": 0.9, "logg": 0.85}
    c["pass"] = {l: r <= MAX_RATIO for l, r in c["ratio"].items()}
    lines = format_table(c).splitlines()
    assert "PASS" in lines[2] and "FAIL" in lines[3] and "PASS" in lines[4]
    rc = main(["run", "--out", str(out), "--n", "120", "--seed", "1", "--epochs", "2", "--workers", "1",
               "--threads", "1", "--config", str(cfg), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == (0 if res["all_pass"] else 1) and "Ridge" in printed


def test_run_reports_test_coverage_of_the_error_bars(toy_run):
    out, _, res = toy_run
    cal = json.loads((out / "results.json").read_text())["calibration"]
    assert (out / "model" / "uncertainty.json").exists()
    overall = [r for r in cal["table"] if r["snr_lo"] is None]
    assert [r["label"] for r in overall] == ["teff", "feh", "logg"]
    assert all(0 <= r["cov1"] <= r["cov2"] <= 1 and r["n"] == res["n_spectra"]["test"] for r in overall)
    assert all(r["cov1"] <= r["cov95"] <= 1 for r in overall)   # the 95.4% interval is wider than sigma
    assert 0 <= cal["fraction_unlike_training"] <= 1
    assert "within sigma and the 95% interval" in (out / "results.md").read_text()
    assert (out / "report" / "report.html").exists()
