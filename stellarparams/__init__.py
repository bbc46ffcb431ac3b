"""stellarparams: Teff, [Fe/H] and log g from SDSS optical spectra.

Pipeline, one module per stage:
acquire (fetch) -> simulate -> prepare -> train / tune -> evaluate -> predict.
Modules import only layers below them (docs/design.md); this package facade is the top.
"""
from ._version import __version__


def load_model(path):
    """Load a model folder written by `train` (safetensors + JSON; no code is executed).

    Parameters
    ----------
    path : str or Path
        The model folder.

    Returns
    -------
    stellarparams.model_io.Model
    """
    from .model_io import load_model as _load

    return _load(path)


__all__ = ["__version__", "load_model"]
