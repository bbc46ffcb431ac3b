"""Every command into each exit code of the README's table, in-process through `cli.main`:
0 done, 1 nothing usable, 2 bad option or input (also an output that cannot be written),
3 output busy. Each case stops before the command's real work, so the file runs in seconds."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stellarparams import cli
from stellarparams.files import output_lock


def args_of(command, tmp_path, out=None):
    """The smallest command line of ``command`` that gets as far as its output folder."""
    out = str(out or tmp_path / "out")
    d, m = str(tmp_path / "dataset"), str(tmp_path / "model")
    return {
        "fetch": ["fetch", "--out", out, "--n", "2"],
        "simulate": ["simulate", "--out", out, "--n", "2", "--workers", "1", "--no-progress"],
        "prepare": ["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(tmp_path), "--out", out,
                    "--no-progress"],
        "train": ["train", "--dataset", d, "--out", out, "--quiet"],
        "tune": ["tune", "--dataset", d, "--out", out, "--trials", "1", "--quiet"],
        "evaluate": ["evaluate", m, "--dataset", d, "--out", out, "--no-progress"],
        "benchmark": ["benchmark", "--dataset", d, "--out", out, "--quiet"],
        "predict": ["predict", m, str(tmp_path), "--out", out + ".csv", "--quiet"],
        "run": ["run", "--out", out, "--n", "20", "--quiet"],
        "diagnose": ["diagnose", m, str(tmp_path), "--out", out, "--quiet"],
    }[command]


# (command, bad option): every shared option with an impossible value, on every command that has it
BAD_OPTIONS = [(c, o) for c in ("evaluate", "benchmark", "predict") for o in (["--batch-size", "0"],)] + \
    [(c, o) for c in ("prepare", "predict", "simulate", "run") for o in (["--workers", "-2"],)] + \
    [(c, o) for c in ("train", "benchmark", "tune", "run") for o in (["--epochs", "0"],)] + \
    [(c, o) for c in ("train", "evaluate", "benchmark", "predict", "tune", "run", "diagnose")
     for o in (["--device", "gpu7"],)] + \
    [("prepare", ["--fractions", ".5,.5,.5"]), ("prepare", ["--fractions", "a,b"]), ("train", ["--ensemble", "0"]),
     ("tune", ["--trials", "0"]), ("simulate", ["--n", "0"]), ("fetch", ["--n", "0"]),
     ("prepare", ["--grid", "3900,5000,5000000"]), ("run", ["--grid", "3900,5000,5000000"])]


@pytest.mark.parametrize("command,option", BAD_OPTIONS, ids=lambda x: x if isinstance(x, str) else "=".join(x))
def test_bad_option_exits_2_with_one_line(command, option, tmp_path, capsys):
    rc = cli.main(args_of(command, tmp_path) + option)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and (option[0] in err or "device" in err)
    assert not (tmp_path / "out").exists()  # refused before anything was written


BUSY = ["fetch", "simulate", "prepare", "train", "evaluate", "benchmark", "predict", "run", "diagnose"]


@pytest.mark.parametrize("command", BUSY)
def test_busy_output_exits_3(command, tmp_path, capsys):
    held = {"predict": tmp_path / ".out.csv.partial", "run": tmp_path / "out" / "survey"}.get(command, tmp_path / "out")
    with output_lock(held):
        rc = cli.main(args_of(command, tmp_path))
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"PID {os.getpid()}" in err and "Traceback" not in err


def test_tune_workers_share_their_folder(tmp_path, capsys):
    """tune takes no lock on purpose: parallel tune workers share one folder and one study."""
    with output_lock(tmp_path / "out"):
        rc = cli.main(args_of("tune", tmp_path))
    assert rc == 2 and "dataset" in capsys.readouterr().err  # it went on to read the (missing) dataset


@pytest.mark.parametrize("command", ["prepare", "predict"])
def test_nothing_usable_exits_1_and_publishes_nothing(command, tmp_path, capsys):
    from test_predict import tiny_model
    from test_prepare import catalog_row

    from stellarparams.model_io import save_model

    (tmp_path / "spectra").mkdir()
    bad = tmp_path / "spectra" / "spec-0500-55000-0001.fits"
    bad.write_bytes(b"not a FITS file")
    pd.DataFrame([catalog_row(500, 55000, 1)]).to_csv(tmp_path / "cat.csv", index=False)
    save_model(tiny_model(), tmp_path / "model")
    argv = args_of(command, tmp_path)
    argv[argv.index("--spectra") + 1 if command == "prepare" else 2] = str(tmp_path / "spectra")
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("error: ") and "nothing was written" in err
    published = {"prepare": ["dataset.h5", "rejects.csv", "summary.json"], "predict": []}[command]
    out = tmp_path / "out"
    assert not any((out / f).exists() for f in published) and not Path(str(out) + ".csv").exists()


# ------------------------------------------------------------------------------ read-only output

@contextlib.contextmanager
def read_only_folder(tmp_path):
    """A folder nobody may write into: chmod for a normal user; a read-only tmpfs for root (who ignores
    permissions), where the test may mount one."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            yield ro
        finally:
            ro.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("root, and no tmpfs can be mounted here: no folder is read-only for this user")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_read_only_output_folder_exits_2_with_one_line(command, tmp_path, capsys):
    from test_predict import tiny_model

    from stellarparams.model_io import save_model

    save_model(tiny_model(), tmp_path / "model")
    with read_only_folder(tmp_path) as ro:
        rc = cli.main(args_of(command, tmp_path, out=ro / "out"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(ro) in err and "Traceback" not in err


class ClosedPipe:
    """sys.stdout when the reader left (`stellarparams predict ... | head -1`)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_broken_pipe_is_quiet(tmp_path, monkeypatch, capsys):
    from test_predict import tiny_model, write_star

    from stellarparams.model_io import save_model

    save_model(tiny_model(), tmp_path / "model")
    write_star(tmp_path / "spectra" / "spec-1000-52000-0001.fits", 1)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    rc = cli.main(["predict", str(tmp_path / "model"), str(tmp_path / "spectra"), "--out", str(tmp_path / "r.csv"),
                   "--quiet", "--workers", "0"])  # --quiet: the summary goes to stdout
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "r.csv").exists() and "Traceback" not in err and "Broken" not in err
