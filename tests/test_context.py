"""The run context: one object for device, precision, progress, workers and Dask."""
import dataclasses

import numpy as np
import pytest
import torch

from stellarparams.cli import build_parser
from stellarparams.config import TrainConfig
from stellarparams.context import Run
from stellarparams.train import train

from helpers import TINY

torch.set_num_threads(1)


def _args(argv):
    return build_parser(argv).parse_args(argv)


def test_from_args_reads_each_commands_options():
    r = Run.from_args(_args(["train", "--dataset", "d", "--out", "m", "--quiet", "--device", "cpu",
                             "--precision", "bf16"]))
    assert r == Run(progress=False, device="cpu", precision="bf16")
    r = Run.from_args(_args(["prepare", "--catalog", "c.csv", "--spectra", "s", "--out", "o", "--no-progress",
                             "--workers", "3", "--dask", "local:2"]))
    assert (r.progress, r.workers, r.dask, r.precision) == (False, 3, "local:2", "fp32")
    assert Run.from_args(_args(["fetch", "--out", "o"])).progress  # no --quiet: progress; no --device: None


def test_on_device_resolves_and_checks_and_the_run_is_frozen():
    r = Run(device="cpu").on_device()
    assert r.device == torch.device("cpu") and r.on_device() == r
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Run(device="cpu", precision="fp16").on_device()
    with pytest.raises(ValueError, match="not one of"):
        Run(device="gpu7").on_device()
    assert not Run().quiet().progress
    with pytest.raises(dataclasses.FrozenInstanceError):
        Run().progress = False


def test_without_dask_the_cluster_is_none_and_a_client_is_used_as_it_is():
    with Run().cluster() as client:
        assert client is None

    class Client:  # anything with submit() is taken for a connected client
        def submit(self):
            pass

    given = Client()
    with Run(dask=given).cluster() as client:
        assert client is given


def test_say_prints_only_with_progress(capsys):
    Run(progress=False).say("hidden")
    Run().say("shown")
    assert capsys.readouterr().err == "shown\n"


def test_train_with_a_run_equals_train_with_keywords(tiny_ds, capsys):
    tc = TrainConfig(epochs=1, batch_size=32, seed=2, calib_folds=0)
    a = train(tiny_ds, None, TINY, tc, progress=False, device="cpu")
    capsys.readouterr()
    b = train(tiny_ds, None, TINY, tc, run=Run(progress=False, device="cpu"))
    X = tiny_ds.flux(tiny_ds.indices("test"))
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    assert capsys.readouterr().err == ""  # the run's progress=False reached the training loop
