"""Fetch SDSS DR12 stars: the SSPP label catalog and the spectra (`stellarparams fetch`).

Two steps, both resumable (docs/method.md, "Data"):

1. The catalog. Either the DR12 SkyServer SQL service (``SqlSearch``, CSV), joining
   ``sppParams`` (SSPP labels) with ``specObjAll`` (PLATE, MJD, FIBERID, RUN2D, CLASS), paged
   by keyset on SPECOBJID; or the SSPP FITS file on the SAS (``ssppOut-dr12.fits``, ~2 GB),
   downloaded and cut locally. Both give the same underscore column names, which is what
   ``prepare`` reads: PLATE, MJD, FIBERID, RUN2D, TEFF_ADOP(_UNC), FEH_ADOP(_UNC),
   LOGG_ADOP(_UNC), RV_ADOP (km/s), RV_ADOP_ERR, SNR, ...
2. The spectra, from the SAS DR12 tree (lite files by default), with bounded concurrency,
   retries with exponential back-off (``urllib3.util.Retry``: 5xx, 408, 429, time-outs and
   cut connections; ``Retry-After`` is honoured), resumable ``.part`` files (HTTP Range), a
   FITS check of every file, and a table of every failure with its reason.

Layout of OUT::

    catalog.fits, catalog.parquet   one row per spectrum; FILE is the spectrum's path relative to
                                    OUT (spectra/spec-...fits), the rule of ``prepare`` and ``predict``
    spectra/spec-PLATE4-MJD5-FIBER4.fits
    failures.csv                    file, url, reason, attempts of every spectrum not fetched
    fetch.json                      version, configuration, SQL query and summary of the last run
    sspp/ssppOut-dr12.fits          only with source="sas-fits"
    .lock                           one `fetch` at a time writes OUT (``--wait`` to queue)

Re-running the same command skips complete files, re-fetches corrupt ones and resumes
partial ones.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.util import Retry

from . import __version__
from .context import Run
from .files import atomic_write
from .outputs import locked_output
from .surveys.sdss import open_fits, read_catalog, spec_filename

DEFAULT_SQL_URL = "https://skyserver.sdss.org/dr12/SkyServerWS/SearchTools/SqlSearch"
DEFAULT_SAS_URL = "https://data.sdss.org/sas/"
SSPP_FITS_PATH = "dr12/sdss/sspp/ssppOut-dr12.fits"
SDSS_RUN2D = ("26", "103", "104")  # SDSS-I/II reductions in DR12: dr12/sdss/spectro/redux/
BOSS_RUN2D = ("v5_7_0", "v5_7_2")  # BOSS reductions in DR12: dr12/boss/spectro/redux/
BOSS_FIRST_PLATE = 3520  # only orders the guesses when RUN2D is unknown; every candidate is tried
# SkyServer caps the rows of one answer (500,000 on SqlSearch) and long queries time out,
# so large selections are fetched in pages.
DEFAULT_PAGE_SIZE = 50_000
FITS_BLOCK = 2880  # a complete FITS file is a whole number of 2880-byte blocks
MISSING = -9999  # what SSPP writes for "no value"
USER_AGENT = f"stellarparams/{__version__} (+https://github.com/; SDSS DR12 fetch)"
CHUNK = 1 << 16

# what the query selects: (SQL expression, SkyServer column name)
SELECT = [
    ("s.specObjID", "SPECOBJID"), ("s.plate", "PLATE"), ("s.mjd", "MJD"), ("s.fiberID", "FIBERID"),
    ("s.run2d", "RUN2D"), ("s.class", "CLASS"), ("s.sciencePrimary", "SCIENCEPRIMARY"),
    ("s.zWarning", "ZWARNING"),
    ("p.teffadop", "TEFFADOP"), ("p.teffadopunc", "TEFFADOPUNC"),
    ("p.fehadop", "FEHADOP"), ("p.fehadopunc", "FEHADOPUNC"),
    ("p.loggadop", "LOGGADOP"), ("p.loggadopunc", "LOGGADOPUNC"),
    ("p.elodiervfinal", "ELODIERVFINAL"), ("p.elodiervfinalerr", "ELODIERVFINALERR"),
    ("p.snr", "SNR"), ("p.flag", "FLAG"),
]
# SkyServer (no underscores) -> catalog (SSPP FITS datamodel names, what `prepare` reads)
SKYSERVER_RENAME = {
    "TEFFADOP": "TEFF_ADOP", "TEFFADOPUNC": "TEFF_ADOP_UNC", "FEHADOP": "FEH_ADOP",
    "FEHADOPUNC": "FEH_ADOP_UNC", "LOGGADOP": "LOGG_ADOP", "LOGGADOPUNC": "LOGG_ADOP_UNC",
    "ELODIERVFINAL": "RV_ADOP", "ELODIERVFINALERR": "RV_ADOP_ERR",
}
# ssppOut-dr12.fits -> catalog
SSPP_FITS_RENAME = {"FIBER": "FIBERID", "RV_ADOP_UNC": "RV_ADOP_ERR", "SPECPRIMARY": "SCIENCEPRIMARY"}
SSPP_FITS_COLUMNS = ["SPECOBJID", "PLATE", "MJD", "FIBER", "RUN2D", "SPECPRIMARY", "ZWARNING", "FLAG",
                     "TEFF_ADOP", "TEFF_ADOP_UNC", "FEH_ADOP", "FEH_ADOP_UNC", "LOGG_ADOP", "LOGG_ADOP_UNC",
                     "RV_ADOP", "RV_ADOP_UNC", "SNR"]
CATALOG_COLUMNS = ["SPECOBJID", "PLATE", "MJD", "FIBERID", "RUN2D", "CLASS", "TEFF_ADOP", "TEFF_ADOP_UNC",
                   "FEH_ADOP", "FEH_ADOP_UNC", "LOGG_ADOP", "LOGG_ADOP_UNC", "RV_ADOP", "RV_ADOP_ERR", "SNR",
                   "ZWARNING", "FLAG", "SCIENCEPRIMARY", "FILE"]
SOURCES = ("skyserver", "sas-fits")


class CatalogQueryError(OSError):
    """The SQL service answered with an error, or with something that is not a CSV table; or the SSPP
    catalog could not be downloaded (an OSError: the `stellarparams` command exits 2, naming the service)."""


# ----------------------------------------------------------------------------- catalog


def _range(r, name):
    if r is None:
        return None
    lo, hi = (float(v) for v in r)
    if not lo <= hi:
        raise ValueError(f"{name} range must be (low, high), got {r}")
    return lo, hi


def build_query(n: int | None = None, *, min_snr: float = 10.0, teff_range=(4000.0, 9500.0), feh_range=None,
                logg_range=None, primary_only: bool = True, top: int | None = None,
                after_specobjid: int | None = None) -> str:
    """SQL (SkyServer dialect) selecting SSPP stars with usable labels, ordered by SPECOBJID.

    Cuts: Teff, [Fe/H], log g and RV not -9999, RV error > 0, S/N >= ``min_snr`` (SSPP itself
    needs 10), Teff (K) in ``teff_range``, optional [Fe/H] / log g (dex) ranges, and
    ``sciencePrimary = 1`` (one spectrum per object and plate) unless ``primary_only=False``.
    ``top`` (default ``n``) rows at most; ``after_specobjid`` continues a keyset page.
    """
    k = top if top is not None else n
    where = [f"p.{c} != {MISSING}" for c in ("teffadop", "fehadop", "loggadop", "elodiervfinal")]
    where += ["p.elodiervfinalerr > 0", f"p.snr >= {float(min_snr):g}"]
    for col, r, name in (("teffadop", teff_range, "Teff"), ("fehadop", feh_range, "[Fe/H]"),
                         ("loggadop", logg_range, "log g")):
        r = _range(r, name)
        if r is not None:
            where.append(f"p.{col} BETWEEN {r[0]:g} AND {r[1]:g}")
    if primary_only:
        where.append("s.sciencePrimary = 1")
    if after_specobjid is not None:
        where.append(f"s.specObjID > {int(after_specobjid)}")
    head = f"SELECT TOP {int(k)} " if k else "SELECT "
    return (head + ", ".join(f"{e} AS {a}" for e, a in SELECT)
            + "\nFROM sppParams AS p JOIN specObjAll AS s ON s.specObjID = p.specObjID"
            + "\nWHERE " + "\n  AND ".join(where) + "\nORDER BY s.specObjID")


def _snippet(text: str, n: int = 300) -> str:
    """The readable part of an HTML/text error page."""
    text = re.sub(r"(?is)<(script|style).*?</\1>", " ", text)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).strip()[:n]


def parse_skyserver_csv(text: str, source: str = "SkyServer") -> pd.DataFrame:
    """Parse a SqlSearch ``format=csv`` answer: a ``#Table1`` line, a header, the rows.

    Anything else (an HTML error page, "ERROR: ..." text) raises CatalogQueryError quoting it.
    """
    lines = text.lstrip("\ufeff").splitlines()
    if lines and lines[0].lstrip().startswith("#"):
        lines = lines[1:]  # "#Table1"
    while lines and not lines[0].strip():
        lines = lines[1:]
    if not lines:
        return pd.DataFrame(columns=[a for _, a in SELECT])
    header = [h.strip().upper() for h in lines[0].split(",")]
    if "SPECOBJID" not in header or "<" in lines[0]:
        raise CatalogQueryError(f"{source} did not return a CSV table; it said: {_snippet(text)!r}")
    from io import StringIO

    as_text = ("SPECOBJID", "RUN2D", "CLASS", "FLAG")
    text_cols = {h.strip(): str for h in lines[0].split(",") if h.strip().upper() in as_text}
    df = pd.read_csv(StringIO("\n".join(lines)), dtype=text_cols, keep_default_na=False, na_values=[""])
    df.columns = [c.strip().upper() for c in df.columns]
    return df


RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def http_retry(retries: int, backoff: float) -> Retry:
    """The retry policy of every request: ``retries`` retries of time-outs, cut connections and
    5xx/408/429 answers, waiting ``backoff * 2**k`` seconds (or what ``Retry-After`` asks).

    Parameters
    ----------
    retries : int
    backoff : float
        Seconds; the first wait.

    Returns
    -------
    urllib3.util.Retry
    """
    return Retry(total=retries, connect=retries, read=retries, status=retries, other=retries, redirect=5,
                 backoff_factor=backoff, status_forcelist=RETRY_STATUS, allowed_methods={"GET"},
                 respect_retry_after_header=True, raise_on_status=False)


def http_pool(url: str, maxsize: int = 8) -> urllib3.PoolManager:
    """A connection pool for ``url``'s host (through the environment's proxy, if it sets one).

    Parameters
    ----------
    url : str
    maxsize : int
        Connections kept per host (the download concurrency).

    Returns
    -------
    urllib3.PoolManager
    """
    u = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(u.scheme)
    headers = {"User-Agent": USER_AGENT}
    if proxy and not urllib.request.proxy_bypass(u.hostname or ""):
        return urllib3.ProxyManager(proxy, maxsize=maxsize, headers=headers)
    return urllib3.PoolManager(maxsize=maxsize, headers=headers)


def _attempts(retry: Retry) -> int:
    return len(retry.history) + 1


def _http_get_text(url: str, params: dict, *, timeout: float, retries: int, backoff: float, http=None) -> str:
    full = url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
    http = http or http_pool(url, 1)
    try:
        r = http.request("GET", full, retries=http_retry(retries, backoff), timeout=timeout)
    except MaxRetryError as e:
        reason, attempts = _net_reason(e.reason), retries + 1
    except Urllib3Error as e:
        reason, attempts = _net_reason(e), 1
    else:
        if r.status < 400:
            return r.data.decode("utf-8", errors="replace")
        reason = f"HTTP {r.status}: {_snippet(r.data.decode('utf-8', errors='replace')) or r.reason}"
        attempts = _attempts(r.retries) if r.retries else 1
    raise CatalogQueryError(f"SQL query to {url} failed after {attempts} attempt(s): {reason} "
                            "(check --sql-url, try again later, or use --source sas-fits)")


def _to_catalog(df: pd.DataFrame, rename: dict) -> pd.DataFrame:
    """Rename to the catalog's names and give every column a plain type."""
    df = df.rename(columns={c: c.strip().upper() for c in df.columns}).rename(columns=rename)
    for c in ("PLATE", "MJD", "FIBERID", "ZWARNING", "SCIENCEPRIMARY"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").fillna(-1).astype(np.int64)
    if "SPECOBJID" in df:
        ids = pd.to_numeric(df["SPECOBJID"].astype(str).str.strip(), errors="coerce")
        df["SPECOBJID"] = ids.fillna(-1).astype(np.int64)
    for c in ("RUN2D", "CLASS", "FLAG"):
        if c in df:
            df[c] = df[c].map(lambda v: (v.decode() if isinstance(v, bytes) else "" if pd.isna(v) else str(v)).strip())
    for c in df.columns:
        if c.endswith(("_ADOP", "_UNC", "_ERR")) or c == "SNR":
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    return df.reset_index(drop=True)


def query_catalog(sql_url: str = DEFAULT_SQL_URL, n: int | None = None, *, page_size: int = DEFAULT_PAGE_SIZE,
                  timeout: float = 600.0, retries: int = 4, backoff: float = 2.0, progress: bool = True,
                  http=None, **cuts) -> pd.DataFrame:
    """Run :func:`build_query` on a SkyServer ``SqlSearch`` URL, ``page_size`` rows at a time.

    Pages are keyset pages ('SELECT TOP k ... WHERE specObjID > last ORDER BY specObjID'), so
    a selection larger than SkyServer's row limit comes back whole. ``n=None``: every row.
    ``cuts``: keyword arguments of :func:`build_query`; they are applied again to every page
    (:func:`apply_cuts`), so a mirror that ignores them still gives a clean catalog.

    Parameters
    ----------
    sql_url : str
        SkyServer ``SqlSearch`` URL (or a mirror).
    n : int, optional
        Rows wanted; None: every row passing the cuts.
    page_size : int
        Rows per SQL page.
    timeout, retries, backoff
        Seconds per network operation; retries and first back-off of :func:`http_retry`.
    progress : bool
    http : urllib3.PoolManager, optional
        Default: a new one.
    **cuts
        Keyword arguments of :func:`build_query`.

    Returns
    -------
    DataFrame
        The catalog columns (underscore names, RV_ADOP in km/s).
    """
    from tqdm.auto import tqdm

    http = http or http_pool(sql_url, 1)
    frames, got, last = [], 0, None
    with tqdm(total=n, unit="row", desc="catalog", disable=not progress) as bar:
        while n is None or got < n:
            k = page_size if n is None else min(page_size, n - got)
            sql = build_query(None, top=k, after_specobjid=last, **cuts)
            text = _http_get_text(sql_url, {"cmd": sql, "format": "csv"}, timeout=timeout, retries=retries,
                                  backoff=backoff, http=http)
            page = parse_skyserver_csv(text, sql_url)
            if page.empty:
                break
            ids = pd.to_numeric(page["SPECOBJID"], errors="raise")
            if last is not None and (ids <= last).any():
                raise CatalogQueryError(f"{sql_url} ignored the keyset condition 'specObjID > {last}'")
            kept = apply_cuts(_to_catalog(page, SKYSERVER_RENAME), **cuts)  # a mirror may ignore WHERE
            frames.append(kept)
            got += len(kept)
            last = int(ids.max())
            bar.update(len(kept))
            if len(page) < k:
                break
    empty = _to_catalog(pd.DataFrame(columns=[a for _, a in SELECT]), SKYSERVER_RENAME)
    df = pd.concat(frames, ignore_index=True) if frames else empty
    return df.iloc[:n].reset_index(drop=True) if n is not None else df


def read_sspp_fits(path) -> pd.DataFrame:
    """The catalog columns of an SSPP ``ssppOut-drNN.fits`` file (HDU 1), no cuts applied."""
    with open_fits(path) as f:
        hdu = f[1]
        have = set(hdu.get_colnames())
        need = ("PLATE", "MJD", "FIBER", "TEFF_ADOP", "FEH_ADOP", "LOGG_ADOP", "RV_ADOP")
        missing = [c for c in need if c not in have]
        if missing:
            raise ValueError(f"{path}: not an SSPP catalog, HDU 1 lacks {', '.join(missing)}")
        data = hdu.read(columns=[c for c in SSPP_FITS_COLUMNS if c in have])
    df = pd.DataFrame({c: data[c].astype(data[c].dtype.newbyteorder("=")) for c in data.dtype.names})
    df = _to_catalog(df, SSPP_FITS_RENAME)
    # ssppOut stores RUN2D in 3 characters, too short for BOSS names: keep only what is certain
    df["RUN2D"] = df["RUN2D"].where(df["RUN2D"].isin(SDSS_RUN2D + BOSS_RUN2D), "") if "RUN2D" in df else ""
    return df


def apply_cuts(df: pd.DataFrame, *, min_snr: float = 10.0, teff_range=(4000.0, 9500.0), feh_range=None,
               logg_range=None, primary_only: bool = True) -> pd.DataFrame:
    """The cuts of :func:`build_query` on a catalog frame (underscore names)."""
    keep = np.ones(len(df), bool)
    for c in ("TEFF_ADOP", "FEH_ADOP", "LOGG_ADOP", "RV_ADOP"):
        v = df[c].to_numpy(float)
        keep &= np.isfinite(v) & (v != MISSING)
    keep &= df["RV_ADOP_ERR"].to_numpy(float) > 0 if "RV_ADOP_ERR" in df else True
    keep &= df["SNR"].to_numpy(float) >= float(min_snr)
    for c, r, name in (("TEFF_ADOP", teff_range, "Teff"), ("FEH_ADOP", feh_range, "[Fe/H]"),
                       ("LOGG_ADOP", logg_range, "log g")):
        r = _range(r, name)
        if r is not None:
            v = df[c].to_numpy(float)
            keep &= (v >= r[0]) & (v <= r[1])
    if primary_only and "SCIENCEPRIMARY" in df:
        keep &= df["SCIENCEPRIMARY"].to_numpy() == 1
    return df[keep].reset_index(drop=True)


def write_catalog(df: pd.DataFrame, out, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``OUT/catalog.fits`` and ``OUT/catalog.parquet`` atomically; ``meta`` goes in both."""
    from astropy.table import Table

    out = Path(out)
    meta = {"stellarparams_version": __version__, **(meta or {})}

    def fits_writer(tmp):
        t = Table.from_pandas(df)
        t.meta["EXTNAME"] = "CATALOG"
        t.meta["SPVERS"] = __version__
        t.meta["SOURCE"] = str(meta.get("source", ""))
        t.meta["COMMENTS"] = [f"stellarparams fetch {json.dumps(meta.get('config', {}), default=str)}"[:7000]]
        t.write(tmp, format="fits", overwrite=True)

    def parquet_writer(tmp):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, preserve_index=False)
        md = dict(table.schema.metadata or {})
        md[b"stellarparams"] = json.dumps(meta, default=str).encode()
        pq.write_table(table.replace_schema_metadata(md), tmp)

    return atomic_write(out / "catalog.fits", fits_writer), atomic_write(out / "catalog.parquet", parquet_writer)


# ----------------------------------------------------------------------------- files on the SAS


def sas_path(plate: int, mjd: int, fiberid: int, run2d: str, lite: bool = True) -> str:
    """Path of one spectrum in the DR12 SAS tree, relative to the SAS root.

    RUN2D 26, 103, 104 (SDSS-I/II) live under ``dr12/sdss/``, the others (BOSS) under
    ``dr12/boss/``; lite files under ``spectra/lite/PLATE4/``.
    """
    run2d = str(run2d).strip()
    survey = "sdss" if run2d in SDSS_RUN2D else "boss"
    sub = "spectra/lite" if lite else "spectra"
    name = spec_filename(int(plate), int(mjd), int(fiberid))
    return f"dr12/{survey}/spectro/redux/{run2d}/{sub}/{int(plate):04d}/{name}"


def sas_urls(sas_url: str, plate: int, mjd: int, fiberid: int, run2d: str, lite: bool = True) -> list[str]:
    """URLs to try for one spectrum: its RUN2D, or every DR12 reduction when RUN2D is unknown."""
    base = sas_url.rstrip("/") + "/"
    run2d = "" if run2d is None or (isinstance(run2d, float) and np.isnan(run2d)) else str(run2d).strip()
    if run2d:
        cands = [run2d]
    else:
        cands = list(SDSS_RUN2D + BOSS_RUN2D) if int(plate) < BOSS_FIRST_PLATE else list(BOSS_RUN2D + SDSS_RUN2D)
    return [base + sas_path(plate, mjd, fiberid, r, lite) for r in cands]


def _size_problem(path) -> str | None:
    if not os.path.isfile(path):
        return "missing file"
    size = os.path.getsize(path)
    if size == 0 or size % FITS_BLOCK:
        return f"truncated: {size} bytes is not a whole number of {FITS_BLOCK}-byte FITS blocks"
    return None


def _fits_error(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return f"not readable FITS: {first}"


def check_spectrum_file(path) -> str | None:
    """None if ``path`` is a complete spectrum (whole FITS blocks, COADD table readable), else why not."""
    bad = _size_problem(path)
    if bad:
        return bad
    try:
        with open_fits(path) as f:
            if "COADD" not in f:
                return "no COADD HDU"
            hdu = f["COADD"]
            if hdu.get_nrows() == 0:
                return "empty COADD table"
            hdu.read()  # fails when the data stop short of what the header declares
            for h in f:
                if "DATASUM" in h.read_header():
                    h.verify_checksum()
    except Exception as e:  # fitsio raises OSError/ValueError for damaged files
        return _fits_error(e)
    return None


def check_fits_table(path) -> str | None:
    """None if ``path`` is a complete FITS file with a non-empty table in HDU 1, else why not."""
    bad = _size_problem(path)
    if bad:
        return bad
    try:
        with open_fits(path) as f:
            if len(f) < 2 or f[1].get_exttype() != "BINARY_TBL":
                return "no binary table in HDU 1"
            n = f[1].get_nrows()
            if n == 0:
                return "empty table"
            f[1].read(rows=[n - 1])
    except Exception as e:
        return _fits_error(e)
    return None


# ----------------------------------------------------------------------------- downloads


@dataclass
class FileResult:
    """What happened to one file: status is 'downloaded', 'present' or 'failed'."""

    file: str
    url: str
    status: str
    bytes: int = 0
    attempts: int = 0
    reason: str = ""


class _Again(Exception):
    """The body came short or the file is corrupt: fetch it again (counts against the retries)."""


class _Failed(Exception):
    """No more tries: the reason, and how many requests were made."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.attempts = attempts


class _NotFound(_Failed):
    pass


class _Stopped(Exception):
    pass


def _net_reason(e: BaseException) -> str:
    if "timed out" in str(e) or isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
        return "timeout"
    return f"network: {type(e).__name__}: {e}"[:200]


def _get_to_file(http, url: str, part: Path, retry: Retry, timeout: float, stop: threading.Event, count):
    """GET ``url`` into ``part``, continuing a partial ``part`` with an HTTP Range request.

    urllib3 retries time-outs, refused connections and 5xx/408/429 answers under ``retry``.
    Returns (size of ``part``, the retry state after this request). Raises _Again (body cut
    short: retry the body), _NotFound (404), _Failed (other 4xx, retries used up).
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = http.request("GET", url, headers=headers, retries=retry, timeout=timeout, preload_content=False,
                            enforce_content_length=False)  # we keep and count what came, then compare
    except MaxRetryError as e:
        raise _Failed(_net_reason(e.reason), _attempts(retry) + retry.total) from None
    retry = resp.retries or retry
    try:
        if resp.status == 404:
            raise _NotFound("http_404 not found", _attempts(retry))
        if resp.status == 416:  # our partial file does not fit the server's: start again
            part.unlink(missing_ok=True)
            raise _Again("http_416 range not satisfiable")
        if resp.status >= 400:
            raise _Failed(f"http_{resp.status} {resp.reason}", _attempts(retry))
        m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        append = have > 0 and resp.status == 206 and m is not None and int(m.group(1)) == have
        expected = resp.headers.get("Content-Length")
        n = 0
        try:
            with open(part, "ab" if append else "wb") as f:
                for chunk in resp.stream(CHUNK):
                    if stop.is_set():
                        raise _Stopped()
                    f.write(chunk)
                    n += len(chunk)
                    count(len(chunk))
        except (OSError, Urllib3Error) as e:  # time-out or connection cut mid-body: keep the part
            raise _Again("truncated: " + _net_reason(e)) from None
        if expected is not None and n != int(expected):
            raise _Again(f"truncated: got {n} of {expected} bytes")
    finally:
        resp.release_conn()
    return (have if append else 0) + n, retry


def _fetch_one(dest: Path, urls: list[str], check, *, http, retry: Retry, stop: threading.Event, timeout: float,
               count) -> FileResult:
    """Make ``dest`` a complete file: keep it if ``check`` passes, else download (retrying under ``retry``)."""
    url = urls[0]
    try:
        if dest.exists():
            bad = check(dest)
            if bad is None:
                return FileResult(str(dest), url, "present", dest.stat().st_size)
            dest.unlink()  # corrupt or incomplete on disk: fetch it again
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        not_found = 0  # URLs that answered 404 before this one
        for i, url in enumerate(urls):
            while True:
                if stop.is_set():
                    return FileResult(str(dest), url, "failed", 0, _attempts(retry) - 1, "interrupted")
                try:
                    size, retry = _get_to_file(http, url, part, retry, timeout, stop, count)
                    bad = check(part)
                    if bad is None:
                        os.replace(part, dest)
                        return FileResult(str(dest), url, "downloaded", size, _attempts(retry) + not_found)
                    part.unlink(missing_ok=True)
                    raise _Again(f"corrupt: {bad}")
                except _NotFound as e:
                    if i == len(urls) - 1:
                        return FileResult(str(dest), url, "failed", 0, e.attempts + not_found, str(e))
                    not_found += 1
                    break  # try the next candidate URL
                except _Again as e:
                    try:
                        retry = retry.increment("GET", url, error=ProtocolError(str(e)))
                    except MaxRetryError:
                        return FileResult(str(dest), url, "failed", 0, _attempts(retry) + not_found, str(e))
                    retry.sleep()
        raise AssertionError("unreachable: the last URL returns")
    except _Failed as e:
        return FileResult(str(dest), url, "failed", 0, e.attempts + not_found, str(e))
    except _Stopped:
        return FileResult(str(dest), url, "failed", 0, 0, "interrupted")
    except Exception as e:  # a bug or a full disk must not stop the batch
        return FileResult(str(dest), url, "failed", 0, 0, f"error: {type(e).__name__}: {e}"[:300])


def _run_jobs(jobs, check, *, concurrency: int, retries: int, timeout: float, backoff: float, progress: bool,
              desc: str, results: list, on_file=None, http=None) -> list[FileResult]:
    """Fetch ``jobs`` [(dest, [url, ...]), ...] with ``concurrency`` threads; fills ``results``.

    ``http``: a urllib3 PoolManager (default: a new one; tests inject one).
    On KeyboardInterrupt (or any exception from ``on_file``) the queued jobs are cancelled, the
    running ones stop at their next chunk (their .part files stay for the next run) and the
    exception propagates.
    """
    from tqdm.auto import tqdm

    stop, lock, nbytes = threading.Event(), threading.Lock(), [0]

    def count(k):
        with lock:
            nbytes[0] += k

    t0, nfail = time.monotonic(), 0
    bar = tqdm(total=len(jobs), unit="file", desc=desc, disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=max(1, int(concurrency)))
    http = http or (http_pool(jobs[0][1][0], max(1, int(concurrency))) if jobs else None)
    retry = http_retry(retries, backoff)
    try:
        pending = {pool.submit(_fetch_one, d, u, check, http=http, retry=retry, timeout=timeout, stop=stop,
                               count=count) for d, u in jobs}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                r = fut.result()
                results.append(r)
                nfail += r.status == "failed"
                bar.update(1)
                if on_file is not None:
                    on_file(r)
            mb, dt = nbytes[0] / 1e6, max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{mb:.1f} MB, {mb / dt:.2f} MB/s, {nfail} failed", refresh=False)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
        pool.shutdown(wait=True)
    return results


def _write_failures(out: Path, results: list[FileResult]) -> Path:
    path = out / "failures.csv"
    fails = sorted((r for r in results if r.status == "failed"), key=lambda r: r.file)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "url", "reason", "attempts"])
            for r in fails:
                w.writerow([os.path.relpath(r.file, out), r.url, r.reason, r.attempts])

    return atomic_write(path, write)


def _summarise(results: list[FileResult], seconds: float) -> dict:
    fails = [r for r in results if r.status == "failed"]
    reasons: dict[str, int] = {}
    for r in fails:
        key = r.reason.split(":")[0].split(" ")[0] if r.reason else "unknown"
        reasons[key] = reasons.get(key, 0) + 1
    got = sum(r.bytes for r in results if r.status == "downloaded")
    return {"files": len(results), "downloaded": sum(r.status == "downloaded" for r in results),
            "present": sum(r.status == "present" for r in results), "failed": len(fails),
            "failed_by_reason": reasons, "bytes_downloaded": int(got), "seconds": round(seconds, 3),
            "mb_per_s": round(got / 1e6 / max(seconds, 1e-9), 3)}


def download(catalog, out, sas_url: str = DEFAULT_SAS_URL, *, lite: bool = True, concurrency: int = 8,
             retries: int = 4, timeout: float = 30.0, backoff: float = 1.0, progress: bool = True,
             on_file=None, http=None) -> dict:
    """Download the spectrum of every catalog row into ``OUT/spectra/`` and return a summary.

    Files that are already complete are kept; corrupt ones are fetched again; ``.part`` files
    left by an interrupted run are continued (HTTP Range). Each file is retried ``retries``
    times on 5xx/408/429 answers, time-outs (``timeout`` seconds per network operation), cut
    connections and short bodies, waiting ``backoff * 2**k`` seconds or what ``Retry-After``
    asks (:func:`http_retry`); a 404 tries the other DR12 reductions only when RUN2D is
    unknown. Every failure, with its reason, goes to ``OUT/failures.csv``.

    Parameters
    ----------
    catalog : DataFrame or path
        PLATE, MJD, FIBERID, RUN2D (.parquet/.fits path or a DataFrame).
    out : str or Path
        The fetch folder; spectra go to ``OUT/spectra/``.
    sas_url : str
        SAS root URL (or a mirror).
    lite : bool
        Lite files (no per-exposure HDUs).
    concurrency : int
        Parallel downloads.
    retries, timeout, backoff
        See above and :func:`http_retry`.
    progress : bool
    on_file : callable, optional
        ``on_file(FileResult)`` after each file (raise from it to stop the run).
    http : urllib3.PoolManager, optional
        Default: a new one.

    Returns
    -------
    dict
        files, downloaded, present, failed, failed_by_reason, bytes_downloaded, seconds,
        mb_per_s, failures_csv.
    """
    df = catalog if isinstance(catalog, pd.DataFrame) else read_catalog(catalog)
    missing = [c for c in ("PLATE", "MJD", "FIBERID") if c not in df]
    if missing:
        raise ValueError(f"the catalog lacks column(s) {', '.join(missing)}")
    out = Path(out)
    spectra = out / "spectra"
    run2d = df["RUN2D"] if "RUN2D" in df else pd.Series([""] * len(df))
    jobs, seen = [], set()
    for p, m, f, r in zip(df["PLATE"], df["MJD"], df["FIBERID"], run2d):
        dest = spectra / spec_filename(int(p), int(m), int(f))
        if dest not in seen:
            seen.add(dest)
            jobs.append((dest, sas_urls(sas_url, p, m, f, r, lite)))
    results: list[FileResult] = []
    t0 = time.monotonic()
    try:
        _run_jobs(jobs, check_spectrum_file, concurrency=concurrency, retries=retries, timeout=timeout,
                  backoff=backoff, progress=progress, desc="spectra", results=results, on_file=on_file, http=http)
    finally:  # also on interrupt: record what is known so far
        _write_failures(out, results)
    summary = _summarise(results, time.monotonic() - t0)
    summary["failures_csv"] = str(out / "failures.csv")
    return summary


def download_sspp_fits(out, sas_url: str = DEFAULT_SAS_URL, *, retries: int = 4, timeout: float = 30.0,
                       backoff: float = 1.0, progress: bool = True, http=None) -> Path:
    """Download (or resume) the DR12 SSPP catalog FITS into ``OUT/sspp/``.

    Parameters
    ----------
    out : str or Path
    sas_url : str
    retries, timeout, backoff, progress, http
        As in :func:`download`.

    Returns
    -------
    Path
        The downloaded, checked FITS file.
    """
    dest = Path(out) / "sspp" / Path(SSPP_FITS_PATH).name
    url = sas_url.rstrip("/") + "/" + SSPP_FITS_PATH
    results: list[FileResult] = []
    _run_jobs([(dest, [url])], check_fits_table, concurrency=1, retries=retries, timeout=timeout, backoff=backoff,
              progress=progress, desc="sspp catalog", results=results, http=http)
    r = results[0]
    if r.status == "failed":
        raise CatalogQueryError(f"could not download {url}: {r.reason}. Check --sas-url, or re-run to resume.")
    return dest


# ----------------------------------------------------------------------------- the whole step


def fetch(n: int = 50_000, out="data/sdss", *, sql_url: str = DEFAULT_SQL_URL, sas_url: str = DEFAULT_SAS_URL,
          source: str = "skyserver", min_snr: float = 10.0, teff_range=(4000.0, 9500.0), feh_range=None,
          logg_range=None, primary_only: bool = True, sample: str = "random", seed: int = 0, lite: bool = True,
          concurrency: int = 8, retries: int = 4, timeout: float = 30.0, backoff: float = 1.0,
          page_size: int = DEFAULT_PAGE_SIZE, spectra: bool = True, refresh_catalog: bool = False,
          progress: bool = True, on_file=None, wait: bool = False, http=None, run: Run | None = None) -> dict:
    """Select ``n`` SSPP stars, write the catalog, download their spectra.

    The catalog is reused when ``OUT/fetch.json`` shows the same selection, unless
    ``refresh_catalog``. Writes OUT/catalog.{fits,parquet}, OUT/spectra/, OUT/failures.csv and
    OUT/fetch.json. One fetch at a time writes OUT (an advisory lock).

    Parameters
    ----------
    n : int
        Stars wanted.
    out : str or Path
        The fetch folder.
    sql_url, sas_url : str
        SkyServer SqlSearch URL and SAS root URL (or mirrors).
    source : str
        "skyserver" (SQL on ``sql_url``) or "sas-fits" (the SSPP FITS file under ``sas_url``).
    min_snr, teff_range, feh_range, logg_range, primary_only
        The cuts of :func:`build_query`.
    sample : str
        "random" draws ``n`` of all stars passing the cuts with ``seed`` (the whole selection
        is fetched, page by page); "first" keeps the first ``n`` by SPECOBJID (cheaper, but
        early plates only).
    seed : int
    lite, concurrency, retries, timeout, backoff, on_file
        As in :func:`download`.
    page_size : int
        Rows per SQL page.
    spectra : bool
        Also download the spectra (False: the catalog only).
    refresh_catalog : bool
    progress : bool
        Progress bars and catalog lines.
    run : stellarparams.context.Run, optional
        The run settings as one object (only ``progress`` is read); when given, ``progress`` is not.
    wait : bool
        When another fetch writes OUT: wait (True) or raise :class:`files.OutputBusy`,
        naming the holder's PID (False).
    http : urllib3.PoolManager, optional
        For every request (default: new ones).

    Returns
    -------
    dict
        {"catalog": {rows, reused, fits, parquet}, "spectra": the :func:`download` summary,
        "seconds"}.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if sample not in ("random", "first"):
        raise ValueError(f"sample must be 'random' or 'first', got {sample!r}")
    if n is None or int(n) < 1:
        raise ValueError(f"n must be a positive number of stars, got {n}")
    run = run or Run(progress=progress)
    cuts = dict(min_snr=float(min_snr), teff_range=_range(teff_range, "Teff"), feh_range=_range(feh_range, "[Fe/H]"),
                logg_range=_range(logg_range, "log g"), primary_only=bool(primary_only))
    selection = {"source": source, "n": int(n), "sample": sample, "seed": int(seed), **cuts}
    query = (build_query(None if sample == "random" else int(n), top=page_size, **cuts) if source == "skyserver"
             else None)
    net = dict(retries=retries, timeout=timeout, backoff=backoff, http=http)  # every request's
    with locked_output(out, wait) as out:
        t0, meta_path = time.monotonic(), out / "fetch.json"
        old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        reuse = (out / "catalog.parquet").exists() and not refresh_catalog and old.get("selection") == json.loads(
            json.dumps(selection))
        df = _catalog(out, selection, cuts, query, reuse, sql_url, sas_url, page_size, net, run)
        summary = {"catalog": {"rows": len(df), "reused": reuse, "fits": str(out / "catalog.fits"),
                               "parquet": str(out / "catalog.parquet")}}
        record = {"stellarparams_version": __version__, "created": datetime.now(timezone.utc).isoformat(),
                  "selection": selection, "source": source, "sql_url": sql_url, "sas_url": sas_url, "query": query,
                  "download": {"lite": lite, "concurrency": concurrency, "retries": retries, "timeout": timeout,
                               "backoff": backoff}, "status": "catalog written"}
        _write_record(meta_path, record)
        if spectra:
            try:
                summary["spectra"] = download(df, out, sas_url, lite=lite, concurrency=concurrency, on_file=on_file,
                                              progress=run.progress, **net)
            except BaseException:
                _write_record(meta_path, dict(record, status="interrupted during the spectra; re-run to resume"))
                raise
        summary["seconds"] = round(time.monotonic() - t0, 3)
        _write_record(meta_path, dict(record, status="done", summary=summary))
    return summary


def _write_record(path: Path, record: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))


def _catalog(out: Path, selection: dict, cuts: dict, query, reuse: bool, sql_url, sas_url, page_size, net: dict,
             run: Run) -> pd.DataFrame:
    """The catalog of :func:`fetch`: OUT/catalog.parquet when ``reuse``, else queried (or read from the SSPP
    FITS file), cut, drawn and written to OUT/catalog.{fits,parquet}."""
    cat_path, n, sample = out / "catalog.parquet", selection["n"], selection["sample"]
    if reuse:
        df = read_catalog(cat_path)
        run.say(f"catalog: reusing {cat_path} ({len(df)} stars, same selection)", file=sys.stdout)
        return df
    if selection["source"] == "skyserver":
        df = query_catalog(sql_url, None if sample == "random" else n, page_size=page_size, progress=run.progress,
                           http=net["http"], **cuts)
    else:
        df = read_sspp_fits(download_sspp_fits(out, sas_url, progress=run.progress, **net))
    parent = len(df)
    df = apply_cuts(df, **cuts)  # the query's cuts again: a mirror or the FITS file may not apply them
    df = df.drop_duplicates(["PLATE", "MJD", "FIBERID"]).reset_index(drop=True)
    if sample == "random" and len(df) > n:
        df = df.sample(n=n, random_state=selection["seed"]).sort_index().reset_index(drop=True)  # keeps SPECOBJID order
    df = df.iloc[:n].copy()
    df["FILE"] = ["spectra/" + spec_filename(int(p), int(m), int(f))  # relative to the catalog's folder
                  for p, m, f in zip(df["PLATE"], df["MJD"], df["FIBERID"])]
    df = df[[c for c in CATALOG_COLUMNS if c in df] + [c for c in df if c not in CATALOG_COLUMNS]]
    write_catalog(df, out, {"source": selection["source"], "config": selection, "query": query, "selected": parent})
    if len(df) < n:
        run.say(f"catalog: only {len(df)} stars pass the cuts (asked for {n})", file=sys.stdout)
    return df


# ----------------------------------------------------------------------------- CLI


def _pair(text: str):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected two numbers 'LOW,HIGH', got {text!r}") from None
    return lo, hi


def add_arguments(parser):
    parser.description = (
        "Select SDSS DR12 stars with SEGUE Stellar Parameter Pipeline labels, write their catalog "
        "(OUT/catalog.fits and .parquet, read by `prepare`) and download their spectra to OUT/spectra/. "
        "Re-running the same command resumes: complete files are skipped, corrupt ones fetched again. "
        "Failures are listed with their reason in OUT/failures.csv.")
    parser.add_argument("--n", type=int, default=50_000, help="number of stars (spectra)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--min-snr", type=float, default=10.0, help="minimum SSPP S/N (SSPP needs >= 10)")
    parser.add_argument("--teff-range", default="4000,9500", help="Teff range in K, 'LOW,HIGH'")
    parser.add_argument("--feh-range", default=None, help="optional [Fe/H] range in dex, 'LOW,HIGH'")
    parser.add_argument("--logg-range", default=None, help="optional log g range in dex, 'LOW,HIGH'")
    parser.add_argument("--all-spectra", action="store_true",
                        help="also keep spectra that are not sciencePrimary")
    parser.add_argument("--source", choices=SOURCES, default="skyserver",
                        help="catalog from the SkyServer SQL service, or from the SSPP FITS file on the SAS (~2 GB)")
    parser.add_argument("--sample", choices=("random", "first"), default="random",
                        help="random: n stars drawn with --seed from all that pass the cuts; first: lowest SPECOBJIDs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    parser.add_argument("--sql-url", default=DEFAULT_SQL_URL, help="SkyServer SqlSearch URL (or a mirror)")
    parser.add_argument("--sas-url", default=DEFAULT_SAS_URL, help="SAS root URL (or a mirror / local server)")
    parser.add_argument("--full", action="store_true", help="download full spectra instead of lite ones")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel downloads")
    parser.add_argument("--retries", type=int, default=4, help="retries per file on 5xx, time-outs, short bodies")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation")
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="rows per SQL page")
    parser.add_argument("--catalog-only", action="store_true", help="write the catalog, download no spectra")
    parser.add_argument("--refresh-catalog", action="store_true", help="query the catalog again even if present")
    parser.add_argument("--wait", action="store_true", help="if another fetch is writing OUT, wait for it instead of failing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args) -> int:
    ranges = {k: _pair(v) if v else None for k, v in
              (("teff_range", args.teff_range), ("feh_range", args.feh_range), ("logg_range", args.logg_range))}
    s = fetch(args.n, args.out, sql_url=args.sql_url, sas_url=args.sas_url, source=args.source,
              min_snr=args.min_snr, primary_only=not args.all_spectra, sample=args.sample, seed=args.seed,
              lite=not args.full, concurrency=args.concurrency, retries=args.retries, timeout=args.timeout,
              page_size=args.page_size, spectra=not args.catalog_only, refresh_catalog=args.refresh_catalog,
              wait=args.wait, run=Run.from_args(args), **ranges)
    c = s["catalog"]
    print(f"catalog: {c['rows']} stars{' (reused)' if c['reused'] else ''} -> {c['fits']}, {c['parquet']}")
    d = s.get("spectra")
    if d is None:
        return 0
    print(f"spectra: {d['downloaded'] + d['present']} of {d['files']} on disk ({d['downloaded']} downloaded, "
          f"{d['present']} already present), {d['failed']} failed")
    print(f"downloaded {d['bytes_downloaded'] / 1e6:.1f} MB in {d['seconds']:.0f} s ({d['mb_per_s']:.2f} MB/s)")
    if d["failed"]:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(d["failed_by_reason"].items()))
        print(f"failures ({why}) are listed in {d['failures_csv']}; re-run the same command to retry them",
              file=sys.stderr)
        return 1
    return 0
