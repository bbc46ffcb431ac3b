"""Calibrated sigmas and extrapolation flags on a synthetic task whose noise is known exactly."""
import json
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from stellarparams import load_model
from stellarparams.config import ModelConfig
from stellarparams.dataset import write_dataset
from stellarparams.model import StellarNet
from stellarparams.model_io import ModelFileError, save_model
from stellarparams.train import TrainConfig, train
from stellarparams.uncertainty import (Uncertainty, coverage, coverage_table, der_snr_noise, fit_variance,
                                       format_coverage, mc_predict)

torch.set_num_threads(1)
P = 120
NAMES = ["teff", "feh", "logg"]
CENTER, SPREAD = np.array([6000.0, -1.0, 3.5]), np.array([1000.0, 0.6, 0.8])
LABEL_NOISE = np.array([0.4, 0.45, 0.5])   # catalog label noise std per unit of spectrum noise (scaled units)
LABEL_FLOOR = 0.06                          # + this floor (like a catalog's systematic error)


def _basis(n, seed=42):
    """(P, n) spectral features: Gaussian lines 4-8 px wide."""
    rng = np.random.default_rng(seed)
    t = np.arange(P)[:, None]
    return np.exp(-0.5 * ((t - rng.uniform(10, P - 10, n)) / rng.uniform(4, 8, n)) ** 2)


IONS = np.linspace(-3, 3, 7)       # like ions whose lines peak at one temperature: label 0's "ladder"
B = _basis(len(IONS) + 4)


def spectra_of(u, noise, rng):
    """u (N, 3) labels ([-1, 1] in training), noise (N,) pixel noise std relative to the clean spectrum's std."""
    ions = np.exp(-0.5 * ((u[:, :1] - IONS) / 0.7) ** 2)         # lines of "ions" peak at one u0 each
    phi = np.column_stack([ions, u[:, 1], u[:, 1] * u[:, 0], np.tanh(2 * u[:, 2]), u[:, 2] * u[:, 1]])
    clean = 3.0 + phi @ B.T + np.linspace(-0.5, 0.5, P)
    clean_std = clean.std(1, keepdims=True)
    f = clean + rng.standard_normal(clean.shape) * noise[:, None] * clean_std
    return ((f - f.mean(1, keepdims=True)) / f.std(1, keepdims=True)).astype(np.float32)


def make_task(folder, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1, 1, (n, 3))
    noise = np.exp(rng.uniform(np.log(0.03), np.log(0.4), n))          # heteroscedastic: S/N 2.5 to 33
    flux = spectra_of(u, noise, rng)
    catalog = u + rng.standard_normal(u.shape) * (LABEL_FLOOR + LABEL_NOISE * noise[:, None] / 0.4)  # known noise
    labels = CENTER + SPREAD * catalog
    split = np.array(["train"] * int(0.6 * n) + ["val"] * int(0.15 * n) + ["test"] * (n - int(0.75 * n)))
    import pandas as pd

    meta = pd.DataFrame({"plate": 0, "mjd": 0, "fiberid": np.arange(n), "rv": 0.0, "snr": 1.0 / noise,
                         "object_id": [str(i) for i in range(n)], "file": ""})
    write_dataset(folder, flux, labels, split, NAMES, meta=meta)
    return flux, labels, split, noise


MC = ModelConfig(n_in=P, stem_width=64, block_widths=(32,), heads={"teff": (16,), "feh": (16,), "logg": (16,)},
                 trunk_dropout=0.2)
TC = TrainConfig(epochs=25, batch_size=64, lr=3e-3, n_augment=0, seed=0, threads=1, calib_folds=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unc")
    flux, labels, split, noise = make_task(folder / "data", n=6000)
    model = train(folder / "data", folder / "model", MC, TC, progress=False)
    return model, folder, flux, labels, split, noise


def test_coverage_lands_in_band_on_known_noise_task(trained):
    model, folder, flux, labels, split, noise = trained
    # calibrated on out-of-fold residuals of every training spectrum + the validation split
    stats = model.uncertainty.stats
    assert stats["n_oof"] == (split == "train").sum() and stats["n_val"] == (split == "val").sum()
    assert "out-of-fold" in stats["calibrated_on"] and not list((folder / "model").glob("oof_*"))
    assert set(stats["oof_rescaled"]) == set(NAMES) and all(0.5 <= v <= 2 for v in stats["oof_rescaled"].values())
    te = split == "test"
    df = model.predict_full(flux[te])
    sigma = df[[f"sigma_{n}" for n in NAMES]].to_numpy()
    cov = coverage(labels[te], df[NAMES].to_numpy(), sigma)
    assert np.all(np.abs(cov[1] - 0.683) <= 0.05), cov
    assert np.all(np.abs(cov[2] - 0.954) <= 0.03), cov
    # also within S/N bins: low S/N gets wider error bars, not more misses
    table = coverage_table(labels[te], df[NAMES].to_numpy(), sigma, 1.0 / noise[te], NAMES, edges=(0, 5, 12, np.inf))
    bins = table[np.isfinite(table["snr_lo"])]
    assert len(bins) == 9 and (bins["n"] > 60).all()
    assert np.all(np.abs(bins["cov1"] - 0.683) <= 0.08), format_coverage(table)   # ~250 rows per bin: wider band
    assert np.all(np.abs(bins["cov2"] - 0.954) <= 0.05), format_coverage(table)
    for name in NAMES:
        med = bins[bins["label"] == name]["median_sigma"].to_numpy()
        assert med[0] > med[-1]  # S/N < 5 has wider error bars than S/N > 12
    assert "teff 1s/2s" in format_coverage(table)


def test_noisier_copies_get_larger_sigma(trained):
    model, *_ = trained
    rng = np.random.default_rng(5)
    u = rng.uniform(-0.8, 0.8, (40, 3))
    sig = []
    for level in (0.03, 0.1, 0.3):
        df = model.predict_full(spectra_of(u, np.full(40, level), np.random.default_rng(7)))
        sig.append(df[[f"sigma_{n}" for n in NAMES]].to_numpy())
    assert np.all(np.median(sig[1] / sig[0], axis=0) > 1.1) and np.all(np.median(sig[2] / sig[1], axis=0) > 1.1)
    assert (sig[2] > sig[0]).mean() > 0.95


def test_flags_fire_for_unlike_spectra_and_stay_quiet_for_held_out_stars(trained):
    model, folder, flux, labels, split, noise = trained
    rng = np.random.default_rng(11)
    held_out = model.predict_full(flux[split == "test"])
    assert held_out["flag_unlike_training"].mean() < 0.03
    assert held_out["flag_label_hull"].mean() < 0.03
    t = np.arange(P)
    qso = (t / P + 0.2) ** -1.5 + 3 * np.exp(-0.5 * ((t - 40) / 6) ** 2) + 2 * np.exp(-0.5 * ((t - 90) / 5) ** 2)
    qso = qso + 0.02 * rng.standard_normal(P)
    scrambled = rng.permutation(flux[split == "test"][0])
    far = spectra_of(np.array([[3.5, -3.5, 3.5]]), np.array([0.03]), rng)[0]  # a star far outside the labels, S/N 33
    odd = np.stack([(qso - qso.mean()) / qso.std(), scrambled, far]).astype(np.float32)
    df = model.predict_full(odd)
    assert df["flag_unlike_training"].all(), df
    assert (df["ood_score"].iloc[:2] > 3).all()
    assert np.median(held_out["ood_score"]) < 0.5
    # (its predicted labels stay inside the training hull: the network saturates, so the
    # label-hull flag alone would miss it; the flux novelty is what catches it)
    print(df[["teff", "feh", "logg", "ood_score", "flag_label_hull"]])


def test_calibration_survives_save_load_and_old_models_load(trained, tmp_path):
    model, folder, flux, labels, split, noise = trained
    assert (folder / "model" / "uncertainty.json").exists() and (folder / "model" / "uncertainty.safetensors").exists()
    meta = json.loads((folder / "model" / "uncertainty.json").read_text())
    assert meta["weights_sha256"] == json.loads((folder / "model" / "model.json").read_text())["weights_sha256"]
    back = load_model(folder / "model")
    x = flux[split == "test"][:50]
    a, b = model.predict_full(x), back.predict_full(x)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-4)  # float32 matmuls
    pred, sigma = back.predict(x, return_sigma=True)
    np.testing.assert_allclose(sigma, a[[f"sigma_{n}" for n in NAMES]].to_numpy(), rtol=1e-6)
    # a model folder without calibration (older stellarparams) still loads: sigma NaN, one warning
    model.uncertainty, keep = None, model.uncertainty
    try:
        old = save_model(model, tmp_path / "old")
    finally:
        model.uncertainty = keep
    assert not (old / "uncertainty.json").exists()
    m_old = load_model(old)
    with pytest.warns(UserWarning, match="no uncertainty calibration"):
        df = m_old.predict_full(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m_old.predict_full(x)  # warned once only
    assert df[[f"sigma_{n}" for n in NAMES]].isna().all().all()
    np.testing.assert_allclose(df[NAMES].to_numpy(), a[NAMES].to_numpy(), rtol=1e-6)
    # a calibration that belongs to other weights, put beside them, is refused (not silently NaN)
    (old / "uncertainty.json").write_text((folder / "model" / "uncertainty.json").read_text())
    (old / "uncertainty.safetensors").write_bytes((folder / "model" / "uncertainty.safetensors").read_bytes())
    meta = json.loads((old / "uncertainty.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (old / "uncertainty.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="uncertainty.json: calibrated for other weights"):
        load_model(old)


def test_der_snr_recovers_white_noise():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 6, 4000)
    smooth = np.sin(t)[None] * np.ones((20, 1))
    s = np.linspace(0.01, 0.2, 20)
    est = der_snr_noise(smooth + s[:, None] * rng.standard_normal((20, 4000)))
    np.testing.assert_allclose(est, s, rtol=0.08)


def test_fit_variance_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    n = 20000
    s_mc, noise = rng.uniform(0.05, 0.5, n), rng.uniform(0.01, 0.3, n)
    sd = np.sqrt((2.0 * s_mc) ** 2 + (0.5 * noise) ** 2 + 0.3 ** 2)
    a, b, c = fit_variance(sd * rng.standard_normal(n), s_mc, noise)
    np.testing.assert_allclose([a, b, c], [2.0, 0.5, 0.3], rtol=0.1)


def test_novelty_q_equals_explicit_pca_residual(trained):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(2)
    X = rng.standard_normal((300, 40)).astype(np.float32)
    pca = PCA(5).fit(X)
    u = Uncertainty(NAMES, np.ones(3), np.ones(3), np.ones(3), pca.mean_.astype(np.float32),
                    pca.components_.astype(np.float32), pca.explained_variance_, 1.0, 1.0,
                    np.vstack([np.zeros(3), np.eye(3)]))
    q, qn, t2 = u.novelty(X[:10])
    resid = X[:10] - pca.inverse_transform(pca.transform(X[:10]))
    noise2 = der_snr_noise(X[:10])[:, None] ** 2
    np.testing.assert_allclose(q, (resid ** 2).mean(1), rtol=1e-3)
    np.testing.assert_allclose(qn, q / noise2[:, 0], rtol=1e-6)
    np.testing.assert_allclose(t2, (pca.transform(X[:10]) ** 2 / (pca.explained_variance_ + noise2)).sum(1), rtol=1e-3)
    assert u.in_hull(np.array([[0.2, 0.2, 0.2], [1.0, 1.0, 1.0]])).tolist() == [True, False]


def test_mc_dropout_keeps_point_prediction_and_is_zero_without_dropout():
    torch.manual_seed(0)
    x = torch.randn(16, 30)
    net = StellarNet(ModelConfig(n_in=30, stem_width=8, block_widths=(8,), heads={"a": (4,), "b": (4,)}))
    pred, std = mc_predict(net.eval(), x, n_passes=8)
    torch.testing.assert_close(pred, net(x))            # dropout stays off for the prediction
    assert (std > 0).all() and not net.training and not any(m.training for m in net.modules())
    pred2, std2 = mc_predict(net, x, n_passes=8)
    torch.testing.assert_close(std, std2)                # seeded: the same sigma twice
    torch.testing.assert_close(mc_predict(net, x[5:7], n_passes=8)[1], std[5:7])  # independent of batch neighbours
    # stem dropout: the full-pass fallback; no dropout at all: std 0
    net_s = StellarNet(ModelConfig(n_in=30, stem_width=8, block_widths=(8,), heads={"a": (4,)}, stem_dropout=0.3))
    std_s = mc_predict(net_s.eval(), x, 8)[1]
    assert (std_s > 0).all()
    torch.testing.assert_close(mc_predict(net_s, x[:3], 8)[1], std_s[:3])
    net_0 = StellarNet(ModelConfig(n_in=30, stem_width=8, block_widths=(8,), heads={"a": (4,)}, trunk_dropout=0.0))
    assert (mc_predict(net_0.eval(), x, 8)[1] == 0).all()


def test_fanned_out_tail_equals_t_full_passes_with_the_same_masks():
    """MC dropout runs the model's own forward pass: the T masked copies, fanned out at the first
    dropout, equal T ordinary forward passes with each Dropout's output times mask t (hooks)."""
    from stellarparams.uncertainty import FixedMasks, _dropouts, _hooked_passes

    torch.manual_seed(1)
    x = torch.randn(10, 30)
    for cfg in (dict(block_widths=(8, 8), trunk_dropout=0.4, head_dropout=0.2),   # 2 blocks + head dropout
                dict(block_widths=(8,), trunk_dropout=0.0, head_dropout=0.3),     # dropout only in the heads
                dict(block_widths=(8,), trunk_dropout=0.4, skip=False),
                dict(block_widths=(8,), stem_dropout=0.3),                        # fans out at the stem
                dict(block_widths=(8,), multitask=False)):                        # one trunk per label
        net = StellarNet(ModelConfig(n_in=30, stem_width=12, heads={"a": (6,), "b": (4,)}, **cfg)).eval()
        masks = FixedMasks(_dropouts(net), 5, 0)
        with torch.inference_mode():
            fast = net.tail(net.features(x), masks)
            slow = _hooked_passes(net, x, masks, _dropouts(net))
            assert fast.shape == (5, 10, 2)
            torch.testing.assert_close(fast, slow)
            assert fast.std(0).min() > 0
            torch.testing.assert_close(net.tail(net.features(x)), net(x))     # forward == tail(features)


def test_train_adds_calibration_to_an_already_trained_older_model(trained, tmp_path):
    import shutil

    model, folder, *_ = trained
    old = tmp_path / "model"
    shutil.copytree(folder / "model", old)
    model.uncertainty, keep = None, model.uncertainty
    try:
        save_model(model, old)  # as a stellarparams without calibration wrote it
    finally:
        model.uncertainty = keep
    assert not (old / "uncertainty.json").exists() and load_model(old).uncertainty is None
    again = train(folder / "data", old, MC, TC, progress=False)  # same config + data: not retrained
    assert (old / "uncertainty.json").exists() and again.uncertainty is not None
    # no training: calibrated on the validation split alone, which says so
    assert again.uncertainty.stats["n_oof"] == 0 and again.uncertainty.stats["calibrated_on"] == "900 validation spectra"  # 15% of 6000
    assert np.all(np.isfinite(again.uncertainty.a)) and np.all(again.uncertainty.c > 0)
    assert load_model(old).uncertainty is not None


def test_fold_of_keeps_each_star_in_one_fold_and_balances_folds():
    from stellarparams.calibrate import fold_of

    groups = np.repeat(np.arange(50), np.arange(50) % 7 + 1).astype(str)   # 50 stars, 1-7 spectra each
    f = fold_of(groups, 3, seed=0)
    assert all(len(set(f[groups == g])) == 1 for g in np.unique(groups))
    assert sorted(len(np.unique(groups[f == k])) for k in range(3)) == [16, 17, 17]
    np.testing.assert_array_equal(f, fold_of(groups, 3, seed=0))
    assert not np.array_equal(f, fold_of(groups, 3, seed=1))


def test_out_of_fold_models_never_saw_the_stars_they_predict_and_resume(tmp_path, monkeypatch):
    """40 stars x 8 spectra whose labels no flux feature explains: only memorising a star gives
    its label, so a model that had the star in training is far better on it than one that did not."""
    from stellarparams import calibrate
    from stellarparams.dataset import Dataset

    rng = np.random.default_rng(3)
    n_star, n_obs, p = 40, 8, 32
    star = np.repeat(np.arange(n_star), n_obs)
    pattern, y_star = rng.standard_normal((n_star, p)), rng.uniform(-1, 1, (n_star, 3))
    flux = pattern[star] + 0.05 * rng.standard_normal((len(star), p))
    flux = (flux - flux.mean(1, keepdims=True)) / flux.std(1, keepdims=True)
    split = np.where(star < 28, 0, np.where(star < 34, 1, 2))
    meta = pd.DataFrame({"plate": 0, "mjd": 0, "fiberid": np.arange(len(star)), "rv": 0.0, "snr": 20.0,
                         "object_id": star.astype(str), "file": ""})
    write_dataset(tmp_path / "d", flux, CENTER + SPREAD * y_star[star], split, NAMES, meta=meta)
    mc = ModelConfig(n_in=p, stem_width=64, block_widths=(32,), heads={n: (16,) for n in NAMES})
    tc = TrainConfig(epochs=40, batch_size=32, lr=3e-3, n_augment=0, seed=0, threads=1, calib_folds=4)
    ds = Dataset(tmp_path / "d")
    itr, iva = ds.indices("train"), ds.indices("val")
    final = train(ds, None, mc, replace(tc, calib_folds=0), progress=False)
    (tmp_path / "m").mkdir()
    oof = calibrate.out_of_fold(ds, itr, iva, mc, tc, 4, tmp_path / "m", "f" * 16)
    np.testing.assert_array_equal(np.sort(oof["rows"]), itr)                    # every training row, once
    y = ds.labels(oof["rows"])
    mae_oof = np.abs(oof["pred"] - y).mean()
    mae_seen = np.abs(final.predict(ds.flux(oof["rows"])) - y).mean()
    assert mae_oof > 1.5 * mae_seen, (mae_oof, mae_seen)   # measured: 184 vs 72
    assert len(list((tmp_path / "m").glob("oof_ffffffffffffffff_fold*.npz"))) == 4
    # a re-run (e.g. after a kill) reads the finished folds instead of training again

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(calibrate, "fit_ensemble", no_training)
    again = calibrate.out_of_fold(ds, itr, iva, mc, tc, 4, tmp_path / "m", "f" * 16)
    for k in oof:
        np.testing.assert_array_equal(again[k], oof[k])
    ds.close()


def test_conformal_factors_put_heavy_tailed_residuals_in_both_bands():
    """Student-t residuals (no Gaussian sigma holds 68.3% and 95.4% at once) land in both bands per noise bin."""
    from stellarparams.uncertainty import Q68, Q95, conformal_factors

    rng = np.random.default_rng(0)
    n = 40_000
    noise = rng.uniform(0.01, 0.2, n)
    raw = np.c_[0.1 + noise, 0.2 + 2 * noise]
    r = rng.standard_t(3, size=(n, 2)) * raw * np.where(noise[:, None] > 0.1, 1.5, 1.0)  # scale differs with S/N
    edges, k68, k95 = conformal_factors(r[: n // 2], raw[: n // 2], noise[: n // 2])
    assert (k95 / k68 > 2.2).all()                   # a Gaussian would have 2.0: the tails are heavier
    b = np.searchsorted(edges, noise[n // 2:])
    z = np.abs(r[n // 2:]) / raw[n // 2:]
    for i in range(len(edges) + 1):
        sel = b == i
        assert np.mean(z[sel] <= k68[:, i], axis=0) == pytest.approx([Q68, Q68], abs=0.03)
        assert np.mean(z[sel] <= k95[:, i], axis=0) == pytest.approx([Q95, Q95], abs=0.015)


def test_weighted_conformal_factors_follow_the_weighted_rows():
    """Weights that pick one of two populations give that population's quantiles; equal weights the plain ones."""
    from stellarparams.uncertainty import Q68, conformal_factors, weighted_quantile

    assert weighted_quantile(np.array([3.0, 1.0, 2.0, 4.0]), np.ones(4), [0.5, 1.0]).tolist() == [2.0, 4.0]
    assert weighted_quantile(np.array([3.0, 1.0, 2.0, 4.0]), np.array([0, 1, 0, 0]), [0.5]).tolist() == [1.0]
    rng = np.random.default_rng(0)
    n = 20_000
    wide = rng.random(n) < 0.3                                   # 30% of the rows have 3x the residuals
    r = rng.standard_normal((n, 1)) * np.where(wide, 3.0, 1.0)[:, None]
    raw, noise = np.ones((n, 1)), rng.uniform(0.01, 0.2, n)
    _, k68, _ = conformal_factors(r, raw, noise)
    _, k68_eq, _ = conformal_factors(r, raw, noise, weights=np.full(n, 2.0))
    _, k68_w, _ = conformal_factors(r, raw, noise, weights=np.where(wide, 1.0, 1e-6))
    assert np.allclose(k68_eq, k68, rtol=0.01)
    assert np.allclose(k68_w, np.quantile(np.abs(r[wide, 0]), Q68), rtol=0.05)
    assert (k68_w > 2 * k68).all()


def test_out_of_fold_residuals_are_rescaled_to_the_final_models_error_on_the_same_validation_stars():
    """A fold model that errs twice as much as the final model on the validation rows has its out-of-fold
    residuals halved; one as good keeps them; a label no validation row knows keeps them too."""
    from stellarparams.uncertainty import _rescaled_oof

    rng = np.random.default_rng(0)
    n_val, scale = 4000, np.array([100.0, 0.2, 0.3])
    y_val = rng.normal(size=(n_val, 3)) * scale
    y_val[:, 2] = np.nan
    e = rng.normal(size=(n_val, 3))
    resid_val = e * 0.5                                           # the final model's, scaled units
    val_pred = np.concatenate([y_val + 2 * resid_val * scale, y_val + resid_val * scale])   # fold 0: 2x, fold 1: 1x
    r_oof = rng.normal(size=(600, 3))
    oof = {"fold": np.repeat([0, 1], 300), "val_fold": np.repeat([0, 1], n_val), "val_pred": val_pred}
    out, ratios = _rescaled_oof(r_oof, oof, resid_val, y_val, scale)
    np.testing.assert_allclose(out[:300, :2], r_oof[:300, :2] / 2, rtol=1e-9)
    np.testing.assert_allclose(out[300:, :2], r_oof[300:, :2], rtol=1e-9)
    np.testing.assert_array_equal(out[:, 2], r_oof[:, 2])
    assert ratios == [0.75, 0.75, 1.0]
