"""Each augmentation does what its docstring says, on hand-made spectra."""
import numpy as np
import pytest
import torch

from stellarparams import augment as A

from helpers import tiny_arrays

P = 4000
PIX = torch.arange(P, dtype=torch.float64)
LOGLAM = torch.linspace(3.5754, 3.9670, P, dtype=torch.float64)


def spectrum(centres=(2000.0,), depth=0.5, width=3.0, slope=0.0):
    """Flux with Gaussian absorption lines on a (tilted) continuum, and its standardized form."""
    cont = 1.0 + slope * (PIX / P - 0.5)
    f = cont.clone()
    for c in centres:
        f = f * (1 - depth * torch.exp(-0.5 * ((PIX - c) / width) ** 2))
    x, off = A.restandardize(f[None].float())
    return f, x, off


def centroid(x, lo, hi):
    """Centroid of the absorption (flux deficit) between pixels lo and hi."""
    seg = x[0, lo:hi].double()
    w = seg.max() - seg
    return float((w * PIX[lo:hi]).sum() / w.sum())


@pytest.mark.parametrize("d", [0.3, -0.75, 1.0, 2.6])
def test_shift_moves_a_line_by_the_asked_pixels(d):
    _, x, _ = spectrum(width=4.0)
    y = A.shift(x, torch.tensor([d]))
    assert centroid(y, 1950, 2050) - centroid(x, 1950, 2050) == pytest.approx(d, abs=0.03)


def test_velocity_to_pixels():
    # one pixel of the default grid is ln(10) * dloglam * c = 67.6 km/s
    assert A.velocity_to_pixels(67.6) == pytest.approx(1.0, abs=0.01)


def test_continuum_distortion_is_smooth_with_the_asked_amplitude():
    f, x, off = spectrum(centres=(1000.0, 2000.0, 3000.0))
    coeffs = torch.tensor([[0.05, -0.03, 0.02]])
    y, off2 = A.continuum_distortion(x, off, coeffs)
    ratio = (A.to_flux(y, off2) / A.to_flux(x, off))[0].double()  # = factor up to the new scale
    t = torch.linspace(-1, 1, P, dtype=torch.float64)
    want = 1 + 0.05 * t - 0.03 * 0.5 * (3 * t ** 2 - 1) + 0.02 * 0.5 * (5 * t ** 3 - 3 * t)
    k = ratio.mean() / want.mean()
    assert torch.allclose(ratio / k, want, atol=2e-5)
    # smooth: the second difference is tiny everywhere (no structure at the scale of lines)
    assert (ratio[2:] - 2 * ratio[1:-1] + ratio[:-2]).abs().max() < 1e-5
    # standardized again
    assert float(y.mean()) == pytest.approx(0, abs=1e-5) and float(y.std(unbiased=False)) == pytest.approx(1, abs=1e-5)


def test_reddening_matches_the_extinction_curve():
    curve = torch.tensor(A.extinction_curve(LOGLAM.numpy()), dtype=torch.float32)
    # G23 at R_V = 3.1: A(V)/E(B-V) = 3.1 near 5500 A and A rises to the blue
    assert float(curve[torch.argmin((10 ** LOGLAM - 5500).abs())]) == pytest.approx(3.1, abs=0.15)
    assert float(curve[0]) > float(curve[-1])
    f, x, off = spectrum()
    y, off2 = A.redden(x, off, torch.tensor([0.2]), curve)
    mag = -2.5 * torch.log10(A.to_flux(y, off2) / A.to_flux(x, off))[0].double()
    mag = mag - mag.mean()
    want = 0.2 * curve.double() - 0.2 * curve.double().mean()
    assert torch.allclose(mag, want, atol=1e-4)


def test_masked_runs_are_bridged():
    _, x, _ = spectrum(centres=(1000.0, 2500.0))
    starts = torch.tensor([[990, 3000]])
    lengths = torch.tensor([[21, 0]])
    y = A.mask_runs(x, starts, lengths)
    # inside the run: the straight line between pixels 989 and 1011 (the line is gone)
    line = x[0, 989] + (x[0, 1011] - x[0, 989]) * (PIX[990:1011].float() - 989) / 22
    assert torch.allclose(y[0, 990:1011], line, atol=1e-6)
    assert float(y[0, 990:1011].min()) > float(x[0, 1000]) + 0.5
    # outside: untouched; a run of length 0 does nothing
    keep = torch.ones(P, dtype=bool)
    keep[990:1011] = False
    assert torch.equal(y[0, keep], x[0, keep])


def test_broaden_widens_a_line_to_the_asked_width():
    _, x, _ = spectrum(width=1.5, depth=0.3)
    y = A.broaden(x, torch.tensor([1.2]))
    seg = (y[0, 1970:2031].max() - y[0, 1970:2031]).double()
    p = PIX[1970:2031]
    mu = (seg * p).sum() / seg.sum()
    sd = float(torch.sqrt((seg * (p - mu) ** 2).sum() / seg.sum()))
    assert sd == pytest.approx(np.hypot(1.5, 1.2), rel=0.05)
    assert float(mu) == pytest.approx(2000, abs=0.01)


def test_telluric_band_has_the_asked_depth():
    f, x, off = spectrum(centres=())
    f = f * (1 + 0.1 * PIX / P)  # not flat, so it can be standardized
    x, off = A.restandardize(f[None].float())
    y, off2 = A.telluric(x, off, torch.tensor([0.1]), LOGLAM, bands=((6880.0, 30.0, 1.0),))
    ratio = (A.to_flux(y, off2) / A.to_flux(x, off))[0].double()
    core = int(torch.argmin((10 ** LOGLAM - 6880).abs()))
    far = ratio[100]  # far from the band: 1 up to the new scale
    assert float(ratio[core] / far) == pytest.approx(0.9, abs=0.002)


def test_noise_from_per_pixel_sigma():
    x = torch.zeros(4, P)
    sigma = torch.full((4, P), 0.2)
    g = torch.Generator().manual_seed(0)
    y = A.add_noise(x, sigma, torch.tensor([0.0, 0.5, 1.0, 2.0]), g)
    assert float(y[0].abs().max()) == 0
    assert [float(s) for s in y[1:].std(1)] == pytest.approx([0.1, 0.2, 0.4], rel=0.05)


def test_continuum_normalisation_ignores_smooth_factors():
    _, x, off = spectrum(centres=(800.0, 1500.0, 2200.0, 2900.0), depth=0.4, slope=0.8)
    cn = A.continuum_normalise(x, off)
    # lines of 40% depth -> about -4 in units of 0.1; the continuum -> 0
    assert float(cn[0, 1500]) == pytest.approx(-4.0, abs=0.3)
    assert float(cn[0, 500].abs()) < 0.05
    y, off2 = A.continuum_distortion(x, off, torch.tensor([[0.08, -0.05, 0.04, 0.03, -0.02]]))
    curve = torch.tensor(A.extinction_curve(LOGLAM.numpy()), dtype=torch.float32)
    y, off2 = A.redden(y, off2, torch.tensor([0.3]), curve)
    # 1% of the continuum at most (the degree-10 fit follows the product of both factors)
    assert (A.continuum_normalise(y, off2) - cn).abs().max() < 0.15


def test_pure_functions_do_not_modify_their_input():
    _, x, off = spectrum()
    x0 = x.clone()
    A.shift(x, torch.tensor([0.5]))
    A.mask_runs(x, torch.tensor([[10]]), torch.tensor([[5]]))
    A.broaden(x, torch.tensor([1.0]))
    A.continuum_distortion(x, off, torch.tensor([[0.1]]))
    assert torch.equal(x, x0)


# --------------------------------------------------------------------------- in the training loop
def _dataset(folder, n=120, p=200, with_offset=True):
    """The tiny dataset (72 training rows) with noise and reddening columns; val/test rows marked in pixel 0."""
    from stellarparams.dataset import write_dataset

    X, y, split = tiny_arrays(n, p)
    X[split > 0, 0] = 123.0  # val/test rows carry a mark no training row has
    return write_dataset(folder, X, y, split, sigma=np.full((n, p), 0.05),
                         offset=np.full(n, 3.0) if with_offset else None)


TINY = dict(stem_width=8, block_widths=(8,), heads={"teff": (4,), "feh": (4,), "logg": (4,)})


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_augmentation_sees_only_the_noisy_copies_of_training_rows(tmp_path, monkeypatch, mixup):
    from stellarparams.config import ModelConfig, recipe
    from stellarparams.training import fit

    ds = _dataset(tmp_path / "ds")
    seen = []
    real = A.Augmenter.__call__

    def spy(self, x, offset, sigma, generator):
        seen.append(x.clone())
        return real(self, x, offset, sigma, generator)

    monkeypatch.setattr(A.Augmenter, "__call__", spy)
    tc = recipe("default", epochs=2, calib_folds=0, batch_size=32, aug_pixnoise=0.5, aug_mixup=mixup)
    fit(ds, (ds.indices("train"), ds.indices("val")), ModelConfig(n_in=200, **TINY), tc)
    rows = torch.cat(seen)
    assert len(rows) == 2 * 72 * tc.n_augment            # every noisy copy, every epoch; never a clean row
    assert not (rows[:, 0] > 5).any()                    # never a validation or test row, nor a blend with one


def test_paper_recipe_never_augments_and_default_needs_offsets(tmp_path, monkeypatch):
    from stellarparams.config import ModelConfig, TrainConfig, recipe
    from stellarparams.training import fit

    monkeypatch.setattr(A.Augmenter, "__call__", lambda *a: pytest.fail("the paper recipe augmented"))
    ds = _dataset(tmp_path / "old", with_offset=False)
    rows = (ds.indices("train"), ds.indices("val"))
    assert TrainConfig() == recipe("paper") and not recipe("paper").augments
    fit(ds, rows, ModelConfig(n_in=200, **TINY), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="prepare the dataset again"):
        fit(ds, rows, ModelConfig(n_in=200, **TINY), recipe("default", epochs=1))


def test_ema_run_killed_after_an_epoch_resumes_to_the_same_weights(tmp_path):
    from stellarparams.config import ModelConfig, recipe
    from stellarparams.training import fit

    ds = _dataset(tmp_path / "ds")
    rows = (ds.indices("train"), ds.indices("val"))
    mc, tc = ModelConfig(n_in=200, **TINY), recipe("default", epochs=3, batch_size=32)
    assert tc.ema > 0
    whole = fit(ds, rows, mc, tc)

    def stop(epoch, *a):
        if epoch == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "m" / "checkpoint.safetensors"
    ckpt.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        fit(ds, rows, mc, tc, checkpoint=ckpt, fingerprint="x", on_epoch=stop)
    resumed = fit(ds, rows, mc, tc, checkpoint=ckpt, fingerprint="x")
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731 (timings differ)
    assert drop(resumed.history) == drop(whole.history)


def test_ema_memory_is_capped_at_about_two_epochs(tmp_path, monkeypatch):
    from stellarparams.config import ModelConfig, recipe
    from stellarparams.training import fit

    seen = []
    real = torch.optim.swa_utils.get_ema_multi_avg_fn
    monkeypatch.setattr(torch.optim.swa_utils, "get_ema_multi_avg_fn", lambda d: seen.append(d) or real(d))
    ds = _dataset(tmp_path / "ds")                       # 72 training rows x 3 copies / 32 = 7 steps an epoch
    fit(ds, (ds.indices("train"), ds.indices("val")), ModelConfig(n_in=200, **TINY),
        recipe("default", epochs=1, batch_size=32))
    assert seen == [pytest.approx(1 - 0.5 / 7)]


def test_mixup_blends_neighbour_stars_spectra_and_labels():
    from stellarparams.augment import Neighbours, mix, restandardize

    rng = np.random.default_rng(0)
    y = np.repeat([[5000.0, 0.0], [5100.0, 0.1], [9000.0, -2.0], [5050.0, 0.05]], 3, axis=0)  # 4 stars x 3 rows
    nb = Neighbours(np.repeat(["a", "b", "c", "d"], 3), y, k=1)
    partner = nb.draw(torch.arange(12), torch.Generator().manual_seed(0)).numpy()
    star = partner // 3
    assert set(star[:3]) <= {1, 3} and set(star[3:6]) <= {0, 3} and star[6:9].tolist() != [2, 2, 2]
    assert (star != np.arange(12) // 3).all()  # never the row's own star
    # the blend of two mean-normalised fluxes, standardized again: lam = 1 gives a, 0.5 the midpoint
    f = torch.tensor(rng.uniform(1, 3, (2, 50)), dtype=torch.float32)
    x, o = restandardize(f)
    xa, oa = mix(x[:1], o[:1], x[1:], o[1:], torch.tensor([1.0]))
    np.testing.assert_allclose(xa.numpy(), x[:1].numpy(), atol=1e-5)
    xm, _ = mix(x[:1], o[:1], x[1:], o[1:], torch.tensor([0.5]))
    want, _ = restandardize((f[:1] / f[:1].mean() + f[1:] / f[1:].mean()) / 2)
    np.testing.assert_allclose(xm.numpy(), want.numpy(), atol=1e-5)

