"""Item filters as packed bitmaps, precomputed per snapshot, for FAISS ID selectors.

Bit i of byte i // 8 (little-endian bit order, as `faiss.IDSelectorBitmap` reads it) is
set when item row i may be returned. Per-genre bitmaps and cumulative per-year bitmaps
are built once per snapshot, so a request's filter costs a few ORs/ANDs over n/8 bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from index.catalog import CatalogSnapshot
from index.errors import InvalidArgument
from index.kernels import clear_rows


class FilterError(InvalidArgument):
    """A filter names an unknown genre or an impossible year range."""


@dataclass(frozen=True)
class ItemFilter:
    """Which items may be returned; the empty filter allows every item."""

    genres_any: tuple[str, ...] = ()
    genres_none: tuple[str, ...] = ()
    min_year: int = 0  # 0 = unbounded
    max_year: int = 0

    @property
    def empty(self) -> bool:
        """True when the filter restricts nothing."""
        return not (self.genres_any or self.genres_none or self.min_year or self.max_year)


def pack(allowed: np.ndarray) -> np.ndarray:
    """Pack a boolean row mask into a FAISS bitmap."""
    return np.packbits(allowed, bitorder="little")


def unpack(bitmap: np.ndarray, n: int) -> np.ndarray:
    """The boolean row mask of a bitmap over n items."""
    return np.unpackbits(bitmap, count=n, bitorder="little").view(bool)


def allows_rows(bitmap: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Boolean mask: is each of `rows` allowed by the bitmap (without unpacking it)."""
    return (bitmap[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1 == 1


def count(bitmap: np.ndarray) -> int:
    """Number of allowed items (counted 64 bits at a time)."""
    whole = len(bitmap) // 8 * 8
    return int(np.bitwise_count(np.ascontiguousarray(bitmap[:whole]).view(np.uint64)).sum()) \
        + int(np.bitwise_count(bitmap[whole:]).sum())


def only(bitmap: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A new bitmap of the `rows` that `bitmap` allows."""
    chosen = np.zeros_like(bitmap)
    np.bitwise_or.at(chosen, rows >> 3, np.uint8(1) << (rows & 7).astype(np.uint8))
    return chosen & bitmap


def clear(bitmap: np.ndarray, rows: Sequence[int] | np.ndarray) -> None:
    """Disallow item rows in place (IndexError for a row outside the bitmap)."""
    clear_rows(bitmap, np.ascontiguousarray(rows, np.int64))


class CatalogFilters:
    """The per-snapshot bitmaps, and a filter's bitmap from them."""

    def __init__(self, catalog: CatalogSnapshot) -> None:
        self.n = len(catalog)
        self.all = pack(np.ones(self.n, bool))
        self.none = np.zeros_like(self.all)
        self.genres = {g: pack((catalog.genre_mask >> np.uint64(bit)) & np.uint64(1) == 1)
                       for bit, g in enumerate(catalog.manifest.genres)}
        years = catalog.years.astype(np.int64)
        known = years[years > 0]
        self.first_year = int(known.min()) if len(known) else 0
        self.last_year = int(known.max()) if len(known) else 0
        # before[j]: items with a known year < first_year + j (cumulative, so a range is 2 ops)
        self._before = [pack((years > 0) & (years < y))
                        for y in range(self.first_year, self.last_year + 2)]

    def _years_below(self, year: int) -> np.ndarray:
        """Items with a known year < `year`."""
        j = min(max(year - self.first_year, 0), len(self._before) - 1)
        return self._before[j]

    def bitmap(self, spec: ItemFilter, known: Collection[str] = ()) -> np.ndarray | None:
        """A fresh bitmap of the items `spec` allows, or None when it allows everything.
        A genre only the live items have (`known`) is one no snapshot item has."""
        if spec.empty:
            return None
        if spec.min_year < 0 or spec.max_year < 0 or (
                spec.min_year and spec.max_year and spec.min_year > spec.max_year):
            raise FilterError(f"bad year range [{spec.min_year}, {spec.max_year}]")
        for genre in (*spec.genres_any, *spec.genres_none):
            if genre not in self.genres and genre not in known:
                raise FilterError(f"unknown genre {genre!r}; known: "
                                  f"{sorted({*self.genres, *known})}")
        allowed = self.all.copy()
        if spec.genres_any:
            allowed &= np.bitwise_or.reduce([self.genres.get(g, self.none)
                                             for g in spec.genres_any])
        for genre in spec.genres_none:
            if genre in self.genres:
                allowed &= ~self.genres[genre]
        if spec.min_year or spec.max_year:
            allowed &= self._years_below(spec.max_year + 1 if spec.max_year
                                         else self.last_year + 1)
        if spec.min_year:
            allowed &= ~self._years_below(spec.min_year)
        return allowed
