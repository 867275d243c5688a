"""Filter bitmaps: packing, row tests, clearing, and filters against a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest

from index.catalog import CatalogSnapshot
from index.filters import (
    CatalogFilters,
    FilterError,
    ItemFilter,
    allows_rows,
    clear,
    count,
    pack,
    unpack,
)


def test_bitmap_helpers_agree_with_a_boolean_mask() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random(1003) < 0.3
    bitmap = pack(mask)
    np.testing.assert_array_equal(unpack(bitmap, 1003), mask)
    rows = rng.integers(0, 1003, 400)
    np.testing.assert_array_equal(allows_rows(bitmap, rows), mask[rows])
    assert count(bitmap) == mask.sum()
    allowed = np.flatnonzero(mask)[:5]
    clear(bitmap, allowed.tolist())
    assert count(bitmap) == mask.sum() - 5 and not allows_rows(bitmap, allowed).any()


@pytest.mark.parametrize("spec", [
    ItemFilter(genres_any=("genre-01", "genre-04")),
    ItemFilter(genres_none=("genre-00",)),
    ItemFilter(min_year=1990, max_year=1999),
    ItemFilter(genres_any=("genre-02",), genres_none=("genre-05",), min_year=2000),
    ItemFilter(max_year=1951),
])
def test_filter_bitmap_matches_brute_force(catalog: CatalogSnapshot, spec: ItemFilter) -> None:
    filters = CatalogFilters(catalog)
    bitmap = filters.bitmap(spec)
    assert bitmap is not None
    expected = np.array([
        (not spec.genres_any or bool(set(catalog.genres_of(r)) & set(spec.genres_any)))
        and not set(catalog.genres_of(r)) & set(spec.genres_none)
        and (not spec.min_year or catalog.years[r] >= spec.min_year)
        and (not spec.max_year or catalog.years[r] <= spec.max_year)
        for r in range(len(catalog))])
    np.testing.assert_array_equal(unpack(bitmap, len(catalog)), expected)


def test_empty_and_bad_filters(catalog: CatalogSnapshot) -> None:
    filters = CatalogFilters(catalog)
    assert filters.bitmap(ItemFilter()) is None
    with pytest.raises(FilterError, match="unknown genre"):
        filters.bitmap(ItemFilter(genres_any=("jazz",)))
    with pytest.raises(FilterError, match="bad year range"):
        filters.bitmap(ItemFilter(min_year=2001, max_year=2000))
