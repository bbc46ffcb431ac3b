"""Catalog rows matched to spectrum files by integer keys, with numpy's sort (or pyarrow's hash join).

Survey-agnostic: a survey gives its key as a tuple of integer columns (SDSS: PLATE, MJD,
FIBERID from the file name and the catalog), and :func:`first_match` finds, for each catalog
row, the first file with the same key. Keys live in numpy arrays, never in per-row Python
objects. A key that fits one int64 (SDSS's always do) is packed into one and looked up in the
files' sorted keys (``np.unique``, ``np.searchsorted``): ~30 bytes a row while matching, where
pyarrow's hash group-by and join took ~250 (measured, RSS); other keys go through pyarrow. A
catalog can be matched in chunks against one file table (:func:`file_table`).

:class:`FileIndex` holds the files found under a folder as one sorted array of relative
paths, not a list of Path objects.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _names(k: int) -> list:
    return [f"k{j}" for j in range(k)]


def _as_keys(keys) -> np.ndarray:
    """(n, k) int64 from an (n, k) or (n,) array."""
    keys = np.asarray(keys, np.int64)
    return keys.reshape(len(keys), 1) if keys.ndim == 1 else keys


def _pack(keys: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The keys of rows ``idx`` as one int64 each: the k columns side by side, 63 // k bits each (one column: itself)."""
    k = keys.shape[1]
    if k == 1:
        return keys[idx, 0]
    bits = 63 // k
    packed = np.zeros(len(idx), np.int64)
    for j in range(k):
        packed |= keys[idx, j] << (bits * (k - 1 - j))
    return packed


def _fits(keys: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(len(idx),) bool: every column of the row is in [0, 2**(63 // k)), so :func:`_pack` keeps it whole."""
    ok = np.ones(len(idx), bool)
    for j in range(keys.shape[1]):
        c = keys[idx, j]
        ok &= (c >= 0) & (c < 1 << (63 // keys.shape[1]))
    return ok


def pack(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray | None:
    """(n, 1) int64: each row's k key columns in one (:func:`_pack`; 0 where not ``valid``), or None when a
    valid row's key does not fit (:func:`_fits`). Packed keys match as the columns do, in a third of the memory."""
    keys = _as_keys(keys)
    if keys.shape[1] == 1:
        return keys
    idx = np.arange(len(keys)) if valid is None else np.flatnonzero(valid)
    if not _fits(keys, idx).all():
        return None
    out = np.zeros((len(keys), 1), np.int64)
    out[idx, 0] = _pack(keys, idx)
    return out


class SortedKeys:
    """The files' distinct keys, each packed into one int64 (:func:`_pack`), sorted, with the first file of each."""

    def __init__(self, key: np.ndarray, file: np.ndarray):
        self.key, self.file = key, file  # (u,) int64 each

    def __len__(self) -> int:
        return len(self.key)


def _packable(keys: np.ndarray, idx: np.ndarray) -> bool:
    return keys.shape[1] == 1 or bool(_fits(keys, idx).all())


def file_table(keys: np.ndarray, valid: np.ndarray | None = None):
    """The files' keys, each distinct key with the index of its first file.

    When every file's key fits one int64 (one key column, or each column in [0, 2**(63 // k)):
    SDSS's plate, mjd and fiber below 2**21), a :class:`SortedKeys` (numpy: ``np.unique``, then
    :func:`first_match` looks rows up with ``np.searchsorted``; ~30 bytes a key while matching,
    where pyarrow's hash group-by and join took ~250). Otherwise a pyarrow table of (key
    columns, ``file``) for a hash join.

    Parameters
    ----------
    keys : (m, k) integer array
        Each file's key.
    valid : (m,) bool, optional
        Files without a key (False) are left out.

    Returns
    -------
    SortedKeys or pyarrow.Table
    """
    keys = _as_keys(keys)
    idx = np.arange(len(keys)) if valid is None else np.flatnonzero(valid)
    if _packable(keys, idx):
        key, first = np.unique(_pack(keys, idx), return_index=True)  # first occurrence: the lowest file index
        return SortedKeys(key, idx[first])
    import pyarrow as pa

    names = _names(keys.shape[1])
    t = pa.table({**{n: keys[idx, j] for j, n in enumerate(names)}, "file": idx})
    return t.group_by(names, use_threads=False).aggregate([("file", "min")]).rename_columns(names + ["file"])


def first_match(keys: np.ndarray, files, valid: np.ndarray | None = None) -> np.ndarray:
    """For each row of ``keys``, the index of the first file with the same key; -1 when none.

    Parameters
    ----------
    keys : (n, k) integer array
        The catalog rows' keys (a chunk of the catalog is fine).
    files : from :func:`file_table`, or an (m, k) integer array of the files' keys
    valid : (n,) bool, optional
        Rows without a key (False: a NaN or text cell) match nothing.

    Returns
    -------
    (n,) int64
    """
    keys = _as_keys(keys)
    if isinstance(files, np.ndarray):
        files = file_table(files)
    idx = np.arange(len(keys)) if valid is None else np.flatnonzero(valid)
    out = np.full(len(keys), -1, np.int64)
    if isinstance(files, SortedKeys):
        if keys.shape[1] > 1:  # a row whose key does not fit matches no file (every file's key fits)
            idx = idx[_fits(keys, idx)]
        packed = _pack(keys, idx)
        pos = np.minimum(np.searchsorted(files.key, packed), max(len(files) - 1, 0))
        hit = files.key[pos] == packed if len(files) else np.zeros(len(idx), bool)
        out[idx[hit]] = files.file[pos[hit]]
        return out
    import pyarrow as pa

    names = _names(keys.shape[1])
    left = pa.table({**{n: keys[idx, j] for j, n in enumerate(names)}, "row": idx})
    joined = left.join(files, names, join_type="inner", use_threads=False)
    out[joined["row"].to_numpy()] = joined["file"].to_numpy()
    return out


def duplicates(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(n,) bool: the valid rows whose key an earlier valid row has (:func:`first_of_key` is not the row itself).

    One key column (:func:`pack` makes one): a stable sort, ~25 bytes a row; else :func:`first_of_key`.
    """
    keys = _as_keys(keys)
    if keys.shape[1] > 1:
        first = first_of_key(keys, valid)
        return (first >= 0) & (first != np.arange(len(keys)))
    idx = np.arange(len(keys)) if valid is None else np.flatnonzero(valid)
    order = idx[np.argsort(keys[idx, 0], kind="stable")]  # equal keys stay in row order: the first one first
    sorted_keys = keys[order, 0]
    dup = np.zeros(len(keys), bool)
    dup[order[1:]] = sorted_keys[1:] == sorted_keys[:-1]
    return dup


def first_of_key(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """For each row, the index of the first row with the same key (itself when it is the first); -1 without a key.

    Parameters
    ----------
    keys : (n, k) integer array
    valid : (n,) bool, optional

    Returns
    -------
    (n,) int64
    """
    return first_match(keys, file_table(keys, valid), valid)


def id_text(v) -> str:
    """A catalog identifier as text (an integer stored as float loses its '.0'); '' when missing."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def resolve_file(f, base):
    """A catalog's FILE cell -> Path (absolute, or relative to ``base``, the catalog's folder); None when empty."""
    if f is None or (isinstance(f, float) and np.isnan(f)) or str(f).strip() == "":
        return None
    p = Path(str(f).strip())
    return p if p.is_absolute() else base / p


class FileIndex:
    """The files found under one folder, held as one sorted array of relative paths (bytes).

    A sequence of :class:`~pathlib.Path` (``len``, ``index[j]``, iteration), each made only
    when asked: about as many bytes per file as its relative path is long (SDSS
    ``lite/PLATE/spec-PLATE-MJD-FIBER.fits``: 36), against ~300 for a ``Path`` object. The order
    is ``sorted(paths)``'s: the parts are joined with a byte below every character of a name.

    Parameters
    ----------
    root : str or Path
        The folder searched.
    rel : (m,) bytes array
        Each file's path relative to ``root``, its parts joined by ``SEP``, sorted.
    """

    SEP = b"\x01"  # joins the parts of a relative path: sorts below any character of a name, as Path's parts do

    def __init__(self, root, rel: np.ndarray):
        self.root, self.rel = Path(root), rel
        self._prefix = "" if str(self.root) == "." else os.path.join(str(self.root), "")  # str(root / name) = prefix + name

    @classmethod
    def scan(cls, root, wanted, block: int = 1 << 16) -> "FileIndex":
        """The files under ``root`` whose name ``wanted(name)`` keeps: recursively, as ``Path.rglob("*")``
        (symbolic links to folders are not followed; a folder that cannot be read is skipped).

        Names are gathered in blocks of ``block`` and kept as fixed-width bytes; no Path is made
        (``rglob`` keeps every path it yielded until it ends).
        """
        root = Path(root)
        blocks, names = [], []
        for rel, name in walk(root, cls.SEP):
            if wanted(name):
                names.append(rel)
                if len(names) == block:
                    blocks.append(np.array(names, dtype=bytes))
                    names = []
        blocks.append(np.array(names, dtype=bytes) if names else np.zeros(0, "S1"))
        rel = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        rel.sort()  # in place: no second copy
        return cls(root, rel)

    def __len__(self) -> int:
        return len(self.rel)

    def __getitem__(self, j) -> Path:
        return self.root / os.fsdecode(self.rel[j].replace(self.SEP, b"/"))

    def __iter__(self):
        return (self[j] for j in range(len(self.rel)))

    def text(self, j: int) -> str:
        """``str(self[j])``, without making the Path."""
        return self._prefix + os.fsdecode(self.rel[j].replace(self.SEP, b"/"))

    def texts(self):
        """Each file as :meth:`text`, in order: a generator."""
        return (self.text(j) for j in range(len(self.rel)))

    def names(self):
        """Each file's name (without its folder), in order: a generator."""
        return (os.fsdecode(r.rsplit(self.SEP, 1)[-1]) for r in self.rel)


def walk(root, sep: bytes = b"/"):
    """Yield (path relative to ``root`` as bytes, its parts joined by ``sep``; name) of every file under
    ``root``, recursively, in no order: the files ``Path.rglob("*")`` finds (symbolic links to folders are
    not followed, a folder that cannot be read is skipped), without keeping a Path of each."""
    folders = [b""]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(os.path.join(os.fsencode(root), folder.replace(sep, b"/"))) as it:
                entries = list(it)
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            rel = folder + sep + e.name if folder else e.name
            if _is_dir(e):
                folders.append(rel)
            if _is_file(e):
                yield rel, os.fsdecode(e.name)


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_file(entry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False
