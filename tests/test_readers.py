"""Readers behind one interface: LAMOST (both layouts), DESI coadds, plain tables, arrays."""
import gzip
import shutil

import numpy as np
import pytest

from stellarparams.spectrum import SpectrumError
from stellarparams import readers
from stellarparams.surveys import desi, lamost, sdss, tables
from stellarparams.physics import rv_from_z
from stellarparams.preprocess import PrepareConfig, preprocess


def spectrum(n=300, lo=3800.0, hi=9000.0, seed=0):
    rng = np.random.default_rng(seed)
    wave = np.geomspace(lo, hi, n)
    flux = (1 + 0.3 * np.sin(wave / 50) + 0.05 * rng.normal(size=n)).astype(np.float32)
    ivar = rng.uniform(50, 100, n).astype(np.float32)
    return wave, flux, ivar


# ---------------------------------------------------------------- LAMOST
@pytest.mark.parametrize("layout", ["dr8", "early"])
def test_lamost_returns_exactly_what_was_written(tmp_path, layout):
    wave, flux, ivar = spectrum()
    andmask = np.zeros(len(flux), np.int32)
    andmask[10] = 4
    path = tmp_path / lamost.spec_filename(57000, "GAC116N20B1", 15, 92)
    lamost.write_spectrum(path, wave, flux, ivar, andmask, layout=layout, obsid=123456, lmjd=57000,
                          planid="GAC116N20B1", spid=15, fiberid=92, z=1e-4, helio_rv=29.9)
    assert readers.detect(path) == "lamost"
    (rec,) = readers.read(path)
    w_written = wave.astype(np.float32)  # both layouts store float32, as LAMOST's files do
    assert np.array_equal(rec.wave, w_written) and np.array_equal(rec.flux, flux) and np.array_equal(rec.ivar, ivar)
    assert rec.ident == "123456" and rec.keys["obsid"] == 123456
    assert rec.keys["lmjd_planid_spid_fiberid"] == (57000, "GAC116N20B1", 15, 92)
    # the star's RV is c z; HELIO_RV is LAMOST's heliocentric correction, kept in the header only
    assert rec.z == pytest.approx(1e-4) and rec.rv == pytest.approx(rv_from_z(1e-4)) and rec.survey == "lamost"
    assert rec.header["HELIO_RV"] == pytest.approx(29.9) and abs(rec.rv - 29.9) > 0.05
    good = rec.good()
    assert not good[10] and good[11]  # ANDMASK != 0 is unusable
    assert np.allclose(10 ** rec.loglam, rec.wave)
    # gzipped, detected by name too
    gz = tmp_path / (path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert np.array_equal(readers.read(gz)[0].flux, flux)


def test_lamost_wrong_number_of_rows_is_a_named_error(tmp_path):
    from astropy.io import fits

    wave, flux, ivar = spectrum()
    bad = tmp_path / "spec-57000-GAC1_sp01-001.fits"
    fits.PrimaryHDU(np.stack([flux, ivar, wave]).astype(np.float32)).writeto(bad)  # 3 rows, not 5
    with pytest.raises(SpectrumError) as e:
        readers.read(bad)
    assert e.value.reason == "bad_layout" and "3 rows" in e.value.detail
    two = tmp_path / "spec-57000-GAC1_sp01-002.fits"
    lamost.write_spectrum(two, wave, flux, ivar)
    from astropy.table import Table

    t = Table.read(two, hdu=1)
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(Table([np.concatenate([t[c]] * 2) for c in t.colnames],
                                                             names=t.colnames))]).writeto(two, overwrite=True)
    with pytest.raises(SpectrumError, match="2 rows"):
        lamost.read_spectrum(two)


# ---------------------------------------------------------------- DESI
def test_desi_arms_merge_by_ivar_and_a_masked_pixel_is_not_used(tmp_path):
    wb = np.arange(3600.0, 3610.0, 1.0)           # 3600 .. 3609
    wr = np.arange(3605.0, 3615.0, 1.0)           # overlaps at 3605 .. 3609
    fb = np.array([[1, 2, 3, 4, 5, 10, 10, 10, 10, 10]], np.float32)
    ib = np.array([[1, 1, 1, 1, 1, 1, 3, 1, 1, 1]], np.float32)
    fr = np.array([[20, 20, 20, 20, 20, 6, 7, 8, 9, 11]], np.float32)  # overlap 3605-3609, then R alone
    ir = np.array([[2, 2, 2, 2, 2, 1, 1, 1, 1, 1]], np.float32)
    mr = np.zeros((1, 10), np.int32)
    mr[0, 2] = 1  # R pixel at 3607 masked: B alone there
    path = tmp_path / "coadd-main-bright-1234.fits"
    desi.write_coadd(path, [39627], {"B": (wb, fb, ib, None), "R": (wr, fr, ir, mr)})
    assert readers.detect(path) == "desi"
    (rec,) = readers.read(path)
    assert np.array_equal(rec.wave, np.arange(3600.0, 3615.0, 1.0)) and rec.ident == "39627"
    assert np.array_equal(rec.flux[:5], fb[0, :5]) and np.array_equal(rec.ivar[:5], ib[0, :5])  # B only
    assert np.array_equal(rec.flux[10:], fr[0, 5:]) and np.array_equal(rec.ivar[10:], ir[0, 5:])  # R only
    assert rec.flux[5] == pytest.approx((10 * 1 + 20 * 2) / 3) and rec.ivar[5] == 3   # ivar-weighted
    assert rec.flux[6] == pytest.approx((10 * 3 + 20 * 2) / 5) and rec.ivar[6] == 5
    assert rec.flux[7] == 10 and rec.ivar[7] == 1                                      # masked R unused


def test_desi_bad_target_is_named_and_the_others_are_kept(tmp_path):
    wave, flux, ivar = spectrum(n=200, lo=3600, hi=5800)
    f = np.stack([flux, flux * 2, flux * 3])
    i = np.stack([ivar, np.zeros_like(ivar), ivar])
    path = tmp_path / "coadd-main-dark-7.fits"
    desi.write_coadd(path, [11, 22, 33], {"B": (wave, f, i, None)}, fiberstatus=[1 << 3, 0, 1 << 2])  # RESTRICTED: info
    recs = readers.read(path, "desi")
    assert [r.ident for r in recs] == ["11", "22", "33"]
    assert np.array_equal(recs[0].flux, f[0]) and np.array_equal(recs[0].ivar, i[0])
    assert np.array_equal(recs[1].flux, f[1])  # all-zero ivar: the flux is still what was written
    assert recs[0].problem is None
    assert recs[1].problem[0] == "no_good_pixels" and "22" in recs[1].problem[1]
    assert recs[2].problem[0] == "bad_fiberstatus"
    with pytest.raises(SpectrumError) as e:
        preprocess(recs[1], 0.0, PrepareConfig())
    assert e.value.reason == "no_good_pixels"
    assert list(desi.target_ids(path)) == [11, 22, 33]


def test_desi_broken_file_is_a_named_error(tmp_path):
    from astropy.io import fits

    wave, flux, ivar = spectrum(n=50)
    path = tmp_path / "coadd-main-dark-8.fits"
    desi.write_coadd(path, [1, 2], {"B": (wave, np.stack([flux, flux]), np.stack([ivar, ivar]), None)})
    with fits.open(path) as h:
        h["B_IVAR"].data = h["B_IVAR"].data[:1]  # ivar for one target of two
        h.writeto(tmp_path / "coadd-main-dark-9.fits")
    with pytest.raises(SpectrumError) as e:
        readers.read(tmp_path / "coadd-main-dark-9.fits")
    assert e.value.reason == "bad_layout"


# ---------------------------------------------------------------- tables
@pytest.mark.parametrize("suffix,shared", [(".fits", False), (".fits", True), (".parquet", False),
                                            (".h5", False), (".h5", True)])
def test_table_rows_come_back_exactly(tmp_path, suffix, shared):
    rows = [spectrum(seed=s) for s in range(3)]
    wave = rows[0][0]
    flux = np.stack([r[1] for r in rows])
    ivar = np.stack([r[2] for r in rows])
    mask = np.zeros(flux.shape, np.int32)
    mask[1, 5] = 1
    path = tables.write_table(tmp_path / f"spectra{suffix}", wave, flux, ivar, mask,
                              {"ID": np.array(["a", "b", "c"]), "TEFF": np.array([5000.0, 6000, 7000]),
                               "RV": np.array([1.0, 2.0, 3.0])}, shared_wave=shared)
    assert readers.detect(path) == "table"
    recs = readers.read(path)
    assert [r.ident for r in recs] == ["a", "b", "c"]
    for k, r in enumerate(recs):
        assert np.array_equal(r.wave, wave) and np.array_equal(r.flux, flux[k]) and np.array_equal(r.ivar, ivar[k])
        assert r.labels["TEFF"] == [5000.0, 6000, 7000][k] and r.rv == k + 1
    assert not recs[1].good()[5] and recs[0].good()[5]
    assert list(tables.catalog(path)["TEFF"]) == [5000.0, 6000, 7000]


def test_table_without_ivar_is_a_named_error(tmp_path):
    import pandas as pd

    path = tmp_path / "broken.parquet"
    pd.DataFrame({"WAVE": [np.arange(5.0)], "FLUX": [np.ones(5)]}).to_parquet(path)
    with pytest.raises(SpectrumError) as e:
        readers.read(path)
    assert e.value.reason == "missing_columns" and "IVAR" in e.value.detail


# ---------------------------------------------------------------- SDSS, arrays, detection
def test_sdss_is_wrapped_unchanged(tmp_path):
    wave, flux, ivar = spectrum()
    path = tmp_path / "spec-0266-51602-0001.fits"
    sdss.write_spec_lite(path, np.log10(wave), flux, ivar, plate=266, mjd=51602, fiberid=1)
    (rec,) = readers.read(path)
    spec = sdss.read_spectrum(path)
    assert rec.survey == "sdss" and rec.ident == "0266-51602-0001"
    assert np.array_equal(rec.flux, spec.flux) and np.array_equal(rec.loglam, spec.loglam)
    a = preprocess(spec, 10.0, PrepareConfig())[0]
    b = preprocess(rec, 10.0, PrepareConfig())[0]
    assert np.array_equal(a, b)


def test_plain_arrays_go_through_preprocess(tmp_path):
    wave, flux, ivar = spectrum(n=3000, lo=3700, hi=9300)
    rec = readers.from_arrays(wave, flux, ivar, rv_kms=15.0)
    assert rec.rv == 15.0 and rec.z > 0
    out, valid = preprocess(rec, 15.0, PrepareConfig())
    assert out.shape == (4000,) and valid.mean() > 0.9
    with pytest.raises(SpectrumError, match="bad_shape"):
        readers.from_arrays(wave, flux[:-1], ivar)


def test_unknown_file_is_a_named_error(tmp_path):
    from astropy.io import fits

    p = tmp_path / "mystery.fits"
    fits.PrimaryHDU(np.zeros(3)).writeto(p)
    with pytest.raises(SpectrumError) as e:
        readers.detect(p)
    assert e.value.reason == "unknown_format"
    with pytest.raises(SpectrumError) as e:
        readers.read(tmp_path / "spec-1-2-3.fits")
    assert e.value.reason == "missing_file"
    shutil.copy(p, tmp_path / "spec-57000-X_sp01-001.fits")  # named LAMOST, holds nothing
    with pytest.raises(SpectrumError) as e:
        readers.read(tmp_path / "spec-57000-X_sp01-001.fits")
    assert e.value.reason == "not_lamost"


# ---------------------------------------------------------------- prepare on each survey
def _labels(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(4000, 7000, n), rng.uniform(-2, 0.3, n), rng.uniform(1, 5, n)


def _lamost_folder(tmp_path, n=6):
    folder = tmp_path / "lamost"
    folder.mkdir()
    names = []
    for k in range(n):
        wave, flux, ivar = spectrum(n=2500, lo=3700, hi=9100, seed=k)
        name = lamost.spec_filename(57000 + k, "GAC116N20B1", 3, 10 + k)
        lamost.write_spectrum(folder / name, wave, flux, ivar, layout="dr8" if k % 2 else "early",
                              obsid=1000 + k, lmjd=57000 + k, planid="GAC116N20B1", spid=3, fiberid=10 + k)
        names.append(name)
    # a damaged file (3 rows instead of 5) that the catalog asks for
    from astropy.io import fits

    wave, flux, ivar = spectrum(n=2500, lo=3700, hi=9100)
    fits.PrimaryHDU(np.stack([flux, ivar, wave]).astype(np.float32)).writeto(
        folder / lamost.spec_filename(58000, "BROKEN", 1, 1))
    return folder


@pytest.mark.parametrize("match", ["obsid", "keys"])
def test_prepare_lamost_matches_catalog_rows_by_obsid_and_by_keys(tmp_path, match):
    import pandas as pd

    from stellarparams.dataset import Dataset
    from stellarparams.prepare import prepare

    folder = _lamost_folder(tmp_path)
    teff, feh, logg = _labels(7)
    cat = pd.DataFrame({"teff": teff, "teff_err": 50.0, "feh": feh, "feh_err": 0.1, "logg": logg, "logg_err": 0.2,
                        "rv": 5.0, "rv_err": 1.0, "snrg": 50.0})
    if match == "obsid":
        cat["obsid"] = [1000 + k for k in range(6)] + [2000]       # 2000: no file has it
    else:
        cat["lmjd"] = [57000 + k for k in range(6)] + [58000]
        cat["planid"] = ["GAC116N20B1"] * 6 + ["BROKEN"]
        cat["spid"] = [3] * 6 + [1]
        cat["fiberid"] = [10 + k for k in range(6)] + [1]
    cat.to_csv(tmp_path / "dr8_afgk.csv", index=False)
    s = prepare(tmp_path / "dr8_afgk.csv", folder, tmp_path / "ds", workers=1, progress=False)
    assert s["kept"] == 6
    with Dataset(tmp_path / "ds") as ds:
        order = np.argsort(ds.labels()[:, 0])
        assert np.allclose(np.sort(ds.labels()[:, 0]), np.sort(teff[:6]))
        assert np.allclose(ds.label_err()[:, 0], 50.0) and np.allclose(ds.meta()["rv"], 5.0)
        assert len(order) == 6
    rej = pd.read_csv(tmp_path / "ds" / "rejects.csv", keep_default_na=False)
    if match == "obsid":
        assert list(rej["reason"]) == ["no_file", "no_catalog_row"]
        assert str(rej["id"][0]) == "2000" and "BROKEN" in rej["file"][1]
    else:
        assert list(rej["reason"]) == ["bad_layout"] and "BROKEN" in rej["file"][0]


def test_prepare_desi_names_a_zero_ivar_target_and_keeps_the_rest(tmp_path):
    import pandas as pd
    from astropy.table import Table

    from stellarparams.dataset import Dataset
    from stellarparams.prepare import prepare

    folder = tmp_path / "desi"
    folder.mkdir()
    n = 5
    rows = [spectrum(n=3000, lo=3600, hi=9800, seed=k) for k in range(n)]
    wave = rows[0][0]
    b, r = wave < 5900, wave > 5700  # overlap 5700-5900
    flux = np.stack([x[1] for x in rows])
    ivar = np.stack([x[2] for x in rows])
    ivar[2] = 0  # target 102: no data at all
    desi.write_coadd(folder / "coadd-main-bright-100.fits", 100 + np.arange(n),
                     {"B": (wave[b], flux[:, b], ivar[:, b], None), "R": (wave[r], flux[:, r], ivar[:, r], None)})
    teff, feh, logg = _labels(n + 1)
    # mwsall: one row per survey/program observation; the non-PRIMARY row of 100 comes first
    Table({"TARGETID": np.r_[100, 100 + np.arange(n), 999], "TEFF": np.r_[1.0, teff], "FEH": np.r_[0, feh],
           "LOGG": np.r_[0, logg], "TEFF_ERR": np.full(n + 2, 30.0), "VRAD": np.zeros(n + 2),
           "SURVEY": ["main"] * (n + 2), "PROGRAM": ["bright"] * (n + 2),
           "PRIMARY": np.r_[False, np.ones(n + 1, bool)]}).write(tmp_path / "mwsall.fits")
    s = prepare(tmp_path / "mwsall.fits", folder, tmp_path / "ds", workers=1, progress=False)
    assert s["kept"] == 4
    with Dataset(tmp_path / "ds") as ds:
        assert sorted(ds.meta()["object_id"]) == ["100", "101", "103", "104"]
        assert np.allclose(np.sort(ds.labels()[:, 0]), np.sort(np.delete(teff[:n], 2)))  # PRIMARY row's labels
    rej = pd.read_csv(tmp_path / "ds" / "rejects.csv", keep_default_na=False)
    by = dict(zip(rej["reason"], rej["id"].astype(str)))
    assert by == {"duplicate_row": "100", "no_good_pixels": "102", "no_file": "999"}
    assert rej.loc[rej["reason"] == "no_good_pixels", "file"].item().endswith("coadd-main-bright-100.fits")


def test_prepare_a_table_with_its_own_labels(tmp_path):
    from stellarparams.dataset import Dataset
    from stellarparams.prepare import prepare

    n = 8
    rows = [spectrum(n=2000, lo=3700, hi=9300, seed=k) for k in range(n)]
    teff, feh, logg = _labels(n)
    ivar = np.stack([x[2] for x in rows])
    ivar[3] = 0
    tables.write_table(tmp_path / "mine.parquet", rows[0][0], np.stack([x[1] for x in rows]), ivar,
                       columns={"ID": np.array([f"s{k}" for k in range(n)]), "TEFF": teff, "FEH": feh,
                                "LOGG": logg})
    s = prepare(None, tmp_path / "mine.parquet", tmp_path / "ds", workers=1, progress=False,
                config=PrepareConfig(rest_frame=False))
    assert s["kept"] == n - 1 and s["rejected_by_reason"] == {"no_good_pixels": 1}
    with Dataset(tmp_path / "ds") as ds:
        assert "s3" not in set(ds.meta()["object_id"])
        assert np.allclose(np.sort(ds.labels()[:, 0]), np.sort(np.delete(teff, 3)))
