"""baselines.py and benchmark.py: parameter counts, Ridge's validation choice, the tables."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import Ridge

from stellarparams.baselines import CNN, DNN, OLS, RidgeVal
from stellarparams.model import count_parameters as count_trainable
from stellarparams.benchmark import MODELS, benchmark, fit_linear, paper_claims
from stellarparams.dataset import write_dataset

torch.set_num_threads(1)
TABLES = ("table2_mae", "table3_params_time", "table4_relative_to_dnn", "table5_relative_to_proposed")


def test_baseline_parameter_counts_match_the_paper():
    # docs/method.md, section "Reported results": CNN about 4.13M, DNN 3 x 4.55M = about 13.66M, for 4000 inputs and 3 labels
    assert count_trainable(CNN(4000, 3)) == 4_130_103
    assert count_trainable(DNN(4000, 3)) == 3 * 4_551_701 == 13_655_103
    x = torch.randn(5, 4000)
    assert CNN(4000, 3)(x).shape == (5, 3) and CNN.from_dict(CNN(4000, 2).to_dict())(x).shape == (5, 2)


def test_dnn_outputs_are_independent_networks():
    net = DNN(50, 3)
    x = torch.randn(4, 50, requires_grad=True)
    out = net(x)
    out[:, 1].sum().backward()
    grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in sub.parameters()) for sub in net.nets]
    assert grads == [False, True, False]


def test_ridge_picks_alpha_on_validation_and_refits():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 80)).astype(np.float32)
    w = rng.normal(size=(80, 2))
    Y = X @ w + rng.normal(0, 3.0, size=(120, 2))  # noisy, few rows: a real penalty helps
    r = RidgeVal(alphas=(1e-3, 1.0, 30.0, 1e3, 1e5)).fit(X[:60], Y[:60], X[60:90], Y[60:90])
    for j in range(2):
        best = int(np.argmin(r.val_mae_[:, j]))
        assert r.alpha_[j] == r.alphas[best]
        direct = Ridge(alpha=r.alpha_[j]).fit(X[:60], Y[:60, j]).predict(X[90:])
        np.testing.assert_allclose(r.predict(X[90:])[:, j], direct, rtol=1e-4, atol=1e-4)
    assert (r.alpha_ > 1e-3).all()  # with this noise the near-OLS end of the grid is not the best


def test_linear_baselines_handle_missing_labels():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 10)).astype(np.float32)
    Y = X[:, :2] @ np.array([[1.0, 2.0], [3.0, -1.0]])
    Y[5, 0] = np.nan
    ols = OLS().fit(X, Y)
    np.testing.assert_allclose(ols.predict(X[6:]), Y[6:], atol=1e-4)
    assert ols.n_params == 2 * (10 + 1)
    with pytest.raises(ValueError, match="NaN"):
        ols.predict(np.full((2, 10), np.nan))


def tiny_dataset(path, n=60, n_pix=4000, seed=0):
    """60 spectra x 4000 pixels whose flux carries the labels (plus noise)."""
    rng = np.random.default_rng(seed)
    Y = np.c_[rng.uniform(4000, 9000, n), rng.uniform(-3, 0.5, n), rng.uniform(1, 5, n)]
    basis = rng.normal(size=(3, n_pix))
    X = ((Y - Y.mean(0)) / Y.std(0)) @ basis + rng.normal(0, 0.5, size=(n, n_pix))
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    split = np.array(["train"] * 36 + ["val"] * 6 + ["test"] * 18)
    meta = pd.DataFrame({"plate": 1, "mjd": 2, "fiberid": np.arange(n), "rv": 0.0, "snr": rng.uniform(5, 50, n),
                         "object_id": [f"s{i}" for i in range(n)], "file": ""})
    return write_dataset(path, X, Y, split, meta=meta, attrs={"input_hash": f"tiny-{seed}"})


def test_benchmark_quick_all_models(tmp_path):
    ds = tiny_dataset(tmp_path / "ds")
    out = tmp_path / "bench"
    res = benchmark(ds, out, quick=True, seed=3, threads=1, progress=False, batch_size=8)
    test_idx = ds.indices("test")

    assert list(res["models"]) == list(MODELS)
    errors = {k: r.get("error") for k, r in res["models"].items() if r.get("error")}
    assert not errors
    assert res["seed"] == 3 and res["epochs"] == 1 and res["train_config"]["seed"] == 3
    # every model predicted the very same test rows
    shas = {r["rows_sha256"] for r in res["models"].values()}
    assert shas == {res["test_rows_sha256"]}
    assert all(r["n_test"] == len(test_idx) for r in res["models"].values())

    for t in TABLES:
        df = pd.read_csv(out / f"{t}.csv")
        assert list(df["model"]) == list(MODELS), t
        md = (out / f"{t}.md").read_text().splitlines()
        assert len(md) == 2 + len(MODELS), t
    t2 = pd.read_csv(out / "table2_mae.csv")
    assert (t2["n_test"] == len(test_idx)).all()
    assert np.isfinite(t2[["mae_teff [K]", "mae_feh [dex]", "mae_logg [dex]"]].to_numpy()).all()
    t3 = pd.read_csv(out / "table3_params_time.csv").set_index("model")
    assert t3.loc["CNN", "params"] == 4_130_103 and t3.loc["DNN", "params"] == 13_655_103
    assert t3.loc["proposed", "params"] == 542_771
    assert t3.loc["no_multitask", "params"] > 2.5 * t3.loc["proposed", "params"]
    assert (t3["time_s"] > 0).all() and (res["n_timing_runs"] == 10)
    t4 = pd.read_csv(out / "table4_relative_to_dnn.csv").set_index("model")
    t5 = pd.read_csv(out / "table5_relative_to_proposed.csv").set_index("model")
    assert t4.loc["DNN", ["params", "time", "mae_teff", "mae_feh", "mae_logg"]].tolist() == [1.0] * 5
    assert t5.loc["proposed", ["params", "time", "mae_teff"]].tolist() == [1.0] * 3
    assert t5.loc["no_skip", "params"] == pytest.approx(534_259 / 542_771)
    mae = {k: r["metrics"]["teff"]["mae"] for k, r in res["models"].items()}
    assert t4.loc["CNN", "mae_teff"] == pytest.approx(mae["CNN"] / mae["DNN"])

    # the predictions file: one row per test spectrum, one column per model and label
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred["row"]) == list(test_idx)
    assert all(f"{m}_{l}" in pred for m in MODELS for l in ("teff", "feh", "logg"))
    ridge_mae = np.mean(np.abs(pred["Ridge_feh"] - pred["true_feh"]))
    assert ridge_mae == pytest.approx(res["models"]["Ridge"]["metrics"]["feh"]["mae"], rel=1e-5)

    verdicts = {c["verdict"] for c in res["claims"]}
    assert verdicts <= {"agrees", "disagrees"}  # everything ran, so every claim was checked
    params_claim = next(c for c in res["claims"] if "25x" in c["claim"])
    assert params_claim["verdict"] == "agrees"
    text = (out / "report.md").read_text()
    assert "Quick mode" in text and "seed 3" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["Ridge"]["info"]["alpha"].keys() == {"teff", "feh", "logg"}

    # run again: every model is reused from its folder, with the same numbers
    again = benchmark(ds, out, quick=True, seed=3, threads=1, progress=False, batch_size=8)
    assert all(r.get("resumed") for r in again["models"].values())
    for m in MODELS:
        for l in ("teff", "feh", "logg"):
            assert again["models"][m]["metrics"][l]["mae"] == pytest.approx(res["models"][m]["metrics"][l]["mae"])


def test_failing_model_is_reported_and_others_finish(tmp_path, capsys):
    ds = tiny_dataset(tmp_path / "ds", n_pix=300)

    def broken(name, ctx):
        raise RuntimeError("out of memory while building the network")

    out = tmp_path / "bench"
    res = benchmark(ds, out, models={"OLS": fit_linear, "broken": broken, "Ridge": fit_linear}, threads=1)
    assert "RuntimeError: out of memory" in res["models"]["broken"]["error"]
    assert "broken FAILED" in capsys.readouterr().err
    assert not res["models"]["OLS"].get("error") and not res["models"]["Ridge"].get("error")
    t2 = pd.read_csv(out / "table2_mae.csv").set_index("model")
    assert list(t2.index) == ["OLS", "broken", "Ridge"]
    assert np.isnan(t2.loc["broken", "mae_teff [K]"]) and np.isfinite(t2.loc["Ridge", "mae_teff [K]"])
    assert "out of memory" in t2.loc["broken", "error"]
    t4 = pd.read_csv(out / "table4_relative_to_dnn.csv")
    assert len(t4) == 3 and t4["note"].str.contains("reference DNN not run").all()
    claims = {c["claim"]: c["verdict"] for c in res["claims"]}
    assert all(v.startswith("not checked") for v in claims.values())
    # the failed model is retried on the next run, the finished ones are reused
    res2 = benchmark(ds, out, models={"OLS": fit_linear, "broken": broken, "Ridge": fit_linear}, progress=False)
    assert res2["models"]["OLS"].get("resumed") and not res2["models"]["broken"].get("resumed")


def test_paper_claims_verdicts():
    def fake(mae, params=1, t=1.0):
        return {"metrics": {l: {"mae": m} for l, m in zip(("teff", "feh", "logg"), mae)},
                "n_params": params, "timing": {"time_s": t}}

    # the paper's own numbers must agree with every claim about them
    results = {"OLS": fake((143.75, 0.26, 0.28)), "Ridge": fake((115.24, 0.21, 0.23)),
               "CNN": fake((81.72, 0.138, 0.166), 4_130_103, 0.50), "DNN": fake((60.51, 0.103, 0.140), 13_655_103, 1.0),
               "proposed": fake((59.75, 0.103, 0.130), 542_771, 0.16),
               "no_skip": fake((59.75 * 1.39, 0.103 * 1.24, 0.130 * 1.15), 534_259, 0.11),
               "no_skip_no_ln": fake((59.75 * 1.56, 0.103 * 1.17, 0.130 * 1.28), 533_491, 0.12),
               "no_multitask": fake((59.75 * 0.99, 0.103, 0.130 * 1.01), 1_610_419, 0.43)}
    claims = paper_claims(results)
    assert [c["verdict"] for c in claims] == ["agrees"] * len(claims), claims
    # a linear model as good as the network: the halving claim must say so
    results["OLS"] = fake((60.0, 0.11, 0.13))
    first = paper_claims(results)[0]
    assert first["verdict"] == "disagrees" and first["ours"].startswith("1.00")


def test_benchmark_cli(tmp_path, capsys):
    from stellarparams.cli import main

    tiny_dataset(tmp_path / "ds", n_pix=200)
    rc = main(["benchmark", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "b"), "--models", "OLS,Ridge",
               "--threads", "1", "--quiet"])
    assert rc == 0
    assert "2 of 2 models finished" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "b" / "table2_mae.csv")) == 2
    rc = main(["benchmark", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "c"), "--models", "XGBoost"])
    assert rc == 2  # bad input
    assert "unknown models ['XGBoost']" in capsys.readouterr().err
