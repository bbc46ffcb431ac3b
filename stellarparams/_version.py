"""The installed package version (a leaf: every module may import it)."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("stellarparams")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
