"""Partial catalogs: fine-tune on the labels a dataset has (other heads frozen, or dropped with --labels),
train from scratch on rows that miss labels, calibrate and evaluate where the truth exists."""
import json

import numpy as np
import pytest
import torch

from stellarparams import load_model
from stellarparams.cli import main
from stellarparams import training
from stellarparams.dataset import write_dataset
from stellarparams.evaluate import evaluate
from stellarparams.finetune import OptionError, in_part
from stellarparams.train import TrainConfig, train

from test_train import TINY, make_dataset

torch.set_num_threads(1)
TC = dict(batch_size=32, lr=3e-3, calib_folds=0)


def _copy(ds, folder, keep=("teff", "feh", "logg"), drop=None, columns=None):
    """``ds`` rewritten with the labels not in ``keep`` set to NaN (a catalog with -9999), and ``drop``
    (a row mask, label) pairs missing; ``columns`` writes only those label columns."""
    y = ds.labels().astype(np.float32)
    for j, name in enumerate(ds.label_names):
        if name not in keep:
            y[:, j] = np.nan
    for rows, name in drop or ():
        y[rows, ds.label_names.index(name)] = np.nan
    names = list(columns or ds.label_names)
    y = y[:, [ds.label_names.index(n) for n in names]]
    return write_dataset(folder, ds.flux(), y, ds.split, label_names=names)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial")
    full = make_dataset(root / "full", n=240)
    model = train(full, root / "src", TINY, TrainConfig(epochs=4, seed=1, **TC), progress=False)
    feh = _copy(make_dataset(root / "other", n=240, seed=5), root / "feh", keep=("feh",))
    return root, full, feh, model


def _state(model):
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def test_finetune_on_feh_only_keeps_the_other_heads_frozen(source):
    root, _, feh, src = source
    tc = TrainConfig(epochs=2, seed=2, init_from=str(root / "src"), **dict(TC, calib_folds=2))
    ft = train(feh, root / "ft", None, tc, progress=False)
    new, old = _state(ft), _state(src)
    for k in old:
        if in_part(k, "heads.teff") or in_part(k, "heads.logg"):
            assert torch.equal(new[k], old[k]), k          # kept bitwise
    assert not torch.equal(new["heads.feh.mlp.0.weight"], old["heads.feh.mlp.0.weight"])
    assert not torch.equal(new["trunks.0.stem.0.weight"], old["trunks.0.stem.0.weight"])   # the trunk trained
    card = json.loads((root / "ft" / "model.json").read_text())
    assert set(card["train_config"]["freeze"]) == {"heads.teff", "heads.logg"}
    assert card["metrics"]["heads_kept_from_source"] == ["teff", "logg"]
    assert card["label_ranges"]["teff"] == src.label_ranges["teff"]      # no new teff labels: the source's range
    np.testing.assert_array_equal(ft.center, src.center)
    u, su = load_model(root / "ft").uncertainty, src.uncertainty
    assert u.stats["carried_from_source"] == ["teff", "logg"]
    assert u.a[0] == su.a[0] and u.c[2] == su.c[2]                    # carried from the source
    assert u.stats["n_known"]["feh"] > 0 and u.stats["n_known"]["teff"] == 0
    te = feh.indices("test")
    y, sigma = ft.predict(feh.flux(te), return_sigma=True)
    assert np.isfinite(y).all() and np.isfinite(sigma).all() and (sigma > 0).all()
    assert "val_mae_teff" in ft.metrics and not np.isfinite(ft.metrics["val_mae_teff"])
    assert ft.metrics["heads_distilled"] == ["teff", "logg"]


def test_distilling_the_frozen_heads_keeps_their_predictions(source, monkeypatch):
    """The trunk moves under the frozen heads; with the source's outputs as their targets it moves less."""
    root, _, feh, src = source
    tc = TrainConfig(epochs=6, seed=3, init_from=str(root / "src"), **TC)
    x = feh.flux(feh.indices("test"))
    drift = lambda m: np.abs(m.predict(x)[:, [0, 2]] - src.predict(x)[:, [0, 2]]).mean(0) / src.scale[[0, 2]]  # noqa: E731
    kept = train(feh, None, None, tc, progress=False)
    monkeypatch.setattr(training, "_source_outputs", lambda mc, init, X, b: torch.full((len(X), 3), float("nan")))
    free = train(feh, None, None, tc, progress=False)
    assert (drift(kept) < 0.7 * drift(free)).all(), (drift(kept), drift(free))


def test_labels_drops_the_heads_the_catalog_lacks(source, capsys):
    root, _, feh, src = source
    out = root / "one"
    args = ["train", "--dataset", str(root / "feh"), "--out", str(out), "--recipe", "paper", "--epochs", "2",
            "--calib-folds", "0", "--quiet", "--init-from", str(root / "src"), "--labels", "feh"]
    assert main(args) == 0
    assert "val MAE feh" in capsys.readouterr().out
    one = load_model(out)
    assert one.label_names == ["feh"] and list(one.net.heads) == ["feh"]
    assert one.center.tolist() == [src.center[1]] and one.scale.tolist() == [src.scale[1]]
    assert one.train_config.freeze == ()
    y, sigma = one.predict(feh.flux(feh.indices("test")), return_sigma=True)
    assert y.shape == (len(feh.indices("test")), 1) and np.isfinite(sigma).all()
    assert main(args[:-1] + ["mgfe"]) == 2
    assert "not a label of the --init-from model" in capsys.readouterr().err


def test_a_dataset_without_the_columns_and_the_cli_summary(source, capsys):
    root, _, feh, src = source
    _copy(feh, root / "fehcol", columns=["feh"])
    assert main(["train", "--dataset", str(root / "fehcol"), "--out", str(root / "fehcol_m"), "--recipe", "paper",
                 "--epochs", "1", "--calib-folds", "0", "--init-from", str(root / "src")]) == 0
    cap = capsys.readouterr()
    assert "teff head frozen" in cap.out and "the dataset has no teff, logg labels" in cap.err
    m = load_model(root / "fehcol_m")
    assert m.label_names == src.label_names and m.label_units == src.label_units


def test_from_scratch_on_a_partial_catalog(source):
    root, full, _, _ = source
    rng = np.random.default_rng(0)
    itr = full.indices("train")
    a, b = rng.choice(itr, 40, replace=False), rng.choice(itr, 40, replace=False)
    part = _copy(full, root / "holes", drop=[(a, "feh"), (b, "teff"), (full.indices("val")[:5], "logg")])
    m = train(part, root / "holes_m", TINY, TrainConfig(epochs=3, seed=1, **dict(TC, calib_folds=2)), progress=False)
    assert m.uncertainty.stats["n_known"]["feh"] < m.uncertainty.stats["n_known"]["logg"]
    assert "carried_from_source" not in m.uncertainty.stats
    y, sigma = m.predict(part.flux(part.indices("test")), return_sigma=True)
    assert np.isfinite(y).all() and np.isfinite(sigma).all()
    # a label no row has cannot be learned from scratch: the error says what to do
    with pytest.raises(ValueError, match="--labels feh"):
        train(source[2], None, TINY, TrainConfig(epochs=1, **TC), progress=False)
    one = train(source[2], None, TINY.__class__(**{**TINY.to_dict(), "heads": {"feh": (8,)}}),
                TrainConfig(epochs=1, **TC), progress=False)
    assert one.label_names == ["feh"]


def test_evaluate_reports_only_where_truth_exists(source, tmp_path):
    root, _, feh, src = source
    part = _copy(feh, tmp_path / "fehcol", columns=["feh"])   # the catalog has no teff, logg columns at all
    evaluate(src, part, tmp_path / "ev", progress=False)
    r = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_test = len(part.indices("test"))
    assert r["labels"]["feh"]["n"] == n_test and r["labels"]["feh"]["mae"] > 0
    assert r["labels"]["teff"]["n"] == 0 and r["labels"]["teff"]["mae"] is None
    assert any("no teff, logg labels" in n for n in r["notes"])
    cal = {c["label"]: c for c in r["calibration"] if c["snr_lo"] is None}
    assert cal["feh"]["n"] == n_test and cal["logg"]["n"] == 0


def test_freezing_the_stem_on_another_grid_is_refused(source, capsys):
    root, _, _, _ = source
    make_dataset(root / "ds40", n=120, p=40, seed=3)
    with pytest.raises(OptionError, match="stem's input layer"):
        train(root / "ds40", None, None, TrainConfig(epochs=1, init_from=str(root / "src"), freeze=("trunk",), **TC),
              progress=False)
    args = ["train", "--dataset", str(root / "ds40"), "--out", str(root / "g40"), "--recipe", "paper", "--epochs", "1",
            "--calib-folds", "0", "--quiet", "--init-from", str(root / "src"), "--freeze", "stem"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--freeze blocks,ln_out,heads" in err and not (root / "g40" / "model.json").exists()
