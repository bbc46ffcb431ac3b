"""The one small interface every survey's file format implements (in the way specutils registers loaders).

A survey module (``sdss``, ``lamost``, ``desi``, ``tables``) defines one :class:`Survey`
subclass and registers an instance with :func:`stellarparams.surveys.registry.register`.
The stages (``prepare``, ``predict``, ``readers``) ask the registry, never "which survey is
this?": adding a survey is one new module plus its tests.

What a format says:

- ``name_re`` / :meth:`identify`: does this file look like mine, by its name, else by its
  FITS content (:class:`FitsInfo`); ``priority`` orders the formats (higher asks first);
- :meth:`read`: every spectrum of a file as :class:`stellarparams.spectrum.Record`;
- ``labels``, ``rv_column``, ``id_column``, ``catalog_keys``: the catalog's label, RV and
  identifier columns, and the column sets a catalog row can be matched with (besides FILE);
- :meth:`locate`: which file (and which spectrum in it) each catalog row's spectrum is;
- :meth:`reject_unused`: the rejects of the files no catalog row took.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..matching import id_text
from ..spectrum import Record, SpectrumError


class FitsInfo:
    """What content detection looks at in a FITS file (read lazily from an open ``fitsio.FITS``).

    names: the HDUs' upper-case EXTNAMEs; header: the primary header; cols: HDU 1's upper-case
    column names when it is a binary table, else an empty set.
    """

    def __init__(self, f):
        self.f = f
        self.names = {f[i].get_extname().upper() for i in range(len(f))}
        self.header = f[0].read_header()

    @cached_property
    def cols(self) -> set:
        f = self.f
        if len(f) > 1 and f[1].get_exttype() == "BINARY_TBL":
            return {c.upper() for c in f[1].get_colnames()}
        return set()


@dataclass
class Located:
    """Where each of a catalog's n rows has its spectrum (what :meth:`Survey.locate` returns).

    Per-row facts are arrays, or lists for a survey that has no arrays for them; :meth:`file`,
    :meth:`key` and :meth:`row_id` give one row's, made when asked (a reject, a chunk of work).

    twin : (m,) int64 or None
        Per file of ``files``, the index of its first file of the same key (None: files have no keys).
    match : (n,) int64
        Each row's file matched by key, an index in ``files`` (-1: none, or not matched by key).
    files : sequence of Path
    row_files : sequence
        Each row's FILE as a Path, or None.
    keys : list of 3 (n,) arrays, or None
        SDSS (plate, mjd, fiberid) of each row, the catalog's own columns (rows without one:
        ``has_key`` False).
    has_key : (n,) bool or None
    located : list or None
        Each row's (file, index in file) or (None, None), when not from ``match``/``row_files``.
    row_ids : list or None
        Each row's identifier text ('' when missing); None: from ``keys``.
    ident : list or None
        What makes two rows the same spectrum (None: no file); used when ``dup`` is None.
    dup : (n,) bool or None
        Rows whose spectrum an earlier row (in the survey's row order) already has.
    """
    twin: object
    match: np.ndarray
    files: object
    row_files: object
    keys: list | None = None
    has_key: np.ndarray | None = None
    located: list | None = None
    row_ids: list | None = None
    ident: list | None = None
    dup: np.ndarray | None = None

    def file(self, i: int) -> tuple:
        """Row ``i``'s (file, index of its spectrum in the file or None), or (None, None)."""
        if self.located is not None:
            return self.located[i]
        j = self.match[i]
        return self.row_files[i] or (self.files[j] if j >= 0 else None), None

    def file_text(self, i: int) -> tuple:
        """:meth:`file` with the file as text ('' when none), without making a Path where the files are a
        :class:`~stellarparams.matching.FileIndex` (the work list of millions of rows)."""
        j = -1 if self.located is not None or self.row_files[i] else self.match[i]
        if j >= 0 and hasattr(self.files, "text"):
            return self.files.text(j), None
        f, index = self.file(i)
        return str(f or ""), index

    def has_file(self) -> np.ndarray:
        """(n,) bool: the rows a file was found for (a FILE cell may name a file that does not exist)."""
        if self.located is not None:
            return np.array([f is not None for f, _ in self.located], bool)
        return (self.match >= 0) | np.array([f is not None for f in self.row_files], bool)

    def key(self, i: int) -> tuple:
        """Row ``i``'s (plate, mjd, fiberid), or (None, None, None)."""
        if self.keys is None or not self.has_key[i]:
            return None, None, None
        return tuple(int(c[i]) for c in self.keys)

    def row_id(self, i: int) -> str:
        """Row ``i``'s identifier as text ('' when none)."""
        if self.row_ids is not None:
            return self.row_ids[i]
        k = self.key(i)
        return f"{k[0]:04d}-{k[1]:05d}-{k[2]:04d}" if k[0] is not None else ""


class Survey:
    """A survey's file format. Subclasses set the attributes and override what differs."""

    name = ""                   # --survey NAME
    title = ""                  # in messages: "not an SDSS, LAMOST, DESI or table file"
    priority = 0                # detection order: the highest that claims a file wins
    name_re = None              # compiled regex of this survey's file names (None: none)
    listed = True               # a folder scan without --survey lists the files named like this
    labels = None               # {our label: catalog column}, None: PrepareConfig's defaults
    rv_column = None            # the catalog's RV column (km/s), None: PrepareConfig's default
    id_column = None            # the catalog's identifier column (rejects' id), None: none
    catalog_keys = ()           # column sets a catalog row is matched with (any one), besides FILE
    catalog_columns = None      # the catalog columns locate/row_ids/row_order read: prepare may leave the other
                                # numbers on disk until it writes them; None: it holds every column
    many_per_file = False       # a file holds many spectra: read once per chunk, work sorted by file
    hashed_name = True          # outputs name the survey (prepare's job hash, simulate.json, ORIGIN); False: SDSS,
                                # whose outputs stay as they were
    plate_keys = False          # records are named by (plate, mjd, fiberid), which predict writes as columns
    carries_labels = False      # a file carries its own catalog (prepare without --catalog)
    one_file_is_enough = False  # one file and a catalog without key columns: rows by position
    simulated = None            # how ``simulate --survey NAME`` writes it (:class:`Simulated`), None: it cannot

    # --- which files are mine
    def matches_name(self, name: str) -> bool:
        """Whether a file name is this survey's (``name_re``)."""
        return bool(self.name_re is not None and self.name_re.match(name))

    def lists(self, name: str) -> bool:
        """Whether a folder scan for this survey keeps a file of this name."""
        return self.matches_name(name)

    def identify(self, info: FitsInfo) -> bool:
        """Whether a FITS file whose name told nothing is this survey's, from its content."""
        return False

    def prepare_files(self, spectra: Path, find_files) -> list:
        """The spectrum files ``prepare`` matches catalog rows with (``find_files``: the registry's)."""
        return find_files(spectra, self.name)

    # --- reading
    def read(self, path: Path, reader: str = "fast") -> list[Record]:
        """Every spectrum of an existing file; raises :class:`SpectrumError` when the whole file is unusable."""
        raise NotImplementedError

    def read_file(self, path, reader: str = "fast") -> list[Record]:
        """:meth:`read`, with a ``missing_file`` error for a file that is not there."""
        path = Path(path)
        if not path.is_file():
            raise SpectrumError(path, "missing_file", f"no such file: {path}")
        return self.read(path, reader)

    def read_one(self, path, index, cache: dict, reader: str = "fast") -> Record:
        """Spectrum ``index`` (None: the first) of a file; the last file's records (or error) are kept in ``cache``."""
        if cache.get("path") != path:
            cache.clear()
            try:
                cache.update(path=path, records=self.read_file(path, reader))
            except SpectrumError as e:
                cache.update(path=path, error=e)
        if "error" in cache:
            raise cache["error"]
        return cache["records"][index or 0]

    def members(self, path) -> list | None:
        """The spectra of a file as [(index, identifier, rv km/s or NaN)], or None: one spectrum, read whole."""
        return None

    def file_keys(self, path) -> list:
        """Keys (as catalog rows give them) read from a file's header, for files not named after them."""
        return []

    # --- the catalog
    def own_catalog(self, files: list) -> pd.DataFrame:
        """The catalog the files themselves carry (``carries_labels``)."""
        raise ValueError("a label catalog is needed (--catalog); only a spectrum table carries its own labels")

    def row_ids(self, cat: pd.DataFrame) -> list:
        """Each catalog row's identifier as text ('' when missing; ``row N`` without an identifier column)."""
        if self.id_column in cat.columns:
            return [id_text(v) for v in cat[self.id_column]]
        return [f"row {r}" for r in (cat["ROW"] if "ROW" in cat.columns else range(len(cat)))]

    def locate_rows(self, cat: pd.DataFrame, files: list, row_files: list) -> list:
        """Where each catalog row's spectrum is: [(file, index in file) or None]."""
        raise NotImplementedError

    def locate(self, cat: pd.DataFrame, files, row_files) -> Located:
        """Where each catalog row's spectrum is (:class:`Located`), from :meth:`locate_rows`."""
        located = [loc or (None, None) for loc in self.locate_rows(cat, files, row_files)]
        ident = [None if f is None else f"{Path(f).resolve()}|{j}" for f, j in located]
        return Located(None, np.full(len(cat), -1), files, row_files, located=located, row_ids=self.row_ids(cat),
                       ident=ident)

    def rv_keys(self, cat: pd.DataFrame) -> list:
        """The keys ``predict --catalog`` finds a catalog row's RV by, one list per kind of key (each row's key, None
        where it has none); a kind is there when the catalog has its columns. Default: ``("id", text)`` of
        ``id_column``."""
        if self.id_column in cat.columns:
            return [[("id", id_text(v)) for v in cat[self.id_column]]]
        return []

    def name_keys(self, name: str) -> list:
        """The keys (as :meth:`rv_keys` gives them) a file's name carries; None where it carries none."""
        return []

    def row_order(self, cat: pd.DataFrame) -> tuple[np.ndarray, str]:
        """The order in which rows claim a spectrum (the first keeps it), and what the duplicate reject adds."""
        return np.arange(len(cat)), ""

    def reject_unused(self, files: list, twin, is_used, rejects: list) -> None:
        """Append a reject for each of ``files`` that ``is_used(j)`` says no catalog row took."""
        for j, p in enumerate(files):
            if not is_used(j):
                rejects.append({"file": str(p), "reason": "no_catalog_row",
                                "detail": "no catalog row matches a spectrum of this file", "id": ""})


class Simulated:
    """How ``simulate --survey NAME`` writes a survey: its pixels, line-spread function, files and catalog.

    :mod:`stellarparams.simulate` makes every spectrum the same way whatever the survey (a MILES
    star, RV, reddening, calibration error, noise) and asks this part of the survey's module
    what differs. ``items`` below are (index, plan, spec, row): the realization's index, its
    plan (:func:`stellarparams.simulate.draw_plan`), the arrays of
    :meth:`stellarparams.simulate.Simulator.realize` and its SDSS-style catalog row
    (:func:`stellarparams.simulate.catalog_row`).
    """

    catalog = ""             # the catalog's file name in OUT
    file_bytes = 170e3       # bytes per spectrum on disk (checked before the work)
    own_lsf = True           # the survey's line-spread function (:meth:`resolution`); False: --resolution's
    response = None          # the survey's fixed instrument response (a --response value), None: none
    chunk_by_file = False    # one chunk per file (a file of many spectra is written whole by one worker)

    def resolution(self, lam):
        """Resolving power lambda / FWHM at ``lam`` (A) (with ``own_lsf``)."""
        raise NotImplementedError

    def pixels(self):
        """(lam, lo, hi) (K,) vacuum A: the pixels every spectrum is written on; None: SDSS's sliding lattice."""
        return None

    def spectrum_path(self, out, plan: dict) -> Path:
        """The file that holds realization ``plan``."""
        raise NotImplementedError

    def is_done(self, path: Path, n: int) -> bool:
        """Whether ``path`` is finished (it exists and holds its ``n`` spectra)."""
        return path.exists()

    def write_files(self, out, items: list, header: dict) -> None:
        """Write the one file of ``items`` (atomically); ``header``: ORIGIN and the simulation's keywords."""
        raise NotImplementedError

    def catalog_row(self, index: int, row: dict) -> dict:
        """The survey's catalog row of realization ``index`` from its SDSS-style ``row``."""
        return row

    def write_catalog(self, out, columns: dict, meta: dict) -> Path:
        """Write the catalog whose columns are ``columns`` ({name: (n,) array}, rows from :meth:`catalog_row`, in
        realization order), atomically; returns its path."""
        raise NotImplementedError
