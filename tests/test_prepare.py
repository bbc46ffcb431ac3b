"""Preprocessing (docs/method.md steps 1-4), splits, and the prepare job: bad input, resume, re-run."""
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from scipy.interpolate import CubicSpline

from stellarparams.spectrum import Record, SpectrumError, pixmask
from stellarparams import cli, prepare as prep
from stellarparams import preprocess as preprocess_module
from stellarparams.surveys import sdss
from stellarparams.dataset import Dataset, Grid
from stellarparams.prepare import assign_splits
from stellarparams.preprocess import PrepareConfig, preprocess
from stellarparams.records import sha256_file

from helpers import (C_KMS, LINES, analytic, catalog_row, content_sha256, dataset_arrays as _dataset_arrays,
                     good_set, write_star)

GRID = Grid()


def line_pixels(f, near=0.0):
    """Sub-pixel position of each line minimum on the grid (parabola through log depth),
    searched within 5 pixels of the rest position + ``near``."""
    depth = np.median(f) - f
    out = []
    for lam in LINES:
        p = int(round((np.log10(lam) - GRID.loglam_min) / (GRID.loglam[1] - GRID.loglam[0]) + near))
        k = p - 5 + int(np.argmax(depth[p - 5:p + 6]))
        a, b, c = np.log(depth[k - 1:k + 2])
        out.append(k + 0.5 * (a - c) / (a - 2 * b + c))
    return np.array(out), (np.log10(LINES) - GRID.loglam_min) / (GRID.loglam[1] - GRID.loglam[0])


@pytest.mark.parametrize("rv", [0.0, 250.0, -180.0, 3000.0])
def test_lines_land_on_rest_positions(rv):
    f, valid = preprocess(analytic(rv), rv)
    found, expected = line_pixels(f)
    assert np.abs(found - expected).max() < 0.1, (found - expected)
    assert valid.all()
    if rv:  # without the shift the lines are off by the Doppler shift: the test can fail
        g, _ = preprocess(analytic(rv), rv, PrepareConfig(rest_frame=False))
        b = rv / C_KMS
        shift = 0.5 * np.log10((1 + b) / (1 - b)) / (GRID.loglam[1] - GRID.loglam[0])  # Doppler, in pixels
        off = line_pixels(g, near=shift)[0] - expected
        np.testing.assert_allclose(off, shift, atol=0.1)
        # at 3000 km/s the classical 1+z = 1+b would already miss by 0.2 pixel
        classical = np.log10(1 + b) / (GRID.loglam[1] - GRID.loglam[0])
        assert abs(rv) < 1000 or np.abs(off - classical).min() > 0.15


def test_doppler_is_relativistic_and_shared():
    from stellarparams import physics

    b = 0.6  # (1+z)^2 = (1+b)/(1-b) = 4 -> log10(1+z) = log10(2)
    assert physics.doppler_log_shift(b * C_KMS) == pytest.approx(np.log10(2.0), rel=1e-12)
    assert physics.doppler_log_shift(-b * C_KMS) == pytest.approx(-np.log10(2.0), rel=1e-12)
    assert preprocess_module.doppler_log_shift is physics.doppler_log_shift  # one formula, not a copy


def test_standardized_rows():
    for rv, noise in [(0, 0.0), (120, 2.0), (-300, 5.0)]:
        f, _ = preprocess(analytic(rv, noise=noise, seed=abs(rv)), rv)
        assert f.dtype == np.float32 and f.shape == (GRID.n_pix,)
        assert abs(f.mean()) < 1e-5 and f.std() == pytest.approx(1.0, abs=1e-5)  # population std


def test_masked_pixels_are_not_zeros_and_ends_are_clamped():
    s = analytic(0.0, n=3000, loglam0=3.6000)  # covers 3.6000-3.8999: part of the grid only
    ref, _ = preprocess(s, 0.0, PrepareConfig(min_coverage=0.3))
    gap = slice(1500, 1520)
    s.flux[gap] = 0.0
    s.ivar[gap] = 0.0  # no data
    s.flux[1600:1610] = 0.0
    s.and_mask[1600:1610] = pixmask("FULLREJECT")  # bad bit, ivar still > 0
    s.flux[1700] = np.nan  # one non-finite pixel is dropped, not fatal
    f, valid = preprocess(s, 0.0, PrepareConfig(min_coverage=0.3))
    g = GRID.loglam
    in_gap = (g > s.loglam[1503]) & (g < s.loglam[1516])
    # the spline bridges the gap from good pixels: values stay near the smooth reference, far from the zeros
    assert np.abs(f[in_gap] - ref[in_gap]).max() < 0.05
    s.ivar[gap] = 1.0  # had the zeros been used as data, the gap would dive by many std
    zeros, _ = preprocess(s, 0.0, PrepareConfig(min_coverage=0.3))
    assert f[in_gap].min() - zeros[in_gap].min() > 3
    assert not valid[in_gap].any()
    near = (g > s.loglam[1499]) & (g < s.loglam[1501])  # within 2 native pixels of good data
    assert valid[near].all()
    assert np.isfinite(f).all()
    # clamped ends: the nearest available flux, constant, and not valid
    below, above = g < s.loglam[0], g > s.loglam[-1]
    assert below.sum() > 100 and above.sum() > 100
    assert np.ptp(f[below]) == 0 and np.ptp(f[above]) == 0
    assert not valid[below].any() and not valid[above].any()
    first = np.flatnonzero(~below)[0]
    assert abs(f[below][0] - f[first]) < 0.05  # continuous with the first covered pixel
    assert valid.mean() == pytest.approx((~below & ~above).mean(), abs=0.01)


def test_valid_means_near_good_data():
    rng = np.random.default_rng(1)
    for trial in range(5):
        s = analytic(float(rng.uniform(-300, 300)), n=4000, loglam0=3.58 + rng.uniform(0, 0.01))
        for _ in range(30):  # holes of 1-12 pixels, ivar 0
            k = rng.integers(0, 3990)
            s.ivar[k:k + rng.integers(1, 13)] = 0
        rv = float(rng.uniform(-300, 300))
        _, valid = preprocess(s, rv)
        x = s.loglam[s.ivar > 0] - preprocess_module.doppler_log_shift(rv)
        g = GRID.loglam
        dist = np.abs(g[:, None] - x[None, :]).min(1)  # brute force: distance to the nearest good pixel
        expect = (g >= x[0]) & (g <= x[-1]) & (dist <= 2e-4 * (1 + 1e-6))
        np.testing.assert_array_equal(valid, expect)
        assert 0 < (~valid[(g > x[0]) & (g < x[-1])]).sum() < 200


@pytest.mark.parametrize("case,reason", [
    ("nan", "nonfinite_flux"), ("inf_half", "nonfinite_flux"), ("ivar0", "no_good_pixels"),
    ("allmasked", "no_good_pixels"), ("short", "low_coverage"), ("constant", "constant_flux"),
    ("norv", "missing_rv"), ("unsorted", "bad_wavelength"), ("three", "too_few_pixels"),
])
def test_preprocess_rejects(case, reason):
    s, rv = analytic(0.0), 0.0
    if case == "nan":
        s.flux[:] = np.nan
    elif case == "inf_half":
        s.flux[: len(s.flux) * 3 // 4] = np.inf
    elif case == "ivar0":
        s.ivar[:] = 0
    elif case == "allmasked":
        s.and_mask[:] = pixmask("NOPLUG")
    elif case == "short":
        s = analytic(0.0, n=1500)
    elif case == "constant":
        s.flux[:] = 42.0
    elif case == "norv":
        rv = np.nan
    elif case == "unsorted":
        s.loglam[100], s.loglam[101] = s.loglam[101], s.loglam[100]
    elif case == "three":
        s.ivar[3:] = 0
    with pytest.raises(SpectrumError) as e:
        preprocess(s, rv)
    assert e.value.reason == reason


def test_config_round_trip():
    c = PrepareConfig(grid=Grid(3.6, 3.9, 1000), min_coverage=0.7, reject_classes=("QSO",))
    d = json.loads(json.dumps(c.to_dict()))
    assert PrepareConfig.from_dict(d) == c
    assert PrepareConfig().grid == Grid() and PrepareConfig().labels["teff"] == "TEFF_ADOP"


# ---------------------------------------------------------------------------------------------
# splits

def test_split_determinism_and_fractions():
    a, b = assign_splits(1000, seed=3), assign_splits(1000, seed=3)
    np.testing.assert_array_equal(a, b)
    assert (a != assign_splits(1000, seed=4)).any()
    assert np.bincount(a, minlength=3).tolist() == [600, 100, 300]
    assert np.bincount(assign_splits(20, 0), minlength=3).tolist() == [12, 2, 6]
    assert np.bincount(assign_splits(20, 0, (1, 0, 1)), minlength=3).tolist() == [10, 0, 10]


def test_split_grouping():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 150, 1000)
    s = assign_splits(1000, seed=1, groups=groups)
    for g in np.unique(groups):
        assert len(np.unique(s[groups == g])) == 1
    frac = np.bincount(s, minlength=3) / 1000
    np.testing.assert_allclose(frac, [0.6, 0.1, 0.3], atol=0.05)
    np.testing.assert_array_equal(s, assign_splits(1000, seed=1, groups=groups))


# ---------------------------------------------------------------------------------------------
# the prepare job on files

def test_bad_input_each_case(tmp_path):
    spectra, cat = good_set(tmp_path, n=6)
    rows = list(cat.to_dict("records"))
    P, M = 600, 56000

    def add(fiber, make=None, **kw):
        rows.append(catalog_row(P, M, fiber, **kw))
        path = spectra / "bad" / sdss.spec_filename(P, M, fiber)
        path.parent.mkdir(parents=True, exist_ok=True)
        if make == "spec":
            write_star(spectra, P, M, fiber, sub="bad")
        elif make is not None:
            make(path)
        return path

    add(1, lambda p: p.write_text("not a FITS file"))                               # non-FITS
    add(2, lambda p: (write_star(spectra, P, M, 2, sub="bad"),
                      p.write_bytes(p.read_bytes()[:6000])))                        # truncated
    add(3, lambda p: fits.HDUList([fits.PrimaryHDU(np.zeros((2, 5)))]).writeto(p))  # no COADD
    add(4, lambda p: fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("flux", "E", array=np.ones(10))], name="COADD")]).writeto(p))  # missing columns

    def nan_flux(p):
        s = analytic(0.0)
        s.flux[:] = np.nan
        sdss.write_spec_lite(p, s.loglam, s.flux, s.ivar, plate=P, mjd=M, fiberid=5)
    add(5, nan_flux)

    def zero_ivar(p):
        s = analytic(0.0)
        sdss.write_spec_lite(p, s.loglam, s.flux, np.zeros_like(s.ivar), plate=P, mjd=M, fiberid=6)
    add(6, zero_ivar)
    add(7, lambda p: write_star(spectra, P, M, 7, n=1500, sub="bad"))               # coverage < half
    add(8, "spec", RV_ADOP=-9999.0)                                                  # missing RV
    add(9, lambda p: write_star(spectra, P, M, 9, sub="bad", objclass="GALAXY"))    # not a star
    add(10, lambda p: write_star(spectra, P, M, 10, sub="bad", objclass="QSO"))
    add(11)                                                                          # row with no file
    write_star(spectra, P, M, 12, sub="bad")                                         # file with no row
    write_star(spectra, 500, 55000, 1, sub="copy")                                   # second file, same spectrum
    rows.append(dict(rows[0], TEFF_ADOP=1.0))                                        # duplicated row
    add(13, "spec", FEH_ADOP=-9999.0, LOGG_ADOP=-9999.0)                             # missing labels: kept

    def some_inf(p):
        s = analytic(0.0)
        s.flux[1000:1003] = np.inf
        sdss.write_spec_lite(p, s.loglam, s.flux, s.ivar, plate=P, mjd=M, fiberid=14)
    add(14, some_inf)                                                                # a few inf pixels: kept
    pd.DataFrame(rows).to_csv(tmp_path / "cat.csv", index=False)

    s = prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "ds", workers=1, progress=False)
    rej = pd.read_csv(tmp_path / "ds" / "rejects.csv")
    reason = {(int(r.fiberid) if r.plate == P else -int(r.fiberid)): r.reason for r in rej.itertuples()}
    assert sorted(rej.loc[rej.plate == 500, "reason"]) == ["duplicate_file", "duplicate_row"]
    assert reason == {1: "unreadable", 2: "unreadable", 3: "not_sdss", 4: "missing_columns", 5: "nonfinite_flux",
                      6: "no_good_pixels", 7: "low_coverage", 8: "missing_rv", 9: "not_a_star",
                      10: "not_a_star", 11: "no_file", 12: "no_catalog_row", -1: reason[-1]}
    assert rej.loc[rej.reason == "unreadable", "file"].str.contains("spec-0600-56000-0001.fits").any()
    assert rej.detail.notna().all()
    assert s["kept"] == 8 and s["rejected"] == 14
    assert s["rejected_by_reason"]["not_a_star"] == 2
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["kept"] == 8
    with Dataset(tmp_path / "ds") as ds:
        m = ds.meta()
        assert len(ds) == 8 and set(m.fiberid[m.plate == P]) == {13, 14}
        lab = ds.labels()
        k13 = int(np.flatnonzero((m.plate == P) & (m.fiberid == 13))[0])
        assert lab[k13, 0] == 4013 and np.isnan(lab[k13, 1:]).all()
        assert lab[0, 0] == 4001  # the first of the duplicated rows was kept
        assert np.isfinite(ds.flux()).all()
        assert np.isnan(ds.label_err()[:, 1:]).all() and (ds.label_err()[:, 0] == 50).all()
        np.testing.assert_array_equal(m.TEFF_TRUE, lab[:, 0] + 1)  # extra numeric column


def test_dataset_content_and_metadata(tmp_path):
    spectra, cat = good_set(tmp_path)
    cat.to_parquet(tmp_path / "cat.parquet")
    prep.prepare(tmp_path / "cat.parquet", spectra, tmp_path / "ds", workers=2, chunk_size=4, seed=5, progress=False)
    flux, valid, labels, split, meta, attrs = _dataset_arrays(tmp_path / "ds")
    assert flux.shape == (12, 4000) and flux.dtype == np.float32 and valid.all()
    np.testing.assert_allclose(flux.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(flux.std(1), 1, atol=1e-5)
    np.testing.assert_array_equal(meta.fiberid, np.arange(1, 13))  # catalog order
    np.testing.assert_allclose(meta.rv, cat.RV_ADOP)
    for i in (0, 7, 11):  # each row is the preprocessed file, with its own RV
        ref, _ = preprocess(sdss.read_spectrum(meta.file[i]), cat.RV_ADOP[i])
        np.testing.assert_array_equal(flux[i], ref)
    assert (meta.snr > 10).all()
    assert attrs["grid"] == Grid().to_dict() and attrs["preprocess"]["min_coverage"] == 0.5
    assert attrs["version"] and len(attrs["input_hash"]) == 32 and attrs["created"] and attrs["seed"] == 5
    np.testing.assert_array_equal(split, assign_splits(12, seed=5))


def test_group_by_and_star_id_default(tmp_path, capsys):
    spectra, cat = good_set(tmp_path, star_ids=True)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "ds", workers=1, seed=2)
    assert "STAR_ID" in capsys.readouterr().err
    _, _, _, split, meta, attrs = _dataset_arrays(tmp_path / "ds")
    assert attrs["group_by"] == "STAR_ID"
    for sid in range(4):
        assert len(set(split[meta.object_id == str(sid)])) == 1
    np.testing.assert_array_equal(split, assign_splits(12, 2, groups=(cat.STAR_ID).astype(str)))
    # an explicit --group-by column
    cat["FIELD"] = ["a", "b"] * 6
    cat.to_csv(tmp_path / "cat2.csv", index=False)
    prep.prepare(tmp_path / "cat2.csv", spectra, tmp_path / "ds2", group_by="field", workers=1, progress=False)
    _, _, _, split2, meta2, _ = _dataset_arrays(tmp_path / "ds2")
    assert len(set(split2[:: 2])) == 1 and len(set(split2[1:: 2])) == 1
    assert set(meta2.object_id) == {"a", "b"}


def test_split_column(tmp_path):
    spectra, cat = good_set(tmp_path)
    cat["SET"] = ["train", "val", "test", "TEST", 0, 1, 2, "validation", "train", "train", "bogus", "test"]
    cat.to_csv(tmp_path / "cat.csv", index=False)
    s = prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "ds", split_column="SET", workers=1, progress=False)
    _, _, _, split, meta, _ = _dataset_arrays(tmp_path / "ds")
    assert s["kept"] == 11 and s["rejected_by_reason"] == {"bad_split_value": 1}
    assert 11 not in set(meta.fiberid)
    np.testing.assert_array_equal(split, [0, 1, 2, 2, 0, 1, 2, 1, 0, 0, 2])


def test_resume_after_kill_and_idempotent_rerun(tmp_path, monkeypatch):
    spectra, cat = good_set(tmp_path)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    # reference: one uninterrupted run
    prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "ref", chunk_size=3, workers=1, progress=False)

    real, calls = prep._run_chunk, []

    def dies_on_third(k, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed during its third chunk
        calls.append(k)
        return real(k, *a)

    monkeypatch.setattr(prep, "_run_chunk", dies_on_third)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(tmp_path / "cat.csv", spectra, out, chunk_size=3, workers=1, progress=False)
    assert not (out / "dataset.h5").exists()
    assert sorted(p.name for p in (out / ".partial").glob("chunk-*.npz")) == ["chunk-00000.npz", "chunk-00001.npz"]

    def counting(k, *a):
        calls.append(k)
        return real(k, *a)

    monkeypatch.setattr(prep, "_run_chunk", counting)
    calls.clear()
    s = prep.prepare(tmp_path / "cat.csv", spectra, out, chunk_size=3, workers=1, progress=False)
    assert calls == [2, 3]  # only the missing chunks were redone
    assert not (out / ".partial").exists() and s["kept"] == 12
    got, ref = _dataset_arrays(out), _dataset_arrays(tmp_path / "ref")
    for a, b in zip(got[:4], ref[:4]):
        np.testing.assert_array_equal(a, b)

    # a finished job with the same inputs is a no-op
    mtime = os.stat(out / "dataset.h5").st_mtime_ns
    calls.clear()
    s2 = prep.prepare(tmp_path / "cat.csv", spectra, out, chunk_size=3, workers=1, progress=False)
    assert s2["up_to_date"] and calls == [] and os.stat(out / "dataset.h5").st_mtime_ns == mtime

    # changed inputs (another seed; a stale partial dir from another job) are redone
    (out / ".partial").mkdir()
    (out / ".partial" / "job.json").write_text('{"input_hash": "old"}')
    (out / ".partial" / "chunk-00000.npz").write_text("stale")
    s3 = prep.prepare(tmp_path / "cat.csv", spectra, out, chunk_size=3, workers=1, seed=9, progress=False)
    assert not s3.get("up_to_date") and calls == [0, 1, 2, 3]
    assert (_dataset_arrays(out)[3] == assign_splits(12, seed=9)).all()


def test_resume_reads_again_a_chunk_whose_pixels_a_power_cut_lost(tmp_path, monkeypatch):
    spectra, cat = good_set(tmp_path, n=9)
    prep.prepare(cat, spectra, tmp_path / "ref", chunk_size=3, workers=1, progress=False)
    real, calls = prep._run_chunk, []

    def dies_on_third(k, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(k)
        return real(k, *a)

    monkeypatch.setattr(prep, "_run_chunk", dies_on_third)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cat, spectra, out, chunk_size=3, workers=1, progress=False)
    pixels = prep._Pixels.open(out / ".partial", PrepareConfig(), 9)
    start, row_bytes = pixels.offsets["sigma"]
    with open(pixels.path, "r+b") as f:  # chunk 1's sigma never reached the disk; its summary did
        f.seek(start + 3 * row_bytes)
        f.write(bytes(row_bytes))
    calls.clear()
    monkeypatch.setattr(prep, "_run_chunk", lambda k, *a: calls.append(k) or real(k, *a))
    prep.prepare(cat, spectra, out, chunk_size=3, workers=1, progress=False)
    assert calls == [1, 2]  # chunk 0 reused, chunk 1 read again
    assert content_sha256(out / "dataset.h5") == content_sha256(tmp_path / "ref" / "dataset.h5")


def test_catalog_with_file_column_and_dr7(tmp_path):
    spectra = tmp_path / "spectra"
    s = analytic(50.0)
    dr7 = sdss.write_spspec_dr7(spectra / "dr7" / "spSpec-52000-0300-007.fit", float(s.loglam[0]), s.flux,
                                np.ones_like(s.flux), plate=300, mjd=52000, fiberid=7)
    dr7.with_name(dr7.name + ".gz").write_bytes(gzip.compress(dr7.read_bytes()))  # archives ship them gzipped
    dr7.unlink()
    write_star(spectra, 500, 55000, 1, 0.0)
    write_star(spectra, 500, 55000, 2, 0.0, sub="x")
    (spectra / "x" / sdss.spec_filename(500, 55000, 2)).rename(spectra / "x" / "renamed.fits")
    cat = pd.DataFrame([catalog_row(300, 52000, 7, 50.0), catalog_row(500, 55000, 1),
                        catalog_row(500, 55000, 2, FILE="spectra/x/renamed.fits")])  # relative to the catalog
    cat["FILE"] = cat["FILE"].fillna("")
    cat.to_csv(tmp_path / "cat.csv", index=False)
    s = prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "ds", workers=1, progress=False)
    assert s["kept"] == 3 and s["rejected"] == 0
    with Dataset(tmp_path / "ds") as ds:
        assert ds.meta().file[2].endswith("renamed.fits")
        ref, _ = preprocess(sdss.read_spectrum(spectra / "dr7" / "spSpec-52000-0300-007.fit.gz"), 50.0)
        np.testing.assert_array_equal(ds.flux([0])[0], ref)


def test_cli(tmp_path, capsys):
    spectra, cat = good_set(tmp_path, n=6)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    assert "--split-column" in capsys.readouterr().out
    rc = cli.main(["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra), "--out",
                   str(tmp_path / "ds"), "--workers", "1", "--seed", "1", "--fractions", "0.5,0.5,0"])
    err = capsys.readouterr().err
    assert rc == 0 and "prepared 6 of 6" in err
    with Dataset(tmp_path / "ds") as ds:
        assert sorted(np.bincount(ds.split, minlength=3)) == [0, 3, 3]
    rc = cli.main(["prepare", "--catalog", str(tmp_path / "missing.csv"), "--spectra", str(spectra), "--out",
                   str(tmp_path / "ds")])
    assert rc == 2 and "missing.csv" in capsys.readouterr().err


def test_sigma_is_the_resampled_noise_in_standardized_units(tmp_path):
    s = analytic(0.0, n=3000, loglam0=3.6000)  # covers part of the grid: the rest has no data
    s.ivar[:1500] = 4.0  # noise 0.5 in the blue half, 1 in the red half
    f, valid, sigma = preprocess(s, 0.0, PrepareConfig(min_coverage=0.3), return_sigma=True)
    assert sigma.dtype == np.float32 and sigma.shape == f.shape
    assert np.isinf(sigma[~valid]).all() and np.isfinite(sigma[valid]).all() and (~valid).any()
    x = GRID.loglam
    blue, red = valid & (x < s.loglam[1400]), valid & (x > s.loglam[1600])
    np.testing.assert_allclose(sigma[red] / sigma[blue].mean(), 2.0, rtol=1e-5)
    # the same star 3x brighter (noise 3x too) gives the same standardized flux and noise
    s3 = Record(s.loglam, 3 * s.flux + 7, s.ivar / 9, s.and_mask)
    f3, _, sigma3 = preprocess(s3, 0.0, PrepareConfig(min_coverage=0.3), return_sigma=True)
    np.testing.assert_allclose(f3, f, atol=1e-5)
    np.testing.assert_allclose(sigma3[valid], sigma[valid], rtol=1e-5)
    # and it is 1/sqrt(ivar) divided by the std that standardized the flux
    raw, _ = preprocess(s, 0.0, PrepareConfig(min_coverage=0.3))
    spl = CubicSpline(s.loglam, s.flux.astype(np.float64))(np.clip(x, s.loglam[0], s.loglam[-1]))
    np.testing.assert_allclose(sigma[red], 1.0 / spl.std(), rtol=1e-5)


def test_prepare_stores_sigma(tmp_path):
    spectra, cat = good_set(tmp_path, n=4)
    prep.prepare(cat, spectra, tmp_path / "ds", workers=1, progress=False)
    with Dataset(tmp_path / "ds") as ds:
        sig, m = ds.sigma(), ds.meta()
        assert sig.shape == (4, 4000) and (sig > 0).all()
        for i in range(4):
            _, _, ref = preprocess(sdss.read_spectrum(m.file[i]), cat.RV_ADOP[i], return_sigma=True)
            np.testing.assert_array_equal(sig[i], ref)


def test_prepare_stores_each_spectrums_offset(tmp_path):
    """offset = mean/std of the resampled flux, so flux + offset is the physical flux over its std."""
    from stellarparams.simulate import simulate

    cat = simulate(tmp_path / "sim", n=6, seed=3, workers=1, progress=False)
    prep.prepare(cat, tmp_path / "sim" / "spectra", tmp_path / "ds", workers=1, progress=False)
    with Dataset(tmp_path / "ds") as d:
        off, m = d.offset(), d.meta()
        assert off.shape == (d.n,) and np.isfinite(off).all() and (off > 0).all()  # positive stellar flux
        for i in range(d.n):
            _, _, o = preprocess(sdss.read_spectrum(m.file[i]), m.rv[i], return_offset=True)
            assert o == pytest.approx(off[i], rel=1e-6)


def test_resolver_equals_path_resolve_through_links(tmp_path):
    """The matching's folder-cached resolve gives Path.resolve for linked folders, linked files and missing files."""
    real = tmp_path / "real" / "0500"
    real.mkdir(parents=True)
    (real / "spec-0500-55000-0001.fits").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(tmp_path / "real")                                  # a linked folder
    (real / "spec-0500-55000-0002.fits").symlink_to(real / "spec-0500-55000-0001.fits")  # a linked file
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "plate").symlink_to(real)  # '..' after it is real's parent, not other/
    resolve = prep._resolver()
    for p in [real / "spec-0500-55000-0001.fits", tmp_path / "linked" / "0500" / "spec-0500-55000-0001.fits",
              tmp_path / "linked" / "0500" / "spec-0500-55000-0002.fits", tmp_path / "linked" / "0500" / "nope.fits",
              tmp_path / "real" / ".." / "linked" / "0500" / "spec-0500-55000-0001.fits",
              tmp_path / "linked" / "0500" / ".." / "0500" / "spec-0500-55000-0001.fits",
              tmp_path / "other" / "plate" / ".." / "0500" / "spec-0500-55000-0001.fits",
              Path(os.path.relpath(real / "spec-0500-55000-0001.fits"))]:
        assert resolve(p) == p.resolve(), p


def test_fast_reader_and_fitsio_give_the_same_dataset_bit_for_bit(tmp_path, monkeypatch):
    spectra, cat = good_set(tmp_path, n=6)
    (spectra / "spec-0500-55000-0099.fits").write_text("not a FITS file")  # no catalog row: the same reject
    cat.to_csv(tmp_path / "cat.csv", index=False)
    calls = []
    fast = sdss.read_spec_fast
    monkeypatch.setattr(sdss, "read_spec_fast", lambda p: calls.append(p) or fast(p))
    a = prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "fast", workers=1, progress=False)
    assert len(calls) == 6  # every file with a catalog row went through the fast path first
    calls.clear()
    rc = cli.main(["prepare", "--catalog", str(tmp_path / "cat.csv"), "--spectra", str(spectra),
                   "--out", str(tmp_path / "fitsio"), "--reader", "fitsio", "--workers", "1", "--no-progress"])
    assert rc == 0 and not calls  # --reader fitsio: never the fast path
    assert a["kept"] == 6
    assert content_sha256(tmp_path / "fast" / "dataset.h5") == content_sha256(tmp_path / "fitsio" / "dataset.h5")
    assert (tmp_path / "fast" / "rejects.csv").read_bytes() == (tmp_path / "fitsio" / "rejects.csv").read_bytes()
    with pytest.raises(ValueError, match="unknown reader"):
        prep.prepare(tmp_path / "cat.csv", spectra, tmp_path / "x", reader="numpy", progress=False)


def test_matching_finds_each_rows_first_file_as_a_dict_would():
    from stellarparams import matching

    rng = np.random.default_rng(0)
    files = rng.integers(0, 4, (300, 3))  # many repeated keys
    rows = rng.integers(0, 5, (200, 3))   # some keys with no file
    valid = rng.random(200) > 0.1
    first = {}
    for j, k in enumerate(map(tuple, files)):
        first.setdefault(k, j)
    want = [first.get(tuple(k), -1) if ok else -1 for k, ok in zip(rows, valid)]
    np.testing.assert_array_equal(matching.first_match(rows, files, valid), want)
    np.testing.assert_array_equal(matching.first_of_key(files), [first[tuple(k)] for k in files])
    assert (np.asarray(want) == -1).sum() > 10 and (np.asarray(want) >= 0).sum() > 50  # both outcomes exercised
    for k in (files, matching.pack(files)):  # three columns (pyarrow) or packed into one (a stable sort)
        np.testing.assert_array_equal(matching.duplicates(k), [first[tuple(r)] != j for j, r in enumerate(files)])
    seen, dup = set(), []
    for r, ok in zip(map(tuple, rows), valid):
        dup.append(bool(ok) and r in seen)
        seen |= {r} if ok else set()
    np.testing.assert_array_equal(matching.duplicates(matching.pack(rows, valid), valid), dup)
    np.testing.assert_array_equal(matching.duplicates(rows, valid), dup)
    assert list(matching.first_match(rows[:2], files[:0])) == [-1, -1] and len(matching.first_of_key(files[:0])) == 0


def test_pixels_written_in_place_equal_a_dataset_copied_from_them(tmp_path, monkeypatch):
    spectra, cat = good_set(tmp_path, n=9, star_ids=True)
    monkeypatch.setattr(prep, "TABLE_BLOCK", 4)  # the per-row table in three blocks
    in_place = prep.prepare(cat, spectra, tmp_path / "in_place", workers=2, chunk_size=2, progress=False)
    monkeypatch.setattr(prep._Pixels, "holds_only", lambda self, pos: False)  # as when a spectrum is left out
    copied = prep.prepare(cat, spectra, tmp_path / "copied", workers=2, chunk_size=2, progress=False)
    assert content_sha256(tmp_path / "in_place" / "dataset.h5") == content_sha256(tmp_path / "copied" / "dataset.h5")
    for s, name in [(in_place, "in_place"), (copied, "copied")]:  # the recorded sha256 is the published file's
        assert s["dataset_sha256"] == sha256_file(tmp_path / name / "dataset.h5")
        assert not (tmp_path / name / ".partial").exists()


def test_rejected_spectra_leave_no_row_of_the_pixels_file_in_the_dataset(tmp_path):
    spectra, cat = good_set(tmp_path, n=7)
    bad = next(spectra.rglob("spec-*-0003.fits"))
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated: rejected while reading, in the first chunk
    s = prep.prepare(cat, spectra, tmp_path / "ds", workers=1, chunk_size=2, progress=False)
    ref = prep.prepare(cat[cat.FIBERID != 3], spectra, tmp_path / "ref", workers=1, chunk_size=2, progress=False)
    assert s["kept"] == 6 and s["rejected"] == 1
    got, want = _dataset_arrays(tmp_path / "ds"), _dataset_arrays(tmp_path / "ref")
    np.testing.assert_array_equal(got[0], want[0])  # the same flux, row for row: no zero row of the reject
    assert 3 not in set(got[4].fiberid)


def test_a_large_catalogs_bookkeeping_is_held_in_arrays(tmp_path):
    """30,000 catalog rows, 12 with a file: the rest are rejected (no_file) without a Python object per row.

    Bound: 300 bytes a row of traced memory at the peak. The catalog itself (9 numeric columns,
    72 bytes a row) is held whole, and matching makes a few int64 columns per row beside it;
    one Python object per row exceeds the bound on its own (a reject as a dict ~600 bytes, a
    tuple of three ints ~150, a Path ~300): the bookkeeping held that way measured 880 bytes a row.
    """
    import tracemalloc

    import fitsio

    spectra, cat = good_set(tmp_path, n=12)
    n, k = 30_000, np.arange(30_000)
    big = {c: np.resize(cat[c].to_numpy(), n) for c in cat.columns}
    big.update(PLATE=np.where(k < 12, 500, 900), MJD=np.where(k < 12, 55000, 56000 + k // 1000),
               FIBERID=np.where(k < 12, k + 1, k % 1000 + 1))
    fitsio.write(str(tmp_path / "cat.fits"), big)
    tracemalloc.start()
    try:
        s = prep.prepare(tmp_path / "cat.fits", spectra, tmp_path / "ds", workers=1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s["kept"] == 12 and s["rejected_by_reason"] == {"no_file": n - 12}
    assert peak < 300 * n, f"{peak / n:.0f} bytes a catalog row"
    rej = pd.read_csv(tmp_path / "ds" / "rejects.csv")  # written as they came: catalog order, every column
    np.testing.assert_array_equal(rej.fiberid, big["FIBERID"][12:])
    assert rej.id.iloc[0] == "0900-56000-0013" and rej.detail.iloc[-1] == f"no spectrum file for catalog row {n - 1}"
    assert not (tmp_path / "ds" / ".rejects.csv").exists()  # renamed into place
    fitsio.write(str(tmp_path / "none.fits"), {c: v[12:100] for c, v in big.items()})
    with pytest.raises(prep.NoUsableInput):
        prep.prepare(tmp_path / "none.fits", spectra, tmp_path / "none", workers=1, progress=False)
    assert not (tmp_path / "none" / ".rejects.csv").exists() and not (tmp_path / "none" / "rejects.csv").exists()


def test_file_index_lists_and_sorts_files_as_rglob_does(tmp_path):
    from stellarparams import matching
    from stellarparams.surveys import registry

    names = ["a/spec-1-2-3.fits", "a-b/spec-1-2-4.fits", "a/b/spec-1-2-5.fits.gz", "ab/spec-1-2-6.fits",
             "spec-1-2-7.fits", "a/.hidden/spec-1-2-8.fits", "a/notes.txt", "z/spSpec-2-1-9.fit"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "spec-9-9-9.fits").mkdir()                        # a folder named like a file: not listed
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)  # not followed, as rglob
    (tmp_path / "spec-1-2-10.fits").symlink_to(tmp_path / "a" / "spec-1-2-3.fits")  # a link to a file: listed

    def wanted(name):
        return sdss.parse_name(name) is not None

    want = sorted(p for p in tmp_path.rglob("*") if wanted(p.name) and p.is_file())
    index = matching.FileIndex.scan(tmp_path, wanted)
    assert list(index) == want and len(index) == 8
    assert list(index.names()) == [p.name for p in want] and index[len(index) - 1] == want[-1]
    assert registry.find_files(tmp_path, "sdss") == want
    assert sdss.find_spectra(tmp_path) == want


def test_keys_that_do_not_fit_one_int64_are_matched_as_the_packed_ones():
    from stellarparams import matching

    rng = np.random.default_rng(1)
    files = rng.integers(0, 4, (300, 3))
    rows = rng.integers(0, 5, (200, 3))
    valid = rng.random(200) > 0.1
    packed = matching.first_match(rows, files, valid)
    assert isinstance(matching.file_table(files), matching.SortedKeys)
    big = 1 << 40  # a column over 2**21: the keys cannot be packed, pyarrow joins them
    wide = matching.file_table(files + [0, 0, big])
    assert not isinstance(wide, matching.SortedKeys)
    np.testing.assert_array_equal(matching.first_match(rows + [0, 0, big], wide, valid), packed)
    negative = matching.file_table(files - 2)  # negative keys cannot be packed either
    np.testing.assert_array_equal(matching.first_match(rows - 2, negative, valid), packed)
    # a packed file table: a row whose key does not fit matches nothing
    assert (matching.first_match(np.array([[-1, 0, 0], [big, 0, 0]]), matching.file_table(files)) == -1).all()
    one = matching.file_table(files[:, :1] - 2)  # one column (negative too): the column itself, sorted
    assert isinstance(one, matching.SortedKeys)
    np.testing.assert_array_equal(matching.first_match(rows[:, :1] - 2, one), [
        int(np.flatnonzero(files[:, 0] == r)[0]) if (files[:, 0] == r).any() else -1 for r in rows[:, 0]])


@pytest.mark.parametrize("fmt", ["fits", "parquet"])
def test_a_catalog_read_in_blocks_gives_the_dataset_of_one_read_whole(tmp_path, monkeypatch, fmt):
    from astropy.table import Table

    spectra, cat = good_set(tmp_path, n=9, star_ids=True)
    cat["SNR"] = np.arange(9.0)
    cat.loc[4, "SNR"] = -9999.0          # a missing value in an extra column: NaN in the dataset
    cat.loc[2, "TEFF_ADOP_UNC"] = -9999.0  # and in a label error, read back when written
    cat["NAME"] = [f" star {i} " for i in range(9)]  # text: held in memory, stripped
    cat["GOOD"] = np.arange(9) % 2 == 0
    cat["FLAG"] = np.arange(9)
    path, kind = tmp_path / f"cat.{fmt}", {"fits": sdss.FitsCatalog, "parquet": sdss.ParquetCatalog}[fmt]
    if fmt == "fits":
        Table.from_pandas(cat).write(path)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = pa.Table.from_pandas(cat, preserve_index=False)
        flag = pa.array([None if i == 6 else i for i in range(9)], pa.int64())  # a null in one row group: float
        pq.write_table(t.set_column(t.schema.get_field_index("FLAG"), "FLAG", flag), path, row_group_size=5)
    assert isinstance(sdss.open_catalog(path), kind) and sdss.open_catalog(path).n == 9  # read in blocks
    monkeypatch.setattr(prep, "CATALOG_BLOCK", 4)  # three blocks of catalog rows (across the row groups of 5)
    monkeypatch.setattr(prep, "TABLE_BLOCK", 4)    # the extra columns read back in three blocks
    blocks = prep.prepare(path, spectra, tmp_path / "blocks", workers=1, progress=False)
    monkeypatch.setattr(kind, "open", classmethod(lambda cls, path: None))  # read whole
    whole = prep.prepare(path, spectra, tmp_path / "whole", workers=1, progress=False)
    assert blocks["input_hash"] == whole["input_hash"]
    assert content_sha256(tmp_path / "blocks" / "dataset.h5") == content_sha256(tmp_path / "whole" / "dataset.h5")
    with Dataset(tmp_path / "blocks") as ds:
        m, err = ds.meta(), ds.label_err()
        assert np.isnan(m.SNR[m.fiberid == 5]).all() and (m.SNR[m.fiberid == 6] == 5).all()
        assert np.isnan(err[m.fiberid == 3, 0]).all() and (err[m.fiberid != 3, 0] == 50).all()
        assert np.isnan(m.FLAG[m.fiberid == 7]).all() == (fmt == "parquet") and (m.FLAG[m.fiberid == 8] == 7).all()


def test_sdss_rows_find_their_files_whether_or_not_the_keys_pack():
    files = [Path("a") / sdss.spec_filename(1, 2, 3), Path("b") / sdss.spec_filename(1, 2, 3),
             Path("a") / sdss.spec_filename(7, 8, 9)]
    cat = pd.DataFrame({"PLATE": [1, 1, 1, 9, 7], "MJD": [2, 2, 2, 9, 8], "FIBERID": [3, 3, 2**40, 9, 9]})
    for rows in (cat.iloc[[0, 1, 3, 4]], cat):  # every key fits 21 bits, or one does not: three columns
        loc = sdss.SURVEY.locate(rows.reset_index(drop=True), files, [None] * len(rows))
        want = {(1, 2, 3): 0, (9, 9, 9): -1, (7, 8, 9): 2, (1, 2, 2**40): -1}
        assert list(loc.match) == [want[loc.key(i)] for i in range(len(rows))]
        assert list(loc.twin) == [0, 0, 2] and list(loc.dup) == [False, True] + [False] * (len(rows) - 2)
        assert loc.row_id(0) == "0001-00002-0003" and loc.file(0) == (files[0], None)
