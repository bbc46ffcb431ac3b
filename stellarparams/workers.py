"""Worker processes that die with their parent, whatever stops it (Ctrl-C, SIGTERM, ``kill -9``).

``prepare``, ``predict`` and ``simulate`` run their per-file work in a
:class:`~concurrent.futures.ProcessPoolExecutor`. Three things keep its workers from outliving
the job:

- each worker asks the Linux kernel, as it starts, to send it SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), and exits at once if the parent is already gone: this covers
  ``kill -9`` of the parent, where no clean-up of ours can run;
- each worker ignores SIGINT (Ctrl-C reaches the whole process group): the parent alone
  decides, and no worker prints a traceback of its own;
- leaving the pool's ``with`` block on an error or an interrupt kills the workers at once
  instead of waiting for their running chunks (``shutdown`` would wait), so Ctrl-C and
  SIGTERM (which ``stellarparams.cli`` turns into an interrupt) stop the job within a second.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, initializer=None, initargs=()) -> None:
    """Pool initializer: SIGKILL this process when ``parent_pid`` dies (Linux); ignore Ctrl-C.

    Parameters
    ----------
    parent_pid : int
        PID of the process that made the pool.
    initializer : callable, optional
        The caller's own initializer, run after.
    initargs : tuple
        Its arguments.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler (cli) is not for workers
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)


class Pool(ProcessPoolExecutor):
    """A process pool whose ``with`` block kills its workers when left by an exception."""

    def kill(self) -> None:
        """Drop the queued work and SIGKILL the workers now (their running chunks are lost)."""
        procs = list((self._processes or {}).values())  # private, but the only handle (3.14 adds kill_workers)
        self.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.kill()
        return super().__exit__(exc_type, exc, tb)


def pool(workers: int, initializer=None, initargs=()) -> Pool:
    """A process pool whose workers die with this process (forked, so they start fast).

    Parameters
    ----------
    workers : int
        Number of worker processes.
    initializer : callable, optional
        Run in each worker as it starts (after :func:`die_with_parent`'s requests).
    initargs : tuple
        Its arguments.

    Returns
    -------
    Pool
    """
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    return Pool(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                initargs=(os.getpid(), initializer, tuple(initargs)))
