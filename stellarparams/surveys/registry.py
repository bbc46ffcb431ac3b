"""The survey formats, and the questions the stages ask them: which survey is this file, read it, list files.

Each survey module registers one :class:`stellarparams.surveys.base.Survey` (``SURVEY``);
:func:`register` adds another at runtime (a plug-in, or a test). Detection asks the formats
in ``priority`` order, highest first: by file name, else by FITS content.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import desi, lamost, sdss, tables
from .base import FitsInfo, Survey
from ..files import check_readable
from ..spectrum import Record, SpectrumError

_FORMATS: dict = {}


def register(survey: Survey) -> Survey:
    """Add (or replace) a survey format; returns it."""
    _FORMATS[survey.name] = survey
    return survey


def unregister(name: str) -> None:
    """Remove a survey format added with :func:`register`."""
    _FORMATS.pop(name, None)


for _module in (sdss, lamost, desi, tables):
    register(_module.SURVEY)


def names() -> tuple:
    """The registered surveys' names (the choices of ``--survey``), in the order registered."""
    return tuple(_FORMATS)


def get(name: str) -> Survey:
    """The survey format ``name``; a ValueError naming the choices for any other."""
    if name not in _FORMATS:
        raise ValueError(f"unknown survey {name!r}; choose one of {', '.join(_FORMATS)}")
    return _FORMATS[name]


def _by_priority() -> list:
    return sorted(_FORMATS.values(), key=lambda s: -s.priority)


def detect(path) -> str:
    """The survey of a spectrum file: from its name, else from its content.

    Returns
    -------
    str
        One of :func:`names`.

    Raises
    ------
    SpectrumError
        ``unknown_format``: no format recognises the file; ``missing_file``, ``unreadable``.
    """
    named = by_name(os.path.basename(path))  # no Path made for the usual case: detect_survey asks per file
    if named:
        return named
    path = Path(path)
    formats = _by_priority()
    if not path.is_file():
        raise SpectrumError(path, "missing_file", f"no such file: {path}")
    try:
        sdss.check_headers(path)
        with sdss.open_fits(path) as f:
            info = FitsInfo(f)
            for s in formats:
                if s.identify(info):
                    return s.name
    except SpectrumError:
        raise
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise SpectrumError(path, "unreadable", str(e).strip().splitlines()[0][:200] if str(e).strip()
                            else type(e).__name__) from e
    titles = [s.title for s in _FORMATS.values()]
    raise SpectrumError(path, "unknown_format", f"not an {', '.join(titles[:-1])} or {titles[-1]} file "
                        f"(name it after its survey or pass --survey {'|'.join(_FORMATS)})")


def by_name(name: str) -> str | None:
    """The survey whose file-name pattern ``name`` matches (the highest priority first), or None."""
    return next((s.name for s in _by_priority() if s.matches_name(name)), None)


def read(path, survey: str | None = None, reader: str = "fast") -> list[Record]:
    """Every spectrum in one file, as records (``survey``: default :func:`detect`)."""
    path = Path(path)
    return get(survey or detect(path)).read_file(path, reader)


def read_record(path, index, survey: str, cache: dict, reader: str = "fast") -> Record:
    """Spectrum ``index`` of a file of ``survey`` (None: its only one); the last file's records stay in ``cache``."""
    return get(survey).read_one(path, index, cache, reader)


def _wanted(survey: str | None):
    """The file-name test of a folder scan for ``survey`` (None: any listed survey)."""
    listed = [s for s in _by_priority() if s.listed]
    if survey is None:
        return lambda n: any(s.matches_name(n) for s in listed)
    fmt = get(survey)
    higher = [s for s in listed if s.priority > fmt.priority] if fmt.listed else []
    return lambda n: fmt.lists(n) and not any(s.matches_name(n) for s in higher)


def find_files(folder, survey: str | None = None) -> list[Path]:
    """Spectrum files under ``folder`` (recursively, sorted) of one survey, or of any listed one when None.

    A file named like a survey of higher priority is not another's. ``folder`` may be one file
    (returned as is).
    """
    return [Path(p) for p in iter_files(folder, survey)]


def iter_files(folder, survey: str | None = None):
    """:func:`find_files` as a stream of path strings, in the same order, holding one folder's names at a time.

    A depth-first walk with each folder's entries sorted by name is the order of sorting the
    whole list (paths compare part by part); like ``rglob``, links to folders are not
    followed and unreadable subfolders are skipped. Memory: the largest folder's entries,
    not the number of files (a survey of 20 million files in plate folders stays flat).
    """
    folder = Path(folder)
    if folder.is_file():
        yield str(folder)
        return
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: spectra folder not found")
    check_readable(folder)
    wanted = _wanted(survey)

    def walk(top: str):
        try:
            with os.scandir(top or ".") as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            return
        for e in entries:
            path = os.path.join(top, e.name)
            try:
                if e.is_dir(follow_symlinks=False):
                    yield from walk(path)
                elif wanted(e.name) and e.is_file():
                    yield path
            except OSError:
                continue

    yield from walk("" if str(folder) == "." else str(folder))


def prepare_files(spectra, survey: str) -> list[Path]:
    """The spectrum files ``prepare`` matches the catalog of ``survey`` with."""
    return get(survey).prepare_files(Path(spectra), find_files)
