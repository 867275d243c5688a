"""Ranking: a user's top items from their latest vector, filtered inside the ANN search.

The live catalog is one reference held by a `SnapshotFollower` and swapped atomically, so
a request that began on the old snapshot finishes on it. User records are read in a
short LMDB read txn per request, so an event acked a moment ago is already visible
(read-your-writes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index.catalog import CatalogSnapshot
from index.errors import NotFound
from index.filters import CatalogFilters, ItemFilter, allows_rows, clear, count, unpack
from index.follower import SnapshotFollower
from index.model import History
from index.store import UserStore
from index.user_record import UserRecord

PERSONALIZED, POPULAR = "personalized", "popular"
_POPULAR_BLOCK = 4096


@dataclass(frozen=True, kw_only=True)
class RankingConfig:
    """Tuning of the ranker."""

    brute_force_below: int = 4096  # a filter this narrow is searched exactly
    popularity_blend: float = 0.5  # weight of recent plays against batch popularity
    new_release_years: int = 2


@dataclass(frozen=True)
class Scored:
    """One ranked item: its catalog row and score."""

    row: int
    score: float


@dataclass(frozen=True)
class Ranking:
    """The answer to a Recommend call."""

    items: list[Scored]
    source: str
    user_version: int
    catalog: CatalogSnapshot  # the snapshot the rows refer to (it may be swapped since)


@dataclass(frozen=True)
class Row:
    """One named row of a home page."""

    id: str
    title: str
    items: list[Scored]
    source: str


@dataclass
class LiveCatalog:
    """A snapshot with what is derived from it: filter bitmaps and the popularity order."""

    catalog: CatalogSnapshot
    filters: CatalogFilters
    trending: np.ndarray = field(default_factory=lambda: np.zeros(0))  # recent counts per row
    trending_order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    popular_order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @staticmethod
    def of(catalog: CatalogSnapshot, recent: np.ndarray, blend: float) -> LiveCatalog:
        """Derive the serving state of a snapshot (and warm its fold-in solver)."""
        _ = catalog.fold_in.gram  # pay for YtY at load, not on the first request
        live = LiveCatalog(catalog, CatalogFilters(catalog))
        live.set_trending(recent, blend)
        return live

    def set_trending(self, recent: np.ndarray, blend: float) -> None:
        """Blend batch popularity with recent play counts into the fallback order."""
        batch = self.catalog.popularity
        score = (1 - blend) * batch / max(float(batch.max()), 1e-9) + \
            blend * recent / max(float(recent.max(initial=0.0)), 1e-9)
        order = np.argsort(-recent, kind="stable")
        # Assigned last: a request reading the orders mid-refresh sees old or new, both valid.
        self.trending, self.trending_order = recent, order[recent[order] > 0]
        self.popular_order = np.argsort(-score, kind="stable")


class Ranker:
    """Recommend, SimilarItems and HomePage over the live catalog and the user store."""

    def __init__(self, snapshots: Path, store: UserStore, config: RankingConfig) -> None:
        """Load the live snapshot (SnapshotError if it cannot be)."""
        self.snapshots, self.store, self.config = snapshots, store, config
        self.catalogs = SnapshotFollower(snapshots, self._serving,
                                         lambda live: live.catalog.model_version)

    @property
    def live(self) -> LiveCatalog:
        """The catalog served now, with its derived state."""
        return self.catalogs.live

    def _serving(self, version: str) -> LiveCatalog:
        catalog = CatalogSnapshot.load(self.snapshots, version, mmap=True)
        return LiveCatalog.of(catalog, self._recent_counts(catalog), self.config.popularity_blend)

    def refresh_trending(self) -> None:
        """Re-read the event service's recent play counts into the popularity order."""
        live = self.live
        live.set_trending(self._recent_counts(live.catalog), self.config.popularity_blend)

    def _recent_counts(self, catalog: CatalogSnapshot) -> np.ndarray:
        recent = np.zeros(len(catalog))
        counts = self.store.item_counts(time.time())
        for item_id, value in counts.items():
            row = catalog.item_index.get(item_id)
            if row is not None:
                recent[row] = value
        return recent

    # -- requests ------------------------------------------------------------------------

    def recommend(self, user_id: str, k: int, spec: ItemFilter,
                  include_watched: bool) -> Ranking:
        """Top k items for the user, or the popularity fallback (source POPULAR)."""
        live = self.live
        record = self._user(live.catalog, user_id)
        vector = self._vector(live.catalog, record)
        allowed = live.filters.bitmap(spec)
        if record is not None and not include_watched:
            allowed = self._without(live, allowed, self._watched(record))
        version = record.version if record else 0
        if vector is None:
            return Ranking(self._popular(live, k, allowed), POPULAR, version, live.catalog)
        return Ranking(self._search(live, vector, k, allowed), PERSONALIZED, version,
                       live.catalog)

    def similar(self, item_id: str, k: int,
                spec: ItemFilter) -> tuple[list[Scored], CatalogSnapshot]:
        """Items nearest to `item_id`'s factor, excluding itself; NotFoundError if unknown."""
        live = self.live
        row = live.catalog.item_index.get(item_id)
        if row is None:
            raise NotFound(f"unknown item {item_id!r}")
        allowed = self._without(live, live.filters.bitmap(spec), [row])
        vector = np.asarray(live.catalog.item_factors[row], np.float32)
        return self._search(live, vector, k, allowed), live.catalog

    def home(self, user_id: str, k: int,
             spec: ItemFilter) -> tuple[list[Row], int, CatalogSnapshot]:
        """The home page rows, no item repeated across rows."""
        live = self.live
        catalog = live.catalog
        record = self._user(catalog, user_id)
        vector = self._vector(catalog, record)
        shown = self._watched(record) if record else []
        base = live.filters.bitmap(spec)  # each row copies it before clearing shown items
        rows: list[Row] = []

        def add(row_id: str, title: str, allowed: np.ndarray | None, query: np.ndarray | None,
                trending: bool = False) -> None:
            allowed = self._without(live, allowed, shown)
            items = (self._search(live, query, k, allowed) if query is not None else
                     self._popular(live, k, allowed, by_trending=trending))
            if items:
                source = PERSONALIZED if query is not None else POPULAR
                rows.append(Row(row_id, title, items, source))
                shown.extend(s.row for s in items)

        last = self._last_known(record)
        if last is not None:
            add("because_you_watched", f"Because you watched {catalog.titles[last]}",
                base, np.asarray(catalog.item_factors[last], np.float32))
        add("top_picks", "Top picks for you", base, vector)
        recent_from = max(spec.min_year, live.filters.last_year - self.config.new_release_years)
        if not spec.max_year or spec.max_year >= recent_from:  # else the filter excludes them
            new_spec = ItemFilter(spec.genres_any, spec.genres_none, recent_from, spec.max_year)
            add("new_releases", "New releases for you", live.filters.bitmap(new_spec), vector)
        add("trending", "Trending now", base, None, trending=True)
        return rows, record.version if record else 0, catalog

    # -- internals -----------------------------------------------------------------------

    def _user(self, catalog: CatalogSnapshot, user_id: str) -> UserRecord | None:
        """The user's latest record, with rows for this catalog (remapped if from another)."""
        record = self.store.get_user(user_id)
        return None if record is None else catalog.fit(record)

    @staticmethod
    def _vector(catalog: CatalogSnapshot, record: UserRecord | None) -> np.ndarray | None:
        """The stored vector if it is of this model, else the fold-in of the history.

        After a model change the event service re-folds every user in the background
        (and anyone it sees an event of), so the fold-in here is the exception.
        """
        if record is None:
            return None
        if len(record.vector) == catalog.dim:
            return record.vector
        history = History(*record.known())
        if not len(history.items):
            return None
        return catalog.fold_in.exact([history])[0]

    @staticmethod
    def _watched(record: UserRecord) -> list[int]:
        return record.rows[record.rows >= 0].tolist()  # type: ignore[no-any-return]

    @staticmethod
    def _last_known(record: UserRecord | None) -> int | None:
        if record is None or not (record.rows >= 0).any():
            return None
        known = np.flatnonzero(record.rows >= 0)
        return int(record.rows[known[np.argmax(record.last_at[known])]])

    @staticmethod
    def _without(live: LiveCatalog, allowed: np.ndarray | None,
                 rows: list[int]) -> np.ndarray | None:
        if not rows:
            return allowed
        allowed = live.filters.all.copy() if allowed is None else allowed.copy()
        clear(allowed, rows)
        return allowed

    def _search(self, live: LiveCatalog, vector: np.ndarray, k: int,
                allowed: np.ndarray | None) -> list[Scored]:
        """ANN search restricted by a bitmap; exact over the allowed rows when it is narrow."""
        catalog = live.catalog
        budget = len(catalog) if allowed is None else count(allowed)
        if budget == 0:
            return []
        if budget <= self.config.brute_force_below:
            return self._exact(catalog, vector, k, allowed)
        selector = None if allowed is None else faiss.IDSelectorBitmap(
            len(catalog), faiss.swig_ptr(allowed))
        ids, scores = catalog.search(vector, k, selector)
        found = [Scored(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True)
                 if i >= 0]
        if len(found) < min(k, budget):  # the ANN index gave up early: be exact instead
            return self._exact(catalog, vector, k, allowed)
        return found

    @staticmethod
    def _exact(catalog: CatalogSnapshot, vector: np.ndarray, k: int,
               allowed: np.ndarray | None) -> list[Scored]:
        rows = np.arange(len(catalog)) if allowed is None else \
            np.flatnonzero(unpack(allowed, len(catalog)))
        scores = np.asarray(catalog.item_factors)[rows] @ vector
        top = np.argsort(-scores, kind="stable")[:k]
        return [Scored(int(rows[t]), float(scores[t])) for t in top]

    def _popular(self, live: LiveCatalog, k: int, allowed: np.ndarray | None,
                 by_trending: bool = False) -> list[Scored]:
        # With no recent plays yet, "trending" is the batch popularity.
        by_trending = by_trending and len(live.trending_order) > 0
        order = live.trending_order if by_trending else live.popular_order
        score = live.trending if by_trending else live.catalog.popularity
        top: list[int] = []
        # Walk the popularity order in blocks, testing bits in place: a filter rarely
        # needs more than the first block, and unpacking a 1M-item mask costs ~1 ms.
        for start in range(0, len(order), _POPULAR_BLOCK):
            rows = order[start:start + _POPULAR_BLOCK]
            if allowed is not None:
                rows = rows[allows_rows(allowed, rows)]
            top.extend(rows[:k - len(top)].tolist())
            if len(top) == k:
                break
        return [Scored(r, float(score[r])) for r in top]
