"""LAMOST low-resolution (LRS) spectrum files and the A/F/G/K stellar-parameter catalog.

Data model followed (docs/surveys.md has the links and which release carries which layout):

- LAMOST "Fits Files" page for the pilot data (lamost.org/public/dr/algorithms/ff): the
  primary HDU is an image of 5 rows: flux, inverse variance, a third row that is NOT a
  wavelength array (the page calls it the continuum-subtracted spectrum), and-mask, or-mask.
  The wavelengths are only in the header (below). Real DR1 files of the pilot survey
  (pipeline v2.6.4) are 5 x 3904 images of this kind, without OBSID.
- LAMOST DR1-DR5 "Data Production Description", section 2 (dr1.lamost.org/doc/
  data-production-description, ..., dr5.lamost.org/v3/doc/data-production-description) and
  real DR6/DR7 files (pipeline v2.9.7, header ``EXTEN0 = 'Flux, Inverse, Wavelength,
  Andmask, Ormask'``): the same 5-row image (3909 pixels) whose third row IS the wavelength.
- LAMOST DR8 v1.0 LRS "Data Production Description" (lamost.org/dr8/v1.0/doc/
  lr-data-production-description): from DR8 on, HDU 1 is a one-row binary table with vector
  columns FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK, NORMALIZATION (all float32).
- Header wavelength solution (real DR6/DR7 headers): ``COEFF0`` = log10 of the first pixel's
  wavelength, ``COEFF1`` = log10 step per pixel (``NWORDER = 2``, ``WFITTYPE = 'LOG-LINEAR'``),
  repeated as ``CRVAL1``, ``CD1_1``, ``CRPIX1 = 1`` with ``DC-FLAG = 1`` (log-linear), and
  ``VACUUM = T``. :func:`header_wavelength` reads either.
- Wavelengths are vacuum, heliocentric, log-linear binned; flux is relative (not absolute).
  ``Z`` is the redshift of the object (LASP), so its RV is c z (relativistic, :func:`rv_from_z`);
  ``HELIO_RV`` is NOT the star's velocity but the heliocentric correction already applied
  (header comment "[km/s] Heliocentric correction"), kept in ``header`` only. OBSID, LMJD,
  PLANID, SPID, FIBERID identify the spectrum; CLASS is STAR/GALAXY/QSO/Unknown.
- File names: ``spec-LMJD-PLANID_spSS-FFF.fits[.gz]`` (PLANID is text, e.g. GAC116N20B1; the
  pilot-data page writes ``spec-MMMMM-YYYYspXX-fff.fit`` without the underscore).
- Catalog: the LRS "A, F, G and K type star" parameter table with lower-case columns obsid,
  lmjd, planid, spid, fiberid, teff, teff_err, logg, logg_err, feh, feh_err, rv, rv_err,
  snrg (read upper-case here, like every catalog). A row is matched to its file by FILE, by
  (lmjd, planid, spid, fiberid) against the file names and then the headers, or by obsid
  (:func:`locate`).

A pixel is unusable where ANDMASK != 0 (bad in every exposure) or ivar == 0.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import sdss
from .physics import rv_from_z
from .spectrum import Record, make_record

NAME_RE = re.compile(r"^spec-(\d+)-(.+?)_?sp(\d+)-(\d+)\.fits?(\.gz)?$", re.I)
EARLY_ROWS = ("flux", "ivar", "wavelength", "andmask", "ormask")  # DR1-DR7; the pilot's third row is no wavelength
TABLE_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION")
KEY_COLUMNS = ("LMJD", "PLANID", "SPID", "FIBERID")
LABELS = {"teff": "TEFF", "feh": "FEH", "logg": "LOGG"}
RV_COLUMN = "RV"
HEADER_KEYS = ("OBSID", "DESIG", "RA", "DEC", "LMJD", "MJD", "PLANID", "SPID", "FIBERID", "CLASS", "SUBCLASS",
               "Z", "Z_ERR", "HELIO_RV", "SNRU", "SNRG", "SNRR", "SNRI", "SNRZ", "DATA_V", "VERSPIPE")
WAVE_RANGE = (1000.0, 100000.0)   # A: a row outside this is not a wavelength array in Angstrom
WAVE_RTOL = 1e-5                  # a wavelength row and the header solution agree to this (a pixel is 2.3e-4)



def parse_name(name: str):
    """(lmjd, planid, spid, fiberid) from ``spec-LMJD-PLANID_spSS-FFF.fits[.gz]``, else None.

    Parameters
    ----------
    name : str
        A file name (no folder).

    Returns
    -------
    tuple of (int, str, int, int), or None
    """
    m = NAME_RE.match(name)
    return (int(m[1]), m[2], int(m[3]), int(m[4])) if m else None


def spec_filename(lmjd: int, planid: str, spid: int, fiberid: int) -> str:
    """LAMOST's file name of a spectrum, ``spec-LMJD-PLANID_spSS-FFF.fits``."""
    return f"spec-{lmjd}-{planid}_sp{spid:02d}-{fiberid:03d}.fits"


def header_wavelength(hdr, n: int, path=""):
    """Vacuum wavelengths (A) of ``n`` pixels from a LAMOST header's solution, or None without one.

    ``COEFF0`` / ``COEFF1`` (log10 start and step) first; else ``CRVAL1`` and ``CD1_1`` (or
    ``CDELT1``) at ``CRPIX1`` (default 1), log10 when ``DC-FLAG`` = 1, linear Angstrom when
    ``DC-FLAG`` = 0; without ``DC-FLAG`` a ``CRVAL1`` below 10 is log10 (no wavelength in
    Angstrom is that small), else linear.

    Parameters
    ----------
    hdr : mapping
        The primary header.
    n : int
        Number of pixels.
    path : str or Path
        For the error message.

    Returns
    -------
    (n,) float64 or None
        None when the header has neither pair of keys.

    Raises
    ------
    sdss.SpectrumError
        ``bad_wavelength``: the keys are there but not finite numbers, the step is not > 0,
        or the wavelengths fall outside 1000-100000 A.
    """
    if "COEFF0" in hdr or "COEFF1" in hdr:
        c0, c1 = sdss._number(hdr, "COEFF0"), sdss._number(hdr, "COEFF1")
        what, log, pix = f"COEFF0 = {hdr.get('COEFF0')!r}, COEFF1 = {hdr.get('COEFF1')!r}", True, 1.0
    elif "CRVAL1" in hdr:
        c0 = sdss._number(hdr, "CRVAL1")
        c1 = sdss._number(hdr, "CD1_1") if "CD1_1" in hdr else sdss._number(hdr, "CDELT1")
        pix = sdss._number(hdr, "CRPIX1", 1.0)
        flag = hdr.get("DC-FLAG")
        log = sdss._number(hdr, "DC-FLAG") == 1 if flag is not None else c0 < 10
        what = (f"CRVAL1 = {hdr.get('CRVAL1')!r}, CD1_1/CDELT1 = {c1!r}, CRPIX1 = {hdr.get('CRPIX1', 1)!r}, "
                f"DC-FLAG = {flag!r}")
    else:
        return None
    if not (np.isfinite(c0) and np.isfinite(c1) and np.isfinite(pix)) or c1 <= 0:
        raise sdss.SpectrumError(path, "bad_wavelength", f"header wavelength solution {what}: need finite numbers "
                                 "and a step > 0")
    x = c0 + c1 * (np.arange(n, dtype=np.float64) + 1.0 - pix)
    wave = 10.0 ** x if log else x
    if not (WAVE_RANGE[0] < wave[0] and wave[-1] < WAVE_RANGE[1]):
        raise sdss.SpectrumError(path, "bad_wavelength", f"header wavelength solution {what} gives "
                                 f"{wave[0]:.4g}-{wave[-1]:.4g} A")
    return wave


def _is_wavelength(row) -> bool:
    """Whether ``row`` looks like a wavelength array in Angstrom: finite, increasing, 1000-100000 A."""
    row = np.asarray(row, np.float64)
    return bool(row.ndim == 1 and len(row) > 1 and np.isfinite(row).all() and (np.diff(row) > 0).all()
                and WAVE_RANGE[0] < row[0] and row[-1] < WAVE_RANGE[1])


def _wavelength(path, row, hdr, n: int, where: str) -> np.ndarray:
    """The wavelengths of a file: its wavelength ``row`` (or column) when it is one, else the header's.

    A wavelength row that disagrees with the header's solution (by more than :data:`WAVE_RTOL`)
    is refused: which of the two is right cannot be told.
    """
    hw = header_wavelength(hdr, n, path)
    if row is not None and _is_wavelength(row):
        row = np.asarray(row, np.float64)
        if hw is not None and not np.allclose(row, hw, rtol=WAVE_RTOL, atol=0):
            k = int(np.argmax(np.abs(row / hw - 1)))
            raise sdss.SpectrumError(path, "bad_wavelength", f"{where} ({row[k]:.3f} A at pixel {k}) disagrees with "
                                     f"the header's wavelength solution ({hw[k]:.3f} A)")
        return row
    if hw is not None:
        return hw
    seen = "missing" if row is None else (f"values {np.nanmin(row):.4g} to {np.nanmax(row):.4g}, not an increasing "
                                          "wavelength array" if np.isfinite(row).any() else "not finite")
    raise sdss.SpectrumError(path, "bad_wavelength", f"{where} is {seen}, and the header has no wavelength solution "
                             "(COEFF0/COEFF1, or CRVAL1/CD1_1 with DC-FLAG)")


def _header_keys(hdr, name: str) -> dict:
    """``keys`` of a spectrum: obsid and (lmjd, planid, spid, fiberid) from the header, else the file name."""
    keys = {}
    if all(k in hdr for k in KEY_COLUMNS):
        keys["lmjd_planid_spid_fiberid"] = (sdss._int(hdr["LMJD"]), str(hdr["PLANID"]).strip(),
                                            sdss._int(hdr["SPID"]), sdss._int(hdr["FIBERID"]))
    elif parse_name(name):
        keys["lmjd_planid_spid_fiberid"] = parse_name(name)
    if "OBSID" in hdr and sdss._int(hdr["OBSID"]):
        keys["obsid"] = sdss._int(hdr["OBSID"])
    return keys


def file_keys(path) -> dict:
    """The ``keys`` of a LAMOST file from its primary header (cheap: no data read), else its name.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict
        ``obsid`` (when the header has a nonzero OBSID) and ``lmjd_planid_spid_fiberid``;
        empty for an unreadable file with an unparseable name.
    """
    try:
        sdss.check_headers(path)  # a damaged header must not make cfitsio allocate gigabytes
        with sdss.open_fits(path) as f:
            hdr = f[0].read_header()
    except (sdss.SpectrumError, OSError, ValueError, KeyError, UnicodeDecodeError):
        hdr = {}
    return _header_keys(hdr, Path(path).name)


def _z_or_nan(hdr) -> float:
    """The header's Z; NaN when missing, not a number, or LAMOST's -9999 (no redshift)."""
    z = sdss._number(hdr, "Z")
    return z if np.isfinite(z) and z > sdss.SENTINEL else float("nan")


def read_spectrum(path) -> Record:
    """Read one LAMOST LRS file (any layout, detected from the file).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Record
        ``ident`` = OBSID (else the file's stem); ``wave`` in vacuum Angstrom: the file's
        wavelength row or column when it holds one, else the header's solution
        (:func:`header_wavelength`; the pilot layout); ``z`` = Z and ``rv`` = c z (km/s,
        NaN without Z); ``keys`` obsid and (lmjd, planid, spid, fiberid) from the header, else
        the file name; header metadata in ``header`` (HELIO_RV there is the heliocentric
        correction LAMOST applied; the DR8 NORMALIZATION vector as ``header["NORMALIZATION"]``).

    Raises
    ------
    sdss.SpectrumError
        ``bad_layout`` (primary image without 5 rows, a table with more or fewer than one
        row), ``bad_wavelength`` (no wavelength row and no header solution, a damaged or
        disagreeing solution), ``missing_columns``, ``not_lamost``, ``unreadable``, ``missing_file``.
    """
    path = Path(path)
    if not path.is_file():
        raise sdss.SpectrumError(path, "missing_file", f"no such file: {path}")
    if path.stat().st_size == 0:
        raise sdss.SpectrumError(path, "unreadable", "empty file (0 bytes)")
    try:
        sdss.check_headers(path)
        with sdss.open_fits(path) as f:
            hdr0 = f[0].read_header()
            extra = {}
            if hdr0.get("NAXIS", 0) == 2:
                img = f[0].read()
                if img.shape[0] != len(EARLY_ROWS):
                    raise sdss.SpectrumError(path, "bad_layout", f"primary image has {img.shape[0]} rows; LAMOST's "
                                             "early layout has 5 (flux, ivar, wavelength or a pilot spectrum, "
                                             "andmask, ormask)")
                flux, ivar, andmask = img[0], img[1], img[3]
                wave = _wavelength(path, img[2], hdr0, img.shape[1], "the image's third row")
            elif len(f) > 1 and f[1].get_exttype() == "BINARY_TBL":
                t = f[1].read()
                cols = {c.upper(): c for c in t.dtype.names or ()}
                missing = [c for c in ("FLUX", "IVAR") if c not in cols]
                if missing:
                    raise sdss.SpectrumError(path, "missing_columns", "HDU 1 lacks " + ", ".join(missing))
                if len(t) != 1:
                    raise sdss.SpectrumError(path, "bad_layout", f"HDU 1 has {len(t)} rows; LAMOST DR8+ has one")
                row = t[0]
                flux, ivar = row[cols["FLUX"]], row[cols["IVAR"]]
                wave = _wavelength(path, row[cols["WAVELENGTH"]] if "WAVELENGTH" in cols else None, hdr0,
                                   np.size(flux), "the WAVELENGTH column")
                andmask = row[cols["ANDMASK"]] if "ANDMASK" in cols else np.zeros(len(flux), np.int32)
                if "NORMALIZATION" in cols:
                    extra["NORMALIZATION"] = np.asarray(row[cols["NORMALIZATION"]], np.float32)
            else:
                raise sdss.SpectrumError(path, "not_lamost", "neither a 5-row primary image nor a table in HDU 1")
    except sdss.SpectrumError:
        raise
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise sdss.SpectrumError(path, "unreadable", str(e).strip().splitlines()[0][:200] if str(e).strip()
                                 else type(e).__name__) from e
    header = {k: hdr0[k] for k in HEADER_KEYS if k in hdr0}
    header.update(extra)
    keys = _header_keys(hdr0, path.name)
    ident = str(keys["obsid"]) if "obsid" in keys else path.name.split(".")[0]
    objclass = str(hdr0.get("CLASS", "")).strip().upper()
    z = _z_or_nan(hdr0)
    return make_record(wave, flux, ivar, andmask, path=path, ident=ident, survey="lamost", rv=rv_from_z(z), z=z,
                       header=header, keys=keys, objclass="UNKNOWN" if objclass == "UNKNOWN" else objclass)


# ---------------------------------------------------------------------------- catalog matching

def _catalog_keys(cat) -> list:
    """(lmjd, planid, spid, fiberid) of each catalog row (None where one is missing), or [] without the columns."""
    import pandas as pd

    if not all(c in cat.columns for c in KEY_COLUMNS):
        return []
    num = {c: pd.to_numeric(cat[c], errors="coerce").to_numpy(np.float64) for c in ("LMJD", "SPID", "FIBERID")}
    plan = [str(v.decode() if isinstance(v, bytes) else v).strip() for v in cat["PLANID"]]
    return [(int(num["LMJD"][i]), plan[i], int(num["SPID"][i]), int(num["FIBERID"][i]))
            if all(np.isfinite(num[c][i]) for c in num) else None for i in range(len(cat))]


def row_ids(cat) -> list:
    """Each catalog row's identifier text: OBSID, else LMJD-PLANID-SPID-FIBERID, else ``row N``."""
    if "OBSID" in cat.columns:
        return ["" if not sdss._int(v) else str(sdss._int(v)) for v in cat["OBSID"]]
    keys = _catalog_keys(cat)
    if keys:
        return [f"{k[0]}-{k[1]}-{k[2]:02d}-{k[3]:03d}" if k else "" for k in keys]
    return [f"row {r}" for r in range(len(cat))]


def locate(cat, files: list, row_files: list) -> list:
    """Which file holds each catalog row's spectrum: [(file, None) or None].

    A row's FILE first; else its (LMJD, PLANID, SPID, FIBERID) against the file names, then
    against the headers of the files no row has taken yet (real files are not always named
    after their keys; when every file is matched by name, no header is read); else its OBSID
    against those headers' OBSID.

    Parameters
    ----------
    cat : DataFrame
        Upper-case columns (``sdss.read_catalog``).
    files : list of Path
        The spectrum files found.
    row_files : list of Path or None
        Each row's FILE (None where it has none).

    Returns
    -------
    list of (Path, None) or None
    """
    n = len(cat)
    loc = [(row_files[i], None) if row_files[i] is not None else None for i in range(n)]
    keys = _catalog_keys(cat)
    by_key = {}
    for p in files:
        k = parse_name(p.name)
        if k is not None:
            by_key.setdefault(k, p)
    obsid = None
    if "OBSID" in cat.columns:
        import pandas as pd

        obsid = pd.to_numeric(cat["OBSID"], errors="coerce").to_numpy(np.float64)

    def unmatched():
        return [i for i in range(n) if loc[i] is None]

    if keys:
        for i in unmatched():
            if keys[i] is not None and keys[i] in by_key:
                loc[i] = (by_key[keys[i]], None)
    todo = unmatched()
    taken = {x[0] for x in loc if x is not None}
    rest = [p for p in files if p not in taken]  # a file holds one spectrum: only these can still match
    if todo and rest and (keys or obsid is not None):
        by_header, by_obsid = {}, {}
        for p in rest:
            fk = file_keys(p)
            if "lmjd_planid_spid_fiberid" in fk:
                by_header.setdefault(fk["lmjd_planid_spid_fiberid"], p)
            if "obsid" in fk:
                by_obsid.setdefault(fk["obsid"], p)
        for i in todo:
            if keys and keys[i] is not None and keys[i] in by_header:
                loc[i] = (by_header[keys[i]], None)
            elif obsid is not None and np.isfinite(obsid[i]) and int(obsid[i]) in by_obsid:
                loc[i] = (by_obsid[int(obsid[i])], None)
    return loc


# ---------------------------------------------------------------------------- writer

def write_spectrum(path, wave, flux, ivar, andmask=None, *, layout: str = "dr8", obsid: int | None = 0,
                   lmjd: int = 0, planid: str = "", spid: int = 0, fiberid: int = 0, z: float = 0.0,
                   helio_rv: float = 0.0, objclass: str = "STAR", normalization=None, header: dict | None = None,
                   ormask=None, wave_header: bool | None = None, third_row=None, durable: bool = True):
    """Write a LAMOST LRS file in one of its layouts (tests, simulations), atomically.

    Parameters
    ----------
    path : str or Path
    wave, flux, ivar, andmask : (n,) arrays
        Vacuum wavelength (Angstrom), relative flux, inverse variance, and-mask (default 0).
    layout : {"dr8", "early", "pilot"}
        ``dr8``: one-row table in HDU 1 (FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK,
        NORMALIZATION, all float32, as DR8+); ``early``: a 5-row float32 primary image (flux,
        ivar, wavelength, andmask, ormask; DR1-DR7); ``pilot``: the same image whose third row
        is ``third_row`` (default: flux over its median, near 1) instead of the wavelengths,
        which are then only in the header (``wave`` must be log-linear).
    obsid, lmjd, planid, spid, fiberid, z, helio_rv, objclass
        Header keywords OBSID (None: no OBSID keyword, as the pilot files), LMJD, PLANID,
        SPID, FIBERID, Z, HELIO_RV (the heliocentric correction, km/s), CLASS.
    normalization : (n,) array, optional
        DR8 NORMALIZATION (default ones).
    header : dict, optional
        More primary-header keywords.
    ormask : (n,) array, optional
        ORMASK (default: ``andmask``).
    wave_header : bool, optional
        Write the header's log-linear solution (COEFF0, COEFF1, CRVAL1, CD1_1, CRPIX1,
        DC-FLAG, NWORDER, WFITTYPE, VACUUM) from ``wave``, as real DR1-DR7 files do. Default:
        for the image layouts; ``wave`` must then be log-linear.
    durable : bool
        fsync before the rename (:func:`stellarparams.files.atomic_write`).

    Returns
    -------
    Path
    """
    from astropy.io import fits

    from .files import atomic_write

    if layout not in ("dr8", "early", "pilot"):
        raise ValueError(f"layout must be 'dr8', 'early' or 'pilot', got {layout!r}")
    n = len(flux)
    andmask = np.zeros(n, np.int32) if andmask is None else np.asarray(andmask, np.int32)
    ormask = andmask if ormask is None else np.asarray(ormask, np.int32)
    if layout == "pilot" and third_row is None:
        third_row = np.asarray(flux, np.float64) / np.median(flux)
    rows = [flux, ivar, wave if layout == "early" else third_row, andmask, ormask]
    primary = fits.PrimaryHDU(np.stack(rows).astype(np.float32) if layout != "dr8" else None)
    h = primary.header
    h["TELESCOP"] = "LAMOST"
    if layout == "early":
        h["EXTEN0"] = "Flux, Inverse, Wavelength, Andmask, Ormask"
    keys = {"OBSID": obsid, "LMJD": lmjd, "PLANID": planid, "SPID": spid, "FIBERID": fiberid, "Z": z,
            "HELIO_RV": (helio_rv, "[km/s] Heliocentric correction"), "CLASS": objclass}
    for k, v in keys.items():
        if v is not None:
            h[k] = v
    if (layout != "dr8") if wave_header is None else wave_header:
        loglam = np.log10(np.asarray(wave, np.float64))
        c0, c1 = round(float(loglam[0]), 6), round(float(np.median(np.diff(loglam))), 9)
        if not np.allclose(loglam, c0 + c1 * np.arange(n), rtol=0, atol=1e-6):
            raise ValueError("wave is not log-linear: the header solution COEFF0/COEFF1 cannot describe it")
        for k, v in {"VACUUM": (True, "Wavelengths are in vacuum"), "NWORDER": 2, "WFITTYPE": "LOG-LINEAR",
                     "COEFF0": (c0, "Central wavelength (log10) of first pixel"),
                     "COEFF1": (c1, "Log10 dispersion per pixel"), "CRVAL1": c0, "CD1_1": c1, "CRPIX1": 1,
                     "CTYPE1": "LINEAR", "DC-FLAG": (1, "Log-linear flag")}.items():
            h[k] = v
    for k, v in (header or {}).items():
        h[k] = v
    hdus = [primary]
    if layout == "dr8":
        norm = np.ones(n) if normalization is None else normalization
        cols = [("FLUX", flux), ("IVAR", ivar), ("WAVELENGTH", wave), ("ANDMASK", andmask), ("ORMASK", ormask),
                ("NORMALIZATION", norm)]
        hdus.append(fits.BinTableHDU.from_columns([fits.Column(c, f"{n}E", array=np.asarray(a, np.float32)[None])
                                                   for c, a in cols]))
    return atomic_write(path, fits.HDUList(hdus).writeto, durable=durable)
