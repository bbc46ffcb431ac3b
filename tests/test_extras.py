"""Optional dependencies: a command whose extra is missing exits 2 with one line naming the extra."""
import sys

import pytest

from stellarparams import cli
from stellarparams.extras import requires


@pytest.mark.parametrize("module, extra, argv", [
    ("optuna", "tune", ["tune", "--dataset", "{tmp}/ds", "--out", "{tmp}/study"]),
    ("matplotlib", "plots", ["evaluate", "{tmp}/model", "--dataset", "{tmp}/ds", "--out", "{tmp}/report"]),
    ("mangadap", "simulate", ["simulate", "--out", "{tmp}/survey", "--n", "10"]),
])
def test_a_command_without_its_extra_names_the_extra(module, extra, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import of it fails as if it were not installed
    code = cli.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"pip install 'stellarparams[{extra}]'" in err and module in err
    assert not (tmp_path / argv[argv.index("--out") + 1].split("/")[-1]).exists()  # no work started


def test_requires_returns_the_module_or_names_the_extra(monkeypatch):
    assert requires("plots", "json") is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"pip install 'stellarparams\[tune\]'"):
        requires("tune", "optuna")
