"""How a job runs, as one object: :class:`Run` (device, precision, progress, worker processes, Dask).

None of these settings changes what a job computes on one machine (the device only by
floating-point rounding): they say where and how it runs. They are made once, by a command
from its options (:meth:`Run.from_args`) or by a Python caller, and passed on as one object
instead of five parameters. Importing this module does not import torch; :meth:`Run.on_device`
does.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Run:
    """The settings of one run that are not part of its result.

    Attributes
    ----------
    progress : bool
        Progress bars and summaries on stderr.
    device : str, torch.device or None
        ``--device``: ``"auto"`` or None (CUDA when present, then MPS, else the CPU), ``"cpu"``,
        ``"cuda"``, ``"cuda:N"``, ``"mps"``, or a resolved ``torch.device`` (:meth:`on_device`).
    precision : str
        ``--precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only); autocast of training.
    workers : int or None
        Worker processes for per-file work (None: all CPUs).
    dask : str, dask.distributed.Client or None
        ``--dask``: run the chunks on a Dask cluster instead (``tcp://HOST:PORT``, ``local:N``).
    """

    progress: bool = True
    device: object = None
    precision: str = "fp32"
    workers: int | None = None
    dask: object = None

    @classmethod
    def from_args(cls, args) -> "Run":
        """The run settings of a command's parsed options (those it has: ``--quiet`` or ``--no-progress``,
        ``--device``, ``--precision``, ``--workers``, ``--dask``; the others keep their defaults).

        Parameters
        ----------
        args : argparse.Namespace

        Returns
        -------
        Run
        """
        quiet = getattr(args, "quiet", False) or getattr(args, "no_progress", False)
        return cls(progress=not quiet, device=getattr(args, "device", None),
                   precision=getattr(args, "precision", None) or "fp32", workers=getattr(args, "workers", None),
                   dask=getattr(args, "dask", None))

    def on_device(self) -> "Run":
        """This run with its device resolved to a ``torch.device`` and its precision checked against it.

        Raises
        ------
        ValueError
            An unknown or absent device, or a precision the device cannot run
            (:func:`stellarparams.devices.resolve_device`, :func:`~stellarparams.devices.check_precision`).
        """
        from .devices import check_precision, resolve_device

        device = resolve_device(self.device)
        return replace(self, device=device, precision=check_precision(device, self.precision))

    def cluster(self):
        """Context manager yielding the Dask client of ``dask`` while the block runs (None without Dask):
        :func:`stellarparams.engine.connect`, which says where the work goes when the run shows progress.

        Raises
        ------
        stellarparams.engine.DaskError
            Dask is missing, or no scheduler or worker answers at ``dask``.
        """
        from .engine import connect

        return connect(self.dask, self.progress)

    def quiet(self) -> "Run":
        """This run without progress output (for the inner jobs of a job that reports its own progress)."""
        return replace(self, progress=False)

    def say(self, msg: str, file=None) -> None:
        """Print ``msg`` (to stderr unless ``file`` is given) when the run shows progress."""
        if self.progress:
            print(msg, file=sys.stderr if file is None else file)
