"""Files: the one atomic writer and the one advisory lock on an output folder.

- :func:`atomic_write` writes a temporary sibling with a name unique to this process and
  call (``tempfile``), fsyncs it, and renames it over the target (``os.replace``). A reader,
  a resumed job or a second writer never sees half a file; on failure the temp is removed.
- :func:`output_lock` holds ``FOLDER/.lock`` (``fcntl.flock``, released by the kernel when
  the holder dies, ``kill -9`` included) so that one output has one writer at a time.
- :func:`disk_error` turns a failed write (full disk, quota, read-only file system) into one
  ``OSError`` that names the path, whatever library raised it (h5py gives no errno).
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        err = disk_error(e, path)
        if err is None or err is e:
            raise
        raise err from e
    return path


# errno -> what the user is told; these are faults of the place written to, not of the program
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EFBIG: "file too large for the file system"}
_DISK_TEXT = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
              "read-only file system": errno.EROFS}


def disk_error(e: BaseException, path) -> OSError | None:
    """A failed write as ``OSError(errno, text, path)`` when the disk is to blame, else None.

    Parameters
    ----------
    e : BaseException
        What the writer raised (``OSError`` from Python, h5py's ``OSError`` or ``RuntimeError``
        without errno whose message holds the C library's text, safetensors' error, fitsio's
        ``OSError``).
    path : str or Path
        The file being written (named in the message when ``e`` names none).

    Returns
    -------
    OSError or None
        With ``errno`` one of :data:`DISK_ERRNOS` and ``filename`` set; None for any other error.
    """
    if not isinstance(e, Exception):
        return None
    errno_ = getattr(e, "errno", None) if isinstance(e, OSError) else None
    code = errno_ if errno_ in DISK_ERRNOS else next(
        (c for text, c in _DISK_TEXT.items() if text in str(e).lower()), None)
    if code is None:
        return None
    if errno_ == code and e.filename:
        return e
    return OSError(code, DISK_ERRNOS[code], str(path))


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


def check_readable(folder) -> None:
    """Raise ``PermissionError`` naming ``folder`` when its entries cannot be listed (a folder that
    cannot be read would otherwise look empty: "no spectrum files found").

    Parameters
    ----------
    folder : str or Path
        An existing folder.
    """
    try:
        with os.scandir(folder):
            pass
    except PermissionError as e:
        raise PermissionError(e.errno, "cannot read this folder (permission denied); check its permissions",
                              str(folder)) from None


class OutputBusy(RuntimeError):
    """Another process holds the output folder's lock."""


@contextlib.contextmanager
def output_lock(folder, wait: bool = False, poll_s: float = 0.2, remove: bool = False):
    """Hold an advisory lock on ``folder`` (created when missing) for the ``with`` body.

    Parameters
    ----------
    folder : str or Path
        The output folder (a dataset, model, prediction or survey folder).
    wait : bool
        False: raise :class:`OutputBusy` at once, naming the folder and the holder's PID.
        True: wait until the holder finishes.
    remove : bool
        On leaving, delete the lock file (and ``folder`` when then empty) before releasing
        it: for a scratch folder that should not outlive the job. A process that was
        waiting notices that the file it locked is gone and locks the new one.

    Raises
    ------
    OutputBusy
        When another process holds the lock and ``wait`` is False.
    """
    folder = Path(folder)
    lock = folder / LOCK_NAME
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        if _take(fd, folder, wait, poll_s) and _same_file(fd, lock):
            break
        os.close(fd)  # the holder removed the file we locked (remove=True): lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        if remove:
            with contextlib.suppress(OSError):
                lock.unlink()
                folder.rmdir()  # only when empty: the parts of an interrupted job stay for a re-run
        os.close(fd)  # closing releases the flock


def _take(fd: int, folder: Path, wait: bool, poll_s: float) -> bool:
    """flock ``fd``; raise OutputBusy when held and not ``wait``."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if not wait:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputBusy(f"{folder}: another stellarparams process (PID {holder}) is writing here; "
                                 "wait for it to finish, choose another output, or pass --wait") from None
            time.sleep(poll_s)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
