"""train --init-from MODEL [--freeze PARTS]: start from a model's weights, re-init the stem for another grid, freeze."""
import json

import numpy as np
import pytest
import torch

from stellarparams import load_model
from stellarparams.cli import main
from stellarparams.config import ModelConfig
from stellarparams.finetune import in_part, parse_freeze
from stellarparams.train import TrainConfig, train

from helpers import TINY, tiny_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model trained 4 epochs on a 48-pixel dataset, and that dataset."""
    root = tmp_path_factory.mktemp("ft")
    ds = tiny_dataset(root / "ds", n=240)
    model = train(ds, root / "src", TINY, TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=1, calib_folds=0),
                  progress=False)
    return root, ds, model


def _state(model):
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def test_matching_grid_starts_at_the_source_models_validation_loss(source):
    root, ds, src = source
    tc = TrainConfig(epochs=1, batch_size=32, lr=3e-3, seed=2, calib_folds=0, init_from=str(root / "src"))
    ft = train(ds, root / "ft", None, tc, progress=False)
    assert ft.metrics["init_val_loss"] == pytest.approx(src.best_val_loss, rel=1e-5)
    scratch = train(ds, None, TINY, TrainConfig(epochs=1, batch_size=32, lr=3e-3, seed=2, calib_folds=0),
                    progress=False)
    assert scratch.history[0]["val_loss"] > 2 * ft.metrics["init_val_loss"]  # from scratch starts far worse
    np.testing.assert_array_equal(ft.center, src.center)  # the source's target scaler is kept
    card = json.loads((root / "ft" / "model.json").read_text())["train_config"]
    assert card["init_from"] == str(root / "src") and card["init_sha256"] == src.weights_sha256
    assert card["freeze"] == []


def test_other_grid_reinitialises_the_stem_and_still_trains(source):
    root, _, src = source
    ds40 = tiny_dataset(root / "ds40", n=240, n_pix=40, seed=3)
    tc = TrainConfig(epochs=3, batch_size=32, lr=3e-3, seed=2, calib_folds=0, init_from=str(root / "src"),
                     freeze=("blocks", "heads"))
    ft = train(ds40, None, None, tc, progress=False)
    new, old = _state(ft), _state(src)
    assert new["trunks.0.stem.0.weight"].shape == (32, 40)
    for k in old:
        if in_part(k, "blocks") or in_part(k, "heads"):
            assert torch.equal(new[k], old[k]), k  # frozen: bitwise the source's
    assert not torch.equal(new["trunks.0.stem.1.weight"], old["trunks.0.stem.1.weight"])  # copied, then trained
    losses = [h["val_loss"] for h in ft.history]
    assert np.isfinite(losses).all() and min(losses[1:]) < losses[0]


def test_frozen_parts_stay_bitwise_unchanged_with_the_weight_average(source):
    root, ds, src = source
    tc = TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=4, calib_folds=0, ema=0.99, init_from=str(root / "src"),
                     freeze=("trunk", "heads.feh"))
    ft = train(ds, None, None, tc, progress=False)
    new, old = _state(ft), _state(src)
    frozen = [k for k in old if in_part(k, "trunk") or in_part(k, "heads.feh")]
    assert frozen and all(torch.equal(new[k], old[k]) for k in frozen)
    assert not torch.equal(new["heads.teff.mlp.0.weight"], old["heads.teff.mlp.0.weight"])


def test_cli_records_and_checks_parts(source, capsys):
    root, _, src = source
    out = root / "cli"
    args = ["train", "--dataset", str(root / "ds"), "--out", str(out), "--recipe", "paper", "--epochs", "1",
            "--calib-folds", "0", "--quiet", "--init-from", str(root / "src")]
    assert main(args + ["--freeze", "stem,heads.logg"]) == 0
    card = load_model(out).train_config
    assert card.freeze == ("stem", "heads.logg") and card.init_sha256 == src.weights_sha256
    assert main(args[:-2] + ["--freeze", "stem"]) == 2
    assert "--freeze needs --init-from" in capsys.readouterr().err
    assert main(args[:4] + [str(root / "cli2")] + args[5:] + ["--freeze", "stems"]) == 2
    assert "unknown part; choose from stem, blocks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="heads.mgfe"):
        parse_freeze("heads.mgfe", ["teff"])


def test_another_architecture_is_refused(source):
    root, ds, _ = source
    other = ModelConfig(n_in=48, stem_width=16, block_widths=(16,), heads=TINY.heads)
    with pytest.raises(ValueError, match="source's architecture"):
        train(ds, None, other, TrainConfig(epochs=1, init_from=str(root / "src")), progress=False)


def test_fine_tuned_model_is_calibrated_on_the_new_datasets_held_out_stars(source):
    """train --init-from on labelled stars of another survey: sigma is fitted on that dataset's validation
    stars plus out-of-fold models of its training stars (started from the source's weights), and says so."""
    root, _, src = source
    other = tiny_dataset(root / "other", n=120, seed=5)
    tc = TrainConfig(epochs=1, batch_size=32, lr=3e-3, seed=2, calib_folds=2, init_from=str(root / "src"))
    ft = train(other, root / "ft_other", None, tc, progress=False)
    stats = load_model(root / "ft_other").uncertainty.stats
    assert stats["n_val"] == len(other.indices("val")) and stats["n_oof"] == len(other.indices("train"))
    assert "fine-tuned from" in stats["calibrated_on"] and str(root / "src") in stats["calibrated_on"]
    assert ft.uncertainty.stats["n_val"] != src.uncertainty.stats["n_val"]   # not the source's calibration
