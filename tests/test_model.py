"""The residual multitask network: parameter counts, ablation switches, shapes, config."""
import pytest
import torch

from stellarparams.config import ModelConfig
from stellarparams.model import StellarNet, count_parameters


def lin(i, o):
    return i * o + o


def ln(d):
    return 2 * d


# Paper configuration, by hand: stem, block 128->64 (+projection shortcut), shared LN, heads
STEM = lin(4000, 128) + ln(128)
BLOCK = ln(128) + lin(128, 64) + ln(64) + lin(64, 64)
SHORTCUT = ln(128) + lin(128, 64)
SHARED = ln(64)
HEADS = (lin(64, 48) + lin(48, 32) + lin(32, 1)) + (lin(64, 16) + lin(16, 1)) + (lin(64, 48) + lin(48, 1))


def test_default_has_paper_parameter_count():
    assert STEM + BLOCK + SHORTCUT + SHARED + HEADS == 542_771
    assert count_parameters(StellarNet(ModelConfig())) == 542_771


def test_ablation_switches_change_the_count_as_expected():
    full = count_parameters(StellarNet(ModelConfig()))
    no_skip = count_parameters(StellarNet(ModelConfig(skip=False)))
    assert no_skip == full - SHORTCUT  # the projection shortcut disappears
    no_skip_ln = count_parameters(StellarNet(ModelConfig(skip=False, layernorm=False)))
    assert no_skip_ln == no_skip - (ln(128) + ln(128) + ln(64) + ln(64))  # stem, block in/mid, shared
    single = count_parameters(StellarNet(ModelConfig(multitask=False)))
    assert single == 3 * (STEM + BLOCK + SHORTCUT + SHARED) + HEADS
    # the paper's relative sizes: 0.99, 0.98, 2.97
    assert round(no_skip / full, 2) in (0.98, 0.99) and round(single / full, 2) == 2.97


def test_forward_shapes_and_label_order():
    torch.manual_seed(0)
    cfg = ModelConfig(n_in=50, stem_width=16, block_widths=(8, 8), heads={"logg": (4,), "teff": (), "alpha_fe": (3, 2)})
    net = StellarNet(cfg).eval()
    y = net(torch.randn(7, 50))
    assert y.shape == (7, 3) and net.labels == ["logg", "teff", "alpha_fe"]
    # identity shortcut between equal widths: no projection parameters in the 2nd block
    assert net.trunks[0].blocks[0].project is not None and net.trunks[0].blocks[1].project is None
    # single-task: one trunk per label, same output shape
    assert StellarNet(ModelConfig(n_in=50, stem_width=16, multitask=False, heads=cfg.heads))(torch.randn(2, 50)).shape == (2, 3)


def test_no_skip_really_removes_the_shortcut():
    torch.manual_seed(0)
    cfg = ModelConfig(n_in=10, stem_width=8, block_widths=(8,), trunk_dropout=0.0, skip=False)
    block = StellarNet(cfg).trunks[0].blocks[0]
    with torch.no_grad():
        block.fc2.weight.zero_()
        block.fc2.bias.zero_()
    h = torch.randn(4, 8)
    assert torch.all(block(h) == 0)  # only the (zeroed) residual branch remains
    block.skip = True
    assert torch.allclose(block(h), h)


def test_config_round_trip_and_errors():
    cfg = ModelConfig(block_widths=(64, 32), heads={"teff": (48, 32)}, activation="relu")
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.labels == ["teff"]
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"stem_widht": 3})
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="swishy")


def test_stem_dropout_and_separate_trunks_give_one_output_per_label():
    heads = {"a": (4,), "b": (4,), "c": (4,)}
    for cfg in (dict(stem_dropout=0.3), dict(multitask=False), dict()):
        net = StellarNet(ModelConfig(n_in=20, stem_width=8, block_widths=(8,), heads=heads, **cfg))
        assert net.shared_stem == (cfg == {})
        for mode in (net.train(), net.eval()):
            assert mode(torch.zeros(5, 20)).shape == (5, 3)
        torch.testing.assert_close(net.tail(net.features(torch.ones(2, 20))), net(torch.ones(2, 20)))
