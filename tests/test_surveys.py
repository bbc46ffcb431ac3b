"""Adding a survey is one file: a format registered at runtime is detected, prepared and predicted
with no change anywhere else; the registry answers for the four built-in surveys."""
import re

import numpy as np
import pandas as pd
import pytest
import torch

from stellarparams.dataset import Dataset, Grid
from stellarparams.model import ModelConfig, StellarNet
from stellarparams.model_io import Model, save_model
from stellarparams.predict import predict
from stellarparams.prepare import prepare
from stellarparams.preprocess import PrepareConfig
from stellarparams.spectrum import make_record
from stellarparams.surveys import registry, sdss
from stellarparams.surveys.base import Survey

torch.set_num_threads(1)
GRID = Grid(n_pix=64)


class Fake(Survey):
    """A made-up survey: ``fake-ID.npz`` files of wave/flux/ivar/rv, a catalog keyed by FAKEID."""

    name, title, priority = "fake", "fake", 50
    name_re = re.compile(r"^fake-(\d+)\.npz$")
    labels = {"teff": "T", "feh": "M", "logg": "G"}
    rv_column, id_column = "V", "FAKEID"
    catalog_keys = (("FAKEID",),)

    def read(self, path, reader="fast"):
        with np.load(path) as z:
            return [make_record(z["wave"], z["flux"], z["ivar"], path=path, survey=self.name, rv=float(z["rv"]),
                                ident=self.name_re.match(path.name)[1])]

    def locate_rows(self, cat, files, row_files):
        by_id = {int(self.name_re.match(p.name)[1]): p for p in files}
        return [(by_id[int(i)], None) if int(i) in by_id else None for i in cat["FAKEID"]]


@pytest.fixture
def fake():
    survey = registry.register(Fake())
    yield survey
    registry.unregister("fake")


def write_fake(folder, n):
    folder.mkdir()
    wave = np.geomspace(3700.0, 9200.0, 3000)
    for k in range(n):
        rng = np.random.default_rng(k)
        flux = (wave / 5000) ** -1.5 * (1 - (0.3 + 0.1 * k) * np.exp(-0.5 * ((wave - 6565) / 5) ** 2))
        np.savez(folder / f"fake-{k}.npz", wave=wave, flux=flux + 0.01 * rng.normal(size=wave.size),
                 ivar=np.full(wave.size, 1e4), rv=5.0 * k)


def test_a_registered_survey_is_prepared_and_predicted_with_no_other_change(fake, tmp_path):
    write_fake(tmp_path / "spectra", 4)
    assert registry.detect(tmp_path / "spectra" / "fake-0.npz") == "fake"
    cat = pd.DataFrame({"FAKEID": [0, 1, 2, 3, 9], "T": [5000.0, 5500, 6000, 6500, 7000],
                        "M": [-1.0, -0.5, 0, 0.1, 0.2], "G": [4.0, 4.1, 4.2, 4.3, 4.4], "V": [10.0, -20, 0, 5, 1]})
    prepare(cat, tmp_path / "spectra", tmp_path / "ds", config=PrepareConfig(grid=GRID), workers=1,
                      fractions=(1, 0, 0), progress=False)
    rejects = pd.read_csv(tmp_path / "ds" / "rejects.csv", dtype={"id": str})
    assert list(rejects.reason) == ["no_file"] and list(rejects.id) == ["9"]  # FAKEID 9 has no file
    with Dataset(tmp_path / "ds") as ds:
        assert len(ds) == 4
        np.testing.assert_array_equal(np.sort(ds.labels()[:, ds.label_names.index("teff")]), [5000, 5500, 6000, 6500])

    torch.manual_seed(0)
    cfg = ModelConfig(n_in=64, stem_width=16, block_widths=(8,), heads={"teff": (8,), "feh": (4,), "logg": (8,)})
    model = Model(StellarNet(cfg), ["teff", "feh", "logg"], [6000, -1, 3.5], [1500, 0.8, 1.2], model_config=cfg,
                  label_units=["K", "dex", "dex"], grid=GRID.to_dict(),
                  prepare_config=PrepareConfig(grid=GRID).to_dict(), seed=0)
    folder = save_model(model, tmp_path / "model")
    predict(folder, tmp_path / "spectra", tmp_path / "out.csv", workers=1, progress=False, min_snr=0)
    out = pd.read_csv(tmp_path / "out.csv", dtype={"id": str})
    assert sorted(out.id) == ["0", "1", "2", "3"] and not out.flag_rejected.any()
    assert out.teff.notna().all() and sorted(out.rv) == [0, 5, 10, 15]  # the files' own RVs


def test_without_the_survey_its_files_are_unknown(tmp_path):
    write_fake(tmp_path / "spectra", 1)
    assert "fake" not in registry.names()
    assert registry.find_files(tmp_path / "spectra") == []


def test_detection_by_name_follows_priority():
    assert registry.names() == ("sdss", "lamost", "desi", "table")
    assert [registry.detect(n) for n in ("spec-0266-51602-0001.fits", "spSpec-51602-0266-001.fit.gz",
                                         "spec-55859-F5902_sp01-001.fits", "coadd-main-bright-10000.fits",
                                         "t.parquet")] == ["sdss", "sdss", "lamost", "desi", "table"]
    assert sdss.parse_name("spec-0266-51602-0001.fits") == (266, 51602, 1)
    assert sdss.parse_name("spSpec-51602-0266-001.fit") == (266, 51602, 1)  # DR7: MJD first
    assert sdss.parse_name("spec-55859-F5902_sp01-001.fits") is None
    with pytest.raises(ValueError, match="choose one of sdss, lamost, desi, table"):
        registry.get("gaia")
