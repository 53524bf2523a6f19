"""The built-in synthetic demo (kind ``demo``): the CSV layout read from ``<root>/list.csv``, written by the
demo generator (:mod:`pipeline.data.demo`)."""

from __future__ import annotations

import os

from pipeline.data.annotations.base import Dataset, absolute, require_dir
from pipeline.data.annotations.csvlist import load_csv

__all__ = ["load_demo"]


def load_demo(root: str | os.PathLike, *, allow_missing: bool = False) -> Dataset:
    """The demo dataset at ``root`` (its ``list.csv``, :func:`~pipeline.data.annotations.csvlist.load_csv`)."""
    root = absolute(root)
    require_dir(root, "dataset root")
    return load_csv(root / "list.csv", allow_missing=allow_missing, name="demo")
