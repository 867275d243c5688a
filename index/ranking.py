"""Ranking: a user's top items from their latest vector, filtered inside the ANN search.

The live catalog is one reference held by a `SnapshotFollower` and swapped atomically, so
a request that began on the old snapshot finishes on it. User records are read in a
short LMDB read txn per request, so an event acked a moment ago is already visible
(read-your-writes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.catalog import CatalogSnapshot
from index.errors import NotFound
from index.filters import CatalogFilters, ItemFilter, clear, only
from index.follower import SnapshotFollower
from index.kernels import warm_up
from index.model import History
from index.neighbours import recent_plays
from index.retrieval import BLEND, LIKE, RETRIEVALS, WATCHED, Query, Retriever, Scored
from index.store import UserStore
from index.user_record import UserRecord

PERSONALIZED, POPULAR = "personalized", "popular"
MAX_RECENT = 4096  # recent plays x up to 1,000 neighbours must fit a query's sort keys


@dataclass(frozen=True, kw_only=True)
class RankingConfig:
    """Tuning of the ranker. The neighbour and blend defaults were chosen on a validation
    window earlier than `make eval`'s test window (`python -m bench.tune --blend`)."""

    brute_force_below: int = 4096  # a filter this narrow is searched exactly
    popularity_blend: float = 0.5  # weight of recent plays against batch popularity
    new_release_years: int = 2
    retrieval: str = BLEND  # when a request does not say
    blend_weight: float = 0.5  # of the neighbours' scores against the vector's
    recent_plays: int = 20  # whose neighbours are candidates
    recent_half_life_plays: float = 3.0  # recency weight 0.5 ** (position / this)
    neighbour_candidates: int = 200  # best neighbours taken to blend

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}")
        if not 0.0 <= self.blend_weight <= 1.0:
            raise ValueError(f"blend_weight must be in [0, 1], got {self.blend_weight}")
        if not 1 <= self.recent_plays <= MAX_RECENT or self.neighbour_candidates < 1 \
                or self.recent_half_life_plays < 0:
            raise ValueError(f"recent_plays must be in [1, {MAX_RECENT}], "
                             "neighbour_candidates >= 1, recent_half_life_plays >= 0")


@dataclass(frozen=True)
class UserState:
    """Which state of the user an answer was computed from (version 0: an unknown user)."""

    version: int = 0
    updated_at: float = 0.0  # when it was written (its last applied event)

    @staticmethod
    def of(record: UserRecord | None) -> UserState:
        """The state of a record (or of no record)."""
        return UserState() if record is None else UserState(record.version, record.updated_at)


@dataclass(frozen=True)
class Ranking:
    """The answer to a Recommend (or RankItems) call."""

    items: list[Scored]
    source: str
    user: UserState
    catalog: CatalogSnapshot  # the snapshot the rows refer to (it may be swapped since)
    unknown: tuple[str, ...] = ()  # RankItems: the given ids not in the catalog


@dataclass(frozen=True)
class HomePage:
    """The answer to a HomePage call."""

    rows: list[Row]
    user: UserState
    catalog: CatalogSnapshot


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
    popular_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # inverse

    @staticmethod
    def of(catalog: CatalogSnapshot, recent: np.ndarray, blend: float) -> LiveCatalog:
        """Derive the serving state of a snapshot (and warm its fold-in solver and the
        retrieval kernels)."""
        _ = catalog.fold_in.gram  # pay for YtY at load, not on the first request
        warm_up()
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
        popular_order = np.argsort(-score, kind="stable")
        popular_rank = np.empty_like(popular_order)
        popular_rank[popular_order] = np.arange(len(popular_order))
        self.trending, self.trending_order = recent, order[recent[order] > 0]
        self.popular_order, self.popular_rank = popular_order, popular_rank


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

    def retriever(self, live: LiveCatalog) -> Retriever:
        """Retrieval over `live` with this ranker's tuning."""
        c = self.config
        return Retriever(live=live, brute_force_below=c.brute_force_below,
                         blend_weight=c.blend_weight, neighbour_candidates=c.neighbour_candidates)

    def recommend(self, user_id: str, k: int, spec: ItemFilter, include_watched: bool,
                  retrieval: str | None = None) -> Ranking:
        """Top k items for the user, or the popularity fallback (source POPULAR)."""
        live = self.live
        record = self._user(live.catalog, user_id)
        allowed = live.filters.bitmap(spec)
        allowed = self._without(live, allowed, self._excluded(live.catalog, record,
                                                              watched=not include_watched))
        query = self._query(live.catalog, record, retrieval)
        retrieve = self.retriever(live)
        if query is None:
            return Ranking(retrieve.popular(k, allowed), POPULAR, UserState.of(record),
                           live.catalog)
        return Ranking(retrieve.personal(query, k, allowed), PERSONALIZED, UserState.of(record),
                       live.catalog)

    def similar(self, item_id: str, k: int, spec: ItemFilter,
                retrieval: str | None = None) -> tuple[list[Scored], CatalogSnapshot]:
        """Items most like `item_id` (itself excluded); NotFoundError if unknown."""
        live = self.live
        row = live.catalog.item_index.get(item_id)
        if row is None:
            raise NotFound(f"unknown item {item_id!r}")
        allowed = self._without(live, live.filters.bitmap(spec), [row])
        return self.retriever(live).personal(self._item_query(live.catalog, row, retrieval),
                                             k, allowed), live.catalog

    def rank(self, user_id: str, item_ids: list[str], spec: ItemFilter,
             retrieval: str | None = None) -> Ranking:
        """The given items the filter allows and the user has not dismissed, ordered for the
        user (by popularity for a user with nothing to go on); the ids not in the catalog in
        `unknown`."""
        live = self.live
        catalog = live.catalog
        rows = [catalog.item_index.get(item_id) for item_id in item_ids]
        unknown = tuple(i for i, row in zip(item_ids, rows, strict=True) if row is None)
        given = np.array([row for row in rows if row is not None], np.int64)
        within = live.filters.bitmap(spec)
        allowed = only(live.filters.all if within is None else within, given)
        record = self._user(catalog, user_id)
        clear(allowed, self._excluded(catalog, record, watched=False))
        query = self._query(catalog, record, retrieval)
        retrieve = self.retriever(live)
        if query is None:
            return Ranking(retrieve.popular_among(given, allowed), POPULAR, UserState.of(record),
                           catalog, unknown)
        return Ranking(retrieve.rank(query, given, allowed), PERSONALIZED, UserState.of(record),
                       catalog, unknown)

    def home(self, user_id: str, k: int, spec: ItemFilter,
             retrieval: str | None = None) -> HomePage:
        """The home page rows, no item repeated across rows."""
        live = self.live
        catalog = live.catalog
        record = self._user(catalog, user_id)
        query = self._query(catalog, record, retrieval)
        # What is left to show: the filter's items, less the watched ones and (as the rows
        # fill) those shown in an earlier row. One private bitmap, cleared in place.
        left = self._without(live, live.filters.bitmap(spec), self._excluded(catalog, record),
                             always_copy=True)
        assert left is not None
        retrieve = self.retriever(live)
        rows: list[Row] = []

        def add(row_id: str, title: str, of: Query | None, within: np.ndarray | None = None,
                trending: bool = False) -> None:
            allowed = left if within is None else within & left
            items = retrieve.personal(of, k, allowed) if of is not None else \
                retrieve.popular(k, allowed, by_trending=trending)
            if items:
                rows.append(Row(row_id, title, items, PERSONALIZED if of else POPULAR))
                clear(left, [s.row for s in items])

        if query is not None:
            last = int(query.played[0])
            add("because_you_watched", f"Because you watched {catalog.titles[last]}",
                self._item_query(catalog, last, retrieval, WATCHED))
        add("top_picks", "Top picks for you", query)
        recent_from = max(spec.min_year, live.filters.last_year - self.config.new_release_years)
        if not spec.max_year or spec.max_year >= recent_from:  # else the filter excludes them
            new_spec = ItemFilter(spec.genres_any, spec.genres_none, recent_from, spec.max_year)
            add("new_releases", "New releases for you", query, live.filters.bitmap(new_spec))
        add("trending", "Trending now", None, trending=True)
        return HomePage(rows, UserState.of(record), catalog)

    # -- internals -----------------------------------------------------------------------

    def _user(self, catalog: CatalogSnapshot, user_id: str) -> UserRecord | None:
        """The user's latest record, with rows for this catalog (remapped if from another)."""
        record = self.store.get_user(user_id)
        return None if record is None else catalog.fit(record)

    def _query(self, catalog: CatalogSnapshot, record: UserRecord | None,
               retrieval: str | None) -> Query | None:
        """What a user's recommendations are retrieved from (None: nothing to go on)."""
        vector = self._vector(catalog, record)
        if vector is None or record is None:
            return None
        played, weights = recent_plays(record.rows, record.last_at, self.config.recent_plays,
                                       self.config.recent_half_life_plays)
        return Query.of(catalog.neighbours, vector, played, weights,
                        retrieval or self.config.retrieval)

    def _item_query(self, catalog: CatalogSnapshot, row: int, retrieval: str | None,
                    reason: str = LIKE) -> Query:
        """Items like the one at `row`, every one given `reason` with it as the anchor."""
        return Query.of(catalog.neighbours, np.asarray(catalog.item_factors[row], np.float32),
                        np.array([row], np.int64), np.ones(1),
                        retrieval or self.config.retrieval, reason)

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
    def _excluded(catalog: CatalogSnapshot, record: UserRecord | None,
                  watched: bool = True) -> np.ndarray:
        """Rows never shown to the user: the items they dismissed, and (`watched`) those in
        their history."""
        if record is None:
            return np.zeros(0, np.int64)
        dismissed = np.fromiter((r for r in map(catalog.item_index.get, record.dismissed)
                                 if r is not None), np.int64)
        return np.concatenate([dismissed, record.rows[record.rows >= 0]]) if watched \
            else dismissed

    @staticmethod
    def _without(live: LiveCatalog, allowed: np.ndarray | None, rows: Sequence[int] | np.ndarray,
                 always_copy: bool = False) -> np.ndarray | None:
        """`allowed` (None: every item) less `rows`, as a new bitmap (or None, unchanged)."""
        if not len(rows) and not always_copy:
            return allowed
        allowed = live.filters.all.copy() if allowed is None else allowed.copy()
        clear(allowed, rows)
        return allowed
