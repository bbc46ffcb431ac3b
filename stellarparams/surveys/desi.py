"""DESI healpix coadd files, their Redrock redshifts, and the Milky Way Survey (``mwsall``) label catalog.

Data model followed (docs/surveys.md has the links):

- desidatamodel, ``DESI_SPECTRO_REDUX/SPECPROD/healpix/SURVEY/PROGRAM/PIXGROUP/PIXNUM/
  coadd-SURVEY-PROGRAM-PIXNUM.rst`` (desihub/desidatamodel; the format of the EDR "fuji" and
  DR1 "iron" productions): file ``coadd-SURVEY-PROGRAM-PIXNUM.fits``; HDU FIBERMAP (a table,
  one row per target: TARGETID int64, COADD_FIBERSTATUS int32, TARGET_RA, TARGET_DEC, ...);
  EXP_FIBERMAP (one row per target per exposure); per arm X in B, R, Z the HDUs
  X_WAVELENGTH (nwave,) float64 Angstrom (vacuum; 2751, 2326 and 2881 pixels), X_FLUX and
  X_IVAR (nspec, nwave) float32 in 1e-17 erg/(s cm2 A) and its inverse square, X_MASK
  (nspec, nwave) uint32 (int32 with BZERO 2**31; SPECMASK bits, 0 = good), X_RESOLUTION
  (nspec, 11, nwave; not used); SCORES (per-target S/N and flux summaries). HDUs are read by
  name, never by number.
- desidatamodel ``bitmasks.rst``: COADD_FIBERSTATUS is the bitwise AND of the exposures'
  FIBERSTATUS; bits STUCKPOSITIONER (1), RESTRICTED (3), NEARCHARGETRAP (13) and
  VARIABLETHRU (14) are informational, BADAMPB/BADAMPR/BADAMPZ (22-24) make one camera's
  data unusable (that arm is dropped, as desispec does since desihub/desispec pull request 1674), any other bit makes
  the spectrum unusable.
- desidatamodel ``redrock-SURVEY-PROGRAM-PIXNUM.rst``: the Redrock file beside each coadd
  (``zbest-`` in releases before "everest"), HDU REDSHIFTS with TARGETID, Z, ZERR, ZWARN
  (0 = good), SPECTYPE (STAR, GALAXY, QSO). Read when present: Z gives the record's ``z``
  and RV (c z, where ZWARN == 0), SPECTYPE its class.
- desi-mws-edr-datamodel ``docs/mwsall.rst`` (desimilkyway/desi-mws-edr-datamodel, commit
  16f6edc): the ``mwsall`` catalog, HDU 1 RVTAB with TARGETID, VRAD, VRAD_ERR, TEFF, LOGG,
  FEH and their ``_ERR`` columns (RVSpecfit), SURVEY, PROGRAM and PRIMARY (one row per
  survey/program observation of a target). ``prepare`` matches a row to the coadd of its
  SURVEY and PROGRAM and, of several rows of one spectrum, keeps the PRIMARY one.

Arms are merged into one spectrum per TARGETID on the union of the arms' wavelengths:
where arms overlap at one wavelength, flux is the ivar-weighted mean of the arms whose pixel
is usable (MASK == 0, ivar > 0) and ivar is their sum; a masked pixel contributes nothing.
A pixel no arm can use keeps ivar 0 (and the plain mean flux of the arms there).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import sdss
from .base import Simulated as SimulatedBase
from .base import Survey
from ..physics import doppler, rv_from_z
from ..spectrum import Record, SpectrumError, pixmask, make_record

ARMS = ("B", "R", "Z")
LABELS = {"teff": "TEFF", "feh": "FEH", "logg": "LOGG"}
RV_COLUMN = "VRAD"
FIBERMAP_META = ("TARGET_RA", "TARGET_DEC", "MWS_TARGET", "COADD_NUMEXP", "COADD_EXPTIME")
MAX_HDU_BYTES = 1 << 34  # 16 GB: a coadd's X_RESOLUTION HDU of thousands of targets exceeds SDSS's 256 MB limit
NAME_RE = re.compile(r"^coadd-([a-z0-9]+)-([a-z0-9]+)-(\d+)\.fits(\.gz)?$", re.I)
# FIBERSTATUS bits (desidatamodel bitmasks.rst): the informational ones (STUCKPOSITIONER, RESTRICTED,
# NEARCHARGETRAP, VARIABLETHRU), and the one camera each BADAMP bit spoils
FIBERSTATUS_INFO = (1 << 1) | (1 << 3) | (1 << 13) | (1 << 14)
BADAMP = {"B": 1 << 22, "R": 1 << 23, "Z": 1 << 24}
SPECMASK = {"SOMEBADPIX": 1 << 0, "ALLBADPIX": 1 << 1, "COSMIC": 1 << 2, "LOWFLAT": 1 << 3, "BADFIBERFLAT": 1 << 4,
            "BRIGHTSKY": 1 << 5, "BADSKY": 1 << 6, "BAD2DFIT": 1 << 7, "NODATA": 1 << 8, "BADFIBER": 1 << 9,
            "BADCOLUMN": 1 << 10}
REDROCK_PREFIXES = ("redrock", "zbest")


def parse_name(name: str):
    """(survey, program) from ``coadd-SURVEY-PROGRAM-PIXNUM.fits``, lower-case; None for another name.

    Parameters
    ----------
    name : str

    Returns
    -------
    tuple of (str, str), or None
    """
    m = NAME_RE.match(name)
    return (m[1].lower(), m[2].lower()) if m else None


def merge_arms(arms) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge spectrograph arms into one spectrum, weighting overlapping pixels by ivar.

    Parameters
    ----------
    arms : list of (wave (n_k,), flux (N, n_k), ivar (N, n_k), mask (N, n_k))
        One tuple per arm; wavelengths in Angstrom, increasing. Pixels of different arms at
        the same wavelength (equal to 1e-6 A) are combined.

    Returns
    -------
    wave : (n,) float64
        The union of the arms' wavelengths, sorted.
    flux : (N, n) float32
        sum(ivar * flux) / sum(ivar) over the usable arm pixels at each wavelength; the plain
        mean of the arms there where none is usable.
    ivar : (N, n) float32
        sum of the usable pixels' ivar (0 where none).
    mask : (N, n) int64
        OR of the arms' masks at each wavelength where no pixel is usable, else 0.
    """
    waves = [np.asarray(a[0], np.float64) for a in arms]
    wave, inverse = np.unique(np.round(np.concatenate(waves), 6), return_inverse=True)
    n_spec = np.asarray(arms[0][1]).shape[0]
    num = np.zeros((n_spec, len(wave)))
    wsum = np.zeros((n_spec, len(wave)))
    fsum = np.zeros((n_spec, len(wave)))
    count = np.zeros(len(wave))
    mask_or = np.zeros((n_spec, len(wave)), np.int64)
    start = 0
    for w, (_, flux, ivar, mask) in zip(waves, arms):
        idx = inverse[start:start + len(w)]
        start += len(w)
        flux, ivar, mask = np.asarray(flux, np.float64), np.asarray(ivar, np.float64), np.asarray(mask, np.int64)
        use = (mask == 0) & (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
        wgt = np.where(use, ivar, 0.0)
        num[:, idx] += wgt * np.where(use, flux, 0.0)
        wsum[:, idx] += wgt
        fsum[:, idx] += np.where(np.isfinite(flux), flux, 0.0)
        count[idx] += 1
        mask_or[:, idx] |= mask
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(wsum > 0, num / wsum, fsum / count)
    return wave, out.astype(np.float32), wsum.astype(np.float32), np.where(wsum > 0, 0, mask_or)


def read_coadd(path) -> list[Record]:
    """Read a DESI coadd file: one record per TARGETID, arms merged (:func:`merge_arms`).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of Record
        ``ident`` = TARGETID; ``keys["targetid"]``; FIBERMAP metadata in ``header``. A target
        whose COADD_FIBERSTATUS is not 0 gets ``problem`` ("bad_fiberstatus"); one with no
        usable pixel in any arm (e.g. all-zero ivar) gets ("no_good_pixels"), naming the
        TARGETID; the other targets of the file are unaffected.

    Raises
    ------
    SpectrumError
        ``missing_columns`` (no FIBERMAP with TARGETID, no arm), ``bad_layout`` (arm arrays
        whose shapes disagree with the FIBERMAP or the wavelengths), ``unreadable``,
        ``missing_file``.
    """
    path = Path(path)
    if not path.is_file():
        raise SpectrumError(path, "missing_file", f"no such file: {path}")
    try:
        sdss.check_headers(path, MAX_HDU_BYTES)
        with sdss.open_fits(path) as f:
            if "FIBERMAP" not in f:
                raise SpectrumError(path, "missing_columns", "no FIBERMAP HDU")
            fm = f["FIBERMAP"].read()
            cols = {c.upper(): c for c in fm.dtype.names or ()}
            if "TARGETID" not in cols:
                raise SpectrumError(path, "missing_columns", "FIBERMAP has no TARGETID")
            status = (fm[cols["COADD_FIBERSTATUS"]].astype(np.int64) if "COADD_FIBERSTATUS" in cols
                      else np.zeros(len(fm), np.int64))
            arms = []
            for arm in ARMS:
                names = [f"{arm}_{x}" for x in ("WAVELENGTH", "FLUX", "IVAR")]
                if not all(n in f for n in names):
                    continue
                wave, flux, ivar = (f[n].read() for n in names)
                mask = f[f"{arm}_MASK"].read() if f"{arm}_MASK" in f else np.zeros(flux.shape, np.int32)
                if (wave.ndim != 1 or flux.shape != ivar.shape or flux.shape != mask.shape
                        or flux.shape != (len(fm), len(wave))):
                    raise SpectrumError(path, "bad_layout", f"arm {arm}: wavelength {wave.shape}, flux "
                                             f"{flux.shape}, ivar {ivar.shape}, mask {mask.shape} for "
                                             f"{len(fm)} FIBERMAP rows")
                mask = mask.astype(np.int64)
                mask[(status & BADAMP[arm]) != 0] |= SPECMASK["BADFIBER"]  # this camera's data are unusable
                arms.append((wave, flux, ivar, mask))
    except SpectrumError:
        raise
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise SpectrumError(path, "unreadable", str(e).strip().splitlines()[0][:200] if str(e).strip()
                                 else type(e).__name__) from e
    if not arms:
        raise SpectrumError(path, "missing_columns", "no arm with X_WAVELENGTH, X_FLUX, X_IVAR (X = B, R, Z)")
    wave, flux, ivar, mask = merge_arms(arms)
    tid = fm[cols["TARGETID"]].astype(np.int64)
    bad_status = status & ~(FIBERSTATUS_INFO | sum(BADAMP.values()))
    zinfo = redshifts(path)
    records = []
    for i in range(len(fm)):
        header = {k: fm[cols[k]][i].item() for k in FIBERMAP_META if k in cols}
        header["COADD_FIBERSTATUS"] = int(status[i])
        z, zwarn, spectype = zinfo.get(int(tid[i]), (np.nan, -1, ""))
        if spectype:
            header.update(Z=z, ZWARN=zwarn, SPECTYPE=spectype)
        z = z if zwarn == 0 else np.nan
        rec = make_record(wave, flux[i], ivar[i], mask[i], path=path, ident=str(tid[i]), survey="desi",
                          header=header, keys={"targetid": int(tid[i])}, z=z, rv=rv_from_z(z), objclass=spectype)
        if bad_status[i] != 0:
            rec.problem = ("bad_fiberstatus", f"TARGETID {tid[i]}: COADD_FIBERSTATUS {status[i]} has bits beyond the "
                           "informational ones (1, 3, 13, 14) and BADAMPB/R/Z (22-24)")
        elif not rec.good().any():
            rec.problem = ("no_good_pixels", f"TARGETID {tid[i]}: no arm pixel with ivar > 0 and MASK == 0")
        records.append(rec)
    return records


def redrock_path(path):
    """The Redrock file beside a coadd (``redrock-`` or, before "everest", ``zbest-``), or None."""
    path = Path(path)
    if not path.name.startswith("coadd-"):
        return None
    for prefix in REDROCK_PREFIXES:
        p = path.with_name(prefix + path.name[len("coadd"):])
        if p.is_file():
            return p
    return None


def redshifts(path) -> dict:
    """{TARGETID: (Z, ZWARN, SPECTYPE)} from the Redrock file beside the coadd ``path``; {} without one.

    A damaged Redrock file is ignored (the coadd's spectra stay usable, without redshifts).

    Parameters
    ----------
    path : str or Path
        The coadd file.

    Returns
    -------
    dict
        SPECTYPE upper-case and stripped (STAR, GALAXY, QSO).
    """
    p = redrock_path(path)
    if p is None:
        return {}
    try:
        with sdss.open_fits(p) as f:
            t = f["REDSHIFTS" if "REDSHIFTS" in f else "ZBEST"].read(columns=["TARGETID", "Z", "ZWARN", "SPECTYPE"])
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError):
        return {}
    spectype = [(v.decode() if isinstance(v, bytes) else str(v)).strip().upper() for v in t["SPECTYPE"]]
    return {int(a): (float(b), int(c), d) for a, b, c, d in zip(t["TARGETID"], t["Z"], t["ZWARN"], spectype)}


def target_ids(path) -> np.ndarray:
    """The TARGETIDs of a coadd file's FIBERMAP, in file order (cheap: no spectra read).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    (N,) int64
    """
    with sdss.open_fits(path) as f:
        return f["FIBERMAP"].read(columns=["TARGETID"])["TARGETID"].astype(np.int64)


def write_coadd(path, targetid, arms: dict, fiberstatus=None, header: dict | None = None, durable: bool = True):
    """Write a DESI coadd file with the data model's HDUs (tests, simulations), atomically.

    Written as desidatamodel's ``coadd-SURVEY-PROGRAM-PIXNUM``: FIBERMAP (TARGETID,
    COADD_FIBERSTATUS, TARGET_RA, TARGET_DEC, COADD_NUMEXP), EXP_FIBERMAP (one exposure per
    target: TARGETID, EXPID, FIBERSTATUS), per arm X_WAVELENGTH (float64, BUNIT Angstrom),
    X_FLUX and X_IVAR (float32, with their BUNIT), X_MASK (uint32, stored as int32 with BZERO
    2**31), and SCORES (TARGETID, MEDIAN_COADD_SNR_X). X_RESOLUTION is not written (11
    diagonals per pixel: ten times the flux's size; the readers do not use it).

    Parameters
    ----------
    path : str or Path
    targetid : (N,) int
    arms : dict
        ``{"B": (wave (n,), flux (N, n), ivar (N, n), mask (N, n) or None), ...}``.
    fiberstatus : (N,) int, optional
        COADD_FIBERSTATUS (default 0).
    header : dict, optional
        Primary-header keywords (e.g. HPXPIXEL).
    durable : bool
        fsync before the rename (:func:`stellarparams.files.atomic_write`).

    Returns
    -------
    Path
    """
    from astropy.io import fits

    from ..files import atomic_write

    targetid = np.asarray(targetid, np.int64)
    n = len(targetid)
    status = np.zeros(n, np.int32) if fiberstatus is None else np.asarray(fiberstatus, np.int32)
    primary = fits.PrimaryHDU()
    if "HPXPIXEL" in (header or {}):
        primary.header["SPGRP"], primary.header["SPGRPVAL"] = "healpix", header["HPXPIXEL"]
    for k, v in (header or {}).items():
        primary.header[k] = v
    hdus = [primary, fits.BinTableHDU.from_columns(
        [fits.Column("TARGETID", "K", array=targetid), fits.Column("COADD_FIBERSTATUS", "J", array=status),
         fits.Column("TARGET_RA", "D", array=np.zeros(n)), fits.Column("TARGET_DEC", "D", array=np.zeros(n)),
         fits.Column("COADD_NUMEXP", "I", array=np.ones(n, np.int16))], name="FIBERMAP"),
        fits.BinTableHDU.from_columns(
        [fits.Column("TARGETID", "K", array=targetid), fits.Column("EXPID", "J", array=np.ones(n, np.int32)),
         fits.Column("FIBERSTATUS", "J", array=status)], name="EXP_FIBERMAP")]
    scores = [fits.Column("TARGETID", "K", array=targetid)]
    for arm, (wave, flux, ivar, mask) in arms.items():
        flux, ivar = np.asarray(flux, np.float32), np.asarray(ivar, np.float32)
        mask = np.zeros(flux.shape, np.uint32) if mask is None else np.asarray(mask).astype(np.uint32)
        w = fits.ImageHDU(np.asarray(wave, np.float64), name=f"{arm}_WAVELENGTH")
        w.header["BUNIT"] = "Angstrom"
        fl = fits.ImageHDU(flux, name=f"{arm}_FLUX")
        fl.header["BUNIT"] = "10**-17 erg/(s cm2 Angstrom)"
        iv = fits.ImageHDU(ivar, name=f"{arm}_IVAR")
        iv.header["BUNIT"] = "10**+34 (s2 cm4 Angstrom2) / erg2"
        hdus += [w, fl, iv, fits.ImageHDU(mask, name=f"{arm}_MASK", uint=True)]
        with np.errstate(invalid="ignore"):
            snr = np.nan_to_num(np.median(np.where(ivar > 0, flux * np.sqrt(ivar), np.nan), axis=1))
        scores.append(fits.Column(f"MEDIAN_COADD_SNR_{arm}", "E", array=snr.astype(np.float32)))
    hdus.append(fits.BinTableHDU.from_columns(scores, name="SCORES"))
    return atomic_write(path, fits.HDUList(hdus).writeto, durable=durable)


def write_redrock(path, targetid, z, zwarn=None, spectype="STAR", durable: bool = True):
    """Write a Redrock file (desidatamodel ``redrock-SURVEY-PROGRAM-PIXNUM``: HDU REDSHIFTS), atomically.

    Parameters
    ----------
    path : str or Path
        ``redrock-SURVEY-PROGRAM-PIXNUM.fits`` beside its coadd.
    targetid, z : (N,) arrays
    zwarn : (N,) int, optional
        Default 0 (good).
    spectype : str or (N,) str
    durable : bool

    Returns
    -------
    Path
    """
    from astropy.io import fits

    from ..files import atomic_write

    targetid = np.asarray(targetid, np.int64)
    n = len(targetid)
    zwarn = np.zeros(n, np.int64) if zwarn is None else np.asarray(zwarn, np.int64)
    spectype = np.broadcast_to(np.asarray(spectype, "U6"), (n,))
    table = fits.BinTableHDU.from_columns(
        [fits.Column("TARGETID", "K", array=targetid), fits.Column("Z", "D", array=np.asarray(z, np.float64)),
         fits.Column("ZERR", "D", array=np.zeros(n)), fits.Column("ZWARN", "K", array=zwarn),
         fits.Column("SPECTYPE", "6A", array=spectype)], name="REDSHIFTS")
    return atomic_write(path, fits.HDUList([fits.PrimaryHDU(), table]).writeto, durable=durable)


# ---------------------------------------------------------------------------- simulate --survey desi

SIM_ARMS = {"B": (3600.0, 2751), "R": (5760.0, 2326), "Z": (7520.0, 2881)}   # first pixel (A), pixels
SIM_STEP = 0.8                       # A
SIM_R = ((3600.0, 5800.0, 7600.0, 9824.0), (2000.0, 3200.0, 4100.0, 5500.0))  # knots of R(lambda)
SIM_NODATA, SIM_COSMIC = 1 << 8, 1 << 2   # desispec.maskbits specmask NODATA, COSMIC
SIM_SURVEY, SIM_PROGRAM, SIM_PIX0 = "main", "bright", 10000
SIM_PER_FILE = 500
SIM_TARGETID0 = 39_600_000_000_000_000


def sim_waves() -> dict:
    """{arm: (n,) float64 vacuum wavelengths, A} of the three simulated DESI arms."""
    return {arm: np.round(start + SIM_STEP * np.arange(n), 6) for arm, (start, n) in SIM_ARMS.items()}


def sim_ids(index: int) -> dict:
    """targetid and the healpix pixel ``pixnum`` of realization ``index`` (:data:`SIM_PER_FILE` per coadd)."""
    return dict(targetid=SIM_TARGETID0 + index, pixnum=SIM_PIX0 + index // SIM_PER_FILE)


class Simulated(SimulatedBase):
    """The files of ``simulate --survey desi``.

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
      ``_RESOLUTION``: :func:`write_coadd`), and beside it the Redrock file
      ``redrock-main-bright-PIXNUM.fits`` (REDSHIFTS: Z = the redshift of the catalog's VRAD,
      ZWARN 0, SPECTYPE STAR), as DESI's pipeline writes one;
    - catalog ``OUT/mwsall.fits``: RVTAB (HDU 1) with TARGETID, SURVEY, PROGRAM, PRIMARY, VRAD,
      VRAD_ERR, TEFF, TEFF_ERR, LOGG, LOGG_ERR, FEH, FEH_ERR, plus STAR_ID, EBV, SNR and the
      truths TEFF_TRUE, FEH_TRUE, LOGG_TRUE, RV_TRUE.
    """

    catalog, file_bytes, chunk_by_file = "mwsall.fits", 500e3, True

    def resolution(self, lam):
        """Piecewise linear through :data:`SIM_R` (2000 at 3600 A to 5500 at 9824 A)."""
        return np.interp(np.asarray(lam, np.float64), *SIM_R)

    def pixels(self):
        lam = np.concatenate(list(sim_waves().values()))
        return lam, lam - SIM_STEP / 2, lam + SIM_STEP / 2

    def spectrum_path(self, out, plan):
        pix = sim_ids(plan["index"])["pixnum"]
        return (Path(out) / "spectra" / "healpix" / SIM_SURVEY / SIM_PROGRAM / str(pix // 100) / str(pix)
                / f"coadd-{SIM_SURVEY}-{SIM_PROGRAM}-{pix}.fits")

    def is_done(self, path, n):
        if not path.exists():
            return False
        try:
            return len(target_ids(path)) == n
        except (OSError, ValueError, KeyError):
            return False

    def write_files(self, out, items, header):
        nodata, cosmic = pixmask("NODATA"), pixmask("COMBINEREJ")
        arms, start = {}, 0
        for arm, wave in sim_waves().items():
            sl = slice(start, start + len(wave))
            start += len(wave)
            masks = []
            for _, _, spec, _ in items:
                m = np.where((spec["and_mask"][sl] & nodata) != 0, SIM_NODATA, 0)
                masks.append(m | np.where((spec["and_mask"][sl] & cosmic) != 0, SIM_COSMIC, 0))
            arms[arm] = (wave, np.stack([s["flux"][sl] for _, _, s, _ in items]),
                         np.stack([s["ivar"][sl] for _, _, s, _ in items]), np.stack(masks))
        pix = sim_ids(items[0][0])["pixnum"]
        coadd = self.spectrum_path(out, items[0][1])
        tids = [sim_ids(k)["targetid"] for k, _, _, _ in items]
        # Redrock's redshifts beside the coadd (first: a coadd on disk means its Redrock file is there too)
        write_redrock(coadd.with_name("redrock" + coadd.name[len("coadd"):]), tids,
                      [float(doppler(row["RV_ADOP"]) - 1.0) for _, _, _, row in items], durable=False)
        write_coadd(coadd, tids, arms, header={"HPXPIXEL": pix, "HPXNSIDE": 64, "HPXNEST": True, "SURVEY": SIM_SURVEY,
                                               "PROGRAM": SIM_PROGRAM, **header}, durable=False)

    def catalog_row(self, index, row):
        i = sim_ids(index)
        out = dict(TARGETID=i["targetid"], SURVEY=SIM_SURVEY, PROGRAM=SIM_PROGRAM, PRIMARY=True,
                   VRAD=row["RV_ADOP"], VRAD_ERR=row["RV_ADOP_UNC"])
        for name in ("TEFF", "LOGG", "FEH"):
            out[name], out[f"{name}_ERR"] = row[f"{name}_ADOP"], row[f"{name}_ADOP_UNC"]
        out.update(STAR_ID=row["STAR_ID"], EBV=row["EBV"], SNR=row["SNR"])
        out.update({f"{n}_TRUE": row[f"{n}_TRUE"] for n in ("TEFF", "FEH", "LOGG", "RV")})
        return out

    def write_catalog(self, out, columns, meta):
        """An ``mwsall``-like file whose HDU 1 is the table RVTAB."""
        from astropy.io import fits
        from astropy.table import Table

        from ..files import atomic_write

        table = Table(columns, copy=False)
        table.meta.update(meta)
        hdu = fits.table_to_hdu(table)
        hdu.name = "RVTAB"
        return atomic_write(Path(out) / self.catalog, fits.HDUList([fits.PrimaryHDU(), hdu]).writeto)


# ---------------------------------------------------------------------------- the survey (surveys.registry)

class DESI(Survey):
    """DESI coadd files (B/R/Z arms, many targets each) with Redrock beside them; catalog: mwsall (RVTAB)."""

    name, title, priority, name_re = "desi", "DESI", 40, NAME_RE
    labels, rv_column, id_column = LABELS, RV_COLUMN, "TARGETID"
    catalog_keys = (("TARGETID",),)
    catalog_columns = ("TARGETID", "SURVEY", "PROGRAM", "PRIMARY")  # locate_rows and row_order's
    many_per_file = True

    def identify(self, info) -> bool:
        return "B_FLUX" in info.names or "R_FLUX" in info.names or "Z_FLUX" in info.names

    def read(self, path, reader="fast") -> list:
        return read_coadd(path)

    def members(self, path) -> list:
        return [(j, str(t), float("nan")) for j, t in enumerate(target_ids(path))]

    def locate_rows(self, cat, files, row_files) -> list:
        """A row's TARGETID in its FILE, else in the coadd of its SURVEY and PROGRAM, else in any coadd."""
        import pandas as pd

        n = len(cat)
        loc = [None] * n
        tid = pd.to_numeric(cat["TARGETID"], errors="coerce").to_numpy() if "TARGETID" in cat else np.full(n, np.nan)
        where = {}
        for p in sorted(set(files) | {f for f in row_files if f is not None and f.is_file()}):
            sp = parse_name(p.name)  # (survey, program) of coadd-SURVEY-PROGRAM-PIXNUM.fits
            try:
                for j, t in enumerate(target_ids(p)):
                    where.setdefault((p, int(t)), (p, j))
                    where.setdefault((sp, int(t)), (p, j))
                    where.setdefault((None, int(t)), (p, j))
            except (OSError, ValueError, KeyError):
                continue  # an unreadable coadd: its rows become no_file, the file a reject when read
        sp_col = ([(str(a).strip().lower(), str(b).strip().lower()) for a, b in zip(cat["SURVEY"], cat["PROGRAM"])]
                  if "SURVEY" in cat and "PROGRAM" in cat else [None] * n)
        for i in range(n):
            if np.isfinite(tid[i]):
                t = int(tid[i])
                loc[i] = where.get((row_files[i], t)) if row_files[i] is not None else \
                    where.get((sp_col[i], t)) if sp_col[i] is not None else where.get((None, t))
            elif row_files[i] is not None:
                loc[i] = (row_files[i], 0)
        return loc

    def row_order(self, cat):
        """mwsall has several rows per TARGETID: the PRIMARY one claims the spectrum first."""
        if "PRIMARY" not in cat.columns:
            return super().row_order(cat)
        primary = cat["PRIMARY"].map(lambda v: str(v).strip().lower() in ("true", "1", "t")).to_numpy()
        return np.argsort(~primary, kind="stable"), " PRIMARY one"


    simulated = Simulated()


SURVEY = DESI()
