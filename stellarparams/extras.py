"""Optional dependencies: each stage beyond prepare/train/predict comes with a pip extra.

====================  ==============================  =====================================
extra                 brings                          needed by
====================  ==============================  =====================================
``simulate``          sdss-mangadap (MILES library)   ``simulate``, ``run``
``tune``              optuna, matplotlib              ``tune``
``plots``             matplotlib                      ``evaluate``, ``diagnose``, ``run``
``dask``              dask[distributed]               ``--dask``
``specutils``         specutils                       specutils ``Spectrum`` objects as input
``all``               all of the above
====================  ==============================  =====================================

>>> optuna = requires("tune", "optuna")   # the module, or ImportError naming the extra
"""
from __future__ import annotations

import importlib


def install_hint(extra: str) -> str:
    """The command that installs an extra, e.g. ``pip install 'stellarparams[tune]'``."""
    return f"pip install 'stellarparams[{extra}]'"


def requires(extra: str, module: str):
    """Import an optional dependency; returns the module.

    Parameters
    ----------
    extra : str
        The pip extra of stellarparams that brings it ("simulate", "tune", "plots", ...).
    module : str
        The module to import ("optuna", "matplotlib", "mangadap", ...).

    Raises
    ------
    ImportError
        One line naming the module and the extra to install (the CLI exits 2 with it).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed ({e}); this needs the {extra!r} extra: "
                          f"{install_hint(extra)}") from None
