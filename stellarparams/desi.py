"""DESI healpix coadd files and the Milky Way Survey (``mwsall``) label catalog.

Data model followed (docs/surveys.md has the links):

- desidatamodel, ``DESI_SPECTRO_REDUX/SPECPROD/healpix/SURVEY/PROGRAM/PIXGROUP/PIXNUM/
  coadd-SURVEY-PROGRAM-PIXNUM.rst`` (desihub/desidatamodel, commit 035102b; the format of
  the EDR "fuji" and DR1 "iron" productions): file ``coadd-SURVEY-PROGRAM-PIXNUM.fits``; HDU
  FIBERMAP (a table, one row per target: TARGETID int64, COADD_FIBERSTATUS int32, 0 = good,
  TARGET_RA, TARGET_DEC, ...); per arm X in B, R, Z the HDUs X_WAVELENGTH (nwave,) float64
  Angstrom (vacuum), X_FLUX and X_IVAR (nspec, nwave) float32 in 1e-17 erg/(s cm2 A) and
  its inverse square, X_MASK (nspec, nwave) int32 (nonzero = bad), X_RESOLUTION (not used).
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
from .spectrum import Record, make_record

ARMS = ("B", "R", "Z")
LABELS = {"teff": "TEFF", "feh": "FEH", "logg": "LOGG"}
RV_COLUMN = "VRAD"
FIBERMAP_META = ("TARGET_RA", "TARGET_DEC", "MWS_TARGET", "COADD_NUMEXP", "COADD_EXPTIME")
MAX_HDU_BYTES = 1 << 34  # 16 GB: a coadd's X_RESOLUTION HDU of thousands of targets exceeds SDSS's 256 MB limit
NAME_RE = re.compile(r"^coadd-([a-z0-9]+)-([a-z0-9]+)-(\d+)\.fits(\.gz)?$", re.I)


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
    sdss.SpectrumError
        ``missing_columns`` (no FIBERMAP with TARGETID, no arm), ``bad_layout`` (arm arrays
        whose shapes disagree with the FIBERMAP or the wavelengths), ``unreadable``,
        ``missing_file``.
    """
    path = Path(path)
    if not path.is_file():
        raise sdss.SpectrumError(path, "missing_file", f"no such file: {path}")
    try:
        sdss.check_headers(path, MAX_HDU_BYTES)
        with sdss.open_fits(path) as f:
            if "FIBERMAP" not in f:
                raise sdss.SpectrumError(path, "missing_columns", "no FIBERMAP HDU")
            fm = f["FIBERMAP"].read()
            cols = {c.upper(): c for c in fm.dtype.names or ()}
            if "TARGETID" not in cols:
                raise sdss.SpectrumError(path, "missing_columns", "FIBERMAP has no TARGETID")
            arms = []
            for arm in ARMS:
                names = [f"{arm}_{x}" for x in ("WAVELENGTH", "FLUX", "IVAR")]
                if not all(n in f for n in names):
                    continue
                wave, flux, ivar = (f[n].read() for n in names)
                mask = f[f"{arm}_MASK"].read() if f"{arm}_MASK" in f else np.zeros(flux.shape, np.int32)
                if (wave.ndim != 1 or flux.shape != ivar.shape or flux.shape != mask.shape
                        or flux.shape != (len(fm), len(wave))):
                    raise sdss.SpectrumError(path, "bad_layout", f"arm {arm}: wavelength {wave.shape}, flux "
                                             f"{flux.shape}, ivar {ivar.shape}, mask {mask.shape} for "
                                             f"{len(fm)} FIBERMAP rows")
                arms.append((wave, flux, ivar, mask))
    except sdss.SpectrumError:
        raise
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise sdss.SpectrumError(path, "unreadable", str(e).strip().splitlines()[0][:200] if str(e).strip()
                                 else type(e).__name__) from e
    if not arms:
        raise sdss.SpectrumError(path, "missing_columns", "no arm with X_WAVELENGTH, X_FLUX, X_IVAR (X = B, R, Z)")
    wave, flux, ivar, mask = merge_arms(arms)
    tid = fm[cols["TARGETID"]].astype(np.int64)
    status = fm[cols["COADD_FIBERSTATUS"]].astype(np.int64) if "COADD_FIBERSTATUS" in cols else np.zeros(len(fm), int)
    records = []
    for i in range(len(fm)):
        header = {k: fm[cols[k]][i].item() for k in FIBERMAP_META if k in cols}
        header["COADD_FIBERSTATUS"] = int(status[i])
        rec = make_record(wave, flux[i], ivar[i], mask[i], path=path, ident=str(tid[i]), survey="desi",
                          header=header, keys={"targetid": int(tid[i])})
        if status[i] != 0:
            rec.problem = ("bad_fiberstatus", f"TARGETID {tid[i]}: COADD_FIBERSTATUS {status[i]} (0 = good)")
        elif not rec.good().any():
            rec.problem = ("no_good_pixels", f"TARGETID {tid[i]}: no arm pixel with ivar > 0 and MASK == 0")
        records.append(rec)
    return records


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

    from .files import atomic_write

    targetid = np.asarray(targetid, np.int64)
    status = np.zeros(len(targetid), np.int32) if fiberstatus is None else np.asarray(fiberstatus, np.int32)
    primary = fits.PrimaryHDU()
    for k, v in (header or {}).items():
        primary.header[k] = v
    hdus = [primary, fits.BinTableHDU.from_columns(
        [fits.Column("TARGETID", "K", array=targetid), fits.Column("COADD_FIBERSTATUS", "J", array=status),
         fits.Column("TARGET_RA", "D", array=np.zeros(len(targetid))),
         fits.Column("TARGET_DEC", "D", array=np.zeros(len(targetid)))], name="FIBERMAP")]
    for arm, (wave, flux, ivar, mask) in arms.items():
        flux = np.asarray(flux, np.float32)
        mask = np.zeros(flux.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
        hdus += [fits.ImageHDU(np.asarray(wave, np.float64), name=f"{arm}_WAVELENGTH"),
                 fits.ImageHDU(flux, name=f"{arm}_FLUX"),
                 fits.ImageHDU(np.asarray(ivar, np.float32), name=f"{arm}_IVAR"),
                 fits.ImageHDU(mask, name=f"{arm}_MASK")]
    return atomic_write(path, fits.HDUList(hdus).writeto, durable=durable)
