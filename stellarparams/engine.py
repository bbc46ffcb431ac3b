"""Where the per-file work of ``prepare``, ``predict`` and ``simulate`` runs when it leaves this machine.

Without ``--dask`` those stages use :func:`stellarparams.workers.pool` (a process pool on this
machine; Dask is not needed). With ``--dask ADDRESS`` their chunks go to a Dask cluster
(``dask.distributed``; Dask is imported only then):

- ``tcp://HOST:PORT`` (or any address ``distributed.Client`` takes): the scheduler of a
  running cluster (``dask scheduler`` + ``dask worker``, or ``dask-jobqueue`` on Slurm/PBS);
- ``local:N``: a ``LocalCluster`` of N worker processes (one thread each), started for the
  job and stopped after it. Everything it opens (scheduler, workers, nannies, dashboard)
  listens on 127.0.0.1 only: nothing of a user's job is reachable from the network.

A scheduler that has no worker after :data:`WORKER_TIMEOUT` seconds is an error that says so
(instead of a job that waits for ever).

Chunks are submitted with ``pure=False`` and :data:`RETRIES` retries, at most about
:data:`IN_FLIGHT` per worker thread at a time (the scheduler never holds the whole job). A
worker that dies mid-chunk loses only that chunk: the scheduler runs it again elsewhere. The
workers write their shards (prepare) or spectra (simulate) themselves, so they must see the
inputs and the output folder at the same paths as this process: a shared or network file
system. Paths sent to them are made absolute here.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from itertools import islice

CONNECT_TIMEOUT = 10.0  # seconds to wait for a scheduler to answer
WORKER_TIMEOUT = 60.0   # seconds to wait for the first worker to join the scheduler
LOCALHOST = "127.0.0.1"
RETRIES = 2             # re-runs of a chunk that raised (a lost worker is rescheduled on top of these)
IN_FLIGHT = 2           # chunks submitted per worker thread (the rest wait in this process)
INSTALL_HINT = "pip install 'stellarparams[dask]'"
ADDRESS_HELP = ("run the per-file work on a Dask cluster: tcp://HOST:PORT of a running scheduler, or local:N to "
                "start N worker processes on this machine. The workers must see the input files and the output "
                "folder at the same paths (a shared or network file system). Default: a process pool on this "
                "machine (no Dask needed)")


class DaskError(ValueError):
    """A ``--dask`` address that is malformed, does not answer, or Dask is not installed."""


def add_argument(p) -> None:
    """Add ``--dask ADDRESS`` to an argparse parser.

    Parameters
    ----------
    p : argparse.ArgumentParser
    """
    p.add_argument("--dask", default=None, metavar="ADDRESS", help=ADDRESS_HELP)


def local_workers(address: str) -> int | None:
    """N of ``local:N``; None for a scheduler address.

    Parameters
    ----------
    address : str

    Returns
    -------
    int or None

    Raises
    ------
    DaskError
        ``local:`` without a positive integer.
    """
    if not address.startswith("local:"):
        return None
    n = address[len("local:"):]
    if not n.isdigit() or int(n) < 1:
        raise DaskError(f"--dask {address}: local:N needs a number of workers N >= 1, e.g. local:4")
    return int(n)


def _import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise DaskError(f"--dask needs Dask, which is not installed ({e}); install it with {INSTALL_HINT}, "
                        "or leave out --dask to use this machine's process pool") from None
    return distributed


@contextlib.contextmanager
def connect(address, progress: bool = False):
    """A ``distributed.Client`` for ``address`` while the block runs; None when ``address`` is None.

    Parameters
    ----------
    address : str, distributed.Client or None
        ``tcp://HOST:PORT``, ``local:N``, an existing client (used as it is, not closed), or
        None (no Dask: yields None).
    progress : bool
        Say on stderr where the work goes.

    Yields
    ------
    distributed.Client or None

    Raises
    ------
    DaskError
        Dask is not installed, ``local:N`` is malformed, no scheduler answers at ``address``
        within :data:`CONNECT_TIMEOUT` seconds, or no worker joins it within
        :data:`WORKER_TIMEOUT` seconds.
    """
    if address is None or hasattr(address, "submit"):
        yield address
        return
    address = str(address).strip()
    n_local = local_workers(address)
    distributed = _import_distributed()
    with contextlib.ExitStack() as stack:
        if n_local:
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=n_local, threads_per_worker=1, processes=True, host=LOCALHOST,
                dashboard_address=f"{LOCALHOST}:0",  # any free port: a second job or a notebook may hold 8787
                worker_dashboard_address=f"{LOCALHOST}:0"))
            client = stack.enter_context(distributed.Client(cluster))
        else:
            try:
                client = distributed.Client(address, timeout=f"{CONNECT_TIMEOUT:g}s")
            except (OSError, TimeoutError, ValueError, TypeError) as e:
                raise DaskError(f"--dask {address}: no Dask scheduler answered within {CONNECT_TIMEOUT:g} s ({e}). "
                                "Start one there (`dask scheduler`, then `dask worker ADDRESS` on each machine), "
                                "or use --dask local:N to start N workers on this machine") from None
            stack.enter_context(client)
            wait_for_workers(client, address)
        if progress:
            print(f"dask: {client.scheduler.address}, {threads(client)} worker threads", file=sys.stderr, flush=True)
        yield client


def wait_for_workers(client, address, timeout: float | None = None) -> None:
    """Return once the scheduler has a worker; raise :class:`DaskError` after ``timeout`` seconds.

    Parameters
    ----------
    client : distributed.Client
    address : str
        For the message.
    timeout : float, optional
        Seconds (default :data:`WORKER_TIMEOUT`).
    """
    timeout = WORKER_TIMEOUT if timeout is None else timeout
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise DaskError(f"--dask {address}: the scheduler answers but no worker joined it within {timeout:g} s; "
                        f"start workers with `dask worker {address}` (they must see the input and output folders), "
                        "or use --dask local:N") from None


def threads(client) -> int:
    """Worker threads the cluster has now (0 while no worker has joined).

    Parameters
    ----------
    client : distributed.Client

    Returns
    -------
    int
    """
    return int(sum(client.nthreads().values()))


def absolute(path):
    """``path`` as an absolute path string (workers may run in another folder); "" and None stay.

    Parameters
    ----------
    path : str, Path or None

    Returns
    -------
    str or None
    """
    return os.path.abspath(path) if path else path


class _Limit:
    """How many chunks to keep submitted: IN_FLIGHT per worker thread, re-counted at most once a second
    (workers of an adaptive or job-queue cluster come and go)."""

    def __init__(self, client):
        self.client, self.at, self.n = client, 0.0, 1

    def __call__(self) -> int:
        if time.monotonic() - self.at > 1.0:
            self.at, self.n = time.monotonic(), max(1, IN_FLIGHT * threads(self.client))
        return self.n


def _submit(client, fn, args):
    return client.submit(fn, *args, pure=False, retries=RETRIES)


def map_unordered(client, fn, calls):
    """Yield ``fn(*args)`` for each ``args`` in ``calls`` as the chunks finish, on the cluster.

    Parameters
    ----------
    client : distributed.Client
    fn : callable
        An importable module-level function (workers import it by name).
    calls : iterable of tuple
        The arguments of each call.

    Yields
    ------
    object
        Each call's result, in finishing order. Leaving early (an error, Ctrl-C) cancels the
        chunks still queued or running.
    """
    from distributed import as_completed

    calls, limit = iter(calls), _Limit(client)
    running = as_completed([_submit(client, fn, a) for a in islice(calls, limit())])
    try:
        for fut in running:
            while running.count() < limit() and (args := next(calls, None)) is not None:
                running.add(_submit(client, fn, args))
            yield fut.result()
    finally:
        client.cancel(list(running.futures))


def map_ordered(client, fn, calls):
    """Yield ``fn(*args)`` for each ``args`` in ``calls``, in the order of ``calls``, on the cluster.

    Parameters
    ----------
    client : distributed.Client
    fn : callable
        An importable module-level function.
    calls : iterable of tuple

    Yields
    ------
    object
        Each call's result, in input order; later chunks run meanwhile. Leaving early cancels
        the chunks still queued or running.
    """
    from collections import deque

    pending, limit = deque(), _Limit(client)
    try:
        for args in calls:
            pending.append(_submit(client, fn, args))
            if len(pending) >= limit():
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        client.cancel(list(pending))
