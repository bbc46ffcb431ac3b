"""simulate --survey lamost|desi: the survey's files, pixels, resolution and catalog, read back by prepare."""
import fitsio
import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from stellarparams import cli, readers
from stellarparams.surveys import desi, lamost
from stellarparams import simulate as S
from stellarparams.surveys import registry
from stellarparams.dataset import Dataset

NOISELESS = dict(noise=False, rv_sigma=0.0, ebv_mean=0.0, calib_sigma=0.0, bad_frac=0.0)


@pytest.fixture(scope="module")
def surveys(tmp_path_factory):
    """24 LAMOST and 24 DESI spectra from the CLI, each prepared back by `prepare --survey` from the CLI."""
    out = {}
    for survey in ("lamost", "desi"):
        root = tmp_path_factory.mktemp(survey)
        assert cli.main(["simulate", "--out", str(root / "sim"), "--n", "24", "--seed", "2", "--workers", "1",
                         "--no-progress", "--survey", survey]) == 0
        cat = root / "sim" / registry.get(survey).simulated.catalog
        assert cli.main(["prepare", "--catalog", str(cat), "--spectra", str(root / "sim" / "spectra"),
                         "--out", str(root / "ds"), "--survey", survey, "--workers", "1", "--no-progress"]) == 0
        out[survey] = root / "sim", Table.read(cat), root / "ds"
    return out


def test_lamost_survey_reads_back_through_prepare_with_its_labels(surveys):
    sim, cat, ds_path = surveys["lamost"]
    assert cat.colnames[:14] == ["obsid", "lmjd", "planid", "spid", "fiberid", "teff", "teff_err", "logg", "logg_err",
                                 "feh", "feh_err", "rv", "rv_err", "snrg"]
    by_key = {(int(r["lmjd"]), str(r["planid"]), int(r["spid"]), int(r["fiberid"])): r for r in cat}
    with Dataset(ds_path) as ds:
        meta, labels = ds.meta(), ds.labels()
        assert ds.n == 24 and ds.label_names == ["teff", "feh", "logg"]
    for k in range(len(meta)):
        row = by_key[lamost.parse_name(meta["file"][k].split("/")[-1])]
        np.testing.assert_allclose(labels[k], [row["teff"], row["feh"], row["logg"]], rtol=1e-6)
        assert meta["TEFF_TRUE"][k] == row["teff_true"] and meta["rv"][k] == pytest.approx(row["rv"], abs=1e-3)
        assert meta["object_id"][k] == str(row["star_id"])


def test_desi_survey_reads_back_through_prepare_with_its_labels(surveys):
    sim, cat, ds_path = surveys["desi"]
    assert {"TARGETID", "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FEH", "FEH_ERR", "VRAD", "VRAD_ERR"} <= set(cat.colnames)
    assert fitsio.FITS(str(sim / desi.SURVEY.simulated.catalog))[1].get_extname() == "RVTAB"
    truth = {(np.float32(r["TEFF"]), np.float32(r["FEH"]), np.float32(r["LOGG"])): r for r in cat}
    with Dataset(ds_path) as ds:
        meta, labels = ds.meta(), ds.labels()
        assert ds.n == 24
    for k in range(len(meta)):
        row = truth[tuple(np.float32(v) for v in labels[k])]  # each spectrum has its own noisy labels
        assert meta["LOGG_TRUE"][k] == row["LOGG_TRUE"] and meta["rv"][k] == pytest.approx(row["VRAD"], abs=1e-3)
    coadd = readers.find_files(sim / "spectra", "desi")
    assert [p.name for p in coadd] == ["coadd-main-bright-10000.fits"]
    np.testing.assert_array_equal(desi.target_ids(coadd[0]), cat["TARGETID"])
    # Redrock's file beside the coadd: each target's Z is the redshift of its catalog VRAD
    assert desi.redrock_path(coadd[0]).name == "redrock-main-bright-10000.fits"
    recs = readers.read(coadd[0])
    np.testing.assert_allclose([r.rv for r in recs], cat["VRAD"], atol=1e-6)
    assert {r.objclass for r in recs} == {"STAR"}


def test_lamost_file_layout_pixels_and_header(surveys):
    sim, cat, _ = surveys["lamost"]
    row = cat[0]
    path = lamost.SURVEY.simulated.spectrum_path(sim, {"index": 0})
    with fitsio.FITS(str(path)) as f:
        hdr = f[0].read_header()
        table = f[1].read()
    assert len(table) == 1 and set(table.dtype.names) == set(lamost.TABLE_COLUMNS)
    wave = table["WAVELENGTH"][0]
    assert wave[0] == pytest.approx(3700.0, abs=0.1) and wave[-1] == pytest.approx(9100.0, abs=1.0)
    assert wave.dtype.kind == "f" and wave.dtype.itemsize == 4  # every DR8+ column is float32
    np.testing.assert_allclose(wave, lamost.SURVEY.simulated.pixels()[0], rtol=1e-7)  # log-linear, LAMOST's 1e-4 step
    # Z is the star's redshift; HELIO_RV the heliocentric correction LAMOST applied (not the star's RV)
    assert hdr["OBSID"] == row["obsid"] and hdr["HELIO_RV"] == lamost.helio_correction(row["lmjd"])
    assert hdr["Z"] == pytest.approx(row["rv"] / S.C_KMS, rel=2e-3)
    rec = lamost.read_spectrum(path)
    assert rec.rv == pytest.approx(row["rv"], abs=1e-6)
    red = rec.wave > 7500  # beyond MILES: no data, flagged, nothing invented
    assert red.any() and not rec.ivar[red].any() and (table["ANDMASK"][0][red] != 0).all() and not rec.flux[red].any()
    assert (rec.ivar[(rec.wave > 4000) & (rec.wave < 7000)] > 0).mean() > 0.98


def test_desi_arms_pixels_and_masks(surveys):
    sim, _, _ = surveys["desi"]
    with fitsio.FITS(str(desi.SURVEY.simulated.spectrum_path(sim, {"index": 0}))) as f:
        for arm, (start, n) in desi.SIM_ARMS.items():
            wave = f[f"{arm}_WAVELENGTH"].read()
            assert len(wave) == n and wave[0] == start and np.allclose(np.diff(wave), 0.8)
            assert f[f"{arm}_FLUX"].read().shape == (24, n)
        assert wave[-1] == pytest.approx(9824.0)
        z_ivar, z_mask = f["Z_IVAR"].read(), f["Z_MASK"].read()
        b_ivar = f["B_IVAR"].read()
        assert f["FIBERMAP"].read()["COADD_FIBERSTATUS"].tolist() == [0] * 24
    assert not z_ivar.any() and (z_mask & desi.SIM_NODATA).all()  # the Z arm is beyond MILES: no data
    assert (b_ivar[:, 100:-100] > 0).mean() > 0.98


def test_resolution_is_the_surveys():
    """LAMOST: a line at MILES' 2.5 A comes out at lambda / 1800; DESI: sharper than MILES, nothing broadened."""
    raw = S.load_miles()[1][1:3]
    for survey in ("lamost", "desi"):
        sim = S.Simulator(S.SimConfig(**NOISELESS), S.Shifts(), seed=0, survey=survey)
        want = raw if survey == "desi" else S.match_resolution(sim.wave, raw, sim.fwhm_lib, 1800.0)
        np.testing.assert_allclose(sim.flux[1:3], want, rtol=1e-12)
        # a hand-made star: flat, one line of MILES' own FWHM at 6000 A, through the survey's LSF and pixels
        line = 1.0 - 0.5 * np.exp(-0.5 * ((sim.wave - 6000.0) / (sim.fwhm_lib / 2.3548)) ** 2)
        flux = S.match_resolution(sim.wave, line, sim.fwhm_lib, registry.get(survey).simulated.resolution(sim.wave))
        sim.cum[0] = np.concatenate([[0.0], np.cumsum(flux * np.diff(sim.edges))])
        sim.cover[0] = sim.edges[0], sim.edges[-1]
        plan = dict(S.draw_plan(0, 0, len(sim.labels), sim.cfg), star=0, rv=0.0, ebv=0.0)
        spec = sim.realize(plan, seed=0)
        lam = spec["wave"]
        near = np.abs(lam - 6000.0) < 12
        depth = 1 - spec["flux"][near] / np.median(spec["flux"][(np.abs(lam - 6000) > 20) & (np.abs(lam - 6000) < 40)])
        centre = np.sum(lam[near] * depth) / depth.sum()
        step = np.median(np.diff(lam[near]))
        sigma = np.sqrt(np.sum((lam[near] - centre) ** 2 * depth) / depth.sum() - step ** 2 / 12)  # minus binning
        want_fwhm = 6000.0 / 1800.0 if survey == "lamost" else sim.fwhm_lib
        assert sigma * 2.3548 == pytest.approx(want_fwhm, rel=0.05), survey


def test_lamost_flux_is_relative_with_one_smooth_response():
    sim = S.Simulator(S.SimConfig(**NOISELESS), S.Shifts(), seed=5, survey="lamost")
    ref = S.instrument_response(sim.loglam, lamost.SIM_RESPONSE, 5)
    np.testing.assert_allclose(sim.response, ref)
    assert 0.05 < np.std(np.log(ref)) < 0.2


def test_survey_options_are_checked(tmp_path, capsys):
    assert cli.main(["simulate", "--out", str(tmp_path / "a"), "--n", "2", "--survey", "lamost",
                     "--resolution", "3000", "--no-progress"]) == 2
    assert "--resolution is SDSS's" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--survey"):
        S.simulate(tmp_path / "b", n=2, survey="gaia", progress=False)


def test_desi_coadd_is_rewritten_when_the_survey_grows(tmp_path):
    S.simulate(tmp_path, n=3, seed=1, workers=1, progress=False, survey="desi")
    S.simulate(tmp_path, n=5, seed=1, workers=1, progress=False, survey="desi")
    assert len(desi.target_ids(desi.SURVEY.simulated.spectrum_path(tmp_path, {"index": 0}))) == 5
    assert len(Table.read(tmp_path / "mwsall.fits")) == 5


@pytest.mark.parametrize("survey", ["lamost", "desi"])
def test_survey_catalogs_read_in_blocks_give_the_dataset_of_one_read_whole(surveys, survey, tmp_path, monkeypatch):
    """FITS and Parquet catalogs are read a block of rows at a time: the same dataset, rejects and input hash."""
    from helpers import content_sha256
    from stellarparams import prepare as prep
    from stellarparams.surveys import sdss

    sim, cat, _ = surveys[survey]
    cat = cat.copy()
    cat.add_row(cat[0])  # a duplicate row
    cat.add_row(cat[1])
    for key in ("TARGETID",) if survey == "desi" else ("obsid", "fiberid"):
        cat[key][-1] = 123  # a row without a spectrum
    cat["TEFF" if survey == "desi" else "teff"][2] = 1e6  # out of range
    cat.write(tmp_path / "cat.fits")
    cat.to_pandas().to_parquet(tmp_path / "cat.parquet", row_group_size=7)
    monkeypatch.setattr(prep, "CATALOG_BLOCK", 5)
    monkeypatch.setattr(prep, "TABLE_BLOCK", 5)
    open_catalog, opened = sdss.open_catalog, []
    runs = {}
    for fmt, kind in (("fits", sdss.FitsCatalog), ("parquet", sdss.ParquetCatalog)):
        path = tmp_path / f"cat.{fmt}"
        for how in ("blocks", "whole"):
            monkeypatch.setattr(sdss, "open_catalog", (lambda p: opened.append(open_catalog(p)) or opened[-1])
                                if how == "blocks" else lambda p: None)
            out = tmp_path / f"{fmt}-{how}"
            runs[fmt, how] = prep.prepare(path, sim / "spectra", out, survey=survey, workers=1, progress=False), out
        assert isinstance(opened.pop(), kind)  # the blocks run read it in blocks
    for fmt in ("fits", "parquet"):
        (blocks, a), (whole, b) = runs[fmt, "blocks"], runs[fmt, "whole"]
        assert blocks["input_hash"] == whole["input_hash"] and blocks["kept"] == 23
        assert content_sha256(a / "dataset.h5") == content_sha256(b / "dataset.h5")
        assert (a / "rejects.csv").read_bytes() == (b / "rejects.csv").read_bytes()
        assert sorted(pd.read_csv(a / "rejects.csv")["reason"]) == ["bad_label", "duplicate_row", "no_file"]
