"""Files: the one atomic writer and the one advisory lock on an output folder.

- :func:`atomic_write` writes a temporary sibling with a name unique to this process and
  call (``tempfile``), fsyncs it, and renames it over the target (``os.replace``). A reader,
  a resumed job or a second writer never sees half a file; on failure the temp is removed.
- :func:`output_lock` holds ``FOLDER/.lock`` (``fcntl.flock``, released by the kernel when
  the holder dies, ``kill -9`` included) so that one output has one writer at a time.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from pathlib import Path

LOCK_NAME = ".lock"


def atomic_write(path, write, durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; return ``path``.

    Parameters
    ----------
    path : str or Path
        Final location. Its folder is created when missing.
    write : callable
        ``write(tmp: Path)`` writes the whole file to ``tmp`` (any library, any format).
        The temp name keeps ``path``'s suffixes so format-sniffing writers still work.
    durable : bool
        fsync the file before the rename (survives a power cut, not only a killed process).
        Writers of many small files that can be regenerated (simulated spectra) pass False:
        the rename stays atomic, and fsync would double their cost.

    Returns
    -------
    Path
        ``path``, now holding exactly what ``write`` wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.unlink()  # writers that refuse to overwrite (fitsio, h5py "w-") get a free name
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path, data: bytes) -> Path:
    """Write a binary file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


class OutputBusy(RuntimeError):
    """Another process holds the output folder's lock."""


@contextlib.contextmanager
def output_lock(folder, wait: bool = False, poll_s: float = 0.2):
    """Hold an advisory lock on ``folder`` (created when missing) for the ``with`` body.

    Parameters
    ----------
    folder : str or Path
        The output folder (a dataset, model, prediction or survey folder).
    wait : bool
        False: raise :class:`OutputBusy` at once, naming the folder and the holder's PID.
        True: wait until the holder finishes.

    Raises
    ------
    OutputBusy
        When another process holds the lock and ``wait`` is False.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not wait:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise OutputBusy(f"{folder}: another stellarparams process (PID {holder}) is writing here; "
                                     "wait for it to finish, choose another output, or pass --wait") from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing releases the flock
