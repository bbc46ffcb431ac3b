"""Atomic file writes: write a temporary sibling, then rename it over the target.

A reader (or a resumed job) never sees half a file, whatever kills the writer.
"""
import os
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text(path, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
