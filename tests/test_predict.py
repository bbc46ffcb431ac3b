"""Model files (save/load/tamper) and `predict` on a mix of good and broken spectrum files."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.table import Table

from stellarparams import load_model
from stellarparams.surveys import sdss
from stellarparams.dataset import Grid
from stellarparams.model_io import ModelFileError, save_model
from stellarparams.physics import rv_from_z
from stellarparams.predict import predict
from stellarparams.preprocess import PrepareConfig, preprocess

from helpers import LOGLAM, TINY_GRID as GRID, tiny_model, write_spectrum as write_star

torch.set_num_threads(1)


def test_save_load_identical_and_tamper_detected(tmp_path):
    m = tiny_model()
    X = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    folder = save_model(m, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.safetensors"]
    back = load_model(folder)
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    assert back.label_names == m.label_names and back.label_ranges == m.label_ranges and back.grid == m.grid
    meta = json.loads((folder / "model.json").read_text())
    for key in ("model_config", "scaler", "grid", "prepare_config", "stellarparams_version", "weights_sha256",
                "label_units", "label_ranges", "dataset_input_hash", "seed"):
        assert key in meta
    # flip one byte of the weights -> clear error naming the file
    w = folder / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="weights.safetensors.*sha256"):
        load_model(folder)
    w.unlink()
    with pytest.raises(ModelFileError, match="weights.safetensors: missing"):
        load_model(folder)
    save_model(m, folder)  # rewriting into an existing folder works
    (folder / "model.json").unlink()
    with pytest.raises(ModelFileError, match="model.json: missing"):
        load_model(folder)


def test_refuses_foreign_architecture(tmp_path):
    folder = save_model(tiny_model(), tmp_path / "model")
    meta = json.loads((folder / "model.json").read_text())
    meta["architecture"] = "os:system"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="refusing"):
        load_model(folder)


def test_grid_mismatch_says_so():
    m = tiny_model()
    with pytest.raises(ValueError, match="grid"):
        m.check_dataset({"grid": Grid(n_pix=4000).to_dict()})
    m.check_dataset({"grid": GRID.to_dict(), "preprocess": PrepareConfig(grid=GRID).to_dict(), "version": m.version})
    with pytest.raises(ValueError, match=r"shape \(N, 64\)"):
        m.predict(np.zeros((2, 4000), np.float32))


def test_rv_from_z_inverts_the_relativistic_doppler_factor():
    from astropy.constants import c

    v = 300.0
    b = v / c.to_value("km/s")
    z = np.sqrt((1 + b) / (1 - b)) - 1
    assert rv_from_z(z) == pytest.approx(v, rel=1e-9)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".fits"])
def test_predict_mix_of_good_and_broken_files(tmp_path, suffix):
    d = tmp_path / "spectra"
    good = [write_star(d / f"spec-1000-52000-{i:04d}.fits", i) for i in range(1, 6)]
    broken = {}
    broken["unreadable"] = d / "spec-1000-52000-0101.fits"
    broken["unreadable"].write_text("this is not a FITS file")
    trunc = write_star(d / "spec-1000-52000-0102.fits", 102)
    trunc.write_bytes(trunc.read_bytes()[:4000])
    broken["truncated"] = trunc
    broken["no_good_pixels"] = write_star(d / "spec-1000-52000-0103.fits", 103, ivar=np.zeros(3800, np.float32))
    broken["not_a_star"] = write_star(d / "spec-1000-52000-0104.fits", 104, objclass="GALAXY")
    nan = 100 * np.ones(3800)
    nan[100:3000] = np.nan
    broken["nonfinite"] = write_star(d / "spec-1000-52000-0105.fits", 105, flux=nan, ivar=np.ones(3800, np.float32))
    missing = d / "spec-1000-52000-0106.fits"
    m = tiny_model()
    out = tmp_path / f"res{suffix}"
    inputs = [d, missing]  # a folder plus a file that does not exist
    summary = predict(m, inputs, out, workers=2, chunk_size=3, progress=False)
    df = Table.read(out).to_pandas() if suffix == ".fits" else pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    if suffix == ".fits":
        for c in ("file", "reject_reason"):
            df[c] = df[c].astype(str).str.strip()
    assert len(df) == 11 and summary["n_files"] == 11 and summary["n_predicted"] == 5 and summary["n_rejected"] == 6
    rows = df.set_index("file")
    for p in good:  # every good file has a prediction equal to the model on the preprocessed file
        r = rows.loc[str(p)]
        assert not r["flag_rejected"] and r["fiberid"] == int(p.name[-9:-5])
        spec = sdss.read_spectrum(p)
        flux, _ = preprocess(spec, rv_from_z(spec.z), PrepareConfig(grid=GRID))
        np.testing.assert_allclose([r["teff"], r["feh"], r["logg"]], m.predict(flux[None])[0], rtol=1e-4)
        assert r["rv"] == pytest.approx(rv_from_z(1e-4), rel=1e-4)
    for why, p in list(broken.items()) + [("missing", missing)]:
        r = rows.loc[str(p)]
        assert r["flag_rejected"] and isinstance(r["reject_reason"], str) and r["reject_reason"], why
        assert np.isnan(r["teff"]) and not r["flag_out_of_range"]
    assert rows.loc[str(broken["not_a_star"]), "reject_reason"] == "not_a_star"
    assert rows.loc[str(missing), "reject_reason"] == "missing_file"
    assert list(tmp_path.glob(".res*")) == []  # no temp file, no lock folder left
    assert not (tmp_path / f".{out.name}.partial").exists()  # the scratch folder and its lock are gone


def test_predict_catalog_rv_and_flags(tmp_path):
    d = tmp_path / "spectra"
    files = [write_star(d / f"spec-1000-52000-{i:04d}.fits", i, snr=s) for i, s in ((1, 30.0), (2, 2.0))]
    cat = tmp_path / "cat.csv"
    pd.DataFrame({"FILE": [f.relative_to(tmp_path) for f in files], "RV_ADOP": [120.0, -9999.0]}).to_csv(cat, index=False)
    m = tiny_model()
    m.label_ranges = {"teff": [1e9, 2e9]}  # every prediction is now out of range
    out = tmp_path / "r.csv"
    predict(m, [cat], out, workers=0, progress=False)
    df = pd.read_csv(out)
    assert df["rv"].iloc[0] == pytest.approx(120.0)                            # from the catalog
    assert df["rv"].iloc[1] == pytest.approx(rv_from_z(1e-4), rel=1e-4)       # -9999 -> file's redshift
    assert df["flag_out_of_range"].all() and not df["flag_rejected"].any()
    assert list(df["flag_low_snr"]) == [False, True]
    # Python API on Spectrum records gives the same numbers
    spec = sdss.read_spectrum(files[0])
    np.testing.assert_allclose(m.predict(spec, rv_kms=120.0)[0], df.loc[0, ["teff", "feh", "logg"]].to_numpy(float), rtol=1e-4)


def test_predict_resumes_after_kill(tmp_path, monkeypatch):
    import stellarparams.predict as P

    d = tmp_path / "spectra"
    files = [write_star(d / f"spec-1000-52000-{i:04d}.fits", i) for i in range(1, 9)]
    m = tiny_model()
    out = tmp_path / "r.parquet"
    real, seen = P._read_chunk, []

    def dies_on_file_6(items, *a):
        if any(f.endswith("0006.fits") for f, _, _ in items):
            raise KeyboardInterrupt  # the user pressed Ctrl-C
        seen.extend(f for f, _, _ in items)
        return real(items, *a)

    monkeypatch.setattr(P, "_read_chunk", dies_on_file_6)
    with pytest.raises(KeyboardInterrupt, match="4 of 8 spectra are kept.*resume"):
        predict(m, [d], out, workers=0, chunk_size=2, part_chunks=2, progress=False)  # parts of 4 files
    assert not out.exists() and len(seen) == 4  # part 0 (files 1-4) finished, part 1 did not
    seen.clear()
    monkeypatch.setattr(P, "_read_chunk", lambda items, *a: (seen.extend(f for f, _, _ in items), real(items, *a))[1])
    s = predict(m, [d], out, workers=0, chunk_size=2, part_chunks=2, progress=False)
    assert sorted(seen) == [str(f) for f in files[4:]] and s["resumed_from"] == 4
    df = pd.read_parquet(out)
    assert list(df["file"]) == [str(f) for f in files] and not df["flag_rejected"].any()
    X = np.stack([preprocess(sdss.read_spectrum(f), rv_from_z(1e-4), PrepareConfig(grid=GRID))[0] for f in files])
    np.testing.assert_allclose(df[["teff", "feh", "logg"]].to_numpy(), m.predict(X), rtol=1e-4)
    assert not (tmp_path / ".r.parquet.partial").exists()


def test_predict_writes_sigma_and_extrapolation_columns(tmp_path):
    from stellarparams.uncertainty import fit_uncertainty

    d = tmp_path / "spectra"
    good = [write_star(d / f"spec-1000-52000-{i:04d}.fits", i, snr=5 + 10 * i) for i in range(1, 7)]
    bad = d / "spec-1000-52000-0101.fits"
    bad.write_text("not FITS")
    m = tiny_model()
    rng = np.random.default_rng(0)  # calibrate the toy model on random "spectra" with random labels
    X = rng.standard_normal((400, 64)).astype(np.float32)
    y = np.column_stack([rng.uniform(4000, 9000, 400), rng.uniform(-3, 0.5, 400), rng.uniform(0, 5, 400)])
    m.uncertainty = fit_uncertainty(m, X[:300], y[:300], X[300:], y[300:])
    folder = save_model(m, tmp_path / "model")
    summary = predict(folder, [d], tmp_path / "out.csv", workers=0, progress=False)
    df = pd.read_csv(tmp_path / "out.csv").set_index("file")
    for c in ("sigma_teff", "sigma_feh", "sigma_logg", "ood_score", "flag_unlike_training", "flag_label_hull"):
        assert c in df.columns
    back = load_model(folder)
    for p in good:
        spec = sdss.read_spectrum(p)
        flux, _ = preprocess(spec, rv_from_z(spec.z), PrepareConfig(grid=GRID))
        full = back.predict_full(flux[None])
        r = df.loc[str(p)]
        np.testing.assert_allclose(r[["sigma_teff", "sigma_feh", "sigma_logg", "ood_score"]].to_numpy(float),
                                   full[["sigma_teff", "sigma_feh", "sigma_logg", "ood_score"]].to_numpy()[0], rtol=1e-4)
        assert (r[["sigma_teff", "sigma_feh", "sigma_logg"]] > 0).all()
    assert df.loc[str(bad), ["sigma_teff", "ood_score"]].isna().all() and not df.loc[str(bad), "flag_unlike_training"]
    assert summary["calibrated"] and summary["n_unlike_training"] == int(df["flag_unlike_training"].sum())


def test_predict_reads_lamost_desi_and_tables_one_row_per_spectrum(tmp_path):
    """Each survey's file goes through the model's own preprocessing; a DESI coadd gives one row per
    TARGETID, its all-zero-ivar target is a named reject, and the rows equal Model.predict on the records."""
    from stellarparams import readers
    from stellarparams.surveys import desi, lamost, tables

    m = tiny_model()
    lam = 10 ** LOGLAM
    rng = np.random.default_rng(0)
    flux = (100 * (lam / 5000) ** -1.5 + rng.normal(size=len(lam))).astype(np.float32)
    ivar = np.full(len(lam), 4.0, np.float32)
    lam_file = tmp_path / lamost.spec_filename(57000, "GAC1", 2, 7)
    from stellarparams.physics import doppler

    lamost.write_spectrum(lam_file, lam, flux, ivar, obsid=77, lmjd=57000, planid="GAC1", spid=2, fiberid=7,
                          z=float(doppler(12.0)) - 1, helio_rv=-7.0)  # the star's RV is c z, not HELIO_RV
    half = len(lam) // 2 + 100  # arms overlap by 200 pixels
    arms = {"B": (lam[:half], np.stack([flux, flux])[:, :half], np.stack([ivar, 0 * ivar])[:, :half], None),
            "R": (lam[half - 200:], np.stack([flux, flux])[:, half - 200:], np.stack([ivar, 0 * ivar])[:, half - 200:],
                  None)}
    desi_file = tmp_path / "coadd-main-bright-5.fits"
    desi.write_coadd(desi_file, [501, 502], arms)
    table_file = tables.write_table(tmp_path / "t.h5", lam, flux[None], ivar[None],
                                    columns={"ID": np.array(["mine"]), "RV": np.array([3.0])}, shared_wave=True)
    cat = tmp_path / "mws.csv"
    pd.DataFrame({"TARGETID": [501, 502], "VRAD": [-20.0, -20.0]}).to_csv(cat, index=False)
    s = predict(m, [lam_file, desi_file, table_file], tmp_path / "p.csv", catalog=cat, workers=0, progress=False)
    df = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert s["n_files"] == 4 and len(df) == 4
    assert list(df["id"].astype(str)) == ["77", "501", "502", "mine"]
    assert list(df["flag_rejected"].astype(str)) == ["False", "False", "True", "False"]
    assert df["reject_reason"][2] == "no_good_pixels" and "502" in df["reject_detail"][2]
    assert list(pd.to_numeric(df["rv"])[[0, 1, 3]]) == pytest.approx([12.0, -20.0, 3.0])  # Z, catalog VRAD, RV
    recs = [readers.read(lam_file)[0], readers.read(desi_file)[0], readers.read(table_file)[0]]
    want = m.predict(recs, rv_kms=[12.0, -20.0, 3.0])
    got = df.loc[[0, 1, 3], ["teff", "feh", "logg"]].apply(pd.to_numeric).to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # plain arrays through the model's prediction path
    np.testing.assert_allclose(m.predict(readers.from_arrays(lam, flux, ivar, rv_kms=3.0)), want[2:], rtol=1e-5)
    # a specutils Spectrum: wavelength in nm, a sigma uncertainty, its radial velocity
    import astropy.units as u
    from astropy.nddata import StdDevUncertainty
    import specutils

    spec = getattr(specutils, "Spectrum", None) or specutils.Spectrum1D
    one = spec(flux=flux * u.Jy, spectral_axis=lam / 10 * u.nm, uncertainty=StdDevUncertainty(ivar ** -0.5),
               radial_velocity=3.0 * u.km / u.s)
    np.testing.assert_allclose(m.predict(one), want[2:], rtol=1e-5)
    two = spec(flux=np.stack([flux, flux]) * u.Jy, spectral_axis=lam * u.AA,
               uncertainty=StdDevUncertainty(np.stack([ivar, ivar]) ** -0.5), radial_velocity=3.0 * u.km / u.s)
    np.testing.assert_allclose(m.predict(two), np.repeat(want[2:], 2, axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="no uncertainty"):
        m.predict(spec(flux=flux * u.Jy, spectral_axis=lam * u.AA))


def test_predict_with_either_reader_gives_the_same_table(tmp_path):
    d = tmp_path / "spectra"
    for i in range(1, 5):
        write_star(d / f"spec-1000-52000-{i:04d}.fits", i)
    (d / "spec-1000-52000-0101.fits").write_bytes((d / "spec-1000-52000-0001.fits").read_bytes()[:5000])  # truncated
    m = tiny_model()
    for reader in ("fast", "fitsio"):
        predict(m, [d], tmp_path / f"{reader}.parquet", workers=1, progress=False, reader=reader)
    fast, fitsio = (pd.read_parquet(tmp_path / f"{r}.parquet") for r in ("fast", "fitsio"))
    pd.testing.assert_frame_equal(fast, fitsio)
    # the truncated file: cfitsio sees its primary HDU only, with either reader
    assert fast.flag_rejected.sum() == 1 and set(fast.reject_reason) == {"", "not_sdss"}


def _name_tree(root, n_plates, per_plate):
    """Empty files named like SDSS spectra, ``per_plate`` in each of ``n_plates`` plate folders (names only)."""
    for p in range(n_plates):
        d = root / f"{1000 + p:04d}"
        d.mkdir(parents=True)
        for f in range(per_plate):
            (d / f"spec-{1000 + p:04d}-52000-{f + 1:04d}.fits").touch()
    return root


def test_folder_walk_gives_the_order_of_the_sorted_file_list(tmp_path):
    from stellarparams.surveys import registry

    for rel in ("a.fits/spec-1-2-3.fits", "a/spec-1-2-4.fits", "a/b/spec-1-2-5.fits", "spec-1-2-6.fits",
                "A/spec-1-2-7.fits", "a-b/spec-1-2-8.fits", "notes.txt", "spec-1-2-9.fits.gz", "z/x.fits"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    (tmp_path / "link").symlink_to(tmp_path / "a")  # a link to a folder is not followed (as rglob)
    for survey in (None, "sdss", "table"):
        walked = list(registry.iter_files(tmp_path, survey))
        assert walked == [str(p) for p in registry.find_files(tmp_path, survey)] and len(walked) >= 6


def test_spool_gives_back_every_kind_of_item():
    from stellarparams.predict import _from_batch, _to_batch

    items = [("a.fits", np.nan, None), ("b.fits", 12.5, (1000, 52000, 7)), ("", -3.0, None),
             ("c.fits", np.nan, {"survey": "desi", "index": 3, "id": "39627"}),
             ("d.fits", 0.0, {"survey": "lamost", "index": None, "id": ""})]
    back = _from_batch(_to_batch(items))
    assert [(f, k) for f, _, k in back] == [(f, k) for f, _, k in items]
    np.testing.assert_array_equal([v for _, v, _ in back], [v for _, v, _ in items])


def test_predict_bookkeeping_memory_does_not_grow_with_the_number_of_inputs(tmp_path):
    """Listing, hashing and spooling 4,000 inputs takes no more Python memory than 400: inputs stream.

    Both runs hold one folder's names (100) and one block of ``rows`` items at most, so the
    peaks should agree within noise; the bound, 30 bytes per extra input (108 kB), is under a
    quarter of what keeping the 3,600 extra (path, rv, ids) tuples costs (~150 bytes each).
    """
    import hashlib
    import tracemalloc

    from stellarparams.predict import iter_inputs, spool_inputs

    peaks = []
    spool_inputs(iter_inputs([_name_tree(tmp_path / "warm", 1, 2)]), tmp_path / "warm.arrow", 256, hashlib.sha256())
    for n_plates in (4, 40):  # after a warm-up: first imports and caches are not the inputs' memory
        folder = _name_tree(tmp_path / f"s{n_plates}", n_plates, 100)
        tracemalloc.start()
        n = spool_inputs(iter_inputs([folder]), tmp_path / f"s{n_plates}.arrow", 256, hashlib.sha256())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert n == 100 * n_plates
    assert peaks[1] - peaks[0] < 30 * 3600, peaks


def test_fits_output_written_in_blocks_keeps_every_value(tmp_path):
    """Blocks are appended one at a time; a later block's longer text must not be cut to the first block's width."""
    from stellarparams.predict import write_frames

    blocks = [pd.DataFrame({"file": ["a.fits", "b.fits"], "teff": [5000.0, np.nan], "flag_rejected": [False, True],
                            "reject_reason": ["", "unreadable"], "plate": np.array([1, 2], np.int32)}),
              pd.DataFrame({"file": ["/a/much/longer/päth [1]/c.fits"], "teff": [6000.5], "flag_rejected": [False],
                            "reject_reason": [""], "plate": np.array([3], np.int32)})]
    out = tmp_path / "o [x].fits"
    assert write_frames(out, [lambda b=b: b for b in blocks], n_rows=3) == 3
    t = Table.read(out, hdu="PREDICTIONS")
    assert [v.decode("utf-8") for v in np.asarray(t["file"])] == ["a.fits", "b.fits", "/a/much/longer/päth [1]/c.fits"]
    assert [v.decode() for v in np.asarray(t["reject_reason"])] == ["", "unreadable", ""]
    np.testing.assert_array_equal(t["teff"], [5000.0, np.nan, 6000.5])
    assert list(t["flag_rejected"]) == [False, True, False] and list(t["plate"]) == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left
