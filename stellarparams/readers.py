"""One interface for the spectrum files of every survey: detect the format, read records.

Every reader returns a list of :class:`Record` (one per spectrum; a DESI coadd or a table
holds many). A record (:class:`stellarparams.spectrum.Record`) is an :class:`sdss.Spectrum`
(so ``prepare.preprocess`` and ``Model.predict`` take it as they are) with these additions:

- ``ident``: the survey's identifier (SDSS PLATE-MJD-FIBER, LAMOST OBSID, DESI TARGETID,
  a table's ID column or its row number);
- ``wave``: vacuum wavelength in Angstrom, exactly as written (``loglam`` = log10 of it);
- ``bad``: True where the survey's own mask marks a pixel unusable (LAMOST ANDMASK != 0,
  DESI MASK != 0, a table's MASK != 0); the SDSS ``and_mask`` bits are used as before;
- ``rv``: a radial velocity in km/s given by the file (LAMOST c Z, DESI c Z of the Redrock
  file beside the coadd, a table's RV), else NaN; ``z``: its redshift, else NaN;
- ``keys``: what a catalog row is matched with (obsid, (lmjd, planid, spid, fiberid),
  targetid, row);
- ``labels``: label columns a table row carries;
- ``problem``: (reason, detail) when the reader found this one spectrum unusable (a DESI
  target with all-zero ivar); ``preprocess`` raises it as a :class:`sdss.SpectrumError`
  so it becomes a named reject while the rest of the file is used.

Readers (each module's docstring cites the data model it follows; docs/surveys.md):
``sdss`` (:mod:`stellarparams.sdss`), ``lamost`` (:mod:`stellarparams.lamost`),
``desi`` (:mod:`stellarparams.desi`), ``table`` (:mod:`stellarparams.tables`).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from . import desi, lamost, sdss, tables
from .physics import doppler, rv_from_z
from .spectrum import Record, make_record

SURVEYS = ("sdss", "lamost", "desi", "table")
_SDSS_NAME = re.compile(r"^(spec-\d+-\d+-\d+\.fits|spSpec-\d+-\d+-\d+\.fits?)(\.gz)?$", re.I)
_LAMOST_NAME = lamost.NAME_RE
_DESI_NAME = re.compile(r"^coadd-.+\.fits(\.gz)?$", re.I)
_TABLE_SUFFIXES = (".parquet", ".pq", ".h5", ".hdf5")
SPECTRUM_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".fts") + _TABLE_SUFFIXES


def from_arrays(wave, flux, ivar, mask=None, *, rv_kms: float = float("nan"), ident: str = "") -> Record:
    """A spectrum given as plain arrays, for ``preprocess`` and ``Model.predict`` (Python API).

    Parameters
    ----------
    wave : (n,) array
        Vacuum wavelength in Angstrom (observed frame).
    flux, ivar : (n,) arrays
        Flux and inverse variance.
    mask : (n,) array, optional
        Nonzero = unusable pixel.
    rv_kms : float
        Radial velocity, km/s; also sets the record's redshift, so ``Model.predict(record)``
        shifts it to the rest frame without an explicit ``rv_kms``.
    ident : str

    Returns
    -------
    Record
    """
    z = float(doppler(rv_kms)) - 1.0 if np.isfinite(rv_kms) else float("nan")
    return make_record(wave, flux, ivar, mask, ident=ident, survey="arrays", rv=rv_kms, z=z)


def is_specutils(obj) -> bool:
    """Whether ``obj`` is a specutils ``Spectrum`` (``Spectrum1D`` before specutils 2), by its attributes."""
    return hasattr(obj, "spectral_axis") and hasattr(obj, "flux") and hasattr(obj, "uncertainty")


def from_specutils(spectrum, *, ident: str = "") -> Record | list:
    """A specutils ``Spectrum`` (``Spectrum1D`` in specutils < 2) as record(s), for ``preprocess``
    and ``Model.predict``.

    The spectral axis is converted to Angstrom (any spectral unit); it must be **vacuum**
    wavelength, as every survey here uses. The uncertainty may be an ``InverseVariance``,
    ``StdDevUncertainty`` or ``VarianceUncertainty`` (astropy.nddata), converted to inverse
    variance; ``mask`` (True = bad) is kept. A nonzero ``radial_velocity`` (or ``redshift``)
    becomes the record's RV, so ``Model.predict(spectrum)`` shifts it to the rest frame.
    A 2-D flux (N spectra sharing one spectral axis) gives a list of N records.

    Raises
    ------
    ValueError
        No uncertainty: without one the pixels cannot be weighted (give ``uncertainty=``).
    """
    import astropy.units as u
    from astropy.nddata import InverseVariance

    if spectrum.uncertainty is None:
        raise ValueError("the specutils spectrum has no uncertainty; give one (InverseVariance, StdDevUncertainty "
                         "or VarianceUncertainty) so that its pixels can be weighted")
    wave = spectrum.spectral_axis.to_value(u.AA, equivalencies=u.spectral())
    flux = np.asarray(spectrum.flux.value, np.float64)
    ivar = np.asarray(spectrum.uncertainty.represent_as(InverseVariance).array, np.float64)
    mask = None if spectrum.mask is None else np.asarray(spectrum.mask)
    rv = float(getattr(spectrum, "radial_velocity", 0 * u.km / u.s).to_value(u.km / u.s))
    z = float(getattr(spectrum, "redshift", 0.0))
    rv = rv if rv else (rv_from_z(z) if z else float("nan"))
    if flux.ndim == 1:
        return from_arrays(wave, flux, ivar, mask, rv_kms=rv, ident=ident)
    masks = [None] * len(flux) if mask is None else mask
    return [from_arrays(wave, f, v, m, rv_kms=rv, ident=f"{ident}{k}") for k, (f, v, m) in
            enumerate(zip(flux, ivar, masks))]


def from_sdss(spec: sdss.Spectrum) -> Record:
    """An SDSS :class:`sdss.Spectrum` as a :class:`Record` (same arrays, ``ident`` PLATE-MJD-FIBER).

    Parameters
    ----------
    spec : sdss.Spectrum

    Returns
    -------
    Record
    """
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(sdss.Spectrum)}
    return Record(**fields, ident=spec.name, survey="sdss", wave=10.0 ** np.asarray(spec.loglam, np.float64),
                  keys={"plate_mjd_fiber": (spec.plate, spec.mjd, spec.fiberid)})


def detect(path) -> str:
    """The survey of a spectrum file: from its name, else from its content.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str
        One of :data:`SURVEYS`.

    Raises
    ------
    sdss.SpectrumError
        ``unknown_format``: no reader recognises the file; ``missing_file``, ``unreadable``.
    """
    path = Path(path)
    name = path.name
    if _LAMOST_NAME.match(name):
        return "lamost"
    if _SDSS_NAME.match(name):
        return "sdss"
    if _DESI_NAME.match(name):
        return "desi"
    if name.lower().endswith(_TABLE_SUFFIXES):
        return "table"
    if not path.is_file():
        raise sdss.SpectrumError(path, "missing_file", f"no such file: {path}")
    try:
        sdss.check_headers(path)
        with sdss.open_fits(path) as f:
            names = {f[i].get_extname().upper() for i in range(len(f))}
            hdr0 = f[0].read_header()
            if "B_FLUX" in names or "R_FLUX" in names or "Z_FLUX" in names:
                return "desi"
            if "LAMOST" in str(hdr0.get("TELESCOP", "")).upper():
                return "lamost"
            if "COADD" in names or "COEFF0" in hdr0:
                return "sdss"
            if len(f) > 1 and f[1].get_exttype() == "BINARY_TBL":
                cols = {c.upper() for c in f[1].get_colnames()}
                if {"WAVELENGTH", "ANDMASK"} <= cols:
                    return "lamost"
                if "FLUX" in cols and "IVAR" in cols:
                    return "table"
    except sdss.SpectrumError:
        raise
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise sdss.SpectrumError(path, "unreadable", str(e).strip().splitlines()[0][:200] if str(e).strip()
                                 else type(e).__name__) from e
    raise sdss.SpectrumError(path, "unknown_format", "not an SDSS, LAMOST, DESI or table file "
                             f"(name it after its survey or pass --survey {'|'.join(SURVEYS)})")


def read(path, survey: str | None = None) -> list[Record]:
    """Every spectrum in one file, as records.

    Parameters
    ----------
    path : str or Path
    survey : str, optional
        One of :data:`SURVEYS`; default: :func:`detect`.

    Returns
    -------
    list of Record
        One for an SDSS or LAMOST file; one per TARGETID of a DESI coadd; one per table row.

    Raises
    ------
    sdss.SpectrumError
        The whole file is unusable (``missing_file``, ``unreadable``, ``bad_layout``,
        ``missing_columns``, ...). A problem of one spectrum among many is that record's
        ``problem`` instead.
    """
    path = Path(path)
    survey = survey or detect(path)
    if survey not in SURVEYS:
        raise ValueError(f"unknown survey {survey!r}; choose one of {', '.join(SURVEYS)}")
    if not path.is_file():
        raise sdss.SpectrumError(path, "missing_file", f"no such file: {path}")
    if survey == "sdss":
        return [from_sdss(sdss.read_spectrum(path))]
    if survey == "lamost":
        return [lamost.read_spectrum(path)]
    if survey == "desi":
        return desi.read_coadd(path)
    return tables.read_table(path)


def find_files(folder, survey: str | None = None) -> list[Path]:
    """Spectrum files under ``folder`` (recursively, sorted) of one survey, or of any when ``survey`` is None.

    Parameters
    ----------
    folder : str or Path
        A folder, or one file (returned as is).
    survey : str, optional
        Keep only files whose name marks that survey (SDSS spec-/spSpec-, LAMOST
        spec-LMJD-PLANID_spSS-FFF, DESI coadd-); ``table``: .parquet/.h5/.fits tables.

    Returns
    -------
    list of Path
    """
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: spectra folder not found")
    pattern = {"sdss": _SDSS_NAME, "lamost": _LAMOST_NAME, "desi": _DESI_NAME}

    def wanted(p: Path) -> bool:
        n = p.name
        if survey in pattern:
            return bool(pattern[survey].match(n)) and (survey != "sdss" or not _LAMOST_NAME.match(n))
        if survey == "table":
            return n.lower().endswith(SPECTRUM_SUFFIXES)
        return any(r.match(n) for r in pattern.values())

    return sorted(p for p in folder.rglob("*") if wanted(p) and p.is_file())
