"""FITS headers walked without cfitsio, and the plain binary-table layout read with numpy.

Two users:

- :func:`sdss.check_headers` walks every header of a file (:func:`walk`, :func:`loose_cards`)
  before cfitsio reads it, to refuse headers that declare absurd sizes.
- the fast spectrum reader (:func:`sdss.read_spectrum` with ``reader="fast"``) reads a file of
  the *plain layout* with numpy alone (:func:`plain_hdus`, :func:`plain_table`): cfitsio costs
  ~1 ms per spec-lite file to open, parse every header and read the tables, several times the
  work itself; numpy reads the same bytes in ~0.2 ms.

The plain layout is exact: an uncompressed, complete file (its size is the sum of its HDUs);
every header card well formed (a keyword, then a string, logical or number value; no
keyword twice); mandatory keywords in the order the standard gives; every size within the
limits ``check_headers`` allows; the table read is a BINTABLE without heap (``PCOUNT = 0``, no
``THEAP``), its columns fixed-width (no ``P``/``Q``), the ones read single unscaled numbers
(no ``TSCAL``/``TZERO``) or text. Any other file makes these functions return None (or raise
ValueError/KeyError), and the caller reads the file with cfitsio, which reads it or names
what is wrong with it: the fast path never rejects a file by itself. The differential fuzz
test (``tests/test_fuzz.py``; more cases in ``bench/fuzz.py``) checks that both paths give the
same arrays or the same reject reason on seeded damaged files.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

FITS_BLOCK = 2880
MAX_HDU_BYTES = 1 << 28   # 256 MB: an SDSS spectrum file is a few MB
MAX_FIELDS = 999          # the FITS standard's limit on TFIELDS and NAXIS
MAX_FAST_BYTES = 1 << 26  # 64 MB: larger files go to cfitsio, which reads only what it needs


# --- the header walk (shared by check_headers and the fast reader) ----------------------------

def walk(f, describe, max_hdus: int = 64):
    """Walk the HDUs of a FITS stream: each header's raw bytes, without parsing the data.

    Parameters
    ----------
    f : binary file object (file, :class:`gzip.GzipFile`, :class:`io.BytesIO`)
        At the start of the file.
    describe : callable (index, header bytes) -> (data bytes, info)
        Says how many data bytes follow header ``index`` (its blocks, END card included); may
        raise to stop the walk.
    max_hdus : int

    Yields
    ------
    (info, data start offset, data bytes) for each HDU whose header is complete; the walk ends
    at the end of the stream or at a truncated header.
    """
    for index in range(max_hdus):
        blocks = []
        while True:
            block = f.read(FITS_BLOCK)
            if len(block) < FITS_BLOCK:
                return
            blocks.append(block)
            if b"END" in block and any(block[i:i + 8].strip() == b"END" for i in range(0, FITS_BLOCK, 80)):
                break
        nbytes, info = describe(index, b"".join(blocks))
        yield info, f.tell(), nbytes
        f.seek(-(-nbytes // FITS_BLOCK) * FITS_BLOCK, 1)


def loose_cards(header: bytes) -> dict:
    """{keyword: value text} of the 'KEY = value / comment' cards before END, as bytes, read leniently."""
    cards = {}
    for i in range(0, len(header), 80):
        key = header[i:i + 8].strip()
        if key == b"END":
            break
        if header[i + 8:i + 10] == b"= ":
            cards[key] = header[i + 10:i + 80].split(b"/")[0].strip()
    return cards


# --- strict card parsing (the plain layout) ----------------------------------------------------

_KEYWORD = re.compile(r"[A-Z0-9_-]*$")
# a value cfitsio reads without complaint: string, logical, number or complex, then a comment
_CARD_VALUE = re.compile(r" *(?:'(?:[^']|'')*'|[TF]|[-+]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][-+]?\d+)?"
                         r"|\( *[-+.\dEeDd]+ *, *[-+.\dEeDd]+ *\))? *(?:/.*)?$")
_INT = re.compile(r"[-+]?(?:0|[1-9]\d*)$")  # what fitsio's read_header gives as int
_FLOAT = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$")  # ... and as float
_PRINTABLE = bytes(range(32, 127))
_END_CARD = "END" + " " * 77
_NOT_PLAIN = ("", None)


def _parse_card(card: str) -> tuple:
    """(keyword, value text or None for a card without a value); ``_NOT_PLAIN`` for a card cfitsio may refuse."""
    key, indicator = card[:8].rstrip(), card[8:10]
    if not _KEYWORD.match(key) or " " in key:
        return _NOT_PLAIN
    if indicator == "= ":
        return (key, card[10:]) if _CARD_VALUE.match(card[10:]) else _NOT_PLAIN
    return (key, None) if key in ("", "COMMENT", "HISTORY", "CONTINUE") else _NOT_PLAIN  # else a value went missing


class _CardCache(dict):
    """card text -> :func:`_parse_card` of it; most cards repeat from file to file, so most are looked up."""

    def __missing__(self, card):
        if len(self) > 100_000:
            self.clear()
        parsed = self[card] = _parse_card(card)
        return parsed


_CARDS = _CardCache()


def _plain_header(index: int, header: bytes):
    """:func:`walk`'s ``describe`` for the plain layout: (data bytes, (cards, keyword order)); ValueError if not plain.

    Extension headers repeat from file to file (the same tables), so they are parsed once.
    """
    return _parse_header(index, header) if index == 0 else _parse_extension_header(header)


@lru_cache(maxsize=64)
def _parse_extension_header(header: bytes):
    return _parse_header(1, header)


def _parse_header(index: int, header: bytes):
    if header.translate(None, _PRINTABLE):
        raise ValueError("bytes that are not printable ASCII")
    text = header.decode("ascii")
    lines = [text[i:i + 80] for i in range(0, len(text), 80)]
    parsed = list(map(_CARDS.__getitem__, lines[:lines.index(_END_CARD)]))  # ValueError: no plain END card
    if _NOT_PLAIN in parsed:
        raise ValueError("a card cfitsio may refuse")
    order = [k for k, _ in parsed]
    cards = {k: v for k, v in parsed if v is not None}
    if len(cards) != sum(v is not None for _, v in parsed):
        raise ValueError("a keyword given twice")
    naxis, bitpix = plain_int(cards, "NAXIS"), plain_int(cards, "BITPIX")
    if order[:3] != ["XTENSION" if index else "SIMPLE", "BITPIX", "NAXIS"] or not 0 <= naxis <= 9 \
            or order[3:3 + naxis] != [f"NAXIS{k}" for k in range(1, naxis + 1)] \
            or bitpix not in (8, 16, 32, 64, -32, -64):
        raise ValueError("mandatory keywords")
    nbytes = abs(bitpix) // 8 if naxis else 0
    for k in range(1, naxis + 1):
        nbytes *= plain_int(cards, f"NAXIS{k}")
    if index:
        if order[3 + naxis:5 + naxis] != ["PCOUNT", "GCOUNT"] or plain_int(cards, "GCOUNT") != 1:
            raise ValueError("PCOUNT, GCOUNT")
        nbytes += plain_int(cards, "PCOUNT")
    elif plain_value(cards["SIMPLE"]) is not True:
        raise ValueError("SIMPLE")
    if not 0 <= nbytes <= MAX_HDU_BYTES or not 0 <= plain_int(cards, "TFIELDS", 0) <= MAX_FIELDS \
            or "HDUNAME" in cards:
        raise ValueError("sizes")  # check_headers refuses the first two
    plain_int(cards, "EXTVER", 0)  # fitsio reads it: an integer, or not plain
    return nbytes, (cards, order)


def plain_hdus(raw: bytes) -> list | None:
    """Every HDU of a complete plain-layout FITS file, as (cards, keyword order, data start, data bytes).

    ``cards`` maps each keyword that has a value to its value text (comment included).
    None when the file is not of the plain layout (truncated, trailing bytes, a card out of
    order or badly formed, a size beyond the limits); may raise ValueError/KeyError for the same.
    """
    import io

    if not raw.startswith(b"SIMPLE  = "):
        return None
    hdus, end = [], 0
    for (cards, order), start, nbytes in walk(io.BytesIO(raw), _plain_header, max_hdus=1000):
        hdus.append((cards, order, start, nbytes))
        end = start + -(-nbytes // FITS_BLOCK) * FITS_BLOCK
    return hdus if hdus and end == len(raw) else None


def plain_int(cards: dict, key: str, default: int | None = None) -> int:
    """An integer keyword's value (``default`` when missing); ValueError when not an integer."""
    if default is not None and key not in cards:
        return default
    return int(cards.get(key, "").split("/")[0])


def plain_value(text: str):
    """A number or logical value as fitsio's read_header gives it; ValueError for anything else."""
    v = text.split("/")[0].strip()
    if _INT.match(v):
        return int(v)
    if _FLOAT.match(v):
        return float(v)
    if v in ("T", "F"):
        return v == "T"
    raise ValueError(f"not a plain number: {v!r}")


def plain_string(text: str) -> str:
    """A string value, quotes and trailing blanks removed; ValueError when not a plain string."""
    v = text.lstrip()
    if not v.startswith("'") or "''" in v:
        raise ValueError("not a plain string")
    return v[1:].split("'")[0].rstrip()


def is_printable(b: bytes) -> bool:
    """Only printable ASCII bytes (no control or non-ASCII byte)."""
    return not b.translate(None, _PRINTABLE)


# --- the plain binary table ----------------------------------------------------------------------

_TFORM = re.compile(r"(\d*)([LXBIJKAEDCM])(\d*)$")  # P/Q (heap) columns are not plain
_TFORM_BYTES = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16}
_TFORM_NUMERIC = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}
_TDIM = re.compile(r"\( *\d+ *(?:, *\d+ *)*\)$")


def plain_table(raw: bytes, hdu, want: tuple, rows: int | None = None) -> dict | None:
    """Columns ``want`` (lower-case names; absent ones left out) of a plain binary table HDU.

    Parameters
    ----------
    raw : bytes
        The whole file.
    hdu : one item of :func:`plain_hdus`
    want : tuple of str
    rows : int, optional
        Read only the first ``rows`` rows.

    Returns
    -------
    dict or None
        {lower-case name: (rows,) array viewing ``raw``, big-endian; text columns: bytes}, or
        None when the table is not plain: not a BINTABLE, no rows, a heap, a scaled column, a
        column read that is not a single number or text, two columns of one name, ...
    """
    cards, order, start, nbytes = hdu
    n_rows = plain_int(cards, "NAXIS2")
    layout = _table_layout(tuple(order[:8]), tuple(kv for kv in cards.items() if kv[0] != "NAXIS2"), want)
    if layout is None or n_rows < 1 or layout[0] * n_rows != nbytes:
        return None
    width, found, text = layout
    n_rows = n_rows if rows is None else min(rows, n_rows)
    for at, n in text:  # fitsio decodes every text cell it reads as ASCII, and fails on other bytes
        if not np.ndarray((n_rows,), f"S{n}", raw, start + at, (width,)).tobytes().isascii():
            return None
    return {name: np.ndarray((n_rows,), dtype, raw, start + at, (width,)) for name, (dtype, at) in found}


@lru_cache(maxsize=256)
def _table_layout(order: tuple, cards: tuple, want: tuple):
    """(row width, ((name, (dtype, offset)), ...) of the columns ``want``, ((offset, bytes), ...) of every text
    column) of a plain table; None if not plain."""
    cards = dict(cards)
    if plain_string(cards["XTENSION"]) != "BINTABLE" or plain_int(cards, "BITPIX") != 8 \
            or plain_int(cards, "NAXIS") != 2 or order[7:8] != ("TFIELDS",) or plain_int(cards, "PCOUNT") != 0 \
            or "THEAP" in cards:
        return None
    width, n_fields = plain_int(cards, "NAXIS1"), plain_int(cards, "TFIELDS")
    if not 0 < n_fields <= MAX_FIELDS:
        return None
    offset, found, names, text = 0, {}, set(), []
    for k in range(1, n_fields + 1):
        if f"TSCAL{k}" in cards or f"TZERO{k}" in cards:
            return None
        name = plain_string(cards[f"TTYPE{k}"]).lower()
        m = _TFORM.match(plain_string(cards[f"TFORM{k}"]))
        if m is None or not name or name in names or name != name.lstrip() or (m[3] and m[2] != "A"):
            return None
        names.add(name)
        repeat = int(m[1] or 1)
        if not _column_keys_plain(cards, k, repeat):
            return None
        if m[2] == "A" and repeat:
            text.append((offset, repeat))
        if name in want:
            if f"TDIM{k}" in cards or m[2] != "A" and (repeat != 1 or m[2] not in _TFORM_NUMERIC):
                return None
            found[name] = (f"S{repeat}" if m[2] == "A" else _TFORM_NUMERIC[m[2]], offset)
        offset += -(-repeat // 8) if m[2] == "X" else repeat * _TFORM_BYTES[m[2]]
    return (width, tuple(found.items()), tuple(text)) if offset == width else None


def _column_keys_plain(cards: dict, k: int, repeat: int) -> bool:
    """Column ``k``'s other keywords are what cfitsio expects: TUNIT/TDISP text, TNULL integer, TDIM '(n, ...)'
    matching the repeat count."""
    try:
        for key in (f"TUNIT{k}", f"TDISP{k}"):
            if key in cards:
                plain_string(cards[key])
        if f"TNULL{k}" in cards:
            plain_int(cards, f"TNULL{k}")
        if f"TDIM{k}" in cards:
            dims = plain_string(cards[f"TDIM{k}"])
            return bool(_TDIM.match(dims)) and int(np.prod([int(d) for d in dims[1:-1].split(",")])) == repeat
    except ValueError:
        return False
    return True


def extname(cards: dict) -> str:
    """An HDU's EXTNAME, stripped and lower-case ('' when none); ValueError when not a plain string."""
    return plain_string(cards["EXTNAME"]).strip().lower() if "EXTNAME" in cards else ""


def read_plain(path) -> tuple[bytes, list] | None:
    """(file bytes, :func:`plain_hdus`) of a plain-layout file of at most :data:`MAX_FAST_BYTES`; None otherwise."""
    import os

    with open(path, "rb") as f:
        if not FITS_BLOCK <= os.fstat(f.fileno()).st_size <= MAX_FAST_BYTES:
            return None
        raw = f.read()
    hdus = plain_hdus(raw)
    return (raw, hdus) if hdus else None
