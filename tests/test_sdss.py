"""SDSS readers and writers on files written to the SDSS datamodel, and the SSPP catalog reader."""
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from stellarparams.spectrum import SpectrumError, pixmask
from stellarparams.surveys import sdss


def _spectrum(n=3900, loglam0=3.5800, seed=0):
    rng = np.random.default_rng(seed)
    loglam = loglam0 + 1e-4 * np.arange(n)
    flux = (100 + 20 * np.sin(loglam * 200) + rng.normal(0, 1, n)).astype(np.float32)
    ivar = rng.uniform(0.5, 2, n).astype(np.float32)
    mask = np.zeros(n, np.int32)
    mask[100:105] = pixmask("NODATA")
    mask[200] = pixmask("NEARBADPIXEL")  # informational only, not a bad bit
    return loglam, flux, ivar, mask


def test_spec_lite_round_trip(tmp_path):
    loglam, flux, ivar, mask = _spectrum()
    path = sdss.write_spec_lite(tmp_path / sdss.spec_filename(1234, 56789, 42), loglam, flux, ivar, mask,
                                plate=1234, mjd=56789, fiberid=42, objclass="STAR", z=1.5e-4,
                                header={"RA": 12.5, "DEC": -3.25})
    assert path.name == "spec-1234-56789-0042.fits"
    s = sdss.read_spectrum(path)
    np.testing.assert_allclose(s.loglam, loglam, atol=2e-7)  # stored as float32 like SDSS
    np.testing.assert_array_equal(s.flux, flux)
    np.testing.assert_array_equal(s.ivar, ivar)
    np.testing.assert_array_equal(s.and_mask, mask)
    assert (s.plate, s.mjd, s.fiberid, s.objclass) == (1234, 56789, 42, "STAR")
    assert s.name == "1234-56789-0042"
    assert s.z == pytest.approx(1.5e-4)
    assert s.snr == pytest.approx(np.median(flux * np.sqrt(ivar)), rel=1e-5)
    assert s.header["RA"] == 12.5 and s.header["DEC"] == -3.25
    good = s.good()
    assert not good[100:105].any() and good[200] and good.sum() == len(flux) - 5
    # the datamodel's HDUs are there, in order
    with fits.open(path) as h:
        assert [x.name for x in h] == ["PRIMARY", "COADD", "SPECOBJ", "SPZLINE"]
        assert set(h["COADD"].columns.names) >= {"flux", "loglam", "ivar", "and_mask", "or_mask", "wdisp", "sky", "model"}


def test_spec_without_specobj_uses_primary_header(tmp_path):
    loglam, flux, ivar, _ = _spectrum(n=500)
    h = fits.PrimaryHDU()
    h.header["PLATEID"], h.header["MJD"], h.header["FIBERID"] = 7, 51000, 9
    coadd = fits.BinTableHDU.from_columns([fits.Column("LOGLAM", "E", array=loglam), fits.Column("FLUX", "E", array=flux),
                                           fits.Column("IVAR", "E", array=ivar)], name="COADD")
    fits.HDUList([h, coadd]).writeto(tmp_path / "spec-0007-51000-0009.fits")
    s = sdss.read_spectrum(tmp_path / "spec-0007-51000-0009.fits")
    assert (s.plate, s.mjd, s.fiberid) == (7, 51000, 9)
    assert (s.and_mask == 0).all() and np.isnan(s.z) and s.objclass == ""
    assert s.snr == pytest.approx(np.median(flux * np.sqrt(ivar)), rel=1e-5)


def test_dr7_spspec_round_trip(tmp_path):
    loglam, flux, _, mask = _spectrum(n=3800, loglam0=3.5797)
    err = np.full(len(flux), 2.0, np.float32)
    err[10:20] = 0  # DR7 marks missing pixels with zero error
    path = sdss.write_spspec_dr7(tmp_path / "spSpec-52000-0300-123.fit", 3.5797, flux, err, mask,
                                 plate=300, mjd=52000, fiberid=123, spec_cln=3, z=2.1)
    s = sdss.read_spectrum(path)
    np.testing.assert_allclose(s.loglam, loglam, atol=1e-9)
    np.testing.assert_array_equal(s.flux, flux)
    assert (s.ivar[10:20] == 0).all() and s.ivar[0] == pytest.approx(0.25)
    np.testing.assert_array_equal(s.and_mask, mask)
    assert (s.plate, s.mjd, s.fiberid) == (300, 52000, 123)
    assert s.objclass == "QSO" and s.z == pytest.approx(2.1)
    assert not s.good()[10:20].any()


@pytest.mark.parametrize("kind,reason", [
    ("text", "unreadable"), ("truncated", "unreadable"), ("missing", "missing_file"),
    ("no_coadd", "not_sdss"), ("no_ivar", "missing_columns"), ("dr7_1row", "missing_columns"),
])
def test_read_spectrum_errors(tmp_path, kind, reason):
    loglam, flux, ivar, mask = _spectrum(n=3000)
    path = tmp_path / "spec-0001-50000-0001.fits"
    if kind == "text":
        path.write_text("this is not a FITS file\n" * 100)
    elif kind == "truncated":
        sdss.write_spec_lite(path, loglam, flux, ivar, mask, plate=1, mjd=50000, fiberid=1)
        data = path.read_bytes()
        path.write_bytes(data[: 2880 * 3 + 100])  # cut inside the COADD table
    elif kind == "no_coadd":
        fits.PrimaryHDU(np.zeros((3, 10), np.float32)).writeto(path)
    elif kind == "no_ivar":
        cols = [fits.Column("loglam", "E", array=loglam), fits.Column("flux", "E", array=flux)]
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(path)
    elif kind == "dr7_1row":
        hdu = fits.PrimaryHDU(np.zeros((1, 10), np.float32))
        hdu.header["COEFF0"], hdu.header["COEFF1"] = 3.58, 1e-4
        hdu.writeto(path)
    with pytest.raises(SpectrumError) as e:
        sdss.read_spectrum(path)
    assert e.value.reason == reason
    assert str(path) in str(e.value) and e.value.path == str(path)


def _catalog():
    return pd.DataFrame({"plate": [1, 1, 2], "mjd": [50000, 50000, 50001], "fiber": [1, 2, 3],
                         "teff_adop": [5000.0, -9999.0, 6000.0], "teff_adop_unc": [50.0, -9999.0, 60.0],
                         "feh_adop": [-1.0, -0.5, -9999.0], "feh_adop_err": [0.1, 0.1, 0.2],
                         "logg_adop": [4.0, 2.5, 3.0], "rv_adop": [10.0, -9000.5, 5.0],
                         "flag": [0, -9999, 3], "class": ["STAR ", "STAR", "QSO"]})


@pytest.mark.parametrize("fmt", ["csv", "parquet", "fits"])
def test_read_catalog_formats(tmp_path, fmt):
    df = _catalog()
    path = tmp_path / f"sppParams.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        t = Table.from_pandas(df)
        t["spectrum_2d"] = np.zeros((3, 4))  # a vector column, dropped
        t.write(path)
    cat = sdss.read_catalog(path)
    assert list(cat.columns[:3]) == ["PLATE", "MJD", "FIBERID"]  # upper case, FIBER -> FIBERID
    assert "SPECTRUM_2D" not in cat.columns
    np.testing.assert_array_equal(cat["PLATE"], [1, 1, 2])
    assert np.isnan(cat["TEFF_ADOP"][1]) and cat["TEFF_ADOP"][0] == 5000
    assert np.isnan(cat["RV_ADOP"][1]) and np.isnan(cat["FEH_ADOP"][2]) and np.isnan(cat["TEFF_ADOP_UNC"][1])
    assert np.isnan(cat["FLAG"][1]) and cat["FLAG"][2] == 3  # integer column with a sentinel -> float NaN
    assert list(cat["CLASS"]) == ["STAR", "STAR", "QSO"]
    assert sdss.error_column(cat, "TEFF_ADOP") == "TEFF_ADOP_UNC"
    assert sdss.error_column(cat, "FEH_ADOP") == "FEH_ADOP_ERR"
    assert sdss.error_column(cat, "LOGG_ADOP") is None


def test_read_catalog_column_mapping(tmp_path):
    df = pd.DataFrame({"p": [1], "m": [2], "f": [3], "T": [5000.0], "TEFF_ADOP": [1.0]})
    df.to_csv(tmp_path / "c.csv", index=False)
    cat = sdss.read_catalog(tmp_path / "c.csv", columns={"PLATE": "p", "MJD": "m", "FIBERID": "f", "TEFF_ADOP": "t"})
    assert list(cat.columns) == ["PLATE", "MJD", "FIBERID", "TEFF_ADOP"]
    assert cat["TEFF_ADOP"][0] == 5000.0  # the mapped column wins over the catalog's own
    with pytest.raises(ValueError, match="no column"):
        sdss.read_catalog(tmp_path / "c.csv", columns={"TEFF_ADOP": "teff_spec"})


def test_read_catalog_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        sdss.read_catalog(tmp_path / "nope.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="x.json"):
        sdss.read_catalog(tmp_path / "x.json")
    (tmp_path / "bad.fits").write_text("not fits")
    with pytest.raises(ValueError, match="bad.fits"):
        sdss.read_catalog(tmp_path / "bad.fits")


@pytest.mark.parametrize("folder", ["a[1] b ñ", "x(2)+1", "!bang", "mem:", "-dash"])
def test_paths_are_data_not_fits_syntax(tmp_path, folder):
    loglam, flux, ivar, mask = _spectrum()
    path = sdss.write_spec_lite(tmp_path / folder / sdss.spec_filename(1, 2, 3), loglam, flux, ivar, mask,
                                plate=1, mjd=2, fiberid=3)
    s = sdss.read_spectrum(path)
    assert s.path == str(path) and s.fiberid == 3
    np.testing.assert_array_equal(s.flux, flux)
    assert list((tmp_path / folder).iterdir()) == [path]  # no temp file left beside it


def test_empty_file_says_empty(tmp_path):
    (tmp_path / "spec-0001-00002-0003.fits").write_bytes(b"")
    with pytest.raises(SpectrumError, match="empty file") as e:
        sdss.read_spectrum(tmp_path / "spec-0001-00002-0003.fits")
    assert e.value.reason == "unreadable" and "107" not in str(e.value)


def test_text_and_empty_cells_in_number_columns_are_missing(tmp_path):
    (tmp_path / "c.csv").write_text("PLATE,MJD,FIBERID,TEFF_ADOP,RV_ADOP,NOTE\n1,2,3,abc,,x\n1,2,4,5000,7.5,y\nz,2,5,6000,1,\n")
    cat = sdss.read_catalog(tmp_path / "c.csv")
    assert np.isnan(cat["TEFF_ADOP"][0]) and cat["TEFF_ADOP"][1] == 5000 and np.isnan(cat["RV_ADOP"][0])
    assert np.isnan(cat["PLATE"][2]) and cat["PLATE"].dtype.kind == "f" and cat["NOTE"][1] == "y"


@pytest.mark.parametrize("key,value,gz", [(b"TFIELDS", b"99999999", False), (b"NAXIS2", b"2147483647", False),
                                          (b"NAXIS2", b"2147483647", True)])
def test_absurd_header_is_refused_before_cfitsio_allocates_it(tmp_path, key, value, gz):
    import gzip

    loglam, flux, ivar, mask = _spectrum()
    if key == b"TFIELDS":
        path = sdss.write_spec_lite(tmp_path / "spec-0001-00002-0003.fits", loglam, flux, ivar, plate=1, mjd=2, fiberid=3)
    else:
        path = sdss.write_spspec_dr7(tmp_path / "spSpec-00002-0001-003.fit", loglam[0], flux, 1 / np.sqrt(ivar),
                                     plate=1, mjd=2, fiberid=3)
    data = path.read_bytes()
    i = data.index(key.ljust(8) + b"= ")
    data = data[:i + 10] + value.rjust(20) + data[i + 30:]
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    with pytest.raises(SpectrumError, match="header declares") as e:
        sdss.read_spectrum(path)
    assert e.value.reason == "unreadable"


@pytest.mark.parametrize("vector", [False, True])
def test_fits_catalog_read_with_fitsio_equals_astropy(tmp_path, vector):
    """The fitsio reader of catalogs (no astropy import) gives astropy's table: types, text, nulls, unsigned."""
    cols = [fits.Column("PLATE", "J", array=[1, 2, 3]), fits.Column("F", "D", array=[1.5, np.nan, -9999]),
            fits.Column("E", "E", array=[1, 2, 3]), fits.Column("S", "8A", array=["ab  ", "", " x y "]),
            fits.Column("B", "L", array=[True, False, True]), fits.Column("N", "J", array=[5, -1, 7], null=-1),
            fits.Column("U", "I", array=np.array([1, 2, 40000], np.uint16), bzero=32768),
            fits.Column("U32", "J", array=np.array([1, 2, 4000000000], np.uint32), bzero=2**31),
            fits.Column("K", "K", array=[1, 2, 3]), fits.Column("BY", "B", array=[1, 2, 3]),
            fits.Column("S1", "1A", array=["a", "", "b"]), fits.Column("T", "5A", array=["a\tb", "\t", "nul"])]
    if vector:  # dropped by both readers
        cols.append(fits.Column("M", "3E", array=np.ones((3, 3))))
    path = tmp_path / "sppParams.fits"
    fits.BinTableHDU.from_columns(cols).writeto(path)
    plain = sdss._read_fits_table_plain(path)
    assert plain is not None  # the fitsio path takes it
    pd.testing.assert_frame_equal(plain, sdss._read_fits_table_astropy(path), check_exact=True)
    pd.testing.assert_frame_equal(sdss.read_catalog(path), sdss.read_catalog(sdss._read_fits_table_astropy(path)),
                                  check_exact=True)


def _parquet_catalog(path, stats=True, index=False):
    """An 11-row catalog in row groups of 4 rows whose nulls and -9999 sit in one row group only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 11
    df = pd.DataFrame({"plate": np.arange(n) + 1, "mjd": 50000 + np.arange(n), "fiber": np.arange(n),
                       "teff_adop": np.linspace(4000, 6000, n), "f32": np.arange(n, dtype=np.float32),
                       "count": np.arange(n), "name": [f" s{k} " for k in range(n)], "good": np.arange(n) % 2 == 0})
    df.loc[9, "teff_adop"] = -9999.0  # last row group: NaN there, float64 in every block
    df.loc[1, "count"] = -9999        # first row group: an int column made float64 with NaN
    if index:  # a DataFrame index: pandas metadata names a column that read_catalog drops
        df.index = pd.Index([f"row{k}" for k in range(n)], name="row")
    t = pa.Table.from_pandas(df, preserve_index=index)
    t = t.append_column("flag", pa.array([k if k != 5 else None for k in range(n)], pa.int64()))  # null in group 2
    t = t.append_column("ok", pa.array([True] * 8 + [None, False, True]))                         # null in group 3
    t = t.append_column("note", pa.array([" a "] * 4 + [None] * 4 + ["b", None, "c"]))            # group 2: nulls only
    t = t.append_column("none", pa.array([None] * n, pa.string()))                                 # no text at all
    t = t.append_column("u", pa.array(list(range(n - 1)) + [None], pa.uint16()))
    t = t.append_column("code", pa.array([b"x "] * 9 + [None, b"y"]))                             # bytes: str
    t = t.append_column("nobytes", pa.array([None] * n, pa.binary()))
    pq.write_table(t, path, row_group_size=4, write_statistics=stats)
    return path


@pytest.mark.parametrize("stats,index", [(True, False), (False, False), (True, True)])
def test_parquet_catalog_blocks_and_rows_are_what_read_catalog_gives(tmp_path, monkeypatch, stats, index):
    path = _parquet_catalog(tmp_path / "sppParams.parquet", stats, index)
    cat = sdss.ParquetCatalog.open(path)
    whole = sdss.read_catalog(path)
    assert isinstance(sdss.open_catalog(path), sdss.ParquetCatalog) and cat.n == 11
    assert cat.columns == list(whole.columns) and "FIBERID" in cat.columns and "ROW" not in cat.columns
    assert cat.sentinel == {"TEFF_ADOP", "COUNT"}
    assert cat.numbers == {c for c in whole.columns if sdss.is_number(whole[c])}
    assert whole["FLAG"].dtype == np.float64 and whole["OK"].dtype == object and whole["NONE"].dtype == np.float64
    assert whole["CODE"].dtype == "str" and whole["NOBYTES"].dtype == object
    blocks = list(cat.blocks(3))  # across row groups of 4
    assert [len(b) for b in blocks] == [3, 3, 3, 2]
    got = pd.concat(blocks)
    np.testing.assert_array_equal(got.index, np.arange(11))
    pd.testing.assert_frame_equal(got.reset_index(drop=True), whole, check_exact=True)
    np.testing.assert_array_equal(pd.util.hash_pandas_object(got, index=True),
                                  pd.util.hash_pandas_object(whole, index=True))
    monkeypatch.setattr(sdss, "PARQUET_BATCH", 3)  # read decodes the row groups 3 rows at a time
    for rows in ([9, 1, 5, 5, 0], [10, 2]):  # unsorted, repeated, from three row groups; from the first and last
        rows = np.array(rows)
        pd.testing.assert_frame_equal(cat.read(rows), whole.iloc[rows].set_axis(pd.Index(rows)), check_exact=True)
    pd.testing.assert_frame_equal(cat.read(rows, ["FLAG", "COUNT"]), whole[["FLAG", "COUNT"]].iloc[rows]
                                  .set_axis(pd.Index(rows)), check_exact=True)
    pd.testing.assert_frame_equal(cat.read(slice(4, 8)), whole.iloc[4:8], check_exact=True)


def test_parquet_catalogs_read_in_blocks_differently_are_read_whole(tmp_path):
    df = pd.DataFrame({"PLATE": [1, 2], "MJD": [3, 4], "FIBERID": [5, 6], "TEFF_ADOP": [5000.0, 6000.0]})
    for name, bad in [("text", {"TEFF_ADOP": ["5000", "x"]}), ("upper", {"plate": [1, 2]}),
                      ("nullable", {"N": pd.array([1, None], "Int64")}),
                      ("date", {"D": pd.to_datetime(["2020", "2021"])})]:
        df.assign(**bad).to_parquet(tmp_path / f"{name}.parquet")
        assert sdss.ParquetCatalog.open(tmp_path / f"{name}.parquet") is None, name
    df.to_parquet(tmp_path / "good.pq")
    assert sdss.ParquetCatalog.open(tmp_path / "good.pq").n == 2
    assert sdss.ParquetCatalog.open(tmp_path / "good.csv") is None
