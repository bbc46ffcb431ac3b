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
from .base import Simulated as SimulatedBase
from .base import Survey
from ..physics import doppler, rv_from_z
from ..spectrum import Record, SpectrumError, pixmask, header_number, make_record, to_int

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
    SpectrumError
        ``bad_wavelength``: the keys are there but not finite numbers, the step is not > 0,
        or the wavelengths fall outside 1000-100000 A.
    """
    if "COEFF0" in hdr or "COEFF1" in hdr:
        c0, c1 = header_number(hdr, "COEFF0"), header_number(hdr, "COEFF1")
        what, log, pix = f"COEFF0 = {hdr.get('COEFF0')!r}, COEFF1 = {hdr.get('COEFF1')!r}", True, 1.0
    elif "CRVAL1" in hdr:
        c0 = header_number(hdr, "CRVAL1")
        c1 = header_number(hdr, "CD1_1") if "CD1_1" in hdr else header_number(hdr, "CDELT1")
        pix = header_number(hdr, "CRPIX1", 1.0)
        flag = hdr.get("DC-FLAG")
        log = header_number(hdr, "DC-FLAG") == 1 if flag is not None else c0 < 10
        what = (f"CRVAL1 = {hdr.get('CRVAL1')!r}, CD1_1/CDELT1 = {c1!r}, CRPIX1 = {hdr.get('CRPIX1', 1)!r}, "
                f"DC-FLAG = {flag!r}")
    else:
        return None
    if not (np.isfinite(c0) and np.isfinite(c1) and np.isfinite(pix)) or c1 <= 0:
        raise SpectrumError(path, "bad_wavelength", f"header wavelength solution {what}: need finite numbers "
                                 "and a step > 0")
    x = c0 + c1 * (np.arange(n, dtype=np.float64) + 1.0 - pix)
    wave = 10.0 ** x if log else x
    if not (WAVE_RANGE[0] < wave[0] and wave[-1] < WAVE_RANGE[1]):
        raise SpectrumError(path, "bad_wavelength", f"header wavelength solution {what} gives "
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
            raise SpectrumError(path, "bad_wavelength", f"{where} ({row[k]:.3f} A at pixel {k}) disagrees with "
                                     f"the header's wavelength solution ({hw[k]:.3f} A)")
        return row
    if hw is not None:
        return hw
    seen = "missing" if row is None else (f"values {np.nanmin(row):.4g} to {np.nanmax(row):.4g}, not an increasing "
                                          "wavelength array" if np.isfinite(row).any() else "not finite")
    raise SpectrumError(path, "bad_wavelength", f"{where} is {seen}, and the header has no wavelength solution "
                             "(COEFF0/COEFF1, or CRVAL1/CD1_1 with DC-FLAG)")


def _header_keys(hdr, name: str) -> dict:
    """``keys`` of a spectrum: obsid and (lmjd, planid, spid, fiberid) from the header, else the file name."""
    keys = {}
    if all(k in hdr for k in KEY_COLUMNS):
        keys["lmjd_planid_spid_fiberid"] = (to_int(hdr["LMJD"]), str(hdr["PLANID"]).strip(),
                                            to_int(hdr["SPID"]), to_int(hdr["FIBERID"]))
    elif parse_name(name):
        keys["lmjd_planid_spid_fiberid"] = parse_name(name)
    if "OBSID" in hdr and to_int(hdr["OBSID"]):
        keys["obsid"] = to_int(hdr["OBSID"])
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
    except (SpectrumError, OSError, ValueError, KeyError, UnicodeDecodeError):
        hdr = {}
    return _header_keys(hdr, Path(path).name)


def _z_or_nan(hdr) -> float:
    """The header's Z; NaN when missing, not a number, or LAMOST's -9999 (no redshift)."""
    z = header_number(hdr, "Z")
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
    SpectrumError
        ``bad_layout`` (primary image without 5 rows, a table with more or fewer than one
        row), ``bad_wavelength`` (no wavelength row and no header solution, a damaged or
        disagreeing solution), ``missing_columns``, ``not_lamost``, ``unreadable``, ``missing_file``.
    """
    path = Path(path)
    if not path.is_file():
        raise SpectrumError(path, "missing_file", f"no such file: {path}")
    if path.stat().st_size == 0:
        raise SpectrumError(path, "unreadable", "empty file (0 bytes)")
    try:
        sdss.check_headers(path)
        with sdss.open_fits(path) as f:
            hdr0 = f[0].read_header()
            extra = {}
            if hdr0.get("NAXIS", 0) == 2:
                img = f[0].read()
                if img.shape[0] != len(EARLY_ROWS):
                    raise SpectrumError(path, "bad_layout", f"primary image has {img.shape[0]} rows; LAMOST's "
                                             "early layout has 5 (flux, ivar, wavelength or a pilot spectrum, "
                                             "andmask, ormask)")
                flux, ivar, andmask = img[0], img[1], img[3]
                wave = _wavelength(path, img[2], hdr0, img.shape[1], "the image's third row")
            elif len(f) > 1 and f[1].get_exttype() == "BINARY_TBL":
                t = f[1].read()
                cols = {c.upper(): c for c in t.dtype.names or ()}
                missing = [c for c in ("FLUX", "IVAR") if c not in cols]
                if missing:
                    raise SpectrumError(path, "missing_columns", "HDU 1 lacks " + ", ".join(missing))
                if len(t) != 1:
                    raise SpectrumError(path, "bad_layout", f"HDU 1 has {len(t)} rows; LAMOST DR8+ has one")
                row = t[0]
                flux, ivar = row[cols["FLUX"]], row[cols["IVAR"]]
                wave = _wavelength(path, row[cols["WAVELENGTH"]] if "WAVELENGTH" in cols else None, hdr0,
                                   np.size(flux), "the WAVELENGTH column")
                andmask = row[cols["ANDMASK"]] if "ANDMASK" in cols else np.zeros(len(flux), np.int32)
                if "NORMALIZATION" in cols:
                    extra["NORMALIZATION"] = np.asarray(row[cols["NORMALIZATION"]], np.float32)
            else:
                raise SpectrumError(path, "not_lamost", "neither a 5-row primary image nor a table in HDU 1")
    except SpectrumError:
        raise
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise SpectrumError(path, "unreadable", str(e).strip().splitlines()[0][:200] if str(e).strip()
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
        return ["" if not to_int(v) else str(to_int(v)) for v in cat["OBSID"]]
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

    from ..files import atomic_write

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


# ---------------------------------------------------------------------------- simulate --survey lamost

SIM_LOGLAM0, SIM_DLOGLAM, SIM_NPIX = 3.5682, 1e-4, 3909   # 3700.0-9099.1 A
SIM_R = 1800.0
SIM_RESPONSE = "legendre:0.1"       # the survey's fixed instrument response (simulate.instrument_response)
SIM_FIBERS, SIM_SPECTROGRAPHS = 250, 16
SIM_NODATA = 1 << 6                 # ANDMASK value of a pixel without data (the readers test != 0)
SIM_BADPIX = 1 << 0                 # ORMASK value of a cosmic-ray hit (bad in one exposure)
SIM_OBSID0, SIM_LMJD0 = 100_000_000, 57000


def sim_ids(index: int) -> dict:
    """obsid, lmjd, planid, spid, fiberid of realization ``index`` (4000 spectra per plan)."""
    plan, k = divmod(index, SIM_FIBERS * SIM_SPECTROGRAPHS)
    return dict(obsid=SIM_OBSID0 + index, lmjd=SIM_LMJD0 + plan, planid=f"SIM{plan:05d}",
                spid=k // SIM_FIBERS + 1, fiberid=k % SIM_FIBERS + 1)


def helio_correction(lmjd: int) -> float:
    """LAMOST's HELIO_RV header value for a night: the heliocentric correction applied (km/s).

    A stand-in: Earth's orbital speed projected with the season, 29.8 cos(2 pi LMJD / 365.25).
    It is not the star's RV (that is Z), and a reader that takes it for one gets it wrong.
    """
    return round(29.8 * float(np.cos(2 * np.pi * lmjd / 365.25)), 5)


def _normalization(flux, good, width: int = 201):
    """DR8 NORMALIZATION stand-in: the flux over a running median of its good pixels (1 elsewhere)."""
    from scipy.ndimage import median_filter

    cont = np.interp(np.arange(len(flux)), np.flatnonzero(good), flux[good]) if good.any() else np.ones(len(flux))
    cont = median_filter(cont, width, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(good & (cont > 0), flux / cont, 1.0)
    return out.astype(np.float32)


class Simulated(SimulatedBase):
    """The files of ``simulate --survey lamost``.

    LAMOST LRS (DR8 v1.0 LRS *Data Production Description*):

    - pixels: log-linear, log10(lambda) = 3.5682 + 1e-4 k, k = 0..3908 (3700.0-9099.1 A, vacuum,
      heliocentric), the same for every spectrum;
    - resolution: Gaussian LSF of FWHM lambda / 1800 where that is broader than MILES' 2.5 A
      (redward of 4500 A); bluer pixels keep MILES' resolution;
    - flux: relative (no unit): the star times one smooth instrument response shared by the
      survey (``RESPONSE``: a seeded Legendre curve, rms of ln response 0.1, drawn from the
      survey seed) on top of the per-spectrum calibration error of ``simulate``;
    - file: ``OUT/spectra/PLANID/spec-LMJD-PLANID_spSS-FFF.fits``, the DR8+ layout (HDU 1 a
      one-row table of float32 FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK, NORMALIZATION), header
      OBSID, LMJD, PLANID, SPID, FIBERID, CLASS, Z (the redshift of the catalog's measured RV) and
      HELIO_RV (as in LAMOST, the heliocentric correction, not the star's RV: a seasonal stand-in,
      :func:`helio_correction`); 16 spectrographs x 250 fibers = 4000 spectra per plan;
    - catalog ``OUT/LRS_stellar.fits``: the A/F/G/K table's lower-case columns obsid, lmjd,
      planid, spid, fiberid, teff, teff_err, logg, logg_err, feh, feh_err, rv, rv_err, snrg,
      plus the simulation's star_id, ebv and the truths teff_true, feh_true, logg_true, rv_true.

    Beyond MILES (3540-7410 A, rest frame): pixels the star does not cover get flux 0, ivar 0
    and a mask bit (LAMOST ANDMASK, DESI ``MASK`` bit NODATA = 2**8 of desispec's specmask),
    as SDSS's NODATA: nothing is invented there. So LAMOST's red ~20% and DESI's whole Z arm
    and the red end of R hold no data. Cosmic-ray hits: ivar 0 and DESI COSMIC (2**2) or LAMOST
    ORMASK (bad in one exposure); sky lines are not flagged (both readers take any ANDMASK or
    MASK bit as bad).
    """

    catalog, file_bytes, response = "LRS_stellar.fits", 170e3, SIM_RESPONSE

    def resolution(self, lam):
        """1800: a Gaussian LSF of FWHM lambda / 1800 (where broader than MILES')."""
        return np.full(np.asarray(lam, np.float64).shape, SIM_R)

    def pixels(self):
        loglam = SIM_LOGLAM0 + SIM_DLOGLAM * np.arange(SIM_NPIX)
        return 10 ** loglam, 10 ** (loglam - SIM_DLOGLAM / 2), 10 ** (loglam + SIM_DLOGLAM / 2)

    def spectrum_path(self, out, plan):
        i = sim_ids(plan["index"])
        return Path(out) / "spectra" / i["planid"] / spec_filename(i["lmjd"], i["planid"], i["spid"], i["fiberid"])

    def write_files(self, out, items, header):
        nodata, cosmic = pixmask("NODATA"), pixmask("COMBINEREJ")
        for index, plan, spec, row in items:
            i = sim_ids(index)
            bad = (spec["and_mask"] & nodata) != 0
            hit = (spec["and_mask"] & cosmic) != 0
            andmask = np.where(bad, SIM_NODATA, 0).astype(np.int32)
            ormask = andmask | np.where(hit, SIM_BADPIX, 0).astype(np.int32)
            flux = spec["flux"].astype(np.float32)
            write_spectrum(self.spectrum_path(out, plan), spec["wave"], flux,
                           spec["ivar"].astype(np.float32), andmask, ormask=ormask, durable=False,
                           obsid=i["obsid"], lmjd=i["lmjd"], planid=i["planid"], spid=i["spid"],
                           fiberid=i["fiberid"], z=float(doppler(row["RV_ADOP"]) - 1.0),
                           helio_rv=helio_correction(i["lmjd"]),
                           normalization=_normalization(flux, ~bad),
                           header={"SNRG": round(float(row["SNR"]), 4), **header})

    def catalog_row(self, index, row):
        i = sim_ids(index)
        out = {k: i[k] for k in ("obsid", "lmjd", "planid", "spid", "fiberid")}
        for name in ("TEFF", "LOGG", "FEH", "RV"):
            out[name.lower()] = row[f"{name}_ADOP"]
            out[name.lower() + "_err"] = row[f"{name}_ADOP_UNC"]
        out.update(snrg=row["SNR"], star_id=row["STAR_ID"], ebv=row["EBV"])
        out.update({f"{n.lower()}_true": row[f"{n}_TRUE"] for n in ("TEFF", "FEH", "LOGG", "RV")})
        return out

    def write_catalog(self, out, columns, meta):
        from astropy.table import Table

        from ..files import atomic_write

        table = Table(columns, copy=False)
        table.meta.update(meta)
        return atomic_write(Path(out) / self.catalog, lambda tmp: table.write(tmp, format="fits"))


# ---------------------------------------------------------------------------- the survey (surveys.registry)

class LAMOST(Survey):
    """LAMOST LRS spectra (pilot, DR1-DR7 image, DR8+ table layouts); catalog: the LRS stellar table."""

    name, title, priority, name_re = "lamost", "LAMOST", 30, NAME_RE
    labels, rv_column, id_column = LABELS, RV_COLUMN, "OBSID"
    catalog_keys = (("OBSID",), KEY_COLUMNS)
    catalog_columns = ("OBSID",) + KEY_COLUMNS

    def identify(self, info) -> bool:
        if "LAMOST" in str(info.header.get("TELESCOP", "")).upper():
            return True  # else a DR8+ table, unless SDSS's COADD or COEFF0 say otherwise
        return not ("COADD" in info.names or "COEFF0" in info.header) and {"WAVELENGTH", "ANDMASK"} <= info.cols

    def read(self, path, reader="fast") -> list:
        return [read_spectrum(path)]

    def file_keys(self, path) -> list:
        fk = file_keys(path)  # a file not named after its keys: LMJD..FIBERID, OBSID from its header
        return [fk.get("lmjd_planid_spid_fiberid"), ("id", str(fk["obsid"])) if "obsid" in fk else None]

    def row_ids(self, cat) -> list:
        return super().row_ids(cat) if self.id_column in cat.columns else row_ids(cat)

    def rv_keys(self, cat) -> list:
        keys = _catalog_keys(cat)
        return ([keys] if keys else []) + super().rv_keys(cat)

    def name_keys(self, name) -> list:
        return [parse_name(name)]

    def locate_rows(self, cat, files, row_files) -> list:
        return locate(cat, files, row_files)


    simulated = Simulated()


SURVEY = LAMOST()
