"""Batch datasets by name: MovieLens-100K or seeded synthetic data, and CSV files."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from index.csvfiles import load_csv
from index.movielens import load_movielens_100k
from index.synthetic import synthetic
from index.tables import Dataset, DatasetError

KNOWN_DATASETS = ("movielens-100k", "synthetic")
__all__ = ["KNOWN_DATASETS", "load", "load_csv"]


def load(name: str, cache_dir: Path, **kwargs: Any) -> Dataset:
    """Load a dataset by name: "movielens-100k" (options: none) or "synthetic" (its options)."""
    if name == "movielens-100k":
        if kwargs:
            raise DatasetError(f"movielens-100k takes no options, got {sorted(kwargs)}")
        return load_movielens_100k(cache_dir)
    if name == "synthetic":
        try:
            inspect.signature(synthetic).bind(**kwargs)
        except TypeError as err:
            raise DatasetError(f"synthetic: bad options {sorted(kwargs)}: {err}") from None
        return synthetic(**kwargs)
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
