"""The Dask engine (``--dask``): the same output as the process pool, a worker killed mid-chunk,
resume and re-run, an address that does not answer. One LocalCluster of 2 worker processes on
127.0.0.1 serves the module (``tcp://`` address, as a remote scheduler would be used)."""
import os
import signal
import socket
import time

import distributed
import numpy as np
import pandas as pd
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

import stellarparams.prepare as prep
from stellarparams import cli, engine
from stellarparams.predict import predict
from test_predict import tiny_model, write_star as write_predict_star
from test_prepare import _dataset_arrays, content_sha256, good_set


@pytest.fixture(scope="module")
def cluster():
    """A client of a 2-worker LocalCluster (processes, one thread each), stopped after the module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", memory_limit=0) as c, distributed.Client(c) as client:
        yield client


def _kill_one_worker(client, marker, prefix):
    """Register a worker plugin that kills its own worker process (SIGKILL) when a task named
    ``prefix...`` starts, once per cluster: the first worker to create ``marker`` dies, after
    writing its PID there. Returns the plugin's name."""

    class KillOnce(WorkerPlugin):  # defined here: pickled by value, so workers need not import this module
        def transition(self, key, start, finish, **kwargs):
            if finish != "executing" or not str(key).startswith(prefix):
                return
            try:
                fd = os.open(str(marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    name = f"kill-once-{prefix}"
    client.register_plugin(KillOnce(), name=name)
    return name


def _with_rejects(tmp_path):
    """good_set plus a file that is not FITS and a catalog row without a file."""
    spectra, cat = good_set(tmp_path, n=12, star_ids=True)
    (spectra / "spec-0500-55000-0099.fits").write_text("not a FITS file")
    extra = [dict(cat.iloc[0], FIBERID=99), dict(cat.iloc[0], FIBERID=98)]
    pd.concat([cat, pd.DataFrame(extra)], ignore_index=True).to_csv(tmp_path / "cat.csv", index=False)
    return spectra, tmp_path / "cat.csv"


def _same_dataset(a, b):
    got, ref = _dataset_arrays(a), _dataset_arrays(b)
    for x, y in zip(got[:4], ref[:4]):
        np.testing.assert_array_equal(x, y)
    pd.testing.assert_frame_equal(got[4], ref[4])
    assert (a / "rejects.csv").read_bytes() == (b / "rejects.csv").read_bytes()


def _chunk_tasks(stream, prefix="_run_chunk"):
    return [t for t in stream.data if str(t["key"]).startswith(prefix)]


def test_prepare_on_dask_equals_the_pool(tmp_path, cluster):
    spectra, cat = _with_rejects(tmp_path)
    prep.prepare(cat, spectra, tmp_path / "pool", workers=2, chunk_size=3, progress=False)
    with distributed.get_task_stream(client=cluster) as ts:
        rc = cli.main(["prepare", "--catalog", str(cat), "--spectra", str(spectra), "--out", str(tmp_path / "dask"),
                       "--dask", cluster.scheduler.address, "--no-progress"])
    assert rc == 0
    _same_dataset(tmp_path / "dask", tmp_path / "pool")
    rej = pd.read_csv(tmp_path / "dask" / "rejects.csv")
    assert sorted(rej.reason) == ["no_file", "unreadable"]  # from the client and from a worker
    assert len(_chunk_tasks(ts)) == 1  # the 13 files in one chunk of the default 256, on the cluster


def test_a_worker_killed_mid_chunk_costs_only_a_retry(tmp_path, cluster):
    spectra, cat = _with_rejects(tmp_path)
    prep.prepare(cat, spectra, tmp_path / "pool", workers=1, chunk_size=2, progress=False)
    marker = tmp_path / "killed"
    name = _kill_one_worker(cluster, marker, "_run_chunk")
    try:
        s = prep.prepare(cat, spectra, tmp_path / "dask", chunk_size=2, progress=False, dask=cluster)
    finally:
        cluster.unregister_worker_plugin(name)
    killed = int(marker.read_text())
    assert killed not in cluster.run(os.getpid).values()  # that worker is gone (its nanny started a new one)
    assert s["kept"] == 12 and s["rejected"] == 2
    _same_dataset(tmp_path / "dask", tmp_path / "pool")  # every row exactly once, in the same order
    assert not (tmp_path / "dask" / ".partial").exists()


def test_resume_and_rerun_on_dask_redo_no_finished_chunk(tmp_path, cluster, monkeypatch):
    spectra, cat = _with_rejects(tmp_path)
    out = tmp_path / "ds"
    real = prep._run_chunk

    def dies_on_third(k, *a):
        if k == 2:
            raise KeyboardInterrupt  # the first job (process pool, one worker) is killed in its third chunk
        return real(k, *a)

    monkeypatch.setattr(prep, "_run_chunk", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cat, spectra, out, workers=1, chunk_size=3, progress=False)
    monkeypatch.setattr(prep, "_run_chunk", real)
    assert len(list((out / ".partial").glob("chunk-*.npz"))) == 2

    with distributed.get_task_stream(client=cluster) as ts:
        s = prep.prepare(cat, spectra, out, chunk_size=3, progress=False, dask=cluster.scheduler.address)
    assert len(_chunk_tasks(ts)) == 3 and s["kept"] == 12  # chunks 2, 3, 4 only
    prep.prepare(cat, spectra, tmp_path / "pool", workers=1, chunk_size=3, progress=False)
    _same_dataset(out, tmp_path / "pool")

    mtime = os.stat(out / "dataset.h5").st_mtime_ns
    with distributed.get_task_stream(client=cluster) as ts:
        s2 = prep.prepare(cat, spectra, out, chunk_size=3, progress=False, dask=cluster.scheduler.address)
    assert s2["up_to_date"] and ts.data == [] and os.stat(out / "dataset.h5").st_mtime_ns == mtime


def _predict_inputs(tmp_path):
    d = tmp_path / "spectra"
    for i in range(1, 10):
        write_predict_star(d / f"spec-1000-52000-{i:04d}.fits", i)
    (d / "spec-1000-52000-0101.fits").write_text("not a FITS file")
    return [d, tmp_path / "spec-1000-52000-0102.fits"]  # a folder and a file that does not exist


def test_predict_on_dask_equals_the_pool_even_when_a_worker_dies(tmp_path, cluster):
    inputs, m = _predict_inputs(tmp_path), tiny_model()
    ref = predict(m, inputs, tmp_path / "pool.parquet", workers=2, chunk_size=2, part_chunks=2, progress=False)
    got = predict(m, inputs, tmp_path / "dask.parquet", chunk_size=2, part_chunks=2, progress=False,
                  dask=cluster.scheduler.address)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "dask.parquet"), pd.read_parquet(tmp_path / "pool.parquet"))
    assert got["n_predicted"] == ref["n_predicted"] == 9 and got["n_rejected"] == 2

    name = _kill_one_worker(cluster, tmp_path / "killed", "_read_chunk")
    try:
        predict(m, inputs, tmp_path / "killed.parquet", chunk_size=2, part_chunks=2, progress=False, dask=cluster)
    finally:
        cluster.unregister_worker_plugin(name)
    assert (tmp_path / "killed").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "killed.parquet"),
                                  pd.read_parquet(tmp_path / "pool.parquet"))
    assert not (tmp_path / ".killed.parquet.partial").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["prepare", "predict", "simulate", "run"])
def test_an_address_that_does_not_answer_is_a_clear_error_and_publishes_nothing(tmp_path, capsys, monkeypatch,
                                                                                command):
    monkeypatch.setattr(engine, "CONNECT_TIMEOUT", 1.0)
    address = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / ("out.csv" if command == "predict" else "out")
    args = {"prepare": ["--catalog", str(tmp_path / "cat.csv"), "--spectra", str(tmp_path), "--out", str(out)],
            "predict": [str(tmp_path / "model"), str(tmp_path), "--out", str(out)],
            "simulate": ["--out", str(out), "--n", "5"], "run": ["--out", str(out), "--n", "5"]}[command]
    t0 = time.monotonic()
    rc = cli.main([command, *args, "--dask", address])
    assert rc == 2 and time.monotonic() - t0 < 10  # bad input, for every command
    err = capsys.readouterr().err
    assert address in err and "local:N" in err and "within 1 s" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output folder, file or partial folder


def test_local_cluster_simulates_the_same_files(tmp_path):
    from stellarparams.simulate import simulate

    simulate(tmp_path / "pool", n=4, seed=3, workers=1, progress=False)
    rc = cli.main(["simulate", "--out", str(tmp_path / "dask"), "--n", "4", "--seed", "3", "--no-progress",
                   "--dask", "local:1"])
    assert rc == 0
    files = sorted(p.relative_to(tmp_path / "pool") for p in (tmp_path / "pool" / "spectra").rglob("*.fits"))
    assert len(files) == 4
    for f in files:
        assert (tmp_path / "dask" / f).read_bytes() == (tmp_path / "pool" / f).read_bytes()


def test_bad_local_address_and_missing_dask_are_clear_errors(monkeypatch):
    with pytest.raises(engine.DaskError, match="local:N needs a number of workers"):
        with engine.connect("local:0"):
            pass
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)  # as if Dask were not installed
    with pytest.raises(engine.DaskError, match=r"pip install 'stellarparams\[dask\]'"):
        with engine.connect("tcp://127.0.0.1:8786"):
            pass
    with engine.connect(None) as client:  # no --dask: no Dask at all
        assert client is None


def test_dask_and_both_readers_give_the_same_dataset_sha256(tmp_path, cluster):
    spectra, cat = _with_rejects(tmp_path)
    sums = set()
    for name, kw in [("fast", {}), ("fitsio", {"reader": "fitsio"}), ("dask", {"dask": cluster.scheduler.address})]:
        prep.prepare(cat, spectra, tmp_path / name, workers=1, progress=False, **kw)
        sums.add(content_sha256(tmp_path / name / "dataset.h5"))
    assert len(sums) == 1
