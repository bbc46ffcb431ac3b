"""Reliability: one writer per output, verified publishing, paths as data, workers that die with
their parent, clear errors and exit codes (prepare and predict)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stellarparams import preprocess
from stellarparams import cli, prepare as prep
from stellarparams.surveys import sdss
from stellarparams.dataset import Dataset, Grid
from stellarparams.files import OutputBusy, output_lock

from helpers import catalog_row, good_set, tiny_model, write_spectrum, write_star

PY = sys.executable


def arrays(path):
    with Dataset(path) as ds:
        return [ds.flux(), ds.valid(), ds.sigma(), ds.labels(), ds.split.copy(), ds.meta()]


def assert_same_dataset(a, b):
    for x, y in zip(arrays(a), arrays(b)):
        if isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y)
        else:
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------- prepare

def test_two_prepare_runs_on_one_output_one_proceeds(tmp_path, monkeypatch):
    spectra, cat = good_set(tmp_path, n=4)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "solo", workers=1, chunk_size=2, progress=False)
    real = prep._run_chunk
    for trial in range(10):
        out = tmp_path / f"ds{trial}"
        inside, go = threading.Event(), threading.Event()

        def slow_chunk(*a):
            inside.set()
            go.wait(30)
            return real(*a)

        monkeypatch.setattr(prep, "_run_chunk", slow_chunk)
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("s", prep.prepare(
            tmp_path / "cat.csv", spectra, out, workers=1, chunk_size=2, progress=False)))
        t.start()
        assert inside.wait(30)
        with pytest.raises(OutputBusy, match=rf"{out}.*PID {os.getpid()}"):  # the second fails at once
            prep.prepare(tmp_path / "cat.csv", spectra, out, workers=1, chunk_size=2, progress=False)
        go.set()
        t.join(60)
        assert first["s"]["kept"] == 4
        assert_same_dataset(out, tmp_path / "solo")
        assert sorted(p.name for p in out.iterdir()) == [".lock", "dataset.h5", "rejects.csv", "summary.json"]


def test_second_prepare_waits_with_wait(tmp_path):
    spectra, cat = good_set(tmp_path, n=3)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    args = ["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--out",
            str(tmp_path / "ds"), "--workers", "1", "--no-progress"]
    with output_lock(tmp_path / "ds"):
        assert cli.main(args) == 3  # busy: fails at once, naming the holder
        rc = []
        t = threading.Thread(target=lambda: rc.append(cli.main(args + ["--wait"])))
        t.start()
        t.join(1.0)
        assert t.is_alive() and not (tmp_path / "ds" / "dataset.h5").exists()  # waiting, not writing
    t.join(60)
    assert rc == [0] and len(Dataset(tmp_path / "ds")) == 3


def test_busy_message_names_folder_and_pid(tmp_path, capsys):
    with output_lock(tmp_path / "ds"):
        rc = cli.main(["prepare", "--catalog", "x.csv", "--spectra", str(tmp_path), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 3 and str(tmp_path / "ds") in err and f"PID {os.getpid()}" in err and "Traceback" not in err


def test_damaged_published_dataset_is_not_up_to_date(tmp_path):
    spectra, cat = good_set(tmp_path, n=4)
    prep.prepare(cat, spectra, tmp_path / "ref", workers=1, progress=False)
    prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False)
    h5 = tmp_path / "ds" / "dataset.h5"
    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert summary["dataset_sha256"] == prep.sha256_file(h5)
    assert prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False)["up_to_date"]
    data = bytearray(h5.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the flux
    h5.write_bytes(bytes(data))
    s = prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False)
    assert not s.get("up_to_date") and s["kept"] == 4  # prepared again ...
    assert_same_dataset(tmp_path / "ds", tmp_path / "ref")  # ... and healed


def test_a_damaged_dataset_is_never_published(tmp_path, monkeypatch):
    spectra, cat = good_set(tmp_path, n=4)
    real = prep._Pixels.write

    def zeros(self, row0, arrays):  # what a second writer truncating the file did
        return real(self, row0, {**arrays, "flux": np.zeros_like(arrays["flux"])})

    monkeypatch.setattr(prep._Pixels, "write", zeros)
    with pytest.raises(RuntimeError, match="all zeros.*nothing was published"):
        prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False)
    assert not (tmp_path / "ds" / "dataset.h5").exists() and not (tmp_path / "ds" / "summary.json").exists()
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.endswith(".tmp.h5")]


def test_output_location_errors_are_one_line_and_early(tmp_path, capsys):
    spectra, cat = good_set(tmp_path, n=2)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "ds"):
        rc = cli.main(["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra),
                       "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and "afile" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys):
    spectra, cat = good_set(tmp_path, n=2)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    rc = cli.main(["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra),
                   "--out", str(tmp_path / "ro" / "ds"), "--no-progress"])
    assert rc == 2 and "ro" in capsys.readouterr().err


def test_nothing_usable_exits_1_and_publishes_nothing(tmp_path, capsys):
    spectra, cat = good_set(tmp_path, n=3)
    (tmp_path / "empty").mkdir()
    cat.to_csv(tmp_path / "cat.csv", index=False)
    base = ["prepare", "--catalog", str(tmp_path / "cat.csv"), "--no-progress"]
    assert cli.main(base + ["--spectra", str(tmp_path / "empty"), "--out", str(tmp_path / "a")]) == 1
    assert "no spectrum was kept (no_file 3)" in capsys.readouterr().err
    cat[["TEFF_ADOP", "FEH_ADOP", "LOGG_ADOP"]] = -9999.0
    cat.to_csv(tmp_path / "nolabels.csv", index=False)
    rc = cli.main(["prepare", "--catalog", str(tmp_path / "nolabels.csv"), "--no-progress", "--spectra",
                   str(spectra), "--out", str(tmp_path / "b")])
    assert rc == 1 and "has a label" in capsys.readouterr().err
    for d in "ab":
        assert not (tmp_path / d / "dataset.h5").exists() and not (tmp_path / d / "summary.json").exists()


@pytest.mark.parametrize("missing", [-9999.0, np.nan])
def test_missing_group_ids_are_groups_of_their_own(tmp_path, capsys, missing):
    spectra, cat = good_set(tmp_path, n=12)
    cat["STAR_ID"] = missing
    cat.loc[:1, "STAR_ID"] = 7  # two rows of one known star
    cat.to_csv(tmp_path / "cat.csv", index=False)
    s = prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "ds", workers=1)
    assert "10 of 12 kept rows have no STAR_ID" in capsys.readouterr().err
    assert s["splits"]["train"] < 12 and s["splits"]["test"] > 0  # not one giant star
    with Dataset(tmp_path / "ds") as ds:
        m = ds.meta()
        assert m.object_id[0] == m.object_id[1] == "7" and m.split[0] == m.split[1]
        assert m.object_id[2] == "0500-55000-0003" and m.object_id.nunique() == 11


def test_rv_column_error_speaks_cli(tmp_path, capsys):
    spectra, cat = good_set(tmp_path, n=2)
    cat.rename(columns={"RV_ADOP": "VHELIO"}).to_csv(tmp_path / "cat.csv", index=False)
    base = ["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--no-progress"]
    assert cli.main(base + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--rv-column" in err and "--no-rest-frame" in err
    assert cli.main(base + ["--out", str(tmp_path / "b"), "--rv-column", "vhelio"]) == 0


def test_spectra_under_a_bracketed_unicode_folder(tmp_path):
    weird = tmp_path / "a[1] b ñ"
    rows = []
    for i in range(3):
        write_star(weird, 500, 55000, i + 1, 10.0 * i)
        rows.append(catalog_row(500, 55000, i + 1, 10.0 * i))
    s = prep.prepare(pd.DataFrame(rows), weird, tmp_path / "ds", workers=1, progress=False)
    assert s["kept"] == 3 and s["rejected"] == 0
    with Dataset(tmp_path / "ds") as ds:
        assert all(f.startswith(str(weird) + "/spec-0500") for f in ds.meta().file)


# ---------------------------------------------------------------------------------------------- workers

def _children(pid):
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------- predict

def _predict_setup(tmp_path, n=4):

    d = tmp_path / "spectra"
    files = [write_spectrum(d / f"spec-1000-52000-{i:04d}.fits", i) for i in range(1, n + 1)]
    return tiny_model(), d, files


def read_table(path):
    from astropy.table import Table

    if str(path).endswith(".fits"):  # text columns are UTF-8 bytes
        df = Table.read(path).to_pandas()
        return df.apply(lambda c: c.str.decode("utf-8") if c.dtype == object else c)
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path, keep_default_na=False,
                                                                               na_values=[""])


def test_two_predict_runs_on_one_output_one_proceeds(tmp_path, monkeypatch):
    import stellarparams.predict as P

    m, d, _ = _predict_setup(tmp_path)
    P.predict(m, [d], tmp_path / "solo.csv", workers=0, chunk_size=2, progress=False)
    solo = pd.read_csv(tmp_path / "solo.csv")
    real = P._read_chunk
    for trial in range(10):
        out = tmp_path / f"r{trial}.csv"
        inside, go = threading.Event(), threading.Event()

        def slow(*a):
            inside.set()
            go.wait(30)
            return real(*a)

        monkeypatch.setattr(P, "_read_chunk", slow)
        res = {}
        t = threading.Thread(target=lambda: res.setdefault("s", P.predict(m, [d], out, workers=0, chunk_size=2,
                                                                          progress=False)))
        t.start()
        assert inside.wait(30)
        with pytest.raises(OutputBusy, match=f"PID {os.getpid()}"):
            P.predict(m, [d], out, workers=0, chunk_size=2, progress=False)
        # a run with other inputs on the same output must not delete the running job's parts either
        with pytest.raises(OutputBusy):
            P.predict(m, [d / "spec-1000-52000-0001.fits"], out, workers=0, progress=False)
        go.set()
        t.join(60)
        assert res["s"]["n_predicted"] == 4
        pd.testing.assert_frame_equal(pd.read_csv(out), solo)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".fits"])
def test_bracketed_unicode_paths_in_every_output_format(tmp_path, suffix):

    weird = tmp_path / "a[1] b ñ"
    good = write_spectrum(weird / "spec-1000-52000-0001.fits", 1)
    bad = weird / "spec-1000-52000-0002.fits"
    bad.write_text("not FITS")
    out = tmp_path / f"out [x] ñ{suffix}"
    s = __import__("stellarparams.predict", fromlist=["predict"]).predict(
        tiny_model(), [weird], out, workers=0, progress=False)
    df = read_table(out)
    assert s["n_predicted"] == 1 and list(df["file"]) == [str(good), str(bad)]
    assert not df["flag_rejected"][0] and np.isfinite(df["teff"][0])
    assert df["reject_reason"][1] == "unreadable"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a[1] b ñ", out.name])


def test_rejected_rows_keep_their_identity(tmp_path):
    from stellarparams.predict import predict

    m, d, files = _predict_setup(tmp_path, n=2)
    (d / "spec-2000-53000-0042.fits").write_text("broken")
    pd.DataFrame({"FILE": ["spectra/spec-1000-52000-0001.fits", "spectra/nothere.fits", "",
                           str(d / "spec-2000-53000-0042.fits")],
                  "PLATE": [1000, 7, 8, 2000], "MJD": [52000, 50007, 50008, 53000], "FIBERID": [1, 77, 88, 42],
                  "RV_ADOP": [0.0, 0.0, 0.0, 0.0]}).to_csv(tmp_path / "cat.csv", index=False)
    predict(m, [tmp_path / "cat.csv"], tmp_path / "r.csv", workers=0, progress=False)
    df = read_table(tmp_path / "r.csv")
    assert list(df["file"].fillna("")) == [str(files[0]), str(tmp_path / "spectra/nothere.fits"), "",
                                str(d / "spec-2000-53000-0042.fits")]
    assert list(df["reject_reason"].fillna("")) == ["", "missing_file", "no_file", "unreadable"]
    assert list(df["plate"]) == [1000, 7, 8, 2000] and list(df["fiberid"]) == [1, 77, 88, 42]
    assert "no such file" in df["reject_detail"][1] and "empty" in df["reject_detail"][2]
    # identity from the file name when no catalog gives it
    predict(m, [d / "spec-2000-53000-0042.fits", d / "spec-3000-54000-0003.fits", files[0]], tmp_path / "r2.csv",
            workers=0, progress=False)
    df = read_table(tmp_path / "r2.csv")
    assert list(df["plate"]) == [2000, 3000, 1000] and list(df["mjd"]) == [53000, 54000, 52000]
    assert list(df["fiberid"]) == [42, 3, 1]


def test_resume_never_reuses_another_models_or_changed_files_parts(tmp_path, monkeypatch):
    import stellarparams.predict as P

    m, d, files = _predict_setup(tmp_path, n=8)
    other = tiny_model(seed=1)  # hand-built: no fingerprint, other weights
    assert m.weights_sha256 != other.weights_sha256  # the resume key's first part
    real = P._read_chunk

    def dies_on_file_6(items, *a):
        if any(f.endswith("0006.fits") for f, _, _ in items):
            raise KeyboardInterrupt
        return real(items, *a)

    out = tmp_path / "r.parquet"
    monkeypatch.setattr(P, "_read_chunk", dies_on_file_6)
    with pytest.raises(KeyboardInterrupt):
        P.predict(m, [d], out, workers=0, chunk_size=2, part_chunks=2, progress=False)
    monkeypatch.setattr(P, "_read_chunk", real)
    s = P.predict(other, [d], out, workers=0, chunk_size=2, part_chunks=2, progress=False)
    assert s["resumed_from"] == 0
    X = np.stack([other.prepare_spectra(sdss.read_spectrum(f))[0] for f in files])
    np.testing.assert_allclose(pd.read_parquet(out)[["teff", "feh", "logg"]].to_numpy(), other.predict(X), rtol=1e-4)
    # a file rewritten between the kill and the re-run is read again
    monkeypatch.setattr(P, "_read_chunk", dies_on_file_6)
    with pytest.raises(KeyboardInterrupt):
        P.predict(m, [d], out, workers=0, chunk_size=2, part_chunks=2, progress=False)
    write_spectrum(files[0], 1, snr=3.0)  # same name, new content
    monkeypatch.setattr(P, "_read_chunk", real)
    assert P.predict(m, [d], out, workers=0, chunk_size=2, part_chunks=2, progress=False)["resumed_from"] == 0


def test_ctrl_c_before_anything_was_kept_says_so(tmp_path, monkeypatch, capsys):
    import stellarparams.predict as P
    from stellarparams.model_io import save_model

    m, d, _ = _predict_setup(tmp_path, n=3)
    save_model(m, tmp_path / "model")

    def interrupted(items, *a):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "_read_chunk", interrupted)
    rc = cli.main(["predict", str(tmp_path / "model"), str(d), "--out", str(tmp_path / "r.csv"), "--quiet",
                   "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 130 and "nothing was kept" in err and "resume" not in err


def test_predict_output_errors_come_before_the_work(tmp_path, monkeypatch, capsys):
    import stellarparams.predict as P
    from stellarparams.model_io import save_model

    m, d, _ = _predict_setup(tmp_path, n=2)
    save_model(m, tmp_path / "model")
    calls = []
    monkeypatch.setattr(P, "_read_chunk", lambda *a: calls.append(a))
    (tmp_path / "x.csv").mkdir()
    (tmp_path / "afile").write_text("")
    for out, says in ((tmp_path / "x.csv", "is a folder"), (tmp_path / "r.txtx", "must end in"),
                      (tmp_path / "afile" / "r.csv", "afile")):
        rc = cli.main(["predict", str(tmp_path / "model"), str(d), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err
    assert calls == []  # no spectrum was read
    (tmp_path / "empty").mkdir()
    rc = cli.main(["predict", str(tmp_path / "model"), str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv")])
    assert rc == 1 and "no spectrum files" in capsys.readouterr().err and not (tmp_path / "e.csv").exists()


# ---------------------------------------------------------------------------------------------- help text

@pytest.mark.parametrize("command", ["prepare", "predict", "fetch"])
def test_help_gives_each_default_once_and_none_for_required(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text)
    assert "--wait" in text
    if command == "prepare":
        assert "seed of the shuffled split (default: 0)" in text and "--rv-column" in text


def test_top_level_help_names_the_ridge_comparison(capsys):
    cli.main([])
    assert "Ridge" in capsys.readouterr().out


def test_one_file_rule_for_prepare_and_predict(tmp_path, monkeypatch):
    from stellarparams.predict import collect_inputs

    spectra, cat = good_set(tmp_path, n=3)
    (tmp_path / "cats").mkdir()
    files = sorted(spectra.rglob("spec-*.fits"))
    cat["FILE"] = [os.path.relpath(f, tmp_path / "cats") for f in files]  # relative to the catalog's folder
    cat.loc[2, "FILE"] = str(files[2])  # absolute paths work too
    cat.to_csv(tmp_path / "cats" / "cat.csv", index=False)
    monkeypatch.chdir(spectra)  # the current folder plays no part
    s = prep.prepare(tmp_path / "cats" / "cat.csv", spectra, tmp_path / "ds", workers=1, progress=False)
    with Dataset(tmp_path / "ds") as ds:
        prepared = [os.path.realpath(f) for f in ds.meta().file]
    predicted = [os.path.realpath(f) for f, _, _ in collect_inputs([tmp_path / "cats" / "cat.csv"])]
    assert s["kept"] == 3 and prepared == predicted == [str(f) for f in files]


RACE_SCRIPT = """
import sys, time
from pathlib import Path
import stellarparams.prepare as m
real = m._run_chunk
def held(*a):
    Path(sys.argv[1], "inside").write_text("")
    while not Path(sys.argv[1], "go").exists():
        time.sleep(0.02)
    return real(*a)
m._run_chunk = held
from stellarparams.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_prepare_processes_on_one_output(tmp_path):
    """The issue's reproduction with two real processes: the second fails at once, naming the first."""
    spectra, cat = good_set(tmp_path, n=3)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    args = ["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--workers", "1",
            "--no-progress"]
    prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "solo", workers=1, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([PY, "-c", RACE_SCRIPT, str(tmp_path)] + args + ["--out", str(tmp_path / "ds")], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "inside").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.02)
        second = subprocess.run([PY, "-m", "stellarparams.cli"] + args + ["--out", str(tmp_path / "ds")], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 3 and f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
        (tmp_path / "go").write_text("")
        assert first.wait(120) == 0
    finally:
        first.kill()
    assert_same_dataset(tmp_path / "ds", tmp_path / "solo")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".fits"])
def test_a_short_table_is_never_published(tmp_path, suffix):
    from stellarparams.predict import write_frames

    out = tmp_path / f"t{suffix}"
    block = pd.DataFrame({"file": ["a ñ", "b"], "teff": [1.0, 2.0]})
    assert write_frames(out, [lambda: block, lambda: block], n_rows=4) == 4 and len(read_table(out)) == 4
    with pytest.raises(ValueError, match=rf"u{suffix}: cannot write the .* output: wrote 2 rows .* expected 3"):
        write_frames(tmp_path / f"u{suffix}", [lambda: block], n_rows=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # nothing else published, no temp left


# ---------------------------------------------------------------------------------------------- full disk

def test_disk_errors_are_named_whatever_library_raised():
    import errno

    from stellarparams.files import disk_error

    h5 = OSError("Unable to synchronously write data (file write failed: time = Mon, filename = 'x', "
                 "errno = 28, error message = 'No space left on device', buf = 0x1)")  # h5py: no errno
    for e, code in ((OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC), (h5, errno.ENOSPC),
                    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
                    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS)):
        err = disk_error(e, "/out/dataset.h5")
        assert err.errno == code and err.filename == "/out/dataset.h5"
    assert disk_error(OSError(errno.ENOENT, "No such file"), "/x") is None and disk_error(ValueError("x"), "/x") is None


def test_full_disk_in_prepare_publishes_nothing_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    import errno

    spectra, cat = good_set(tmp_path, n=4)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "ref", workers=1, progress=False)
    real = prep._write_h5

    def full(tmp, *a):  # the disk fills while the dataset is written
        tmp.write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep, "_write_h5", full)
    args = ["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--out",
            str(tmp_path / "ds"), "--workers", "1", "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "ds" / "dataset.h5") in err and "no space left" in err
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [".lock", ".partial"]  # nothing published
    chunks = sorted((tmp_path / "ds" / ".partial").glob("chunk-*"))
    assert chunks
    monkeypatch.setattr(prep, "_write_h5", real)
    read = []
    monkeypatch.setattr(prep, "_run_chunk", lambda *a: read.append(a))
    assert cli.main(args) == 0 and read == []  # space freed: resumes from the chunks, reads nothing again
    assert_same_dataset(tmp_path / "ds", tmp_path / "ref")


def test_full_disk_while_the_readers_write_the_pixels_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    spectra, cat = good_set(tmp_path, n=4)
    cat.to_csv(tmp_path / "cat.csv", index=False)

    real = os.pwrite

    def full(fd, data, offset):  # the disk fills when the readers write the pixels (other writes go on)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("pixels.h5"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    rc = cli.main(["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--out",
                   str(tmp_path / "ds"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pixels.h5" in err and "no space left" in err
    assert not (tmp_path / "ds" / "dataset.h5").exists()


@pytest.mark.parametrize("command", ["simulate", "train"])
def test_full_disk_in_simulate_and_train_is_one_line(command, tmp_path, monkeypatch, capsys):
    import errno

    import stellarparams.files as files

    if command == "simulate":
        args = ["simulate", "--out", str(tmp_path / "out"), "--n", "2", "--workers", "1", "--no-progress"]
    else:
        spectra, cat = good_set(tmp_path, n=12)
        prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False,
                     config=preprocess.PrepareConfig(grid=Grid(n_pix=64)))
        args = ["train", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--epochs", "1",
                "--recipe", "paper", "--calib-folds", "0", "--labels", "teff", "--quiet", "--device", "cpu"]

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)  # every durable write finds the disk full
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(tmp_path / "out") in err and "space" in err
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]  # no half-written file


def test_real_full_tmpfs_is_refused_before_work(tmp_path, capsys):
    """Where the test may mount a 1 MB tmpfs: prepare sees the space is too small before reading."""
    spectra, cat = good_set(tmp_path, n=4)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(small)],
                                           capture_output=True).returncode:
        pytest.skip("no tmpfs can be mounted here (the patched writers above cover the full disk)")
    try:
        rc = cli.main(["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--out",
                       str(small / "ds"), "--workers", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "free" in err and "Traceback" not in err
        assert not (small / "ds" / "dataset.h5").exists() and not (small / "ds" / "rejects.csv").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_memory_is_checked_before_prepare_reads(tmp_path, monkeypatch):
    import stellarparams.outputs as outputs

    spectra, cat = good_set(tmp_path, n=4)
    monkeypatch.setattr(outputs, "available_memory", lambda: 50e6)  # a machine with 50 MB to spare
    big = preprocess.PrepareConfig(grid=Grid(n_pix=100_000))
    with pytest.raises(ValueError, match=r"needs about .* of memory.*lower --workers or the grid"):
        prep.prepare(cat, spectra, tmp_path / "ds", workers=2, progress=False, config=big)
    assert not (tmp_path / "ds" / ".partial").exists()  # refused before the first chunk
    assert prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False)["kept"] == 4  # 4000 px fit


# ---------------------------------------------------------------------------------------------- labels

def test_impossible_labels_are_bad_label_rejects(tmp_path):
    from stellarparams.config import LABEL_LIMITS

    spectra, cat = good_set(tmp_path, n=6)
    cat.loc[1, "TEFF_ADOP"] = 1e6
    cat.loc[2, "LOGG_ADOP"] = -50.0
    cat.loc[3, "FEH_ADOP"] = -9999.0  # missing, not impossible
    s = prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False)
    assert s["kept"] == 4 and s["rejected_by_reason"] == {"bad_label": 2}
    rej = pd.read_csv(tmp_path / "ds" / "rejects.csv")
    assert "TEFF_ADOP = 1e+06 is outside the physical limits 2000 to 60000" in rej.detail.iloc[0]
    with Dataset(tmp_path / "ds") as ds:
        labels = ds.labels()
    for j, name in enumerate(["teff", "feh", "logg"]):
        lo, hi = LABEL_LIMITS[name]
        assert np.nanmin(labels[:, j]) >= lo and np.nanmax(labels[:, j]) <= hi


def test_predict_catalog_ignores_impossible_labels_and_keeps_the_first_duplicate(tmp_path, capsys):
    from stellarparams.predict import collect_inputs

    _, d, files = _predict_setup(tmp_path, n=3)
    cat = pd.DataFrame({"FILE": [f.name for f in files] + [files[0].name], "RV_ADOP": [10.0, 20.0, 30.0, 99.0],
                        "TEFF_ADOP": [5000.0, 1e6, 5000.0, 5000.0]})
    items = {Path(f).name: rv for f, rv, _ in collect_inputs([d], cat)}
    err = capsys.readouterr().err
    assert items[files[0].name] == 10.0  # the first of two rows, as prepare keeps it
    assert np.isnan(items[files[1].name]) and items[files[2].name] == 30.0  # 1e6 K: its RV is not used
    assert "1 duplicate rows" in err and "outside the physical limits" in err


# ---------------------------------------------------------------------------------------------- options and configs

def test_train_refuses_zero_epochs_before_writing(tmp_path):
    from stellarparams.config import recipe
    from stellarparams.train import train

    with pytest.raises(ValueError, match="at least 1 epoch"):
        train(tmp_path / "no-dataset", tmp_path / "model", train_config=recipe("paper", epochs=0))
    assert not (tmp_path / "model").exists()


def test_command_line_recipe_beats_the_config_files(tmp_path):
    from stellarparams.config import load_config

    (tmp_path / "c.toml").write_text('[train]\nrecipe = "default"\nseed = 3\n')
    assert load_config(tmp_path / "c.toml", "paper")[1].recipe == "paper"  # the command line wins ...
    assert load_config(tmp_path / "c.toml", "paper")[1].ema == 0.0 and load_config(tmp_path / "c.toml", "paper")[1].seed == 3
    assert load_config(tmp_path / "c.toml")[1].recipe == "default"  # ... and without it, the file's
    (tmp_path / "d.toml").write_text('[train]\nseed = 3\n')
    assert load_config(tmp_path / "d.toml", None, "default")[1].recipe == "default"


def test_unreadable_spectra_folder_is_named(tmp_path, monkeypatch, capsys):
    spectra, cat = good_set(tmp_path, n=2)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    real = os.scandir

    def scandir(path="."):  # what a folder without read permission does (root ignores chmod)
        if Path(path) == spectra:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rc = cli.main(["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--out",
                   str(tmp_path / "ds"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{spectra}: cannot read this folder (permission denied)" in err and "no spectrum" not in err


# ---------------------------------------------------------------------------------------------- model

def test_model_predict_one_bad_record_and_an_empty_list(tmp_path):

    m = tiny_model()
    good = [sdss.read_spectrum(write_spectrum(tmp_path / f"spec-1000-52000-000{i}.fits", i)) for i in (1, 2)]
    bad = sdss.read_spectrum(write_spectrum(tmp_path / "spec-1000-52000-0003.fits", 3, ivar=np.zeros(3800)))
    with pytest.warns(UserWarning, match="spectrum 1 .*labels are NaN"):
        pred = m.predict([good[0], bad, good[1]])
    assert pred.shape == (3, 3) and np.isnan(pred[1]).all() and np.isfinite(pred[[0, 2]]).all()
    np.testing.assert_allclose(pred[[0, 2]], m.predict(good), rtol=1e-6)  # the others are unaffected
    assert m.predict([]).shape == (0, 3) and m.predict(np.zeros((0, 64), np.float32)).shape == (0, 3)


def test_report_names_the_model_folder(tmp_path):

    from stellarparams.evaluate import evaluate
    from stellarparams.model_io import save_model

    spectra, cat = good_set(tmp_path, n=12)
    prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False, fractions=(0.4, 0.2, 0.4),
                 config=preprocess.PrepareConfig(grid=Grid(n_pix=64)))
    m = tiny_model()
    m.prepare_config = preprocess.PrepareConfig(grid=Grid(n_pix=64)).to_dict()
    m.grid = Grid(n_pix=64).to_dict()
    save_model(m, tmp_path / "model")  # as `run` does: the model object, saved, is evaluated
    evaluate(m, tmp_path / "ds", tmp_path / "report", progress=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"model: `{tmp_path / 'model'}` (sha256 " in text and "sha256 None" not in text


# ---------------------------------------------------------------------------------------------- Dask

def test_local_dask_cluster_listens_on_127_0_0_1_only():
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("distributed")
    from stellarparams import engine

    with engine.connect("local:1") as client:
        pids = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
        listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
        dashboard = client.dashboard_link
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    assert "127.0.0.1" in dashboard


def test_dask_scheduler_without_workers_times_out_with_a_message(monkeypatch):
    distributed = pytest.importorskip("distributed")
    from stellarparams import engine

    monkeypatch.setattr(engine, "WORKER_TIMEOUT", 1.0)
    with distributed.LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as cluster:
        t0 = time.monotonic()
        with pytest.raises(engine.DaskError, match="no worker joined it within 1 s; start workers"):
            with engine.connect(cluster.scheduler_address):
                pass
        assert time.monotonic() - t0 < 15


# ---------------------------------------------------------------------------------------------- signals

SIGNAL_SCRIPT = """
import sys, time
from pathlib import Path
import stellarparams.{module} as m
def stuck(*a):
    Path(sys.argv[1], str(__import__("os").getpid())).write_text("")
    time.sleep(600)
m.{func} = stuck
{patch}
from stellarparams.cli import main
sys.exit(main({argv!r}))
"""


ONE_PER_CHUNK = "real = m.{func}\nm.{func} = lambda *a, **k: real(*a, **{{**k, 'chunk_size': 1}})"


def _signal_command(command, tmp_path):
    spectra, cat = good_set(tmp_path, n=4)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    if command == "prepare":
        return dict(module="prepare", func="_run_chunk", patch=ONE_PER_CHUNK.format(func="prepare"), argv=[
            "prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--out",
            str(tmp_path / "ds"), "--workers", "2", "--no-progress"])
    if command == "predict":
        from stellarparams.model_io import save_model

        save_model(tiny_model(), tmp_path / "model")
        return dict(module="predict", func="_read_chunk", patch=ONE_PER_CHUNK.format(func="predict"), argv=[
            "predict", str(tmp_path / "model"), str(spectra), "--out", str(tmp_path / "r.csv"), "--workers", "2",
            "--quiet"])
    return dict(module="simulate", func="_run_chunk", argv=[  # the MILES library is not needed to be stuck
        "simulate", "--out", str(tmp_path / "sim"), "--n", "8", "--workers", "2", "--no-progress"],
        patch="m._init_worker = lambda *a: None\nm.miles_labels = lambda r: [0] * 10")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
@pytest.mark.parametrize("command", ["prepare", "predict", "simulate"])
def test_no_worker_outlives_its_parent(tmp_path, command, sig):
    pids = tmp_path / "pids"
    pids.mkdir()
    code = SIGNAL_SCRIPT.format(**_signal_command(command, tmp_path))
    proc = subprocess.Popen([PY, "-c", code, str(pids)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and set(workers) <= set(_children(proc.pid))
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(10)  # the parent stops within seconds (it used to wait for the running chunks)
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers))
        err = proc.stderr.read().decode()
        if sig != signal.SIGKILL:
            assert rc == 130 and err.strip() and "Traceback" not in err, err  # one line on what was kept
    finally:
        proc.kill()
        for w in [int(p.name) for p in pids.iterdir()]:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
