"""The batch inputs as tables: an interaction log, an item catalog, and the two together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.errors import InvalidArgument


class DatasetError(InvalidArgument):
    """Bad or unavailable input data; the message names the file (and line) at fault."""


@dataclass(frozen=True, eq=False)
class Interactions:
    """Implicit-feedback log, one (user, item, weight, timestamp) event per row."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    weights: np.ndarray
    timestamps: np.ndarray

    def __post_init__(self) -> None:
        """Coerce column dtypes and reject columns of unequal length."""
        # Frozen dataclass: coercion has to go through object.__setattr__.
        object.__setattr__(self, "user_ids", np.asarray(self.user_ids, dtype=object))
        object.__setattr__(self, "item_ids", np.asarray(self.item_ids, dtype=object))
        object.__setattr__(self, "weights", np.asarray(self.weights, dtype=np.float32))
        object.__setattr__(self, "timestamps", np.asarray(self.timestamps, dtype=np.int64))
        lengths = {len(self.user_ids), len(self.item_ids), len(self.weights), len(self.timestamps)}
        if len(lengths) != 1:
            raise ValueError(f"Interactions columns differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.user_ids)

    def until(self, timestamp: int) -> Interactions:
        """Rows with timestamp < `timestamp` (the training part)."""
        return self._take(self.timestamps < timestamp)

    def after(self, timestamp: int) -> Interactions:
        """Rows with timestamp >= `timestamp` (the replay part)."""
        return self._take(self.timestamps >= timestamp)

    def sorted_by_time(self) -> Interactions:
        """Rows in timestamp order; ties keep their original order."""
        return self._take(np.argsort(self.timestamps, kind="stable"))

    def _take(self, index: np.ndarray) -> Interactions:
        """Rows selected by a boolean mask or an index array."""
        return Interactions(
            self.user_ids[index], self.item_ids[index], self.weights[index], self.timestamps[index]
        )


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Item catalog: ids, titles, genres and release years (0 when unknown), one per item."""

    item_ids: list[str]
    titles: list[str]
    genres: list[tuple[str, ...]]
    years: np.ndarray

    def __post_init__(self) -> None:
        """Coerce years to int16 and reject columns of unequal length."""
        object.__setattr__(self, "years", np.asarray(self.years, dtype=np.int16))
        lengths = {len(self.item_ids), len(self.titles), len(self.genres), len(self.years)}
        if len(lengths) != 1:
            raise ValueError(f"ItemTable columns differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        """Number of items."""
        return len(self.item_ids)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named interaction log with its item table (and, for synthetic data, the planted truth)."""

    name: str
    interactions: Interactions
    items: ItemTable
    item_clusters: np.ndarray | None = None
    user_clusters: dict[str, int] | None = None
