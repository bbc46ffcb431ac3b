"""Files written here with astropy exactly as the surveys' real files are laid out (not by our writers).

LAMOST: the pilot-survey/DR1 5 x 3904 image whose third row is no wavelength array (the
wavelengths only in the header's COEFF0/COEFF1), without OBSID, matched to its catalog by
(lmjd, planid, spid, fiberid); the CRVAL1/CD1_1/DC-FLAG header; the DR6-DR7 image whose third
row is the wavelength (header EXTEN0); the DR8+ one-row float32 table. DESI: a coadd with the
real arm sizes, EXP_FIBERMAP, uint32 masks, RESOLUTION and SCORES, and its Redrock file. SDSS:
a spec file whose HDU 2 is SPALL. Damaged variants become named rejects.
"""
import numpy as np
import pandas as pd
import pytest
import torch
from astropy.io import fits

from stellarparams.spectrum import SpectrumError
from stellarparams import cli, readers
from stellarparams.surveys import desi, lamost
from stellarparams.dataset import Dataset, Grid
from stellarparams.model import ModelConfig, StellarNet
from stellarparams.model_io import Model, save_model
from stellarparams.physics import doppler, rv_from_z
from stellarparams.predict import predict
from stellarparams.preprocess import PrepareConfig

torch.set_num_threads(1)
N_DR1 = 3904                      # pixels of a pilot/DR1 (pipeline v2.6.4) spectrum
DR1_WAVE = 10 ** (3.5682 + 1e-4 * np.arange(N_DR1))


def star_flux(wave, seed):
    """A smooth continuum with a few absorption lines whose depth depends on ``seed``."""
    rng = np.random.default_rng(seed)
    f = 1000 * (wave / 5000) ** -1.0
    for line in (3934.8, 4862.7, 5176.7, 5895.6, 6564.6, 8544.4):
        f *= 1 - rng.uniform(0.2, 0.6) * np.exp(-0.5 * ((wave - line) / 4) ** 2)
    return (f * (1 + 0.01 * rng.normal(size=len(wave)))).astype(np.float32)


def dr1_header(lmjd=55859, planid="F5902", spid=1, fiberid=1, z=1e-4, **extra):
    """A pilot/DR1 primary header: identifiers, Z and HELIO_RV, the COEFF0/COEFF1 solution, no OBSID."""
    h = fits.Header()
    for k, v in {"TELESCOP": "LAMOST", "LMJD": lmjd, "MJD": lmjd - 1, "PLANID": planid, "SPID": spid,
                 "FIBERID": fiberid, "RA": 10.0, "DEC": 40.0, "CLASS": "STAR", "Z": z, "Z_ERR": 1e-5,
                 "HELIO_RV": (-12.3, "[km/s] Heliocentric correction"), "VACUUM": True, "COEFF0": 3.5682,
                 "COEFF1": 1e-4, **extra}.items():
        h[k] = v
    return h


def write_dr1(path, seed=0, third_row=None, drop=(), n=N_DR1, **header):
    """A 5 x n float32 image: flux, ivar, a third row near 1 (not a wavelength), andmask, ormask."""
    flux = star_flux(DR1_WAVE[:n], seed)
    ivar = np.full(n, 1e-3, np.float32)
    andmask = np.zeros(n, np.float32)
    andmask[100:110] = 1
    third = flux / np.median(flux) if third_row is None else third_row
    h = dr1_header(**header)
    for k in drop:
        del h[k]
    fits.PrimaryHDU(np.stack([flux, ivar, third, andmask, andmask]).astype(np.float32), header=h).writeto(path)
    return path


def tiny_model_folder(path, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_in=64, stem_width=16, block_widths=(8,), heads={"teff": (8,), "feh": (4,), "logg": (8,)})
    grid = Grid(n_pix=64)
    m = Model(StellarNet(cfg), ["teff", "feh", "logg"], [6000, -1, 3.5], [1500, 0.8, 1.2], model_config=cfg,
              label_units=["K", "dex", "dex"], label_ranges={"teff": [4000, 9000], "feh": [-3, 0.5], "logg": [0, 5]},
              grid=grid.to_dict(), prepare_config=PrepareConfig(grid=grid).to_dict(), seed=seed)
    save_model(m, path)
    return m


# ---------------------------------------------------------------- LAMOST, one file
def test_dr1_pilot_image_takes_its_wavelengths_from_the_header(tmp_path):
    path = write_dr1(tmp_path / "spec-55859-F5902_sp01-001.fits", z=2e-4)
    (rec,) = readers.read(path)
    np.testing.assert_allclose(rec.wave, DR1_WAVE, rtol=1e-12)  # COEFF0 + COEFF1 k, not the third row
    assert rec.ident == "spec-55859-F5902_sp01-001" and "obsid" not in rec.keys
    assert rec.keys["lmjd_planid_spid_fiberid"] == (55859, "F5902", 1, 1)
    assert rec.z == 2e-4 and rec.rv == pytest.approx(rv_from_z(2e-4))  # Z, not HELIO_RV (-12.3)
    assert rec.header["HELIO_RV"] == -12.3
    good = rec.good()
    assert not good[100:110].any() and good[110:120].all()


def test_crval1_cd1_1_dc_flag_header(tmp_path):
    drop = ("COEFF0", "COEFF1")
    log = write_dr1(tmp_path / "spec-1-P_sp01-001.fits", drop=drop, CRVAL1=3.5682, CD1_1=1e-4, CRPIX1=1,
                    **{"DC-FLAG": 1})
    np.testing.assert_allclose(readers.read(log)[0].wave, DR1_WAVE, rtol=1e-12)
    lin = write_dr1(tmp_path / "spec-1-P_sp01-002.fits", drop=drop, CRVAL1=3700.0, CD1_1=1.5, CRPIX1=1,
                    **{"DC-FLAG": 0})
    np.testing.assert_allclose(readers.read(lin)[0].wave, 3700.0 + 1.5 * np.arange(N_DR1))


def test_dr6_dr7_image_uses_its_wavelength_row_and_refuses_one_that_disagrees_with_the_header(tmp_path):
    wave = 10 ** (3.5682 + 1e-4 * np.arange(3909))
    flux = star_flux(wave, 1)
    rows = np.stack([flux, np.ones_like(flux), wave, 0 * flux, 0 * flux]).astype(np.float32)
    h = dr1_header(OBSID=359910161, EXTEN0="Flux, Inverse, Wavelength, Andmask, Ormask", NWORDER=2,
                   WFITTYPE="LOG-LINEAR", CRVAL1=3.5682, CD1_1=1e-4, CRPIX1=1, **{"DC-FLAG": 1})
    fits.PrimaryHDU(rows, header=h).writeto(tmp_path / "spec-57287-KP1_sp10-161.fits")
    (rec,) = readers.read(tmp_path / "spec-57287-KP1_sp10-161.fits")
    assert np.array_equal(rec.wave, wave.astype(np.float32)) and rec.ident == "359910161"
    rows[2] = wave * 1.001  # 4 pixels off the header's solution: which one is right cannot be told
    fits.PrimaryHDU(rows, header=h).writeto(tmp_path / "spec-57287-KP1_sp10-162.fits")
    with pytest.raises(SpectrumError) as e:
        readers.read(tmp_path / "spec-57287-KP1_sp10-162.fits")
    assert e.value.reason == "bad_wavelength" and "disagrees" in e.value.detail


def test_dr8_table_of_float32_columns(tmp_path):
    wave = 10 ** (3.5682 + 1e-4 * np.arange(3909))
    flux = star_flux(wave, 2)
    andmask = np.zeros(3909, np.float32)
    andmask[5] = 2.0
    cols = {"FLUX": flux, "IVAR": np.ones(3909), "WAVELENGTH": wave, "ANDMASK": andmask, "ORMASK": andmask,
            "NORMALIZATION": flux / 1000}
    table = fits.BinTableHDU.from_columns([fits.Column(c, "3909E", array=np.asarray(a, np.float32)[None])
                                          for c, a in cols.items()])
    h = dr1_header(OBSID=677503031)
    fits.HDUList([fits.PrimaryHDU(header=h), table]).writeto(tmp_path / "spec-58397-EG1_sp03-031.fits")
    (rec,) = readers.read(tmp_path / "spec-58397-EG1_sp03-031.fits")
    assert np.array_equal(rec.wave, wave.astype(np.float32)) and np.array_equal(rec.flux, flux)
    assert not rec.good()[5] and rec.good()[6] and rec.ident == "677503031"


@pytest.mark.parametrize("damage, reason, words", [
    (dict(drop=("COEFF0", "COEFF1")), "bad_wavelength", "no wavelength solution"),
    (dict(drop=("COEFF1",)), "bad_wavelength", "COEFF1 = None"),
    (dict(COEFF1=-1e-4), "bad_wavelength", "step > 0"),
    (dict(COEFF1=0.0), "bad_wavelength", "step > 0"),
    (dict(COEFF0="n/a"), "bad_wavelength", "COEFF0 = 'n/a'"),
    (dict(COEFF0=0.5), "bad_wavelength", "gives 3.162"),
    (dict(third_row=np.full(N_DR1, np.nan, np.float32), drop=("COEFF0", "COEFF1")), "bad_wavelength", "not finite"),
])
def test_damaged_dr1_files_are_named_rejects(tmp_path, damage, reason, words):
    path = write_dr1(tmp_path / "spec-55859-F5902_sp01-009.fits", **damage)
    with pytest.raises(SpectrumError) as e:
        readers.read(path)
    assert e.value.reason == reason and words in e.value.detail and str(path) in str(e.value)


# ---------------------------------------------------------------- LAMOST, a plate through prepare and predict
def dr1_plate(tmp_path, n=6):
    """n good DR1 files, two damaged ones, and the A/F/G/K catalog without obsid (one row has no file)."""
    folder = tmp_path / "F5902"
    folder.mkdir()
    rng = np.random.default_rng(3)
    rv = rng.uniform(-100, 100, n)
    for k in range(n):
        write_dr1(folder / lamost.spec_filename(55859, "F5902", 1, k + 1), seed=k, fiberid=k + 1,
                  z=float(doppler(rv[k])) - 1)
    write_dr1(folder / lamost.spec_filename(55859, "F5902", 2, 1), spid=2, drop=("COEFF0", "COEFF1"))
    write_dr1(folder / lamost.spec_filename(55859, "F5902", 2, 2), spid=2, fiberid=2, COEFF1=-1e-4)
    cat = pd.DataFrame({"lmjd": 55859, "planid": "F5902", "spid": [1] * n + [2, 2, 3],
                        "fiberid": list(range(1, n + 1)) + [1, 2, 7], "teff": rng.uniform(4500, 6500, n + 3),
                        "teff_err": 50.0, "logg": 4.0, "logg_err": 0.2, "feh": rng.uniform(-1.5, 0.2, n + 3),
                        "feh_err": 0.1, "rv": np.r_[rv, 0, 0, 0] + 0.5, "rv_err": 1.0})
    cat.to_csv(tmp_path / "afgk.csv", index=False)
    return folder, cat


def test_prepare_and_predict_a_dr1_plate_matched_by_lmjd_planid_spid_fiberid(tmp_path):
    folder, cat = dr1_plate(tmp_path)
    assert cli.main(["prepare", "--survey", "lamost", "--catalog", str(tmp_path / "afgk.csv"), "--spectra",
                     str(folder), "--out", str(tmp_path / "ds"), "--workers", "1", "--no-progress"]) == 0
    with Dataset(tmp_path / "ds") as ds:
        assert ds.n == 6
        np.testing.assert_allclose(np.sort(ds.labels()[:, 0]), np.sort(cat["teff"][:6]), rtol=1e-6)
        np.testing.assert_allclose(np.sort(ds.meta()["rv"]), np.sort(cat["rv"][:6]), rtol=1e-6)  # the catalog's
        assert sorted(ds.meta()["object_id"]) == [f"55859-F5902-01-{k:03d}" for k in range(1, 7)]
    rej = pd.read_csv(tmp_path / "ds" / "rejects.csv", keep_default_na=False).sort_values("id")
    assert list(rej["reason"]) == ["bad_wavelength", "bad_wavelength", "no_file"]
    assert list(rej["id"]) == ["55859-F5902-02-001", "55859-F5902-02-002", "55859-F5902-03-007"]

    m = tiny_model_folder(tmp_path / "model")
    assert cli.main(["predict", str(tmp_path / "model"), str(folder), "--out", str(tmp_path / "p.csv"),
                     "--catalog", str(tmp_path / "afgk.csv"), "--survey", "lamost", "--workers", "0", "--quiet"]) == 0
    df = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(df) == 8 and df["flag_rejected"].astype(str).tolist().count("True") == 2
    assert set(df.loc[df["flag_rejected"].astype(str) == "True", "reject_reason"]) == {"bad_wavelength"}
    ok = df[df["flag_rejected"].astype(str) == "False"].sort_values("id")
    assert list(ok["id"]) == [f"spec-55859-F5902_sp01-{k:03d}" for k in range(1, 7)]
    np.testing.assert_allclose(pd.to_numeric(ok["rv"]), cat["rv"][:6], rtol=1e-6)  # catalog RV, matched by keys
    recs = [readers.read(folder / f"{i}.fits")[0] for i in ok["id"]]
    want = m.predict(recs, rv_kms=cat["rv"][:6].to_numpy())
    np.testing.assert_allclose(ok[["teff", "feh", "logg"]].apply(pd.to_numeric).to_numpy(), want, rtol=1e-4)


def test_files_not_named_after_their_keys_are_matched_by_their_headers(tmp_path):
    folder, cat = dr1_plate(tmp_path, n=3)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for k, p in enumerate(sorted(folder.glob("spec-*_sp01-*.fits"))):
        p.rename(renamed / f"star{k}.fits")  # a name that says nothing; the header still does
    files = sorted(renamed.iterdir())
    cat_up = cat.rename(columns=str.upper)
    loc = lamost.locate(cat_up, files, [None] * len(cat_up))
    assert [None if x is None else x[0].name for x in loc] == ["star0.fits", "star1.fits", "star2.fits",
                                                              None, None, None]
    # OBSID in the catalog and the headers, without the key columns
    with fits.open(files[1], mode="update") as h:
        h[0].header["OBSID"] = 424242
    loc = lamost.locate(pd.DataFrame({"OBSID": [424242, 7]}), files, [None, None])
    assert loc == [(files[1], None), None]
    # predict finds each file's catalog RV through its header too
    tiny_model_folder(tmp_path / "model")
    predict(tmp_path / "model", files, tmp_path / "p.csv", catalog=tmp_path / "afgk.csv", survey="lamost",
            workers=0, progress=False)
    df = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    np.testing.assert_allclose(pd.to_numeric(df["rv"]), cat["rv"][:3], rtol=1e-6)


def test_pilot_file_names_without_the_underscore_are_lamost(tmp_path):
    assert lamost.parse_name("spec-55859-F5902sp01-001.fit") == (55859, "F5902", 1, 1)
    assert lamost.parse_name("spec-55977-GAC_080N37_V1_sp03-241.fits.gz") == (55977, "GAC_080N37_V1", 3, 241)
    path = write_dr1(tmp_path / "spec-55859-F5902sp01-001.fit")
    assert readers.detect(path) == "lamost" and readers.find_files(tmp_path, "lamost") == [path]
    assert readers.find_files(tmp_path, "sdss") == []


# ---------------------------------------------------------------- DESI
DESI_ARMS = {"B": (3600.0, 2751), "R": (5760.0, 2326), "Z": (7520.0, 2881)}


def write_real_coadd(folder, tids, status, zwarn):
    """A coadd as desidatamodel lays it out (arm sizes, EXP_FIBERMAP, uint32 masks, RESOLUTION, SCORES)
    and the Redrock file beside it."""
    n = len(tids)
    hdus = [fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("TARGETID", "K", array=tids), fits.Column("COADD_FIBERSTATUS", "J", array=status),
         fits.Column("TARGET_RA", "D", array=np.zeros(n)), fits.Column("TARGET_DEC", "D", array=np.zeros(n)),
         fits.Column("OBJTYPE", "3A", array=["TGT"] * n)], name="FIBERMAP"),
        fits.BinTableHDU.from_columns([fits.Column("TARGETID", "K", array=np.repeat(tids, 2)),
                                       fits.Column("EXPID", "J", array=np.tile([1, 2], n))], name="EXP_FIBERMAP")]
    for arm, (start, npix) in DESI_ARMS.items():
        wave = start + 0.8 * np.arange(npix)
        flux = np.stack([star_flux(wave, k) for k in range(n)])
        hdus += [fits.ImageHDU(wave, name=f"{arm}_WAVELENGTH"), fits.ImageHDU(flux, name=f"{arm}_FLUX"),
                 fits.ImageHDU(np.full(flux.shape, 1e-3, np.float32), name=f"{arm}_IVAR"),
                 fits.ImageHDU(np.zeros(flux.shape, np.uint32), name=f"{arm}_MASK", uint=True),
                 fits.ImageHDU(np.zeros((n, 11, npix), np.float32), name=f"{arm}_RESOLUTION")]
    hdus.append(fits.BinTableHDU.from_columns([fits.Column("TARGETID", "K", array=tids)], name="SCORES"))
    coadd = folder / "coadd-main-bright-26.fits"
    fits.HDUList(hdus).writeto(coadd)
    z = np.array([1e-4, -2e-4, 3e-4, 0.0])[:n]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("TARGETID", "K", array=tids), fits.Column("Z", "D", array=z),
         fits.Column("ZERR", "D", array=np.zeros(n)), fits.Column("ZWARN", "K", array=zwarn),
         fits.Column("SPECTYPE", "6A", array=["STAR"] * n)], name="REDSHIFTS")]).writeto(
        folder / "redrock-main-bright-26.fits")
    return coadd, z


def test_desi_coadd_with_its_redrock_file(tmp_path):
    tids = np.array([39627, 39628, 39629, 39630])
    status = [0, 1 << 1, 1 << 23, 1 << 16]   # good, STUCKPOSITIONER (info), BADAMPR (R unusable), BADFIBER
    coadd, z = write_real_coadd(tmp_path, tids, status, zwarn=[0, 0, 0, 4])
    recs = readers.read(coadd)
    assert [r.ident for r in recs] == [str(t) for t in tids]
    assert len(recs[0].wave) == 2751 + 2326 + 2881 - 51 - 126  # the arms overlap at 5760-5800 and 7520-7620 A
    assert recs[0].z == z[0] and recs[0].rv == pytest.approx(rv_from_z(z[0])) and recs[0].objclass == "STAR"
    assert np.isnan(recs[3].z) and recs[3].header["ZWARN"] == 4  # a warned redshift is not used
    assert recs[0].problem is None and recs[1].problem is None  # an informational bit is not a reject
    r_only = (recs[2].wave > 5800) & (recs[2].wave < 7520)
    assert recs[2].problem is None and not recs[2].good()[r_only].any() and recs[2].good()[~r_only].all()
    assert recs[3].problem[0] == "bad_fiberstatus"

    m = tiny_model_folder(tmp_path / "model")
    predict(tmp_path / "model", [coadd], tmp_path / "p.csv", workers=0, progress=False)  # RV from Redrock's Z
    df = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert df["flag_rejected"].astype(str).tolist() == ["False", "False", "False", "True"]
    assert df["reject_reason"][3] == "bad_fiberstatus"
    np.testing.assert_allclose(pd.to_numeric(df["rv"][:3]), [rv_from_z(v) for v in z[:3]], rtol=1e-6)  # float32
    want = m.predict(recs[:3], rv_kms=[rv_from_z(v) for v in z[:3]])
    np.testing.assert_allclose(df.loc[:2, ["teff", "feh", "logg"]].apply(pd.to_numeric).to_numpy(), want, rtol=1e-4)


def test_desi_writer_follows_the_data_model(tmp_path):
    wave = 3600.0 + 0.8 * np.arange(2751)
    flux = np.stack([star_flux(wave, 0)])
    mask = np.zeros(flux.shape, np.int64)
    mask[0, 3] = desi.SPECMASK["NODATA"]
    path = desi.write_coadd(tmp_path / "coadd-main-dark-1.fits", [5], {"B": (wave, flux, np.ones_like(flux), mask)},
                            header={"HPXPIXEL": 1})
    with fits.open(path) as h:
        assert [x.name for x in h] == ["PRIMARY", "FIBERMAP", "EXP_FIBERMAP", "B_WAVELENGTH", "B_FLUX", "B_IVAR",
                                       "B_MASK", "SCORES"]
        assert h["B_MASK"].header["BZERO"] == 2 ** 31 and h["B_MASK"].data.dtype == np.uint32
        assert h["B_FLUX"].header["BUNIT"] == "10**-17 erg/(s cm2 Angstrom)" and h[0].header["SPGRPVAL"] == 1
    (rec,) = readers.read(path)
    assert not rec.good()[3] and rec.good()[4]


# ---------------------------------------------------------------- SDSS
def test_sdss_spec_file_with_spall_and_exposure_hdus(tmp_path):
    loglam = (3.5800 + 1e-4 * np.arange(3000)).astype(np.float32)
    flux = star_flux(10 ** loglam.astype(np.float64), 4)
    n = len(flux)
    coadd = fits.BinTableHDU.from_columns(
        [fits.Column(c, t, array=a) for c, t, a in (
            ("FLUX", "E", flux), ("LOGLAM", "E", loglam), ("IVAR", "E", np.ones(n)), ("AND_MASK", "J", np.zeros(n)),
            ("OR_MASK", "J", np.zeros(n)), ("WRESL", "E", np.ones(n)), ("SKY", "E", np.zeros(n)),
            ("MODEL", "E", flux))], name="COADD")
    spall = fits.BinTableHDU.from_columns(
        [fits.Column("PLATE", "J", array=[3586]), fits.Column("MJD", "J", array=[55181]),
         fits.Column("FIBERID", "J", array=[7]), fits.Column("CLASS", "6A", array=["STAR"]),
         fits.Column("Z", "D", array=[1.5e-4]), fits.Column("SN_MEDIAN_ALL", "E", array=[23.0])], name="SPALL")
    zline = fits.BinTableHDU.from_columns([fits.Column("LINENAME", "13A", array=["Ha"])], name="SPZLINE")
    exposure = fits.BinTableHDU.from_columns([fits.Column("flux", "E", array=flux)], name="B1-00123456-00123455")
    fits.HDUList([fits.PrimaryHDU(), coadd, spall, zline, exposure]).writeto(tmp_path / "spec-3586-55181-0007.fits")
    (rec,) = readers.read(tmp_path / "spec-3586-55181-0007.fits")
    assert rec.ident == "3586-55181-0007" and rec.z == 1.5e-4 and rec.objclass == "STAR" and rec.snr == 23.0
    assert np.array_equal(rec.flux, flux)
