"""Output locations: checked before the work starts and locked while written."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .files import output_lock


def check_output_folder(folder) -> Path:
    """Make sure ``folder`` can be an output folder before any work starts.

    Parameters
    ----------
    folder : str or Path

    Returns
    -------
    Path
        The folder, created when missing.

    Raises
    ------
    ValueError
        It names an existing file, or cannot be created or written to.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; choose another output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: the output folder is not writable")
    return folder


@contextlib.contextmanager
def locked_output(folder, wait: bool):
    """Hold :func:`files.output_lock` on ``folder`` after :func:`check_output_folder`.

    Parameters
    ----------
    folder : str or Path
    wait : bool
        Wait for another holder (True) or raise :class:`files.OutputBusy` (False).

    Returns
    -------
    context manager yielding the folder as a Path; a folder where the lock file cannot be
    created is a ValueError.
    """
    folder = check_output_folder(folder)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(folder, wait=wait))
        except PermissionError as e:
            raise ValueError(f"{folder}: cannot write in the output folder ({e.strerror})") from None
        yield folder
