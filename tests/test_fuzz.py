"""Seeded fuzzing of the readers: damaged SDSS files and damaged catalog cells.

Every case must end as a kept row with sane numbers or as a reject with a named reason;
never as a crash of the batch, an unnamed error, or a wrong number. ``bench/fuzz.py`` runs
many more cases with the same functions.
"""
import dataclasses
import gzip
import shutil

import h5py
import numpy as np
import pandas as pd

from stellarparams.spectrum import NoUsableInput, Record, SpectrumError
from stellarparams import prepare as prep
from stellarparams.surveys import sdss
from stellarparams.dataset import Dataset
from stellarparams.preprocess import PrepareConfig, preprocess

# every reason a damaged file may get; "error" (an exception nobody foresaw) is not one of them
FILE_REASONS = {"missing_file", "unreadable", "not_sdss", "missing_columns", "bad_wavelength", "nonfinite_flux",
                "no_good_pixels", "too_few_pixels", "low_coverage", "constant_flux", "not_a_star", "missing_rv"}
LOGLAM = 3.5800 + 1e-4 * np.arange(3850)


def base_files(folder):
    """A valid DR8+ lite file and a valid DR7 spSpec file (also gzipped), as bytes."""
    rng = np.random.default_rng(0)
    lam = 10 ** LOGLAM
    flux = 100 * (lam / 5000) ** -1.5 * (1 - 0.5 * np.exp(-0.5 * ((lam - 6565) / 5) ** 2)) + rng.normal(0, 1, lam.size)
    a = sdss.write_spec_lite(folder / "spec-1000-52000-0001.fits", LOGLAM, flux, np.full(lam.size, 1.0),
                             plate=1000, mjd=52000, fiberid=1)
    b = sdss.write_spspec_dr7(folder / "spSpec-52000-1000-002.fit", LOGLAM[0], flux, np.full(lam.size, 1.0),
                              plate=1000, mjd=52000, fiberid=2)
    return [a.read_bytes(), b.read_bytes(), gzip.compress(b.read_bytes(), mtime=0)]  # DR7 archives are gzipped


def _cards(data: bytes):
    """Byte offsets of 'KEYWORD = value' header cards."""
    return [i for i in range(0, len(data) - 80, 80) if data[i + 8:i + 10] == b"= " and data[i:i + 1].isalpha()]


JUNK = [b"-1", b"0", b"99999999", b"2147483647", b"'junk'", b"T", b"F", b"1.5E300", b"NAN", b"", b"'E'", b"-64"]


def mutate(data: bytes, rng) -> tuple[bytes, str]:
    """A random truncation, bit flips, or a header value edit of ``data``."""
    kind = rng.choice(["truncate", "flip", "header"])
    if kind == "truncate":
        return data[:int(rng.integers(0, len(data)))], kind
    if kind == "flip":
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(b), kind
    if data[:2] == b"\x1f\x8b":  # edit the header inside the gzip stream
        inner, _ = mutate_header(gzip.decompress(data), rng)
        return gzip.compress(inner, mtime=0), kind
    return mutate_header(data, rng)


def mutate_header(data: bytes, rng) -> tuple[bytes, str]:
    cards = _cards(data)
    i = cards[int(rng.integers(0, len(cards)))]
    value = JUNK[int(rng.integers(0, len(JUNK)))]
    card = data[i:i + 10] + value.rjust(20) + b" " * 50
    return data[:i] + card[:80] + data[i + 80:], "header"


def check_spectrum_cases(folder, n_cases: int, seed: int) -> dict:
    """Write ``n_cases`` damaged files and read them as ``prepare`` does; returns counts by outcome."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bases = base_files(folder)
    originals = []
    for i, data in enumerate(bases):
        (folder / f"base{i}").mkdir()
        (folder / f"base{i}" / "spec.fits").write_bytes(data)
        originals.append(preprocess(sdss.read_spectrum(folder / f"base{i}" / "spec.fits"), 10.0)[0])
    items, kinds, which_base = [], [], []
    for k in range(n_cases):
        which = int(rng.integers(0, 3))
        data, kind = mutate(bases[which], rng)
        name = [f"spec-2000-53000-{k:04d}.fits", f"spSpec-53000-2000-{k:03d}.fit", f"spSpec-53000-2000-{k:03d}.fit.gz"][which]
        path = folder / f"case{k:05d}" / name
        path.parent.mkdir()
        path.write_bytes(data)
        items.append((k, str(path), 10.0))
        kinds.append(kind)
        which_base.append(which)
    partial = folder / "partial"
    partial.mkdir()
    config = PrepareConfig()
    counts = {}
    pixels = prep._Pixels.open(partial, config, len(items))
    for lo in range(0, len(items), 64):  # the batch code of `prepare`: it must never raise
        r = prep._run_chunk(lo // 64, items[lo:lo + 64], config, str(partial), pixels, lo)
        with np.load(partial / f"chunk-{lo // 64:05d}.npz") as z:
            rows, pos = z["rows"], z["pos"]
        with h5py.File(pixels.path, "r") as f:
            flux, valid, sigma = (f[name][pos] if len(pos) else None for name in ("flux", "valid", "sigma"))
        assert len(rows) + len(r["rejects"]) == len(items[lo:lo + 64])  # every case accounted for, once
        for j in range(len(rows)):  # kept rows: the numbers the file holds, standardized
            assert np.isfinite(flux[j]).all() and abs(flux[j].mean()) < 1e-4 and abs(flux[j].std() - 1) < 1e-4
            assert (sigma[j][valid[j]] > 0).all() and np.isinf(sigma[j][~valid[j]]).all()
            ref, _ = preprocess(sdss.read_spectrum(items[rows[j]][1]), 10.0, config)
            np.testing.assert_array_equal(flux[j], ref)
            if kinds[rows[j]] == "truncate":  # kept after a cut: only padding was lost, never a number
                np.testing.assert_array_equal(flux[j], originals[which_base[rows[j]]])
        for rej in r["rejects"]:
            assert rej["reason"] in FILE_REASONS, (kinds[rej["row"]], rej)
        for key in ["kept"] * len(rows) + [x["reason"] for x in r["rejects"]]:
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_fuzz_damaged_spectrum_files(tmp_path):
    counts = check_spectrum_cases(tmp_path, 330, seed=5)
    assert sum(counts.values()) == 330
    assert counts.get("kept", 0) > 20 and counts.get("unreadable", 0) > 20  # both outcomes were exercised


# ---------------------------------------------------------------------------------------------- fast vs fitsio

def _read_both_ways(path):
    """The outcome of reading ``path`` with the fast reader and with cfitsio: a Spectrum or a reject reason."""
    out = []
    for reader in ("fast", "fitsio"):
        try:
            out.append(sdss.read_spectrum(path, reader=reader))
        except SpectrumError as e:
            out.append(e.reason)
    return out


def assert_same_spectrum(a, b):
    """Two readings of one file agree: the same reject reason, or every field equal (values, dtypes, types)."""
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    for f in dataclasses.fields(Record):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), f.name
        elif isinstance(x, float):
            assert type(y) is float and (x == y or np.isnan(x) and np.isnan(y)), f.name
        else:
            assert type(x) is type(y) and x == y, (f.name, x, y)


def rich_spec_file(path):
    """A DR8+ lite file shaped like SDSS's own: long headers, every column type, array and text columns."""
    from astropy.io import fits

    rng = np.random.default_rng(1)
    n = len(LOGLAM)
    primary = fits.PrimaryHDU()
    h = primary.header
    for k, v in [("TELESCOP", "SDSS 2.5-M"), ("PLATEID", 3586), ("MJD", 55181), ("FIBERID", 12), ("RA", 150.0125),
                 ("DEC", 2.25e0), ("PLUG_RA", 150.01249), ("PLUG_DEC", 2.2500001), ("OBSERVER", "O'Brien"),
                 ("AIRMASS", 1.0512345678901), ("EXPTIME", 2700.0), ("HELIO_RV", -12.5), ("SPEC2_G", 17.25),
                 ("DATE-OBS", "2009-12-21"), ("FLAVOR", "science"), ("VACUUM", True), ("NEXP", 3), ("TAI", 4.8e9),
                 ("LONGSTR", "a text longer than one card, " * 4)]:
        h[k] = v
    h.add_history("spectro2d v5_7_0")
    h.add_comment("shaped like an SDSS DR12 spec-lite file")
    coadd = fits.BinTableHDU.from_columns([
        fits.Column("flux", "E", array=100 + rng.normal(0, 1, n), unit="1e-17 erg/s/cm2/Angstrom"),
        fits.Column("loglam", "E", array=LOGLAM), fits.Column("ivar", "E", array=np.full(n, 1.0)),
        fits.Column("and_mask", "J", array=np.zeros(n, np.int32)), fits.Column("or_mask", "J", array=np.zeros(n)),
        fits.Column("wdisp", "E", array=np.ones(n)), fits.Column("sky", "E", array=np.ones(n)),
        fits.Column("model", "E", array=np.ones(n))], name="COADD")
    specobj = fits.BinTableHDU.from_columns([
        fits.Column("SURVEY", "6A", array=["segue2"]), fits.Column("PLATE", "I", array=[3586]),
        fits.Column("MJD", "J", array=[55181]), fits.Column("FIBERID", "I", array=[12]),
        fits.Column("SPECOBJID", "19A", array=["4037356001012563968"]), fits.Column("CLASS", "6A", array=["STAR  "]),
        fits.Column("Z", "D", array=[1.2e-4]), fits.Column("ZWARNING", "K", array=[4]),
        fits.Column("SN_MEDIAN_ALL", "E", array=[23.5]), fits.Column("SPECTROFLUX", "5E", array=[np.arange(5.0)]),
        fits.Column("CALIBFLUX_IVAR", "5D", array=[np.arange(5.0)], dim="(5)"),
        fits.Column("PRIMARY", "L", array=[True]),
        fits.Column("SPECBOSS", "B", array=[1]), fits.Column("BITS", "12X", array=[np.ones(12, bool)]),
        fits.Column("PSF", "2C", array=[np.ones(2, complex)])], name="SPECOBJ")
    spzline = fits.BinTableHDU.from_columns([fits.Column("LINENAME", "13A", array=["Ly_alpha", "H_beta"]),
                                             fits.Column("LINEWAVE", "D", array=[1215.67, 4862.68])], name="SPZLINE")
    fits.HDUList([primary, coadd, specobj, spzline]).writeto(path)
    return path


def test_fast_reader_reads_an_sdss_shaped_file_as_cfitsio_does(tmp_path):
    path = rich_spec_file(tmp_path / "spec-3586-55181-0012.fits")
    assert sdss.read_spec_fast(path) is not None  # the fast path takes it
    a, b = _read_both_ways(path)
    assert_same_spectrum(a, b)
    assert (a.plate, a.mjd, a.fiberid, a.objclass, a.header["RA"]) == (3586, 55181, 12, "STAR", 150.0125)


def test_fast_reader_leaves_other_layouts_to_cfitsio(tmp_path):
    """A heap (variable-length column), a scaled column, gzip, DR7 and trailing bytes: not plain, read by cfitsio."""
    from astropy.io import fits

    plain = rich_spec_file(tmp_path / "spec-3586-55181-0012.fits")
    with fits.open(plain) as h:
        n = len(h[1].data)
        heap = fits.BinTableHDU.from_columns(h[1].columns + fits.ColDefs(
            [fits.Column("extra", "PJ()", array=[np.arange(i % 3) for i in range(n)])]), name="COADD")
        fits.HDUList([h[0].copy(), heap, h[2].copy()]).writeto(tmp_path / "heap.fits")
        scaled = fits.BinTableHDU.from_columns(h[1].columns, name="COADD")
        scaled.header["TSCAL3"] = 2.0  # ivar, stored halved
        fits.HDUList([h[0].copy(), scaled, h[2].copy()]).writeto(tmp_path / "scaled.fits")
    (tmp_path / "trailing.fits").write_bytes(plain.read_bytes() + b"\0" * 10)
    dr7 = base_files(tmp_path)[2]
    (tmp_path / "spSpec-52000-1000-002.fit.gz").write_bytes(dr7)
    for name in ("heap.fits", "scaled.fits", "trailing.fits", "spSpec-52000-1000-002.fit.gz"):
        assert sdss.read_spec_fast(tmp_path / name) is None, name
        a, b = _read_both_ways(tmp_path / name)
        assert_same_spectrum(a, b)
    assert not isinstance(b, str) and b.flux.size == len(LOGLAM)


def check_fast_reader_cases(folder, n_cases: int, seed: int) -> dict:
    """Damaged lite files read with the fast reader and with cfitsio must give the same spectrum or reason."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lam = 10 ** LOGLAM
    flux = 100 * (lam / 5000) ** -1.5 + rng.normal(0, 1, lam.size)
    base = sdss.write_spec_lite(folder / "spec-1000-52000-0001.fits", LOGLAM, flux, np.full(lam.size, 1.0),
                                plate=1000, mjd=52000, fiberid=1, header={"RA": 12.5, "DEC": -3, "OBSERVER": "it's"})
    bases = [base.read_bytes(), rich_spec_file(folder / "spec-3586-55181-0012.fits").read_bytes()]
    counts = {}
    for k in range(n_cases):
        bad, kind = mutate(bases[k % 2], rng)
        path = folder / f"spec-1000-52000-{k + 2:04d}.fits"
        path.write_bytes(bad)
        a, b = _read_both_ways(path)
        assert_same_spectrum(a, b)
        try:
            fast = sdss.read_spec_fast(path) is not None
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            fast = False
        key = ("fast " if fast else "cfitsio ") + (a if isinstance(a, str) else "read")
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_fast_reader_agrees_with_cfitsio_on_damaged_files(tmp_path):
    counts = check_fast_reader_cases(tmp_path, 300, seed=3)
    assert counts.get("fast read", 0) > 50 and counts.get("cfitsio read", 0) > 5  # both paths were exercised
    assert sum(v for k, v in counts.items() if k.startswith("cfitsio ") and k != "cfitsio read") > 20


# ---------------------------------------------------------------------------------------------- catalog cells

CELL_JUNK = [-9999, np.nan, "", "abc"]
FUZZ_COLUMNS = ["PLATE", "MJD", "FIBERID", "TEFF_ADOP", "FEH_ADOP", "LOGG_ADOP", "RV_ADOP", "TEFF_ADOP_UNC", "STAR_ID"]


def good_catalog(folder, n=6):
    from helpers import catalog_row, write_star

    rows = []
    for i in range(n):
        write_star(folder, 500, 55000, i + 1, 10.0 * i)
        rows.append(catalog_row(500, 55000, i + 1, 10.0 * i, STAR_ID=100 + i))
    return pd.DataFrame(rows)


def check_catalog_case(tmp_path, spectra, cat: pd.DataFrame, rng, k: int) -> dict:
    """Damage random cells, run ``prepare``; each row must be kept with the right numbers or rejected by name."""
    bad = cat.astype(object).copy()
    hit = np.zeros((len(cat), len(FUZZ_COLUMNS)), bool)
    text_id = np.zeros(len(cat), bool)  # STAR_ID "abc": text is a valid star ID
    for _ in range(int(rng.integers(1, 6))):
        i, j = int(rng.integers(0, len(cat))), int(rng.integers(0, len(FUZZ_COLUMNS)))
        junk = CELL_JUNK[int(rng.integers(0, len(CELL_JUNK)))]
        bad.iloc[i, bad.columns.get_loc(FUZZ_COLUMNS[j])] = junk
        hit[i, j] = True
        if FUZZ_COLUMNS[j] == "STAR_ID":
            text_id[i] = junk == "abc"
    path = tmp_path / f"cat{k}.csv"
    bad.to_csv(path, index=False)
    out = tmp_path / f"ds{k}"
    try:
        prep.prepare(path, spectra, out, workers=1, progress=False)
    except NoUsableInput:
        return {"nothing usable": 1}
    rej = pd.read_csv(out / "rejects.csv")
    assert set(rej.reason) <= {"no_file", "missing_rv", "no_catalog_row", "duplicate_row"}, rej
    with Dataset(out) as ds:
        m, lab, err = ds.meta(), ds.labels(), ds.label_err()
    col = {c: j for j, c in enumerate(FUZZ_COLUMNS)}
    assert len(m) + int((rej.reason != "no_catalog_row").sum()) == len(cat)  # every row kept or rejected
    for r in range(len(m)):
        i = int(m.fiberid[r]) - 1  # the catalog row of this spectrum (FIBERID i+1)
        assert not hit[i, col["RV_ADOP"]] and not hit[i, col["PLATE"]] and not hit[i, col["MJD"]]
        for jl, name in enumerate(["TEFF_ADOP", "FEH_ADOP", "LOGG_ADOP"]):
            want = np.nan if hit[i, col[name]] else cat[name][i]
            np.testing.assert_equal(lab[r, jl], np.float32(want))
        np.testing.assert_equal(err[r, 0], np.float32(np.nan if hit[i, col["TEFF_ADOP_UNC"]] else cat.TEFF_ADOP_UNC[i]))
        assert m.object_id[r] == ("abc" if text_id[i] else f"0500-55000-{i + 1:04d}" if hit[i, col["STAR_ID"]]
                                  else str(100 + i))
    shutil.rmtree(out)
    return {"kept": len(m), **{k: int(v) for k, v in rej.reason.value_counts().items()}}


def check_catalog_cases(tmp_path, n_cases: int, seed: int) -> dict:
    spectra = tmp_path / "spectra"
    cat = good_catalog(spectra)
    rng = np.random.default_rng(seed)
    counts = {}
    for k in range(n_cases):
        for key, v in check_catalog_case(tmp_path, spectra, cat, rng, k).items():
            counts[key] = counts.get(key, 0) + v
    return counts


def test_fuzz_damaged_catalog_cells(tmp_path):
    counts = check_catalog_cases(tmp_path, 15, seed=16)
    assert counts.get("kept", 0) > 30 and counts.get("no_file", 0) > 0 and counts.get("missing_rv", 0) > 0
