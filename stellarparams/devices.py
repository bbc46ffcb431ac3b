"""Where tensors live: ``--device auto|cpu|cuda|cuda:N|mps`` and ``--precision fp32|bf16|fp16``.

A leaf module (imports only torch). Conventions used by the training loop, calibration and
prediction:

- The device is a run-time choice, never part of a config or a fingerprint: a model folder
  always holds CPU tensors, and :func:`stellarparams.model_io.load_model` maps them to the
  device asked for, so a model trained on a GPU predicts on a CPU and the reverse.
- ``auto`` is CUDA when present, then MPS, else the CPU.
- Random numbers are drawn on the CPU from the run's ``torch.Generator`` and moved to the
  device. The streams are then the same on every device: a run differs between devices only by
  floating-point rounding, and on the CPU a run is bit-identical to one from before devices
  existed. Drawing on the device would be a little faster but gives other numbers per device.
- Batches go to a CUDA device through pinned memory with ``non_blocking=True``.
"""
from __future__ import annotations

import contextlib
import re

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def available_devices() -> list[str]:
    """The devices this machine can run on, as ``--device`` spells them.

    Returns
    -------
    list of str
        ``"cpu"``, then ``"cuda:0"`` ... for each CUDA device, then ``"mps"`` when present.
    """
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device=None) -> torch.device:
    """The torch device a ``--device`` value names, checked against this machine.

    Parameters
    ----------
    device : str, torch.device or None
        ``"auto"`` (or None): CUDA when present, then MPS, else the CPU; ``"cpu"``, ``"cuda"``
        (the current CUDA device), ``"cuda:N"``, ``"mps"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        An unknown name, or a device this machine does not have (the message names the
        available ones).
    """
    name = "auto" if device is None else str(device).strip().lower()
    if not _PATTERN.fullmatch(name):
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N, mps "
                         f"(available here: {', '.join(available_devices())})")
    have = available_devices()
    if name == "auto":
        name = "cuda" if any(d.startswith("cuda") for d in have) else "mps" if "mps" in have else "cpu"
    if name == "cuda" and "cuda:0" in have:
        return torch.device("cuda", torch.cuda.current_device())
    if name not in have:
        raise ValueError(f"device {name!r} is not available on this machine; available: {', '.join(have)}")
    return torch.device(name)


def check_precision(device, precision: str = "fp32") -> str:
    """Refuse a ``--precision`` the device cannot run; return it.

    Parameters
    ----------
    device : torch.device or str
        The resolved device.
    precision : str
        ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (autocast; fp16 only on CUDA, with a
        gradient scaler in training).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        An unknown precision, or fp16 off CUDA.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device (this run is on {kind}); use fp32 or bf16")
    return precision


def autocast(device, precision: str = "fp32"):
    """Context manager: autocast to ``precision`` on ``device``; nothing at all for fp32.

    Parameters
    ----------
    device : torch.device or str
    precision : str
        As for :func:`check_precision` (which it calls).

    Returns
    -------
    context manager
    """
    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def to_device(t, device):
    """Move a CPU tensor (a batch) to ``device``: through pinned memory, non-blocking, for CUDA.

    Parameters
    ----------
    t : torch.Tensor or None
    device : torch.device

    Returns
    -------
    torch.Tensor or None
        ``t`` itself when it is already there (always on the CPU).
    """
    if t is None or t.device == torch.device(device):
        return t
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def module_device(net) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters).

    Parameters
    ----------
    net : torch.nn.Module

    Returns
    -------
    torch.device
    """
    p = next(iter(net.parameters()), None)
    return torch.device("cpu") if p is None else p.device


def add_arguments(p, precision: bool = True):
    """Add ``--device`` (default ``auto``) and, with ``precision``, ``--precision`` to a command's parser.

    Parameters
    ----------
    p : argparse.ArgumentParser
    precision : bool
        Also add ``--precision``.
    """
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, then MPS, else CPU), cpu, cuda, cuda:N or mps")
    if precision:
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="autocast of training on the device: fp32 (none), bf16, fp16 (CUDA only)")
