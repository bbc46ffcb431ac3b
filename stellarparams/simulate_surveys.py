"""The file formats of ``simulate --survey lamost|desi``: pixels, resolution, files and catalog.

:mod:`stellarparams.simulate` makes every spectrum the same way whatever the survey (a MILES
star, RV, reddening, calibration error, noise); this module says what differs between
surveys and writes their files, following the data models the readers follow
(:mod:`stellarparams.lamost`, :mod:`stellarparams.desi`; links and versions in
``docs/surveys.md``). SDSS stays in :mod:`stellarparams.simulate` itself.

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

DESI (desidatamodel ``coadd-SURVEY-PROGRAM-PIXNUM.rst``; DESI Collaboration 2022, AJ 164,
207, the instrument: R 2000-3200 in B, 3200-4100 in R, 4100-5500 in Z):

- pixels: three arms, linear 0.8 A steps: B 3600.0-5800.0 A (2751), R 5760.0-7620.0 A
  (2326), Z 7520.0-9824.0 A (2881), vacuum; the arms overlap and have independent noise;
- resolution: DESI's LSF (FWHM ~1.8 A) is sharper than MILES' 2.5 A everywhere, so the
  spectra keep MILES' resolution (R = lambda / 2.5 A, 1440 at 3600 A to 2960 at 7400 A):
  a resolution cannot be raised. ``--lsf`` still applies a broader one;
- flux: 1e-17 erg/s/cm2/A, as SDSS;
- file: ``OUT/spectra/healpix/main/bright/PIXGROUP/PIXNUM/coadd-main-bright-PIXNUM.fits``,
  ``PER_FILE`` = 500 targets per file (FIBERMAP TARGETID, COADD_FIBERSTATUS 0;
  EXP_FIBERMAP; B/R/Z ``_WAVELENGTH``, ``_FLUX``, ``_IVAR``, ``_MASK``; SCORES; no
  ``_RESOLUTION``: :func:`stellarparams.desi.write_coadd`), and beside it the Redrock file
  ``redrock-main-bright-PIXNUM.fits`` (REDSHIFTS: Z = the redshift of the catalog's VRAD,
  ZWARN 0, SPECTYPE STAR), as DESI's pipeline writes one;
- catalog ``OUT/mwsall.fits``: RVTAB (HDU 1) with TARGETID, SURVEY, PROGRAM, PRIMARY, VRAD,
  VRAD_ERR, TEFF, TEFF_ERR, LOGG, LOGG_ERR, FEH, FEH_ERR, plus STAR_ID, EBV, SNR and the
  truths TEFF_TRUE, FEH_TRUE, LOGG_TRUE, RV_TRUE.

Beyond MILES (3540-7410 A, rest frame): pixels the star does not cover get flux 0, ivar 0
and a mask bit (LAMOST ANDMASK, DESI ``MASK`` bit NODATA = 2**8 of desispec's specmask),
as SDSS's NODATA: nothing is invented there. So LAMOST's red ~20% and DESI's whole Z arm
and the red end of R hold no data. Cosmic-ray hits: ivar 0 and DESI COSMIC (2**2) or LAMOST
ORMASK (bad in one exposure); sky lines are not flagged (both readers take any ANDMASK or
MASK bit as bad).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import desi, lamost, sdss
from .files import atomic_write
from .physics import doppler

SURVEYS = ("sdss", "lamost", "desi")
LAMOST_LOGLAM0, LAMOST_DLOGLAM, LAMOST_NPIX = 3.5682, 1e-4, 3909   # 3700.0-9099.1 A
LAMOST_R = 1800.0
LAMOST_RESPONSE = "legendre:0.1"     # the survey's fixed instrument response (simulate.instrument_response)
LAMOST_FIBERS, LAMOST_SPECTROGRAPHS = 250, 16
LAMOST_NODATA = 1 << 6               # ANDMASK value of a pixel without data (the readers test != 0)
LAMOST_BADPIX = 1 << 0               # ORMASK value of a cosmic-ray hit (bad in one exposure)
DESI_ARMS = {"B": (3600.0, 2751), "R": (5760.0, 2326), "Z": (7520.0, 2881)}   # first pixel (A), pixels
DESI_STEP = 0.8                      # A
DESI_R = ((3600.0, 5800.0, 7600.0, 9824.0), (2000.0, 3200.0, 4100.0, 5500.0))  # knots of R(lambda)
DESI_NODATA, DESI_COSMIC = 1 << 8, 1 << 2   # desispec.maskbits specmask NODATA, COSMIC
DESI_SURVEY, DESI_PROGRAM, DESI_PIX0 = "main", "bright", 10000
PER_FILE = {"sdss": 1, "lamost": 1, "desi": 500}
CATALOG = {"sdss": "sppParams.fits", "lamost": "LRS_stellar.fits", "desi": "mwsall.fits"}
OBSID0, LMJD0, TARGETID0 = 100_000_000, 57000, 39_600_000_000_000_000


def check(survey: str) -> str:
    """``survey`` if it is one of :data:`SURVEYS`, else a ValueError naming them."""
    if survey not in SURVEYS:
        raise ValueError(f"--survey {survey}: choose one of {', '.join(SURVEYS)}")
    return survey


def desi_waves() -> dict:
    """{arm: (n,) float64 vacuum wavelengths, A} of the three DESI arms."""
    return {arm: np.round(start + DESI_STEP * np.arange(n), 6) for arm, (start, n) in DESI_ARMS.items()}


def pixels(survey: str):
    """The pixels every spectrum of ``survey`` (LAMOST, DESI) is written on.

    Parameters
    ----------
    survey : str
        "lamost" or "desi".

    Returns
    -------
    lam, lo, hi : (K,) float64
        Pixel centres and edges, vacuum A; DESI's arms one after the other (B, R, Z).
    """
    if survey == "lamost":
        loglam = LAMOST_LOGLAM0 + LAMOST_DLOGLAM * np.arange(LAMOST_NPIX)
        return 10 ** loglam, 10 ** (loglam - LAMOST_DLOGLAM / 2), 10 ** (loglam + LAMOST_DLOGLAM / 2)
    if survey == "desi":
        lam = np.concatenate(list(desi_waves().values()))
        return lam, lam - DESI_STEP / 2, lam + DESI_STEP / 2
    raise ValueError(f"no pixel lattice here for survey {survey!r}")


def resolution(survey: str, lam):
    """Resolving power lambda / FWHM of ``survey``'s line-spread function at ``lam`` (A).

    LAMOST: 1800. DESI: piecewise linear through :data:`DESI_R` (2000 at 3600 A to 5500 at
    9824 A; FWHM ~1.8 A throughout, sharper than MILES, so nothing is broadened).
    """
    lam = np.asarray(lam, np.float64)
    if survey == "lamost":
        return np.full(lam.shape, LAMOST_R)
    if survey == "desi":
        return np.interp(lam, *DESI_R)
    raise ValueError(f"no resolution here for survey {survey!r}")


# ---------------------------------------------------------------------------- identifiers and files

def ids(survey: str, index: int) -> dict:
    """The survey's identifiers of realization ``index``.

    LAMOST: obsid, lmjd, planid, spid, fiberid (4000 spectra per plan); DESI: targetid and
    the healpix pixel ``pixnum`` of its coadd (:data:`PER_FILE` targets per coadd).
    """
    if survey == "lamost":
        plan, k = divmod(index, LAMOST_FIBERS * LAMOST_SPECTROGRAPHS)
        return dict(obsid=OBSID0 + index, lmjd=LMJD0 + plan, planid=f"SIM{plan:05d}",
                    spid=k // LAMOST_FIBERS + 1, fiberid=k % LAMOST_FIBERS + 1)
    if survey == "desi":
        return dict(targetid=TARGETID0 + index, pixnum=DESI_PIX0 + index // PER_FILE["desi"])
    raise ValueError(f"no identifiers here for survey {survey!r}")


def spectrum_path(survey: str, out, index: int) -> Path:
    """The file that holds realization ``index`` (a DESI coadd holds :data:`PER_FILE` of them)."""
    i = ids(survey, index)
    if survey == "lamost":
        return Path(out) / "spectra" / i["planid"] / lamost.spec_filename(i["lmjd"], i["planid"], i["spid"],
                                                                          i["fiberid"])
    pix = i["pixnum"]
    return (Path(out) / "spectra" / "healpix" / DESI_SURVEY / DESI_PROGRAM / str(pix // 100) / str(pix)
            / f"coadd-{DESI_SURVEY}-{DESI_PROGRAM}-{pix}.fits")


def is_done(survey: str, path: Path, n: int) -> bool:
    """Whether ``path`` is finished: it exists and (a DESI coadd) holds its ``n`` targets."""
    if not path.exists():
        return False
    if survey != "desi":
        return True
    try:
        return len(desi.target_ids(path)) == n
    except (OSError, ValueError, KeyError):
        return False


def write_files(survey: str, out, items: list, header: dict) -> None:
    """Write the file of ``items`` (one LAMOST spectrum, or one DESI coadd's targets).

    Parameters
    ----------
    survey : str
        "lamost" or "desi".
    out : str or Path
        The survey folder.
    items : list of (index, spec, row)
        Realization index, :meth:`stellarparams.simulate.Simulator.realize`'s dict and the
        SDSS-style catalog row (:func:`stellarparams.simulate.catalog_row`), all of one file.
    header : dict
        Primary-header keywords of every spectrum (ORIGIN, the shifts).
    """
    nodata = sdss.pixmask("NODATA")
    cosmic = sdss.pixmask("COMBINEREJ")
    if survey == "lamost":
        for index, spec, row in items:
            i = ids(survey, index)
            bad = (spec["and_mask"] & nodata) != 0
            hit = (spec["and_mask"] & cosmic) != 0
            andmask = np.where(bad, LAMOST_NODATA, 0).astype(np.int32)
            ormask = andmask | np.where(hit, LAMOST_BADPIX, 0).astype(np.int32)
            flux = spec["flux"].astype(np.float32)
            lamost.write_spectrum(spectrum_path(survey, out, index), spec["wave"], flux,
                                  spec["ivar"].astype(np.float32), andmask, ormask=ormask, durable=False,
                                  obsid=i["obsid"], lmjd=i["lmjd"], planid=i["planid"], spid=i["spid"],
                                  fiberid=i["fiberid"], z=float(doppler(row["RV_ADOP"]) - 1.0),
                                  helio_rv=helio_correction(i["lmjd"]),
                                  normalization=_normalization(flux, ~bad),
                                  header={"SNRG": round(float(row["SNR"]), 4), **header})
        return
    waves = desi_waves()
    arms, start = {}, 0
    for arm, wave in waves.items():
        sl = slice(start, start + len(wave))
        start += len(wave)
        masks = []
        for _, spec, _ in items:
            m = np.where((spec["and_mask"][sl] & nodata) != 0, DESI_NODATA, 0)
            masks.append(m | np.where((spec["and_mask"][sl] & cosmic) != 0, DESI_COSMIC, 0))
        arms[arm] = (wave, np.stack([s["flux"][sl] for _, s, _ in items]),
                     np.stack([s["ivar"][sl] for _, s, _ in items]), np.stack(masks))
    pix = ids(survey, items[0][0])["pixnum"]
    coadd = spectrum_path(survey, out, items[0][0])
    tids = [ids(survey, k)["targetid"] for k, _, _ in items]
    # Redrock's redshifts beside the coadd (first: a coadd on disk means its Redrock file is there too)
    desi.write_redrock(coadd.with_name("redrock" + coadd.name[len("coadd"):]), tids,
                       [float(doppler(row["RV_ADOP"]) - 1.0) for _, _, row in items], durable=False)
    desi.write_coadd(coadd, tids,
                     arms, header={"HPXPIXEL": pix, "HPXNSIDE": 64, "HPXNEST": True, "SURVEY": DESI_SURVEY,
                                   "PROGRAM": DESI_PROGRAM, **header}, durable=False)


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


# ---------------------------------------------------------------------------- catalog

def catalog_row(survey: str, index: int, row: dict) -> dict:
    """The survey's catalog row of realization ``index`` from its SDSS-style ``row``.

    Measured labels are the SDSS row's ``*_ADOP`` (truth + the same noise), their errors
    the ``*_ADOP_UNC``; truths, STAR_ID and EBV are kept.
    """
    i = ids(survey, index)
    if survey == "lamost":
        out = {k: i[k] for k in ("obsid", "lmjd", "planid", "spid", "fiberid")}
        for name in ("TEFF", "LOGG", "FEH", "RV"):
            out[name.lower()] = row[f"{name}_ADOP"]
            out[name.lower() + "_err"] = row[f"{name}_ADOP_UNC"]
        out.update(snrg=row["SNR"], star_id=row["STAR_ID"], ebv=row["EBV"])
        out.update({f"{n.lower()}_true": row[f"{n}_TRUE"] for n in ("TEFF", "FEH", "LOGG", "RV")})
        return out
    out = dict(TARGETID=i["targetid"], SURVEY=DESI_SURVEY, PROGRAM=DESI_PROGRAM, PRIMARY=True,
               VRAD=row["RV_ADOP"], VRAD_ERR=row["RV_ADOP_UNC"])
    for name in ("TEFF", "LOGG", "FEH"):
        out[name], out[f"{name}_ERR"] = row[f"{name}_ADOP"], row[f"{name}_ADOP_UNC"]
    out.update(STAR_ID=row["STAR_ID"], EBV=row["EBV"], SNR=row["SNR"])
    out.update({f"{n}_TRUE": row[f"{n}_TRUE"] for n in ("TEFF", "FEH", "LOGG", "RV")})
    return out


def write_catalog(survey: str, out, rows: list, meta: dict) -> Path:
    """Write the survey's catalog (:data:`CATALOG`) of ``rows`` (from :func:`catalog_row`), atomically.

    DESI's is an ``mwsall``-like file whose HDU 1 is the table RVTAB.
    """
    from astropy.io import fits
    from astropy.table import Table

    table = Table(rows=rows, names=list(rows[0]))
    table.meta.update(meta)
    path = Path(out) / CATALOG[survey]
    if survey == "desi":
        hdu = fits.table_to_hdu(table)
        hdu.name = "RVTAB"
        return atomic_write(path, fits.HDUList([fits.PrimaryHDU(), hdu]).writeto)
    return atomic_write(path, lambda tmp: table.write(tmp, format="fits"))
