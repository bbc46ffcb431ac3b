"""One interface for the spectrum files of every survey: detect the format, read records.

Every reader returns a list of :class:`Record` (one per spectrum; a DESI coadd or a table
holds many). A record (:class:`stellarparams.spectrum.Record`, which ``preprocess.preprocess`` and
``Model.predict`` take as it is) carries the file's arrays and:

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
  target with all-zero ivar); ``preprocess`` raises it as a :class:`spectrum.SpectrumError`
  so it becomes a named reject while the rest of the file is used.

Readers: one module per survey under :mod:`stellarparams.surveys` (``sdss``, ``lamost``, ``desi``,
``tables``; each docstring cites the data model it follows; docs/surveys.md), asked through
:mod:`stellarparams.surveys.registry`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .physics import doppler, rv_from_z
from .spectrum import Record, make_record
from .surveys import registry


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


def detect(path) -> str:
    """The survey of a spectrum file, from its name, else its content (:func:`surveys.registry.detect`).

    Raises
    ------
    SpectrumError
        ``unknown_format``: no format recognises the file; ``missing_file``, ``unreadable``.
    """
    return registry.detect(path)


def read(path, survey: str | None = None) -> list[Record]:
    """Every spectrum in one file, as records.

    Parameters
    ----------
    path : str or Path
    survey : str, optional
        One of :func:`surveys.registry.names`; default: :func:`detect`.

    Returns
    -------
    list of Record
        One for an SDSS or LAMOST file; one per TARGETID of a DESI coadd; one per table row.

    Raises
    ------
    SpectrumError
        The whole file is unusable (``missing_file``, ``unreadable``, ``bad_layout``,
        ``missing_columns``, ...). A problem of one spectrum among many is that record's
        ``problem`` instead.
    """
    return registry.read(Path(path), survey)


def find_files(folder, survey: str | None = None) -> list[Path]:
    """Spectrum files under ``folder`` (recursively, sorted) of one survey, or of any when ``survey`` is None
    (:func:`surveys.registry.find_files`)."""
    return registry.find_files(folder, survey)
