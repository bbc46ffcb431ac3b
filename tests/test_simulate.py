"""simulate: SDSS-like spectra of MILES stars (a few dozen spectra, well under a minute)."""
import importlib.util
import json
import sys
from pathlib import Path

import fitsio
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from stellarparams.spectrum import pixmask
from stellarparams import cli
from stellarparams.surveys import sdss
from stellarparams import simulate as S

NOISELESS = dict(noise=False, rv_sigma=0.0, ebv_mean=0.0, calib_sigma=0.0, bad_frac=0.0)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """24 spectra with every default step (noise, RV, reddening, calibration error, bad pixels)."""
    out = tmp_path_factory.mktemp("survey")
    cat = S.simulate(out, n=24, seed=1, workers=1, progress=False)
    return out, Table.read(cat)


@pytest.fixture(scope="module")
def sim():
    return S.Simulator(S.SimConfig())


def _spectra(out, table):
    for row in table:
        yield row, sdss.simulated_path(out, row["PLATE"], row["MJD"], row["FIBERID"])


def test_air_to_vac_known_lines():
    # [OI] 5577.34 A air = 5578.89 A vacuum; H-alpha 6562.80 air = 6564.61 vacuum
    np.testing.assert_allclose(S.air_to_vac([5577.34, 6562.80]), [5578.89, 6564.61], atol=0.02)


def test_match_resolution_broadens_only_where_sdss_is_broader():
    wave = 3540.5 + 0.9 * np.arange(4300)
    sigma = 2.5 / (2 * np.sqrt(2 * np.log(2)))
    lines = {4000.0: 2.5, 7000.0: 7000.0 / 2000.0}  # centre -> expected FWHM: kept at 4000 A, lambda/R at 7000 A
    flux = 1.0 - sum(0.5 * np.exp(-0.5 * ((wave - c) / sigma) ** 2) for c in lines)
    out = S.match_resolution(wave, flux, fwhm_lib=2.5, resolution=2000.0)
    for c, fwhm in lines.items():
        near = np.abs(wave - c) < 20
        depth = 1.0 - out[near]
        measured = np.sqrt(np.sum(depth * (wave[near] - c) ** 2) / depth.sum()) * 2 * np.sqrt(2 * np.log(2))
        assert measured == pytest.approx(fwhm, rel=0.03)
        assert depth.sum() == pytest.approx(0.5 * sigma * np.sqrt(2 * np.pi) / 0.9, rel=0.01)  # line flux kept


def test_catalog_columns_and_labels(survey):
    out, t = survey
    want = ["PLATE", "MJD", "FIBERID", "TEFF_ADOP", "FEH_ADOP", "LOGG_ADOP", "RV_ADOP", "TEFF_ADOP_UNC",
            "FEH_ADOP_UNC", "LOGG_ADOP_UNC", "RV_ADOP_UNC", "SNR", "EBV", "STAR_ID", "TEFF_TRUE", "FEH_TRUE",
            "LOGG_TRUE", "RV_TRUE"]
    assert t.colnames == want and len(t) == 24
    labels = S.miles_labels().set_index("star_id")
    for row in t:
        star = labels.loc[int(row["STAR_ID"])]
        assert (row["TEFF_TRUE"], row["FEH_TRUE"], row["LOGG_TRUE"]) == (star.teff, star.feh, star.logg)
        assert 4000 <= row["TEFF_TRUE"] <= 9500 and 5 <= row["SNR"] <= 100 and abs(row["RV_TRUE"]) <= 500
    for name, sig in (("TEFF", 60), ("FEH", 0.1), ("LOGG", 0.15), ("RV", 2.0)):
        d = np.asarray(t[f"{name}_ADOP"] - t[f"{name}_TRUE"])
        assert np.all(t[f"{name}_ADOP_UNC"] == sig) and np.all(np.abs(d) < 5 * sig) and np.std(d) > 0.3 * sig
    assert t.meta["SEED"] == 1


def test_files_follow_the_sdss_datamodel(survey, tmp_path):
    out, t = survey
    ref = sdss.write_spec_lite(tmp_path / "ref.fits", np.arange(10) * 1e-4 + 3.58, np.ones(10), np.ones(10),
                               plate=1, mjd=2, fiberid=3)
    with fits.open(ref) as r:
        ref_layout = [(h.name, getattr(h, "columns", None) and [(c.name, c.format) for c in h.columns]) for h in r]
        ref_keys = set(r[0].header)
    for row, path in _spectra(out, t):
        assert path.parent.name == f"{row['PLATE']:04d}"
        with fits.open(path) as f:
            assert [(h.name, getattr(h, "columns", None) and [(c.name, c.format) for c in h.columns]) for h in f] \
                == ref_layout
            assert ref_keys <= set(f[0].header) and f[0].header["VACUUM"] is True
            assert np.all(f["COADD"].data["model"] == 0)  # never the noiseless truth
        with fitsio.FITS(str(path)) as f:
            assert f["COADD"].get_nrows() > 3800
        s = sdss.read_spectrum(path)
        assert (s.plate, s.mjd, s.fiberid, s.objclass) == (row["PLATE"], row["MJD"], row["FIBERID"], "STAR")
        np.testing.assert_allclose(np.diff(s.loglam), 1e-4, atol=2e-6)
        assert 3795 < 10 ** s.loglam[0] < 3805 and 9195 < 10 ** s.loglam[-1] < 9205
        assert s.z == pytest.approx(float(S.doppler(row["RV_ADOP"]) - 1), abs=1e-7)
        assert not any(k in fitsio.read_header(str(path)) for k in ("TEFF", "LOGG", "FEH", "STAR_ID"))


def test_red_end_beyond_miles_is_nodata(survey):
    out, t = survey
    nodata = pixmask("NODATA")
    for row, path in _spectra(out, t):
        s = sdss.read_spectrum(path)
        lam = 10 ** s.loglam.astype(float)
        red = lam > 7411.5 * float(S.doppler(row["RV_TRUE"])) + 1.0
        assert red.sum() > 900  # the red quarter of the grid
        assert np.all(s.flux[red] == 0) and np.all(s.ivar[red] == 0) and np.all(s.and_mask[red] == nodata)
        blue = (lam > 3900) & (lam < 7250)  # every star has good flux here
        assert np.all(s.and_mask[blue] & nodata == 0) and (s.ivar[blue] > 0).mean() > 0.99
        bad = (s.and_mask & pixmask("COMBINEREJ")) > 0  # cosmic rays: flagged, ivar 0
        assert np.all(s.ivar[bad] == 0)


def test_library_pixels_without_flux_count_as_not_covered(sim):
    # MILES star 929 has zero/negative flux blueward of 3836 A (air); 468 has a zero at 7303.4 A
    k929, k468 = (int(np.flatnonzero(sim.labels.star_id == i)[0]) for i in (929, 468))
    assert sim.cover[k929, 0] > S.air_to_vac(3835.7) and sim.cover[k468, 1] < S.air_to_vac(7303.4)
    inside = (sim.wave >= sim.cover[:, :1]) & (sim.wave <= sim.cover[:, 1:])
    assert np.all(sim.flux[inside] > 0)
    plan = dict(S.draw_plan(0, 0, len(sim.labels), sim.cfg), star=k929, rv=0.0)
    spec = sim.realize(plan, seed=0)
    lam = 10 ** spec["loglam"]
    assert np.all(spec["and_mask"][lam < 3835] == pixmask("NODATA")) and np.all(spec["ivar"][lam < 3835] == 0)


def test_measured_snr_matches_header_and_catalog(survey):
    out, t = survey
    for row, path in _spectra(out, t):
        s = sdss.read_spectrum(path)
        lam = 10 ** s.loglam.astype(float)
        win = (lam >= 4950) & (lam <= 5050) & (s.ivar > 0)
        measured = np.median(s.flux[win] * np.sqrt(s.ivar[win]))
        assert measured == pytest.approx(fitsio.read_header(str(path))["SNR5000"], rel=0.10)
        assert measured == pytest.approx(row["SNR"], rel=0.10)


def test_noiseless_realization_matches_library(tmp_path, sim):
    cat = S.simulate(tmp_path, n=4, seed=5, workers=1, progress=False, **NOISELESS)
    for row, path in _spectra(tmp_path, Table.read(cat)):
        assert row["RV_TRUE"] == 0 and row["EBV"] == 0
        s = sdss.read_spectrum(path)
        good = s.ivar > 0
        star = int(np.flatnonzero(sim.labels.star_id == row["STAR_ID"])[0])
        ref = np.interp(10 ** s.loglam[good].astype(float), sim.wave, sim.flux[star])
        ratio = s.flux[good] / ref
        dev = np.abs(ratio / np.median(ratio) - 1)  # one flux scale, nothing else
        assert np.median(dev) < 0.002 and np.percentile(dev, 99) < 0.02 and dev.max() < 0.05
        assert 10 <= np.median(s.flux[good]) <= 300


def _chi2(lam, flux, ivar, wave, template, velocities):
    """chi^2 of flux against the template shifted by each velocity, times a 5th-order Legendre polynomial."""
    w = np.sqrt(ivar)
    poly = np.polynomial.legendre.legvander(np.linspace(-1, 1, len(lam)), 5)
    chi2 = []
    for v in velocities:
        design = np.interp(lam / S.doppler(v), wave, template)[:, None] * poly * w[:, None]
        coef = np.linalg.solve(design.T @ design, design.T @ (flux * w))  # normal equations, 6 x 6
        chi2.append(np.sum((design @ coef - flux * w) ** 2))
    return np.array(chi2)


def _cross_correlate(s, wave, template):
    good = s.ivar > 0
    lam, flux, ivar = 10 ** s.loglam[good].astype(float), s.flux[good].astype(float), s.ivar[good].astype(float)
    coarse = np.arange(-550.0, 551.0, 10.0)  # |RV| <= 500 km/s
    fine = coarse[np.argmin(_chi2(lam, flux, ivar, wave, template, coarse))] + np.arange(-15.0, 16.0)
    c = _chi2(lam, flux, ivar, wave, template, fine)
    i = int(np.clip(np.argmin(c), 1, len(c) - 2))
    return fine[i] + 0.5 * (c[i - 1] - c[i + 1]) / (c[i - 1] - 2 * c[i] + c[i + 1])  # parabola vertex


def test_rv_recovered_by_cross_correlation(survey, sim):
    out, t = survey
    checked = 0
    for row, path in _spectra(out, t):
        if row["SNR"] < 20 or checked == 8:
            continue
        star = int(np.flatnonzero(sim.labels.star_id == row["STAR_ID"])[0])
        rv = _cross_correlate(sdss.read_spectrum(path), sim.wave, sim.flux[star])
        assert rv == pytest.approx(row["RV_TRUE"], abs=5.0)
        assert rv == pytest.approx(row["RV_ADOP"], abs=5.0 + 4 * row["RV_ADOP_UNC"])
        checked += 1
    assert checked >= 5


def _read_all(out):
    t = Table.read(out / "sppParams.fits")
    return t, [fitsio.read(str(p), ext="COADD") for _, p in _spectra(out, t)]


def test_same_seed_same_output_any_worker_count(tmp_path):
    a = S.simulate(tmp_path / "a", n=10, seed=3, workers=1, progress=False).parent
    b = S.simulate(tmp_path / "b", n=10, seed=3, workers=2, progress=False).parent
    c = S.simulate(tmp_path / "c", n=10, seed=4, workers=1, progress=False).parent
    (ta, fa), (tb, fb), (tc, fc) = _read_all(a), _read_all(b), _read_all(c)
    assert np.array_equal(ta.as_array(), tb.as_array()) and all(np.array_equal(x, y) for x, y in zip(fa, fb))
    assert not np.array_equal(ta["RV_TRUE"], tc["RV_TRUE"])
    assert not any(np.array_equal(x["flux"], y["flux"]) for x, y in zip(fa, fc))


def test_resume_skips_finished_files_and_refuses_other_settings(tmp_path, capsys):
    cat = S.simulate(tmp_path, n=6, seed=2, workers=1, progress=False)
    paths = [p for _, p in _spectra(tmp_path, Table.read(cat))]
    before = fitsio.read(str(paths[2]), ext="COADD")
    kept = paths[0].stat().st_mtime_ns
    paths[2].unlink()
    (paths[3].parent / (paths[3].name + ".tmp")).write_bytes(b"half a file")
    cat.unlink()
    S.simulate(tmp_path, n=8, seed=2, workers=1, progress=True)  # resume and extend
    n_stars = len(set(Table.read(cat)["STAR_ID"]))
    assert f"3 spectra written, 5 already there, 0 failed; catalog {cat}: 8 spectra of {n_stars} stars" \
        in capsys.readouterr().err
    assert paths[0].stat().st_mtime_ns == kept  # not rewritten
    assert np.array_equal(fitsio.read(str(paths[2]), ext="COADD"), before)  # rewritten identically
    assert len(Table.read(cat)) == 8 and not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="other settings"):
        S.simulate(tmp_path, n=8, seed=3, workers=1, progress=False)


def test_missing_mangadap_says_how_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mangadap" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install sdss-mangadap"):
        S.load_miles()
    assert cli.main(["simulate", "--out", str(tmp_path), "--n", "2", "--no-progress"]) == 2
    assert "pip install sdss-mangadap" in capsys.readouterr().err


def test_cli_writes_survey(tmp_path, capsys):
    rc = cli.main(["simulate", "--out", str(tmp_path), "--n", "3", "--seed", "7", "--workers", "1", "--no-progress",
                   "--rv-sigma", "0", "--no-noise"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "sppParams.fits")
    t = Table.read(tmp_path / "sppParams.fits")
    assert len(t) == 3 and np.all(t["RV_TRUE"] == 0) and len(list(tmp_path.rglob("spec-*.fits"))) == 3


# tests/data/survey_v0.npz: every header card and column of a 3-spectrum survey (seed 11, defaults,
# version string pinned) as written before the instrument shifts existed (make_fixtures.survey_v0).
# With every shift at its neutral value the survey must hold the same values. Floats are compared
# within rtol 1e-6: they were computed on another CPU, and float64 exp/log/sin round differently with
# other SIMD code (a float32 value moves by at most one unit in the last place, 6e-8 relative); any
# real change of the survey (another seed, star, noise or shift) moves values by far more.
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import make_fixtures  # noqa: E402


def assert_same_survey(out, expected):
    got = make_fixtures.fits_content(out)
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-30, err_msg=key)
        elif key.endswith(".json"):
            assert json.loads(str(got[key])) == json.loads(str(want)), key   # the job's settings, not computed
        else:
            np.testing.assert_array_equal(got[key], want, err_msg=key)


@pytest.fixture(scope="module")
def survey_v0():
    with np.load(DATA / "survey_v0.npz") as z:
        return {k: z[k] for k in z.files}


def test_default_survey_holds_the_values_it_held_before_shifts(tmp_path, survey_v0):
    assert_same_survey(make_fixtures.survey_v0(tmp_path), survey_v0)


def test_neutral_shifts_given_explicitly_change_nothing(tmp_path, monkeypatch, survey_v0):
    monkeypatch.setattr(S, "__version__", "0-test")
    S.simulate(tmp_path / "neutral", n=3, seed=11, workers=1, progress=False, response=None, telluric=0.0,
               airmass=(1.2, 1.2), lsf=None, wave_offset=0.0, sky_residual=0.0)
    assert_same_survey(tmp_path / "neutral", survey_v0)
    default = make_fixtures.survey_v0(tmp_path / "default")
    for f in (tmp_path / "neutral").rglob("*.fits"):   # same machine: the same bytes
        assert f.read_bytes() == (default / f.relative_to(tmp_path / "neutral")).read_bytes(), f.name


def test_the_survey_comparison_catches_a_changed_survey(tmp_path, survey_v0):
    with pytest.raises(AssertionError):
        S.simulate(tmp_path, n=3, seed=12, workers=1, progress=False)
        assert_same_survey(tmp_path, survey_v0)


# ---------------------------------------------------------------------------- shifts on a hand-made spectrum

LINE_VAC = 5200.0  # A, vacuum rest: the absorption line of the hand-made star
_SIMS = {}


def _handmade_sim(**shifts):
    """A noiseless Simulator whose star 0 is hand-made: flat continuum, one Gaussian line (sigma 1.5 A)."""
    key = tuple(sorted(shifts.items()))
    if key not in _SIMS:
        sim = S.Simulator(S.SimConfig(**NOISELESS), S.Shifts(**shifts), seed=0)
        flux = 1.0 - 0.5 * np.exp(-0.5 * ((sim.wave - LINE_VAC) / 1.5) ** 2)
        sim.cum[0] = np.concatenate([[0.0], np.cumsum(flux * np.diff(sim.edges))])
        sim.cover[0] = sim.edges[0], sim.edges[-1]
        _SIMS[key] = sim
    return _SIMS[key]


def _handmade_spectrum(index=0, **shifts):
    sim = _handmade_sim(**shifts)
    plan = dict(S.draw_plan(0, index, len(sim.labels), sim.cfg), star=0, rv=0.0, ebv=0.0)
    return plan, sim.realize(plan, seed=0)


def _line_centroid(spec):
    """Centroid (pixel index) of the hand-made line, from 1 - flux / local continuum."""
    lam = 10 ** spec["loglam"]
    near, cont = np.abs(lam - LINE_VAC) < 12, (np.abs(lam - LINE_VAC) > 15) & (np.abs(lam - LINE_VAC) < 30)
    depth = 1 - spec["flux"][near] / np.median(spec["flux"][cont])
    return np.sum(np.flatnonzero(near) * depth) / depth.sum()


def test_response_from_file_multiplies_by_the_curve(tmp_path):
    wave = np.linspace(3700, 9300, 57)
    curve = 1 + 0.3 * np.sin(wave / 900.0)  # smooth, 0.7-1.3
    path = tmp_path / "response.txt"
    path.write_text("# wavelength_A factor\n" + "".join(f"{w:.17g}, {f:.17g}\n" for w, f in zip(wave, curve)))
    _, ref = _handmade_spectrum(0)
    _, got = _handmade_spectrum(0, response=str(path))
    good = ref["flux"] > 0  # NODATA pixels are 0 in both
    ratio = got["flux"][good] / ref["flux"][good] / np.interp(10 ** ref["loglam"][good], wave, curve)
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-9)  # the curve, up to the flux scale
    for bad, message in (("3900 1\n9300 1\n", "cover"), ("3700 1\n9300 -1\n", "> 0"), ("3700\n9300\n", "two")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            S.Shifts(response=str(path))


def test_legendre_response_has_the_asked_rms_and_is_one_curve_per_survey():
    loglam = S.LOGLAM0 + S.DLOGLAM * np.arange(3841)
    r = S.instrument_response(loglam, "legendre:0.08", seed=3)
    assert np.sqrt(np.mean(np.log(r) ** 2)) == pytest.approx(0.08, rel=1e-3)
    assert np.array_equal(r, S.instrument_response(loglam, "legendre:0.08", seed=3))
    assert not np.allclose(r, S.instrument_response(loglam, "legendre:0.08", seed=4))
    assert np.all(np.abs(np.diff(np.log(r), 2)) < 1e-5)  # smooth: no pixel-scale structure
    (_, a), (_, b) = _handmade_spectrum(0), _handmade_spectrum(0, response="legendre:0.1:3")
    (_, c), (_, d) = _handmade_spectrum(5), _handmade_spectrum(5, response="legendre:0.1:3")
    # two spectra start at different lattice offsets: compare them on their common pixels
    la, lc = np.round(a["loglam"] / S.DLOGLAM).astype(int), np.round(c["loglam"] / S.DLOGLAM).astype(int)
    common, ia, ic = np.intersect1d(la, lc, return_indices=True)
    good = (a["flux"][ia] > 0) & (c["flux"][ic] > 0)  # not NODATA
    ra, rc = b["flux"][ia][good] / a["flux"][ia][good], d["flux"][ic][good] / c["flux"][ic][good]
    np.testing.assert_allclose(ra / rc, np.median(ra / rc), rtol=1e-9)  # the same curve


def test_telluric_band_depth_scales_with_airmass():
    b_lo, b_hi = S.air_to_vac([6867.0, 6884.0])
    o2a = S.air_to_vac(0.5 * (7594.0 + 7621.0))
    wave = np.array([5000.0, 0.5 * (b_lo + b_hi), o2a])
    tau = S.telluric_tau(wave)
    for airmass in (1.0, 1.3, 2.0):
        full = 1 - S.telluric_factor(tau, airmass, 1.0)
        np.testing.assert_allclose(full, [0.0, 1 - 0.75 ** airmass, 1 - 0.45 ** airmass], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(1 - S.telluric_factor(tau, airmass, 0.2), 0.2 * full, rtol=1e-12)
    # through a realization: the B band (inside the MILES range) at a fixed airmass of 1.4
    plan, spec = _handmade_spectrum(0, telluric=1.0, airmass=(1.4, 1.4))
    _, ref = _handmade_spectrum(0)
    lam = 10 ** spec["loglam"]
    core = np.abs(lam - 0.5 * (b_lo + b_hi)) < 2
    ratio = spec["flux"] / np.where(ref["flux"] > 0, ref["flux"], np.nan)
    depth = 1 - ratio[core] / np.median(ratio[(lam > 6000) & (lam < 6500)])
    np.testing.assert_allclose(depth, 1 - 0.75 ** 1.4, rtol=1e-3)
    assert S.plate_airmass(0, plan["plate"], (1.4, 1.4)) == 1.4
    airmasses = [S.plate_airmass(0, p, (1.0, 1.5)) for p in range(1000, 1200)]
    assert 1.0 <= min(airmasses) < 1.05 and 1.45 < max(airmasses) <= 1.5  # uniform, one per plate


def test_wave_offset_moves_the_line_by_the_asked_pixels():
    _, ref = _handmade_spectrum(0)
    for offset in (0.37, -1.5):
        _, got = _handmade_spectrum(0, wave_offset=offset)
        assert np.array_equal(got["loglam"], ref["loglam"])  # the written wavelengths are the same ...
        assert _line_centroid(got) - _line_centroid(ref) == pytest.approx(offset, abs=0.01)  # ... the light is not
        near = np.flatnonzero(np.abs(10 ** ref["loglam"] - 5578.9) < 8)  # [OI] 5577 (air)
        line = [s["sky"][near] - s["sky"][near].min() for s in (got, ref)]
        centroid = [np.sum(near * y) / y.sum() for y in line]
        assert centroid[0] - centroid[1] == pytest.approx(offset, abs=0.02)  # the sky lines move too


def _fwhm(x, y):
    """FWHM of a single-peaked profile, half-maximum crossings by linear interpolation."""
    half, i = y.max() / 2, int(np.argmax(y))
    left = np.interp(half, y[:i + 1], x[:i + 1])
    right = np.interp(half, y[i:][::-1], x[i:][::-1])
    return right - left


def test_lsf_width_and_shape_match_the_asked_ones():
    wave = np.arange(6900.0, 7100.0, 0.05)  # a fine grid: pixel integration is negligible
    delta = np.where(np.abs(wave - 7000.0) < 0.01, 1.0, 0.0)
    for fwhm_kms in (120.0, 200.0):
        fwhm, h3, h4 = S.parse_lsf(f"gauss:{fwhm_kms}")
        out = S.match_resolution(wave, delta, fwhm_lib=0.0, resolution=S.C_KMS / fwhm)
        assert _fwhm(wave, out) == pytest.approx(7000.0 * fwhm_kms / S.C_KMS, rel=0.005)
        assert out.sum() == pytest.approx(1.0, rel=1e-6)  # line flux kept (sigma varies slowly with lambda)
    fwhm, h3, h4 = S.parse_lsf("gh:150:0.08:0.05")
    out = S.match_resolution(wave, delta, fwhm_lib=0.0, resolution=S.C_KMS / fwhm, h3=h3, h4=h4)
    sigma_a = 7000.0 * fwhm / S.C_KMS / (2 * np.sqrt(2 * np.log(2)))
    want = S.gauss_hermite((wave - 7000.0) / sigma_a, h3, h4)
    np.testing.assert_allclose(out / out.sum(), want / want.sum(), atol=2e-3 * (want / want.sum()).max())
    assert np.sum((wave - 7000.0) * out) / out.sum() > 0.05  # h3 > 0: the red wing
    # the library's own 2.5 A Gaussian is taken out in quadrature: a 2.5 A line comes out at the asked FWHM
    line = np.exp(-0.5 * ((wave - 7000.0) / (2.5 / 2.3548)) ** 2)
    out = S.match_resolution(wave, line, fwhm_lib=2.5, resolution=S.C_KMS / 160.0)
    assert _fwhm(wave, out) == pytest.approx(7000.0 * 160.0 / S.C_KMS, rel=0.01)
    for bad in ("gauss", "gh:150:0.1", "gauss:10", "gh:150:0.5:0", "lorentz:150"):
        with pytest.raises(ValueError, match="--lsf"):
            S.Shifts(lsf=bad)


def test_lsf_replaces_the_default_broadening():
    sim = _handmade_sim(lsf="gauss:120")
    ref = S.match_resolution(sim.wave, S.load_miles()[1][:3], sim.fwhm_lib, S.C_KMS / 120.0)
    np.testing.assert_allclose(sim.flux[1:3], ref[1:3], rtol=1e-12)
    red = sim.lam > 7000  # wdisp: sigma in pixels of the LSF core, 120 km/s here
    np.testing.assert_allclose(sim.wdisp[red], 120.0 / 2.3548 / (S.C_KMS * np.log(10) * 1e-4), rtol=1e-3)


def test_sky_residual_adds_the_asked_fraction_of_the_sky_lines():
    plan, ref = _handmade_spectrum(0)
    _, got = _handmade_spectrum(0, sky_residual=-0.04)
    lam = 10 ** ref["loglam"]
    continuum = plan["sky"] * S.SKY_CONTINUUM * (lam / 5000.0) ** 1.5
    peak = np.argmax(np.where(np.abs(lam - 5578.9) < 5, ref["sky"], 0))
    assert (got["flux"] - ref["flux"])[peak] == pytest.approx(-0.04 * (ref["sky"] - continuum)[peak], rel=1e-6)
    far = (lam > 4500) & (lam < 5400)  # no sky line here
    assert np.max(np.abs(got["flux"] - ref["flux"])[far]) < 1e-6 * np.median(ref["flux"][far])
    assert np.array_equal(got["ivar"], ref["ivar"]) and np.array_equal(got["sky"], ref["sky"])


def test_shifts_are_recorded_in_simulate_json_and_headers(tmp_path, capsys):
    rc = cli.main(["simulate", "--out", str(tmp_path), "--n", "2", "--seed", "4", "--workers", "1", "--no-progress",
                   "--response", "legendre:0.05", "--telluric", "0.2", "--airmass", "1.1", "1.3", "--lsf",
                   "gh:140:0.03:0.02", "--wave-offset", "0.2", "--sky-residual", "0.02"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "simulate.json").read_text())
    assert meta["shifts"] == dict(response="legendre:0.05", telluric=0.2, lsf="gh:140:0.03:0.02", wave_offset=0.2,
                                  sky_residual=0.02, airmass=[1.1, 1.3])
    for path in tmp_path.rglob("spec-*.fits"):
        h = fitsio.read_header(str(path))
        assert (h["RESPONSE"], h["TELLURIC"], h["LSF"], h["WAVEOFF"], h["SKYRESID"]) == \
            ("legendre:0.05", 0.2, "gh:140:0.03:0.02", 0.2, 0.02)
        assert 1.1 <= h["AIRMASS"] <= 1.3
        assert not any(k in h for k in ("TEFF", "LOGG", "FEH", "STAR_ID", "TEFF_TRUE"))
    with pytest.raises(ValueError, match="other settings"):  # a resume with other shifts is refused
        S.simulate(tmp_path, n=2, seed=4, workers=1, progress=False, response="legendre:0.05")


def test_shift_values_out_of_range_are_refused(tmp_path, capsys):
    for flags in (["--telluric", "2"], ["--airmass", "0.5", "1"], ["--wave-offset", "9"], ["--sky-residual", "-3"],
                  ["--response", "legendre:2"], ["--response", str(tmp_path / "missing.txt")], ["--lsf", "gh:1:0:0"]):
        assert cli.main(["simulate", "--out", str(tmp_path / "x"), "--n", "2", "--no-progress", *flags]) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_one_writer_per_output_folder(tmp_path, capsys):
    from stellarparams.files import OutputBusy, output_lock

    with output_lock(tmp_path):
        with pytest.raises(OutputBusy, match="--wait"):
            S.simulate(tmp_path, n=2, seed=0, workers=1, progress=False)
        assert cli.main(["simulate", "--out", str(tmp_path), "--n", "2", "--no-progress"]) == 3  # busy
    assert "another stellarparams process" in capsys.readouterr().err
