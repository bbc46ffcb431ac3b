"""files.atomic_write and files.output_lock across processes."""
import multiprocessing as mp
import os
import threading
import time

import pytest

from stellarparams import files

SIZE = 1 << 20  # 1 MB
N_WRITES = 200


def _writer(path, value, n, start):
    data = bytes([value]) * SIZE
    start.wait()
    for _ in range(n):
        files.atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=False)


def _hold_lock(folder, locked, release):
    with files.output_lock(folder):
        locked.set()
        release.wait(10)


def _ctx():
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def test_two_processes_writing_one_file_leave_one_whole_file(tmp_path):
    ctx = _ctx()
    path = tmp_path / "out.bin"
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(path, v, N_WRITES, start)) for v in (1, 2)]
    for p in procs:
        p.start()
    start.set()
    # a reader during the race only ever sees a whole file from one writer
    seen = set()
    while any(p.is_alive() for p in procs):
        if path.exists():
            data = path.read_bytes()
            assert len(data) == SIZE
            assert data.count(data[0]) == SIZE
            seen.add(data[0])
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    data = path.read_bytes()
    assert len(data) == SIZE and data[0] in (1, 2) and data.count(data[0]) == SIZE
    assert os.listdir(tmp_path) == ["out.bin"]  # no temp file left


def test_failing_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    files.write_text(path, "old")

    def bad(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(path, bad)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_output_lock_refuses_second_holder_and_wait_waits(tmp_path):
    ctx = _ctx()
    folder = tmp_path / "out"
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(folder, locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        with pytest.raises(files.OutputBusy, match=f"PID {holder.pid}"):
            with files.output_lock(folder):
                pass
        release_at = time.monotonic() + 0.5
        threading.Timer(0.5, release.set).start()
        with files.output_lock(folder, wait=True, poll_s=0.05):
            assert time.monotonic() >= release_at - 0.05  # got it only after the holder let go
            assert (folder / files.LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        release.set()
        holder.join(10)
    assert holder.exitcode == 0
