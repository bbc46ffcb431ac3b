"""stellarparams: Teff, [Fe/H] and log g from SDSS optical spectra.

Pipeline, one module per stage:
acquire (fetch) -> simulate -> prepare -> train / tune -> evaluate -> predict.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("stellarparams")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"


def load_model(path):
    """Load a model folder written by `train` (safetensors + JSON; no code is executed)."""
    from .model_io import load_model as _load

    return _load(path)


__all__ = ["__version__", "load_model"]
