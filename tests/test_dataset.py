"""The prepared-dataset store: write, read subsets, metadata."""
import h5py
import numpy as np
import pandas as pd
import pytest

from stellarparams import __version__
from stellarparams.dataset import Dataset, Grid, append_rows, create_dataset, dataset_file, write_dataset


def _arrays(n=50, p=40, seed=0):
    rng = np.random.default_rng(seed)
    flux = rng.normal(size=(n, p)).astype(np.float32)
    labels = np.c_[rng.uniform(4000, 9000, n), rng.uniform(-3, 0.5, n), rng.uniform(0, 5, n)].astype(np.float32)
    labels[3, 1] = np.nan
    split = np.array(["train", "val", "test"] * (n // 3) + ["train"] * (n % 3))
    return flux, labels, split


def test_grid_is_the_papers():
    g = Grid()
    assert g.loglam.shape == (4000,) and g.loglam[0] == 3.5754 and g.loglam[-1] == 3.9670
    assert np.allclose(np.diff(g.loglam), (3.9670 - 3.5754) / 3999)
    assert 10 ** g.loglam[0] == pytest.approx(3762, abs=1) and 10 ** g.loglam[-1] == pytest.approx(9268, abs=1)


def test_write_and_read_round_trip(tmp_path):
    flux, labels, split = _arrays()
    valid = flux > -1.5
    meta = pd.DataFrame({"plate": np.arange(50) + 1000, "mjd": 55000, "fiberid": np.arange(50) % 7,
                         "object_id": [f"star{i // 2}" for i in range(50)], "file": [f"f{i}.fits" for i in range(50)],
                         "rv": np.linspace(-100, 100, 50), "snr": 20.0})
    extra = pd.DataFrame({"TEFF_TRUE": labels[:, 0] + 1.0})
    ds = write_dataset(tmp_path / "ds", flux, labels, split, valid=valid, meta=meta, extra=extra,
                       label_err=np.full_like(labels, 0.5), attrs={"input_hash": "abc", "seed": 7})
    assert not (tmp_path / "ds" / "dataset.h5.tmp").exists()
    with ds:
        assert len(ds) == 50 and ds.n_pix == 40 and ds.label_names == ["teff", "feh", "logg"]
        assert ds.label_units == ["K", "dex", "dex"]
        assert ds.attrs["input_hash"] == "abc" and ds.attrs["seed"] == 7 and ds.attrs["version"] == __version__
        assert ds.grid == Grid(n_pix=40)
        np.testing.assert_array_equal(ds.flux(), flux)
        np.testing.assert_array_equal(ds.valid(), valid)
        np.testing.assert_array_equal(ds.labels(), labels)  # NaN in the same place
        assert (ds.label_err() == 0.5).all()
        np.testing.assert_array_equal(ds.indices("val"), np.flatnonzero(split == "val"))
        np.testing.assert_array_equal(ds.indices(), np.arange(50))
        m = ds.meta()
        assert list(m.split) == list(split) and list(m.object_id) == list(meta.object_id)
        np.testing.assert_allclose(m.rv, meta.rv, rtol=1e-6)
        np.testing.assert_array_equal(m.TEFF_TRUE, extra.TEFF_TRUE)
        assert "n=50" in repr(ds) and "'val': 16" in repr(ds)


def test_defaults_and_numeric_split(tmp_path):
    flux, labels, _ = _arrays(n=6)
    with write_dataset(tmp_path, flux, labels[:, 0], np.array([0, 1, 2, 0, 0, 2]), label_names=["teff"]) as ds:
        assert ds.valid().all() and np.isnan(ds.label_err()).all()
        assert ds.labels().shape == (6, 1) and ds.label_units == ["K"]
        assert list(ds.meta().split) == ["train", "val", "test", "train", "train", "test"]
    with pytest.raises(ValueError, match="label_names"):
        write_dataset(tmp_path / "x", flux, labels[:, 0], np.zeros(6))  # 1 label column, 3 names
    with pytest.raises(ValueError, match="split"):
        write_dataset(tmp_path / "x", flux, labels, np.array(["train", "dev"] * 3))


@pytest.mark.parametrize("idx", [[5, 1, 1, 40, 3], [49, 0], [10, 11, 12, 13], []])
def test_row_subsets_keep_the_asked_order(tmp_path, idx):
    flux, labels, split = _arrays()
    with write_dataset(tmp_path, flux, labels, split) as ds:
        idx = np.array(idx, np.int64)
        assert ds.flux(idx).shape == (len(idx), 40)
        np.testing.assert_array_equal(ds.flux(idx), flux[idx])
        np.testing.assert_array_equal(ds.labels(idx), labels[idx])
        assert len(ds.meta(idx)) == len(idx)


def test_iter_batches_cover_a_split_once(tmp_path):
    flux, labels, split = _arrays(n=100)
    with write_dataset(tmp_path, flux, labels, split) as ds:
        seen = []
        for b, X in ds.iter_batches("train", batch_size=7):
            assert len(b) <= 7
            np.testing.assert_array_equal(X, flux[b])
            seen.extend(b)
        np.testing.assert_array_equal(seen, np.flatnonzero(split == "train"))


def test_appending_blocks_is_chunked_on_disk(tmp_path):
    flux, labels, split = _arrays(n=30)
    meta = pd.DataFrame({"plate": 1, "mjd": 2, "fiberid": np.arange(30), "object_id": "x", "file": "f",
                         "rv": 0.0, "snr": 1.0})
    path = tmp_path / "d.h5"
    with create_dataset(path, 40, ["teff", "feh", "logg"], {"grid": Grid(n_pix=40).to_dict()}, chunk_rows=8) as f:
        for lo in (0, 10, 20):
            n = append_rows(f, flux[lo:lo + 10], np.ones((10, 40), bool), labels[lo:lo + 10],
                            np.zeros((10, 3), np.float32), np.zeros(10, np.uint8), meta.iloc[lo:lo + 10],
                            pd.DataFrame({"A": np.arange(lo, lo + 10.0)}) if lo else None)
        assert n == 30
    with h5py.File(path) as f:
        assert f["flux"].chunks == (8, 40)  # row chunks: any subset is read without the rest
    with Dataset(path) as ds:
        np.testing.assert_array_equal(ds.flux(), flux)
        a = ds.meta()["A"].to_numpy()
        assert np.isnan(a[:10]).all() and (a[10:] == np.arange(10, 30)).all()  # column first seen in block 2


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="stellarparams prepare"):
        Dataset(tmp_path / "nothing")
    assert dataset_file(tmp_path) == tmp_path / "dataset.h5"
    assert dataset_file(tmp_path / "x.h5") == tmp_path / "x.h5"


def test_sigma_round_trip_and_old_datasets_without_it(tmp_path):
    flux, labels, split = _arrays(n=9, p=12)
    sigma = np.abs(flux) + 0.1
    sigma[2, 3:5] = np.inf  # no data there
    with write_dataset(tmp_path / "a", flux, labels, split, sigma=sigma) as ds:
        np.testing.assert_array_equal(ds.sigma(), sigma)
        np.testing.assert_array_equal(ds.sigma([4, 2]), sigma[[4, 2]])
    with write_dataset(tmp_path / "b", flux, labels, split) as ds:  # as written before sigma existed
        assert ds.sigma() is None and ds.flux().shape == (9, 12)
    meta = pd.DataFrame({"plate": 0, "mjd": 0, "fiberid": np.arange(9), "object_id": "x", "file": "",
                         "rv": 0.0, "snr": 1.0})
    with create_dataset(tmp_path / "d.h5", 12, ["teff"], {}, sigma=True) as f, pytest.raises(ValueError, match="sigma"):
        append_rows(f, flux, flux > 0, labels[:, :1], labels[:, :1], np.zeros(9, np.uint8), meta)


def test_meta_decodes_unicode_strings(tmp_path):
    flux, labels, split = _arrays(n=5, p=8)
    flux, labels, split = flux[:3], labels[:3], split[:3]
    meta = pd.DataFrame({"plate": 1, "mjd": 2, "fiberid": [1, 2, 3], "rv": 0.0, "snr": 1.0,
                         "object_id": ["é", "b", "星"], "file": ["a[1] b ñ/spec.fits", "x", "y"]})
    with write_dataset(tmp_path, flux, labels, split, meta=meta) as ds:
        m = ds.meta()
        assert list(m.file) == list(meta.file) and list(m.object_id) == ["é", "b", "星"]
        assert ds.meta([2, 0]).file.tolist() == ["y", "a[1] b ñ/spec.fits"]
