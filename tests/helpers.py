"""What several test modules share: the one tiny dataset builder, a tiny network, survey files.

Test modules import from here (``from helpers import ...``; ``conftest.py`` puts this folder on
the path), never from one another.
"""
import hashlib

import h5py
import numpy as np
import pandas as pd
import torch
from astropy.constants import c as C_LIGHT

from stellarparams.config import ModelConfig
from stellarparams.dataset import Dataset, Grid, write_dataset
from stellarparams.model import StellarNet
from stellarparams.model_io import Model
from stellarparams.preprocess import PrepareConfig
from stellarparams.spectrum import Record
from stellarparams.surveys import sdss

# ----------------------------------------------------------------------------- the tiny dataset
TINY = ModelConfig(n_in=48, stem_width=32, block_widths=(16,), heads={"teff": (16,), "feh": (8,), "logg": (16,)})


def tiny_arrays(n=360, n_pix=48, seed=0, missing=0):
    """Spectra that depend smoothly (and non-linearly) on three labels, standardized per row.

    Returns X (n, n_pix) float64, y (n, 3) float32 (teff K, [Fe/H] dex, log g dex) and split (n,)
    0/1/2 = train/val/test, 60/15/25% in row order. ``missing``: that many training rows lack [Fe/H] (NaN).
    """
    rng = np.random.default_rng(seed)
    y = np.c_[rng.uniform(4000, 9000, n), rng.uniform(-2.5, 0.5, n), rng.uniform(1, 5, n)]
    z = (y - [6500, -1, 3]) / [1500, 0.9, 1.2]
    A = np.random.default_rng(99).normal(size=(3, n_pix))
    X = np.tanh(z @ A) + 0.4 * (z[:, :1] * z[:, 1:2]) * A[2] + 0.03 * rng.normal(size=(n, n_pix))
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    split = np.repeat([0, 1, 2], [int(0.6 * n), int(0.15 * n), n - int(0.6 * n) - int(0.15 * n)])
    y = y.astype(np.float32)
    if missing:
        y[rng.choice(int(0.6 * n), missing, replace=False), 1] = np.nan  # some train rows lack [Fe/H]
    return X, y, split


def tiny_dataset(folder, n=360, n_pix=48, seed=0, *, missing=0, meta=False, files=None, teff_true=None, **write_kw):
    """:func:`tiny_arrays` written as a prepared dataset; returns the open :class:`Dataset`.

    meta: add the survey columns (plate, mjd, fiberid, rv, snr 5-80, object_id ``star{i}``, file:
    ``files`` or ""). teff_true: add TEFF_TRUE = teff + teff_true, a simulation's noiseless truth.
    write_kw: passed on to :func:`stellarparams.dataset.write_dataset` (sigma, offset, attrs, ...).
    """
    X, y, split = tiny_arrays(n, n_pix, seed, missing)
    if meta:
        rng = np.random.default_rng(seed + 1)
        write_kw["meta"] = pd.DataFrame({"plate": 1, "mjd": 50000, "fiberid": np.arange(n), "rv": 0.0,
                                         "snr": rng.uniform(5, 80, n), "object_id": [f"star{i}" for i in range(n)],
                                         "file": files if files is not None else ""})
    if teff_true is not None:
        write_kw["extra"] = pd.DataFrame({"TEFF_TRUE": y[:, 0].astype(np.float64) + teff_true})
    return write_dataset(folder, X, y, split, **write_kw)


def dataset_arrays(path):
    """(flux, valid, labels, split, meta, attrs) of a dataset folder, read whole."""
    with Dataset(path) as ds:
        return ds.flux(), ds.valid(), ds.labels(), ds.split.copy(), ds.meta(), ds.attrs


def content_sha256(path) -> str:
    """sha256 of a dataset.h5's every array (name, dtype, shape, bytes) and attribute but its creation time."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        def add(name, obj):
            h.update(name.encode())
            for k in sorted(obj.attrs):
                if k != "created":
                    h.update(f"{k}={obj.attrs[k]!r}".encode())
            if isinstance(obj, h5py.Dataset):
                x = obj[()]
                data = repr(x.tolist()).encode() if x.dtype == object else np.ascontiguousarray(x).tobytes()
                h.update(f"{x.dtype}{np.shape(x)}".encode() + data)
        add("/", f)
        f.visititems(add)
    return h.hexdigest()


# ----------------------------------------------------------------------------- a tiny model on a 64-pixel grid
TINY_GRID = Grid(n_pix=64)
LOGLAM = 3.5780 + 1e-4 * np.arange(3800)


def tiny_model(seed=0):
    """An untrained 64-pixel network as a :class:`Model` (labels teff, feh, logg)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_in=64, stem_width=16, block_widths=(8,), heads={"teff": (8,), "feh": (4,), "logg": (8,)})
    return Model(StellarNet(cfg), ["teff", "feh", "logg"], [6000, -1, 3.5], [1500, 0.8, 1.2], model_config=cfg,
                 label_units=["K", "dex", "dex"], label_ranges={"teff": [4000, 9000], "feh": [-3, 0.5], "logg": [0, 5]},
                 grid=TINY_GRID.to_dict(), prepare_config=PrepareConfig(grid=TINY_GRID).to_dict(), seed=seed)


def write_spectrum(path, fiber, *, objclass="STAR", flux=None, ivar=None, z=1e-4, snr=20.0):
    """An SDSS spec-lite file at ``path``: a power law with an H-alpha line (or ``flux``) on LOGLAM, noise at ``snr``."""
    rng = np.random.default_rng(fiber)
    lam = 10 ** LOGLAM
    f = 100 * (lam / 5000) ** -1.5 * (1 - 0.5 * np.exp(-0.5 * ((lam - 6565) / 5) ** 2)) if flux is None else flux
    err = f / snr if ivar is None else None
    iv = 1 / err ** 2 if ivar is None else ivar
    noisy = f + (rng.normal(size=len(f)) * err if err is not None else 0)
    return sdss.write_spec_lite(path, LOGLAM, noisy, iv, plate=1000, mjd=52000, fiberid=fiber, objclass=objclass, z=z)


# ----------------------------------------------------------------------------- a survey folder for prepare
C_KMS = C_LIGHT.to_value("km/s")
LINES = np.array([3934.8, 4102.9, 4862.7, 5895.9, 6564.6, 8544.4])  # rest wavelengths, Angstrom
SIGMA_LOG = 2.5e-4  # line width in log10 wavelength (2.5 native pixels)


def analytic(rv_kms, n=4700, loglam0=3.5700, noise=0.0, seed=0):
    """Gaussian absorption lines (in log10 lambda) at LINES, observed at rv_kms (relativistic)."""
    loglam = loglam0 + 1e-4 * np.arange(n)
    rest = loglam - 0.5 * np.log10((1 + rv_kms / C_KMS) / (1 - rv_kms / C_KMS))
    flux = 100.0 + 10 * (rest - 3.77)  # gentle slope
    for lam in LINES:
        flux = flux - 40 * np.exp(-0.5 * ((rest - np.log10(lam)) / SIGMA_LOG) ** 2)
    flux = flux + np.random.default_rng(seed).normal(0, noise, n)
    return Record(loglam, flux.astype(np.float32), np.ones(n, np.float32), np.zeros(n, np.int32),
                  plate=1, mjd=2, fiberid=3, objclass="STAR", path="analytic")


def write_star(folder, plate, mjd, fiber, rv=0.0, n=4700, sub="", **kw):
    """An SDSS spec-lite file of :func:`analytic` lines at ``rv`` under ``folder/sub``; returns its path."""
    s = analytic(rv, n=n, noise=0.5, seed=fiber)
    path = folder / sub / sdss.spec_filename(plate, mjd, fiber)
    sdss.write_spec_lite(path, s.loglam, s.flux, s.ivar, s.and_mask, plate=plate, mjd=mjd, fiberid=fiber, **kw)
    return path


def catalog_row(plate, mjd, fiber, rv=0.0, **kw):
    """One SSPP catalog row (labels, RV and a TEFF_TRUE column) for the star of :func:`write_star`."""
    r = dict(PLATE=plate, MJD=mjd, FIBERID=fiber, TEFF_ADOP=4000.0 + fiber, FEH_ADOP=-1.0, LOGG_ADOP=4.0,
             TEFF_ADOP_UNC=50.0, RV_ADOP=rv, TEFF_TRUE=4001.0 + fiber)
    r.update(kw)
    return r


def good_set(tmp_path, n=12, star_ids=False):
    """n good stars under tmp_path/spectra (in two sub-folders) and their catalog; (folder, DataFrame)."""
    spectra = tmp_path / "spectra"
    rows = []
    for i in range(n):
        rv = float(20 * i - 100)
        write_star(spectra, 500, 55000, i + 1, rv, sub=f"{i % 2}")
        rows.append(catalog_row(500, 55000, i + 1, rv, **({"STAR_ID": i // 3} if star_ids else {})))
    return spectra, pd.DataFrame(rows)
