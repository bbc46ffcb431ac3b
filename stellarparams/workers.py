"""Worker processes that die with their parent, whatever kills it (``kill -9`` included).

``prepare`` and ``predict`` read spectra in a :class:`~concurrent.futures.ProcessPoolExecutor`.
When the parent is killed outright, the pool's own clean-up never runs, and its workers
would stay alive (and hold ~140 MB each) until killed by hand. Each worker therefore asks
the Linux kernel, as it starts, to send it SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), and exits at once if the parent is already gone.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: SIGKILL this process when ``parent_pid`` dies (Linux).

    Parameters
    ----------
    parent_pid : int
        PID of the process that made the pool.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


def pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers die with this process (forked, so they start fast).

    Parameters
    ----------
    workers : int
        Number of worker processes.

    Returns
    -------
    ProcessPoolExecutor
    """
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                               initargs=(os.getpid(),))
