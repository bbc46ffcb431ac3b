"""What the package writes about its outputs: one numpy-aware JSON encoder and file hashes (a leaf)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np


def jsonable(o):
    """``o`` with numpy scalars/arrays, dataclasses, tuples and paths turned into JSON types.

    Parameters
    ----------
    o : object
        Anything; containers are converted recursively.

    Returns
    -------
    object
        Built from dict, list, str, int, float, bool and None only. Non-finite floats become
        None (strict JSON); anything else unknown becomes its ``str``.
    """
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return jsonable(dataclasses.asdict(o))
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, Path):
        return str(o)
    if o is None or isinstance(o, (str, int)):
        return o
    return str(o)


def dumps(obj, indent: int | None = 1) -> str:
    """JSON text of ``jsonable(obj)``, ending in a newline.

    Parameters
    ----------
    obj : object
        What to write.
    indent : int or None
        As for :func:`json.dumps`.

    Returns
    -------
    str
    """
    return json.dumps(jsonable(obj), indent=indent) + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (read into one reused buffer: ``hashlib.file_digest``).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str
        64 hex digits.
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
