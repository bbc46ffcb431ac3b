"""Output locations and resources: checked before the work starts, and locked while written."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shutil
from pathlib import Path

from .files import output_lock

GB = 1e9
DISK_MARGIN = 1.1    # ask for 10 % more free space than the estimate
MEMORY_SHARE = 0.8   # use at most this share of the memory available when the job starts


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
def locked_output(folder, wait: bool, remove: bool = False):
    """Hold :func:`files.output_lock` on ``folder`` after :func:`check_output_folder`.

    Parameters
    ----------
    folder : str or Path
    wait : bool
        Wait for another holder (True) or raise :class:`files.OutputBusy` (False).
    remove : bool
        A scratch folder: remove the lock file, and the folder when then empty, on leaving.

    Returns
    -------
    context manager yielding the folder as a Path; a folder where the lock file cannot be
    created is a ValueError.
    """
    folder = check_output_folder(folder)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(folder, wait=wait, remove=remove))
        except OSError as e:  # permission denied, read-only file system, full disk
            raise ValueError(f"{folder}: cannot write in the output folder ({e.strerror or e})") from None
        yield folder


def holds_lock(arg: str):
    """Decorator: the function runs holding :func:`locked_output` on its argument ``arg`` (a folder),
    and takes one more keyword, ``wait`` (False: a busy folder raises :class:`files.OutputBusy`).

    Parameters
    ----------
    arg : str
        Name of the function's output-folder parameter.
    """
    def decorate(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, wait: bool = False, **kwargs):
            with locked_output(sig.bind_partial(*args, **kwargs).arguments[arg], wait):
                return fn(*args, **kwargs)
        return locked
    return decorate


def check_disk(folder, need_bytes: float, what: str) -> None:
    """Refuse to start when ``folder``'s file system has less free space than ``need_bytes``.

    Parameters
    ----------
    folder : str or Path
        The output folder (or any existing folder on the same file system).
    need_bytes : float
        Estimated size of what the job writes there (bytes); :data:`DISK_MARGIN` is added.
    what : str
        What is written, for the message (e.g. "the dataset of 1,000 spectra x 4,000 pixels").

    Raises
    ------
    ValueError
        One line: the estimate, the free space, and what to change.
    """
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need_bytes * DISK_MARGIN > free:
        raise ValueError(f"{folder}: {what} needs about {_size(need_bytes)}, but only {_size(free)} are free "
                         "there; free some space or choose another output folder")


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def available_memory() -> int:
    """Bytes of memory the kernel can give a new job (``MemAvailable`` of /proc/meminfo; elsewhere
    the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(need_bytes: float, what: str, change: str) -> None:
    """Refuse to start a job whose estimated peak memory exceeds what this machine has free.

    Parameters
    ----------
    need_bytes : float
        Estimated peak (bytes), e.g. pixels x spectra per batch x workers x bytes per value.
    what : str
        What takes the memory, for the message.
    change : str
        What the user can lower, for the message (e.g. "--grid N, --workers or --batch-size").

    Raises
    ------
    ValueError
        One line: the estimate, the memory available, and what to change.
    """
    have = available_memory() * MEMORY_SHARE
    if need_bytes > have:
        raise ValueError(f"{what} needs about {_size(need_bytes)} of memory, but this machine has "
                         f"{_size(have)} to spare; lower {change}")
