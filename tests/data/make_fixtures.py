"""Write the compatibility fixtures of tests/test_model_folder.py with the code of the commit
that made them (run from the repository root: ``python tests/data/make_fixtures.py``).

- ``model_v0/``: a tiny model folder as `train` wrote it before the architecture refactor
  (the refactor into model and uncertainty parts), plus ``model_v0_inputs.npy`` and its outputs ``model_v0_pred.npy`` /
  ``model_v0_sigma.npy`` / ``model_v0_ood.npy`` on those inputs.
- ``survey_v0.npz``: every header card and table column of the 3-spectrum simulated survey of
  :func:`survey_v0` (seed 11, defaults, version string pinned), as written by commit c6ccbd1,
  before the instrument shifts existed (regenerated then from code that still wrote the same
  bytes). With every shift at its neutral value the survey must not change.
- ``tiny_run.json``: for the tiny training run of :func:`tiny_run` (fixed seed), the sha256
  of the weights file, the predictions and the calibration coefficients, once without and
  once with out-of-fold calibration models. The same seed must keep giving the same
  predictions and sigma (within a tolerance: see tests/test_model_folder.py). The sigma and
  its coefficients of the out-of-fold run were recorded again when the out-of-fold residuals
  began to be rescaled to the final model's error (``uncertainty._rescaled_oof``).

Everything here is small (< 100 kB) and deterministic with one torch thread on one machine;
another CPU rounds differently, so the weights' sha256 is a record, not something to compare.
"""
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
N_PIX = 48


def tiny_dataset(folder, n=150, p=N_PIX, seed=0):
    """Spectra depending smoothly on three labels, standardized per row (a Dataset)."""
    from stellarparams.dataset import write_dataset

    rng = np.random.default_rng(seed)
    y = np.c_[rng.uniform(4000, 9000, n), rng.uniform(-2.5, 0.5, n), rng.uniform(1, 5, n)]
    z = (y - [6500, -1, 3]) / [1500, 0.9, 1.2]
    A = np.random.default_rng(99).normal(size=(3, p))
    X = np.tanh(z @ A) + 0.4 * (z[:, :1] * z[:, 1:2]) * A[2] + 0.05 * rng.normal(size=(n, p))
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    split = np.repeat([0, 1, 2], [int(0.6 * n), int(0.2 * n), n - int(0.6 * n) - int(0.2 * n)])
    return write_dataset(folder, X, y.astype(np.float32), split)


def tiny_configs(calib_folds=0):
    from stellarparams.config import ModelConfig
    from stellarparams.train import TrainConfig

    mc = ModelConfig(n_in=N_PIX, stem_width=16, block_widths=(8,), heads={"teff": (8,), "feh": (4,), "logg": (8,)},
                     trunk_dropout=0.2)
    tc = TrainConfig(epochs=3, batch_size=32, lr=3e-3, seed=7, n_augment=1, calib_folds=calib_folds)
    return mc, tc


def fixed_inputs(p=N_PIX):
    """Five fixed rows: standardized noise, a ramp, a spike, a constant-ish row and a sine."""
    rng = np.random.default_rng(123)
    x = np.stack([rng.normal(size=p), np.linspace(-2, 2, p), np.eye(p)[p // 2] * p ** 0.5,
                  rng.normal(size=p) * 0.1, np.sin(np.arange(p) / 3.0)])
    return ((x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)).astype(np.float32)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_run(work, calib_folds=0):
    """Train the tiny model into work/model; (model, weights sha256)."""
    from stellarparams.train import train

    torch.set_num_threads(1)
    mc, tc = tiny_configs(calib_folds)
    with tiny_dataset(Path(work) / f"ds{calib_folds}") as ds:
        model = train(ds, Path(work) / f"model{calib_folds}", mc, tc, progress=False)
    return model, sha256(Path(work) / f"model{calib_folds}" / "weights.safetensors")


def record(model, digest):
    x = fixed_inputs()
    pred, sigma = model.predict(x, return_sigma=True)
    u = model.uncertainty
    if hasattr(u, "raw_sigma"):  # since the conformal factors, sigma = k68 x raw sigma; the fixture holds the raw
        from stellarparams.uncertainty import raw_uncertainty

        _, s_mc, noise = raw_uncertainty(model.net, x, u.n_passes, u.seed)
        sigma = u.raw_sigma(s_mc, noise) * model.scale
    return {"weights_sha256": digest, "pred": pred.tolist(), "sigma": sigma.tolist(),
            "a": u.a.tolist(), "b": u.b.tolist(), "c": u.c.tolist(), "n_oof": u.stats["n_oof"]}


def fits_content(folder) -> dict:
    """{"FILE|HDU|CARD" or "FILE|HDU|COLUMN": value or array} for every FITS file under folder,
    plus "FILE" -> text for JSON files: what a survey holds, independent of how it was encoded."""
    import fitsio

    out = {}
    for path in sorted(Path(folder).rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            out[name] = np.array(path.read_text())
        if path.suffix != ".fits":
            continue
        with fitsio.FITS(str(path)) as f:
            for k, hdu in enumerate(f):
                for rec in hdu.read_header().records():
                    if rec["name"] and rec["name"] not in ("COMMENT", "HISTORY", "CHECKSUM", "DATASUM"):
                        out[f"{name}|{k}|card|{rec['name']}"] = np.array(rec["value"])
                if hdu.get_exttype() != "IMAGE_HDU" and hdu.get_nrows():
                    data = hdu.read()
                    for col in data.dtype.names:
                        out[f"{name}|{k}|col|{col}"] = np.asarray(data[col])
    return out


def survey_v0(out):
    """The 3-spectrum survey of ``survey_v0.npz`` written into out."""
    from stellarparams import simulate

    version, simulate.__version__ = simulate.__version__, "0-test"   # the version is in the files
    try:
        simulate.simulate(out, n=3, seed=11, workers=1, progress=False)
    finally:
        simulate.__version__ = version
    return out


def main():
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        np.savez_compressed(HERE / "survey_v0.npz", **fits_content(survey_v0(Path(work) / "survey")))
        runs = {}
        for k in (0, 2):
            model, digest = tiny_run(work, k)
            runs[f"calib_folds={k}"] = record(model, digest)
            if k == 0:
                out = HERE / "model_v0"
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(Path(work) / "model0", out)
                x = fixed_inputs()
                df = model.predict_full(x)
                np.save(HERE / "model_v0_inputs.npy", x)
                np.save(HERE / "model_v0_pred.npy", model.predict(x))
                np.save(HERE / "model_v0_sigma.npy", model.predict(x, return_sigma=True)[1])
                np.save(HERE / "model_v0_ood.npy", df["ood_score"].to_numpy())
    (HERE / "tiny_run.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("wrote", HERE / "model_v0", HERE / "tiny_run.json", file=sys.stderr)


if __name__ == "__main__":
    main()
