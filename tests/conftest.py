"""Shared fixtures; the helpers they build on are in helpers.py (importable from every test module)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from helpers import ...`, whatever the import mode

from helpers import tiny_dataset  # noqa: E402


@pytest.fixture
def tiny_ds(tmp_path):
    """A 60-row x 48-pixel prepared dataset (:func:`helpers.tiny_dataset`) at tmp_path/ds, closed afterwards."""
    ds = tiny_dataset(tmp_path / "ds", n=60)
    yield ds
    ds.close()
