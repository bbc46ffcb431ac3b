"""train --adapt-to: input matching recovers an injected instrument; the target's labels are never used."""
import json

import numpy as np
import pytest
import torch
from numpy.polynomial import legendre

from stellarparams.adapt import (Match, MatchedDataset, estimate_match, read_target, ridge_groups, shift_weights,
                                 target_hash)
from stellarparams.dataset import Dataset, write_dataset
from stellarparams.prepare import prepare
from stellarparams.preprocess import PrepareConfig
from stellarparams.train import TrainConfig, train

from helpers import TINY, TINY_GRID, good_set

torch.set_num_threads(1)


def stars(n, p, seed, response=None, lsf=0.0, shift=0.0):
    """(flux (n, p) standardized, offsets (n,), labels (n, 3), scaled labels (n, 3)) of toy stars.

    Physical flux: a label-dependent smooth continuum times 12 Gaussian absorption lines whose
    depths depend on the labels, plus 1% noise; the target's instrument (LSF, shift, response)
    is applied before the noise.
    """
    rng = np.random.default_rng(seed)
    y = np.c_[rng.uniform(4000, 9000, n), rng.uniform(-2.5, 0.5, n), rng.uniform(1, 5, n)]
    z = (y - [6500, -1, 3]) / [1500, 0.9, 1.2]
    k = np.arange(p)[None, :]
    x = np.linspace(-1, 1, p)[None, :]
    f = np.exp(-0.5 * z[:, :1] * x + 0.1 * z[:, 2:3] * x ** 2)
    centers = np.linspace(10, p - 10, 12)
    for i, c in enumerate(centers):
        depth = 0.3 + 0.2 * np.tanh(z[:, i % 3:i % 3 + 1] + 0.3 * z[:, (i + 1) % 3:(i + 1) % 3 + 1])
        f = f * (1 - depth * np.exp(-0.5 * ((k - c) / 1.5) ** 2))
    f = Match(shift, lsf, response).flux_ratio(f) * (1.0 if response is None else np.exp(response)[None, :])
    f = f * (1 + 0.01 * rng.normal(size=f.shape))
    m, s = f.mean(1), f.std(1)
    return ((f - m[:, None]) / s[:, None]).astype(np.float32), (m / s).astype(np.float32), y.astype(np.float32), z


def injected_response(p, amp=0.15):
    c = np.random.default_rng(5).normal(size=6)
    c[0] = 0
    r = legendre.legval(np.linspace(-1, 1, p), c)
    return amp * (r - r.mean()) / r.std()


def test_estimate_match_recovers_an_injected_smooth_response():
    p = 200
    resp = injected_response(p)
    Xs, Os, _, zs = stars(3000, p, 0)
    Xt, Ot, _, zt = stars(3000, p, 1, response=resp)
    m = estimate_match(Xs, Os, zs, Xt, Ot, zt, order=10, bins=8)
    assert m.shift == 0 and m.lsf == 0
    err = (m.log_response - m.log_response.mean()) - resp
    # 0.15 rms injected; the residual is the star-to-star scatter of group means (3000 toy stars
    # at 1% noise) and the order-10 fit of an order-5 curve: 0.01 is 15x below the injected rms
    assert np.sqrt(np.mean(err ** 2)) < 0.01


def test_ridge_groups_are_blind_to_the_response_and_recover_it():
    p = 200
    resp = injected_response(p, 0.3)
    Xs, Os, ys, _ = stars(2000, p, 0)
    Xt, Ot, _, _ = stars(2000, p, 1, response=resp)
    Xn, On, _, _ = stars(2000, p, 1)                    # the same target stars without the response
    ps, pt = ridge_groups(Xs, Os, ys, Xt, Ot, Match(), order=10)
    _, pn = ridge_groups(Xs, Os, ys, Xn, On, Match(), order=10)
    # an order-5 response drops out of the high-passed flux: the same predictions to rounding
    assert ps.shape == (2000, 3) and np.abs(pt - pn).max() < 1e-6
    m = estimate_match(Xs, Os, ps, Xt, Ot, pt, order=10, bins=8)
    err = (m.log_response - m.log_response.mean()) - resp
    # 0.3 rms injected; groups from predicted (not true) labels mix neighbouring stars alike in
    # both sets, so the error stays at the group-mean scatter (one group, reading the two star sets
    # apart, errs by ~0.015)
    assert np.sqrt(np.mean(err ** 2)) < 0.01


def test_narrow_keeps_a_narrow_band_every_star_shares():
    p = 200
    resp = injected_response(p)
    resp[100:104] -= 0.2                     # a 4-pixel absorption band (a telluric residual), 18% deep
    Xs, Os, _, zs = stars(3000, p, 0)
    Xt, Ot, _, zt = stars(3000, p, 1, response=resp)
    err = {}
    for narrow in (0.0, 3.0):
        m = estimate_match(Xs, Os, zs, Xt, Ot, zt, order=10, bins=8, narrow=narrow)
        err[narrow] = np.abs(m.log_response - m.log_response.mean() - (resp - resp.mean()))[98:106].max()
    # smooth only: the band is missed (error ~ its depth); narrow: found to within the group-mean noise
    assert err[0.0] > 0.1 and err[3.0] < 0.05


def test_excess_keeps_only_what_the_matching_leaves_beyond_the_group_noise():
    p, n = 200, 3000
    resp = injected_response(p)
    Xs, Os, _, zs = stars(n, p, 0)
    Xt, Ot, _, zt = stars(n, p, 1, response=resp)
    plain = estimate_match(Xs, Os, zs, Xt, Ot, zt, order=10, bins=8, src_stars=np.arange(n))
    g = (1 + Xt / Ot[:, None]) * (1 - 0.2 * (zt[:, :1] > 0) * np.exp(-0.5 * ((np.arange(p) - 50) / 1.5) ** 2))
    m_, s_ = g.mean(1), g.std(1)           # hot target stars only: a line the source lacks, 20% deep
    line = estimate_match(Xs, Os, zs, (g - m_[:, None]) / s_[:, None], m_ / s_, zt, order=10, bins=8,
                          src_stars=np.arange(n))
    # a smooth response leaves only the group means' noise: (nearly) all of it is shrunk away
    assert plain.stats["excess_rms"] < 0.01 and plain.stats["excess_noise_pixels"] == 0
    hot = line.excess[:, 50]                # per group: what is kept at the line's centre
    assert np.sum(hot < -0.1) >= 2 and np.sum(np.abs(hot) < 0.05) >= 2   # hot groups keep it, cool ones don't
    # calibration rows are multiplied by exp(one group's excess); the others are untouched
    g = 1 + Xt / Ot[:, None]
    g[:, 120:126] *= 1 + 0.1 * np.random.default_rng(9).standard_normal((n, 1))   # a band of varying depth
    m_, s_ = g.mean(1), g.std(1)
    varying = estimate_match(Xs, Os, zs, (g - m_[:, None]) / s_[:, None], m_ / s_, zt, order=10, bins=8,
                             src_stars=np.arange(n))
    # its extra variance is found where it is (10% rms to ~10% of itself: 3000 stars) and nowhere else
    assert np.flatnonzero(varying.excess_var).tolist() == list(range(120, 126))
    np.testing.assert_allclose(np.sqrt(varying.excess_var[120:126]), 0.1, rtol=0.1)
    ds = MatchedDataset(type("D", (), {"flux": lambda self, i=None: Xs[i], "offset": lambda self, i=None: Os[i],
                                       "__len__": lambda self: n})(), line)
    cal = ds.for_calibration(np.arange(10), seed=0)
    idx = np.arange(20)
    np.testing.assert_array_equal(cal.flux(idx)[10:], ds.flux(idx)[10:])
    assert not np.allclose(cal.flux(idx)[:10], ds.flux(idx)[:10])


def test_adapt_to_reads_a_folder_or_catalog_of_spectra_like_prepare(tmp_path):
    spectra, cat = good_set(tmp_path, n=24)
    cat["FILE"] = [str(f) for f in sorted(spectra.rglob("*.fits"), key=lambda f: int(f.name.split("-")[-1][:4]))]
    cat["FEH_ADOP"], cat["LOGG_ADOP"] = np.linspace(-2, 0, len(cat)), np.linspace(1, 5, len(cat))
    cat.to_csv(tmp_path / "cat.csv", index=False)
    prepare(tmp_path / "cat.csv", spectra, tmp_path / "ds", config=PrepareConfig(grid=TINY_GRID), workers=1,
            progress=False)
    (spectra / "spec-0500-55000-0099.fits").write_text("not a FITS file")
    with Dataset(tmp_path / "ds") as ds:
        flux, off, rejects = read_target(tmp_path / "cat.csv", ds)     # the catalog's RV, as prepare used
        np.testing.assert_allclose(flux, ds.flux(), atol=1e-6)
        np.testing.assert_allclose(off, ds.offset(), rtol=1e-6)
        assert rejects == {}
        flux, off, rejects = read_target(spectra, ds)     # the folder: every good file read, the bad one skipped
        assert flux.shape == (24, TINY_GRID.n_pix) and sum(rejects.values()) == 1
        model = train(ds, None, TINY, TrainConfig(epochs=1, batch_size=8, seed=1, calib_folds=0, adapt_bins=1,
                                                  adapt_order=3, adapt_to=str(spectra)), progress=False)
        assert model.metrics["adapt"]["target_spectra"] == 24
        assert sum(model.metrics["adapt"]["target_rejected"].values()) == 1     # the bad file, named on stderr
        h = target_hash(spectra, ds)
        (spectra / "spec-0500-55000-0099.fits").unlink()
        assert target_hash(spectra, ds) != h
        with pytest.raises(ValueError, match="no such file"):
            read_target(tmp_path / "nowhere", ds)


def test_estimate_match_finds_an_injected_resolution_and_shift():
    p = 200
    Xs, Os, _, zs = stars(3000, p, 0)
    Xt, Ot, _, zt = stars(3000, p, 1, response=injected_response(p), lsf=2.0, shift=0.3)
    m = estimate_match(Xs, Os, zs, Xt, Ot, zt, order=10, bins=8)
    assert m.lsf == pytest.approx(2.0, abs=0.5) and m.shift == pytest.approx(0.3, abs=0.1)


def _write(folder, X, O, y, split, labels_hash=""):
    return write_dataset(folder, X, y, split, offset=O, attrs={"input_hash": labels_hash})


def test_adapt_to_trains_records_the_target_and_never_reads_its_labels(tmp_path):
    p, n = 48, 300
    Xs, Os, ys, _ = stars(n, p, 0)
    Xt, Ot, yt, _ = stars(200, p, 1, response=injected_response(p, 0.2))
    split = np.repeat([0, 1, 2], [180, 60, 60])
    src = _write(tmp_path / "src", Xs, Os, ys, split)
    _write(tmp_path / "tgt", Xt, Ot, yt, np.zeros(200, int), "target-hash-1")
    perm = np.random.default_rng(3).permutation(200)
    _write(tmp_path / "tgt_perm", Xt, Ot, yt[perm], np.zeros(200, int), "target-hash-1")
    tc = TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=1, calib_folds=0, adapt_bins=2, adapt_order=3,
                     adapt_match=2, adapt_group="net", adapt_coral=0.5, adapt_consistency=0.5, adapt_noise=1.0, adapt_pseudo=0.5,
                     ema=0.9)   # every switch on (network groups; the default, ridge groups, below)
    a = train(src, tmp_path / "m", TINY, TrainConfig(**{**tc.to_dict(), "adapt_to": str(tmp_path / "tgt")}),
              progress=False)
    b = train(src, None, TINY, TrainConfig(**{**tc.to_dict(), "adapt_to": str(tmp_path / "tgt_perm")}),
              progress=False)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["train_config"]["adapt_to"] == str(tmp_path / "tgt")
    assert card["train_config"]["adapt_hash"] == "target-hash-1"
    assert card["train_config"]["adapt_coral"] == 0.5 and card["metrics"]["adapt"]["response_rms"] > 0
    assert len(card["metrics"]["adapt"]["rounds"]) == 2
    assert card["metrics"]["pseudo_labelled"] == 100        # half the 200 target spectra, labelled by the model
    assert "target" in a.uncertainty.stats["ood_reference"] and "input matching" in a.uncertainty.stats["calibrated_on"]
    widened = a.uncertainty.stats["target_widening"]   # adapt_widen is on by default
    assert set(widened) == set(a.label_names) and min(widened.values()) >= 1
    assert "widened for the target" in json.loads((tmp_path / "m" / "uncertainty.json").read_text())["method"]
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)      # permuted target labels: bitwise the same weights
    one = train(src, None, TINY, TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=1, calib_folds=0, adapt_bins=1,
                                             adapt_to=str(tmp_path / "tgt")), progress=False)
    assert len(one.metrics["adapt"]["rounds"]) == 1          # one group: one estimate, no first pass
    ridge = train(src, None, TINY, TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=1, calib_folds=0, adapt_bins=2,
                                               adapt_order=3, adapt_to=str(tmp_path / "tgt")),
                  progress=False)
    assert len(ridge.metrics["adapt"]["rounds"]) == 3        # one group (shift, LSF), then 2 ridge-grouped rounds
    plain = train(src, None, TINY, TrainConfig(**{**tc.to_dict(), "adapt_to": None}), progress=False)
    assert not all(torch.equal(sa[k], v) for k, v in plain.net.state_dict().items())   # adapting changed them


def test_shift_weights_estimate_the_density_ratio():
    """Source N(0, 1), target N(0.5, 1) along one of 6 axes: the weights follow exp(0.5 x - 0.125); no shift: ~1."""
    rng = np.random.default_rng(0)
    src, tgt = rng.standard_normal((3000, 6)), rng.standard_normal((3000, 6))
    w, info = shift_weights(src, tgt + [0.5, 0, 0, 0, 0, 0], components=6)
    assert np.corrcoef(np.log(w), 0.5 * src[:, 0])[0, 1] > 0.95
    assert np.median(w[src[:, 0] > 1]) / np.median(w[src[:, 0] < -1]) > 2.0   # true ratio of those: ~3.3
    assert info["auc"] > 0.55 and info["n"] == 3000 and 0 < info["n_eff"] < 3000
    same, info0 = shift_weights(src, tgt, components=6)
    assert 0.8 < np.median(same) < 1.25 and info0["auc"] < 0.55 and info0["clipped"] == 0


def _tilted(X, O, amp, seed):
    """Each standardized spectrum times its own smooth tilt exp(a x), a ~ N(0, amp), standardized again."""
    f = (X + O[:, None]) * np.exp(np.random.default_rng(seed).normal(0, amp, (len(X), 1))
                                  * np.linspace(-1, 1, X.shape[1])[None, :])
    m, s = f.mean(1), f.std(1)
    return ((f - m[:, None]) / s[:, None]).astype(np.float32), (m / s).astype(np.float32)


def test_widen_for_target_tracks_the_error_growth_a_smooth_per_star_difference_causes(tmp_path):
    """A linear 'network' on the flux reads a per-star tilt as a change of label; the ridge on continuum-free
    flux does not. The widening follows the growth of the network's error on a tilted target, and stays ~1 on
    more stars of the same instrument."""
    from types import SimpleNamespace

    from stellarparams.adapt import _robust_scale, widen_for_target
    from stellarparams.uncertainty import NOISE_BINS

    p = 64
    Xs, Os, ys, _ = stars(1500, p, 0)
    ds = MatchedDataset(_write(tmp_path / "src", Xs, Os, ys, np.repeat([0, 1], [1200, 300])), Match())  # no change
    tr, va = np.arange(1200), np.arange(1200, 1500)
    A = np.c_[Xs[tr], np.ones(len(tr))]
    w = np.linalg.solve(A.T @ A + 1e-3 * np.eye(p + 1), A.T @ ys[tr])        # least squares on the raw flux
    lin = torch.nn.Linear(p, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w[:p].T.copy())), lin.bias.copy_(torch.from_numpy(w[p]))

    def model():
        u = SimpleNamespace(k68=np.ones((3, NOISE_BINS)), k95=np.full((3, NOISE_BINS), 2.0), stats={})
        return SimpleNamespace(net=lin, scale=np.ones(3), center=np.zeros(3), label_names=["teff", "feh", "logg"],
                               uncertainty=u)

    Xt, Ot, yt, _ = stars(1000, p, 7)
    same = widen_for_target(model(), ds, (tr, va), Xt, Ot, order=3)
    assert all(1.0 <= f < 1.15 for f in same.values())
    Xw, Ow = _tilted(Xt, Ot, 0.1, 8)
    m = model()
    wide = widen_for_target(m, ds, (tr, va), Xw, Ow, order=3)
    pred = lambda X: lin(torch.from_numpy(X)).detach().numpy()  # noqa: E731
    grown = np.sqrt(np.maximum(1, (_robust_scale(pred(Xw) - yt) ** 2 - _robust_scale(pred(Xt) - yt) ** 2)
                               / _robust_scale(pred(Xs[va]) - ys[va]) ** 2 + 1))
    assert wide["teff"] > 1.3 and grown[0] > 1.3
    assert np.allclose(list(wide.values()), grown, rtol=0.25), (wide, grown, same)
    assert np.allclose(m.uncertainty.k68[0], wide["teff"], rtol=1e-3)
    assert np.allclose(m.uncertainty.k95[0], 2 * wide["teff"], rtol=1e-3)
    assert m.uncertainty.stats["target_widening"] == wide
