"""Devices without a GPU: which device a --device value names (CUDA faked only in the choice
logic, never for computation), refusals that name the available devices, autocast refused for
fp16 off CUDA, the model folder's CPU tensors mapped onto the asked device, augmentation and
MC-dropout masks placed on the input's device (the ``meta`` device: shapes only, but any CPU
tensor mixed in raises), and the same seed giving the same weights with an explicit CPU device."""
import contextlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stellarparams.cli import main
from stellarparams.config import ModelConfig, recipe
from stellarparams.devices import autocast, available_devices, check_precision, resolve_device, to_device

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import make_fixtures  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture()
def two_gpus(monkeypatch):
    """Only what resolve_device asks: nothing is ever computed on these."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_falls_back_to_cpu_without_a_gpu(no_gpu):
    assert available_devices() == ["cpu"]
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:3", "mps"])
def test_an_absent_device_is_refused_naming_the_available_ones(no_gpu, name):
    with pytest.raises(ValueError, match=r"not available on this machine; available: cpu$"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "cpu:0", "", "cuda:0,1"])
def test_junk_device_names_are_refused(no_gpu, name):
    with pytest.raises(ValueError, match=r"not one of auto, cpu, cuda, cuda:N, mps \(available here: cpu\)"):
        resolve_device(name)


def test_the_choice_with_cuda_present(two_gpus):
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="available: cpu, cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_auto_takes_mps_when_there_is_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_precision_fp16_is_refused_off_cuda_and_fp32_adds_no_autocast():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_precision("cpu", "fp16")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="not one of fp32, bf16, fp16"):
        check_precision("cpu", "fp8")
    assert isinstance(autocast("cpu", "fp32"), contextlib.nullcontext)
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    assert check_precision("cuda", "fp16") == "fp16"   # allowed there (nothing runs)


def test_to_device_leaves_a_cpu_tensor_alone():
    t = torch.ones(3)
    assert to_device(t, torch.device("cpu")) is t
    assert to_device(None, torch.device("cpu")) is None
    assert to_device(t, torch.device("meta")).device.type == "meta"


def _tiny(tmp_path, offset=False):
    ds = make_fixtures.tiny_dataset(tmp_path / "ds")
    if not offset:
        return ds
    from stellarparams.dataset import write_dataset

    n = ds.n
    flux, labels = ds.flux(np.arange(n)), ds.labels(np.arange(n))
    split = np.repeat([0, 1, 2], [int(0.6 * n), int(0.2 * n), n - int(0.6 * n) - int(0.2 * n)])
    ds.close()
    return write_dataset(tmp_path / "ds_off", flux, labels, split, offset=np.full(n, 3.0, np.float32))


def test_model_folder_holds_cpu_tensors_and_loads_onto_the_asked_device(tmp_path, no_gpu):
    from safetensors import safe_open
    from stellarparams.model_io import load_model
    from stellarparams.train import train

    mc, tc = make_fixtures.tiny_configs(0)
    with _tiny(tmp_path) as ds:
        model = train(ds, tmp_path / "model", mc, tc, progress=False, device="cpu")
    x = make_fixtures.fixed_inputs()
    with safe_open(tmp_path / "model" / "weights.safetensors", "pt") as f:
        assert {f.get_tensor(k).device.type for k in f.keys()} == {"cpu"}
    back = load_model(tmp_path / "model", device="cpu")
    assert back.device == torch.device("cpu") and back.to("auto") is back
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    np.testing.assert_array_equal(back.predict(x, return_sigma=True)[1], model.predict(x, return_sigma=True)[1])
    with pytest.raises(ValueError, match="'cuda' is not available on this machine; available: cpu"):
        load_model(tmp_path / "model", device="cuda")


def test_explicit_cpu_device_gives_the_same_weights_as_the_default(tmp_path, no_gpu):
    from stellarparams.model_io import weights_bytes
    from stellarparams.training import fit

    mc = ModelConfig(n_in=make_fixtures.N_PIX, stem_width=16, block_widths=(8,),
                     heads={"teff": (8,), "feh": (4,), "logg": (8,)})
    tc = replace(recipe("default"), epochs=2, batch_size=32, calib_folds=0, seed=3)   # physical augmentation on
    with _tiny(tmp_path, offset=True) as ds:
        rows = (ds.indices("train"), ds.indices("val"))
        a = fit(ds, rows, mc, tc)
        b = fit(ds, rows, mc, tc, device="cpu", precision="fp32")
        c = fit(ds, rows, mc, replace(tc, seed=4), device="cpu")
    assert weights_bytes(a.net) == weights_bytes(b.net)
    assert weights_bytes(a.net) != weights_bytes(c.net)
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert drop(a.history) == drop(b.history)


def test_augmentation_runs_on_the_device_of_its_input():
    from stellarparams.augment import Augmenter

    # broaden and shift read a max back to choose a path (meta tensors hold no values): off here
    tc = replace(recipe("default"), aug_lsf_pix=0.0, aug_shift_pix=0.0, aug_pixnoise=0.5)
    loglam = np.linspace(3.5754, 3.9670, 64)
    aug = Augmenter(tc, loglam)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    out = aug(x.to("meta"), torch.full((5,), 3.0, device="meta"), torch.ones(5, 64, device="meta"), g)
    assert out.device.type == "meta" and out.shape == (5, 64)
    # the same draws on the CPU: the generator advanced the same way on both devices
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    aug(x.to("meta"), torch.full((5,), 3.0, device="meta"), torch.ones(5, 64, device="meta"), g1)
    aug(x, torch.full((5,), 3.0), torch.ones(5, 64), g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_mc_dropout_masks_and_passes_live_on_the_device_of_the_input():
    from stellarparams.model import StellarNet
    from stellarparams.uncertainty import FixedMasks, _dropouts, mc_predict

    net = StellarNet(ModelConfig(n_in=32, stem_width=16, block_widths=(8,), heads={"teff": (8,)},
                                 trunk_dropout=0.2)).eval()
    drops = _dropouts(net)
    masks = FixedMasks(drops, 4, seed=0)
    cpu, meta = masks.mask(drops[0], 8), masks.mask(drops[0], 8, "meta")
    assert cpu.device.type == "cpu" and meta.device.type == "meta" and meta.shape == cpu.shape
    pred, std = mc_predict(net.to("meta"), torch.zeros(3, 32, device="meta"), n_passes=4)
    assert pred.device.type == std.device.type == "meta" and std.shape == (3, 1)


def _cli(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip().splitlines()


def test_train_cli_device_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys, no_gpu):
    rc, err = _cli(capsys, "train", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "m"),
                   "--device", "cuda")
    assert rc == 2   # a bad option: exit 2, as in every command
    assert err == ["error: device 'cuda' is not available on this machine; available: cpu"]
    assert not (tmp_path / "m").exists()


def test_train_cli_refuses_fp16_on_cpu_and_junk_devices(tmp_path, capsys, no_gpu):
    rc, err = _cli(capsys, "train", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "m"),
                   "--device", "cpu", "--precision", "fp16")
    assert rc == 2 and len(err) == 1 and "fp16 needs a CUDA device" in err[0]
    rc, err = _cli(capsys, "train", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "m"),
                   "--device", "gpu")
    assert rc == 2 and len(err) == 1 and "available here: cpu" in err[0]


@pytest.mark.parametrize("command", ["tune", "evaluate", "benchmark", "run", "predict"])
def test_every_command_takes_device(tmp_path, capsys, no_gpu, command):
    argv = {"tune": ["tune", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
            "evaluate": ["evaluate", str(tmp_path / "nope"), "--dataset", str(tmp_path / "nope"),
                         "--out", str(tmp_path / "o")],
            "benchmark": ["benchmark", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
            "run": ["run", "--out", str(tmp_path / "o"), "--quiet"],
            "predict": ["predict", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o.csv")]}[command]
    rc, err = _cli(capsys, *argv, "--device", "cuda:1")
    assert rc in (1, 2) and err[-1] == "error: device 'cuda:1' is not available on this machine; available: cpu"
    assert not (tmp_path / "o" / "survey").exists()
