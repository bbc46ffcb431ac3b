"""LAMOST low-resolution (LRS) spectrum files and the A/F/G/K stellar-parameter catalog.

Data model followed (docs/surveys.md has the links):

- LAMOST DR1-DR3 "Data Production Description", section 2 (dr1.lamost.org/doc/
  data-production-description, dr3.lamost.org/doc/data-production-description) and the
  LAMOST "Fits Files" page (lamost.org/public/dr/algorithms/ff): early releases keep the
  spectrum in the primary HDU as an image of 5 rows, here read as flux, ivar, wavelength,
  andmask, ormask (the issue #15 layout; the pilot-data page names row 3 differently, so a
  file whose row 3 is not an increasing wavelength array is refused as ``bad_layout``).
- LAMOST DR8 v1.0 LRS "Data Production Description" (lamost.org/dr8/v1.0/doc/
  lr-data-production-description): from DR8 on, HDU 1 is a one-row binary table with vector
  columns FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK, NORMALIZATION.
- Wavelengths are vacuum, heliocentric, log-linear binned; flux is relative (not absolute)
  flux. Header keywords Z and HELIO_RV give the redshift and heliocentric RV (km/s); OBSID,
  LMJD, PLANID, SPID, FIBERID identify the spectrum; CLASS is STAR/GALAXY/QSO/Unknown.
- File names: ``spec-LMJD-PLANID_spSS-FFF.fits[.gz]`` (PLANID is text, e.g. GAC116N20B1).
- Catalog: the LRS "A, F, G and K type star" parameter table with lower-case columns obsid,
  lmjd, planid, spid, fiberid, teff, teff_err, logg, logg_err, feh, feh_err, rv, rv_err,
  snrg (read upper-case here, like every catalog).

A pixel is unusable where ANDMASK != 0 (bad in every exposure) or ivar == 0.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import sdss
from .spectrum import Record, make_record

NAME_RE = re.compile(r"^spec-(\d+)-(.+)_sp(\d+)-(\d+)\.fits?(\.gz)?$", re.I)
EARLY_ROWS = ("flux", "ivar", "wavelength", "andmask", "ormask")
TABLE_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION")
KEY_COLUMNS = ("LMJD", "PLANID", "SPID", "FIBERID")
LABELS = {"teff": "TEFF", "feh": "FEH", "logg": "LOGG"}
RV_COLUMN = "RV"
HEADER_KEYS = ("OBSID", "DESIG", "RA", "DEC", "LMJD", "MJD", "PLANID", "SPID", "FIBERID", "CLASS", "SUBCLASS",
               "Z", "Z_ERR", "HELIO_RV", "SNRU", "SNRG", "SNRR", "SNRI", "SNRZ", "DATA_V")


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


def read_spectrum(path) -> Record:
    """Read one LAMOST LRS file (either layout, detected from the file).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Record
        ``ident`` = OBSID (else the file's stem); ``wave`` in vacuum Angstrom; ``rv`` =
        HELIO_RV and ``z`` = Z from the header; ``keys`` obsid and (lmjd, planid, spid,
        fiberid) from the header, else the file name; header metadata in ``header`` (and
        the DR8 NORMALIZATION vector as ``header["NORMALIZATION"]``).

    Raises
    ------
    sdss.SpectrumError
        ``bad_layout`` (primary image without 5 rows, a table with more or fewer than one
        row, a wavelength row that is not increasing), ``missing_columns``, ``not_lamost``,
        ``unreadable``, ``missing_file``.
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
                                             "early layout has 5 (flux, ivar, wavelength, andmask, ormask)")
                flux, ivar, wave, andmask = img[0], img[1], img[2], img[3]
            elif len(f) > 1 and f[1].get_exttype() == "BINARY_TBL":
                t = f[1].read()
                cols = {c.upper(): c for c in t.dtype.names or ()}
                missing = [c for c in ("FLUX", "IVAR", "WAVELENGTH") if c not in cols]
                if missing:
                    raise sdss.SpectrumError(path, "missing_columns", "HDU 1 lacks " + ", ".join(missing))
                if len(t) != 1:
                    raise sdss.SpectrumError(path, "bad_layout", f"HDU 1 has {len(t)} rows; LAMOST DR8+ has one")
                row = t[0]
                flux, ivar, wave = row[cols["FLUX"]], row[cols["IVAR"]], row[cols["WAVELENGTH"]]
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
    wave = np.asarray(wave, np.float64)
    if wave.ndim != 1 or len(wave) < 2 or not (np.diff(wave) > 0).all():
        raise sdss.SpectrumError(path, "bad_layout", "the wavelength row is not increasing")
    header = {k: hdr0[k] for k in HEADER_KEYS if k in hdr0}
    header.update(extra)
    name_keys = parse_name(path.name)
    keys = {}
    if all(k in hdr0 for k in KEY_COLUMNS):
        keys["lmjd_planid_spid_fiberid"] = (sdss._int(hdr0["LMJD"]), str(hdr0["PLANID"]).strip(),
                                            sdss._int(hdr0["SPID"]), sdss._int(hdr0["FIBERID"]))
    elif name_keys:
        keys["lmjd_planid_spid_fiberid"] = name_keys
    if "OBSID" in hdr0:
        keys["obsid"] = sdss._int(hdr0["OBSID"])
    ident = str(keys["obsid"]) if "obsid" in keys else path.name.split(".")[0]
    objclass = str(hdr0.get("CLASS", "")).strip().upper()
    return make_record(wave, flux, ivar, andmask, path=path, ident=ident, survey="lamost",
                       rv=sdss._number(hdr0, "HELIO_RV"), z=sdss._number(hdr0, "Z"), header=header, keys=keys,
                       objclass="UNKNOWN" if objclass == "UNKNOWN" else objclass)


def write_spectrum(path, wave, flux, ivar, andmask=None, *, layout: str = "dr8", obsid: int = 0, lmjd: int = 0,
                   planid: str = "", spid: int = 0, fiberid: int = 0, z: float = 0.0, helio_rv: float = 0.0,
                   objclass: str = "STAR", normalization=None, header: dict | None = None, ormask=None,
                   durable: bool = True):
    """Write a LAMOST LRS file in one of its two layouts (tests, simulations), atomically.

    Parameters
    ----------
    path : str or Path
    wave, flux, ivar, andmask : (n,) arrays
        Vacuum wavelength (Angstrom), relative flux, inverse variance, and-mask (default 0).
    layout : {"dr8", "early"}
        ``dr8``: one-row table in HDU 1 (FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK,
        NORMALIZATION); ``early``: a 5-row primary image (flux, ivar, wavelength, andmask,
        ormask).
    obsid, lmjd, planid, spid, fiberid, z, helio_rv, objclass
        Header keywords OBSID, LMJD, PLANID, SPID, FIBERID, Z, HELIO_RV, CLASS.
    normalization : (n,) array, optional
        DR8 NORMALIZATION (default ones).
    header : dict, optional
        More primary-header keywords.
    ormask : (n,) array, optional
        ORMASK (default: ``andmask``).
    durable : bool
        fsync before the rename (:func:`stellarparams.files.atomic_write`).

    Returns
    -------
    Path
    """
    from astropy.io import fits

    from .files import atomic_write

    n = len(flux)
    andmask = np.zeros(n, np.int32) if andmask is None else np.asarray(andmask, np.int32)
    ormask = andmask if ormask is None else np.asarray(ormask, np.int32)
    primary = fits.PrimaryHDU(np.stack([flux, ivar, wave, andmask, ormask]).astype(np.float32)
                              if layout == "early" else None)
    h = primary.header
    h["TELESCOP"] = "LAMOST"
    for k, v in {"OBSID": obsid, "LMJD": lmjd, "PLANID": planid, "SPID": spid, "FIBERID": fiberid, "Z": z,
                 "HELIO_RV": helio_rv, "CLASS": objclass, **(header or {})}.items():
        h[k] = v
    hdus = [primary]
    if layout == "dr8":
        norm = np.ones(n) if normalization is None else normalization
        cols = [("FLUX", "E", flux), ("IVAR", "E", ivar), ("WAVELENGTH", "D", wave), ("ANDMASK", "J", andmask),
                ("ORMASK", "J", ormask), ("NORMALIZATION", "E", norm)]
        hdus.append(fits.BinTableHDU.from_columns([fits.Column(c, f"{n}{t}", array=np.asarray(a)[None])
                                                   for c, t, a in cols]))
    elif layout != "early":
        raise ValueError(f"layout must be 'dr8' or 'early', got {layout!r}")
    return atomic_write(path, fits.HDUList(hdus).writeto, durable=durable)
