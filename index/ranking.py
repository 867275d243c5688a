"""Ranking: a user's top items from their latest vector, filtered inside the ANN search.

The live catalog is one reference held by a `SnapshotFollower` and swapped atomically, so
a request that began on the old snapshot finishes on it. User records are read in a
short LMDB read txn per request, so an event acked a moment ago is already visible
(read-your-writes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from index.catalog import CatalogSnapshot
from index.errors import NotFound
from index.filters import CatalogFilters, ItemFilter, allows_rows, clear, only, pack
from index.follower import SnapshotFollower
from index.kernels import warm_up
from index.live import (
    CatalogItem,
    LiveItem,
    LiveSegment,
    catalog_version,
    changed_since,
    read_items,
    snapshot_item,
)
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
    live_learn_refresh_s: float = 0.5  # how often learned live vectors reach the segment

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}")
        if not 0.0 <= self.blend_weight <= 1.0:
            raise ValueError(f"blend_weight must be in [0, 1], got {self.blend_weight}")
        if not 1 <= self.recent_plays <= MAX_RECENT or self.neighbour_candidates < 1 \
                or self.recent_half_life_plays < 0 or not 0 <= self.live_learn_refresh_s <= 60:
            raise ValueError(f"recent_plays must be in [1, {MAX_RECENT}], "
                             "neighbour_candidates >= 1, recent_half_life_plays >= 0, "
                             "live_learn_refresh_s in [0, 60]")


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
    live: LiveCatalog  # the catalog the rows refer to (it may be swapped since)
    unknown: tuple[str, ...] = ()  # RankItems: the given ids not servable


@dataclass(frozen=True)
class HomePage:
    """The answer to a HomePage call."""

    rows: list[Row]
    user: UserState
    live: LiveCatalog


@dataclass(frozen=True)
class Row:
    """One named row of a home page."""

    id: str
    title: str
    items: list[Scored]
    source: str


@dataclass
class LiveCatalog:
    """A snapshot with what is derived from it (filter bitmaps, the popularity order) and
    the live segment: the items put since it was built, searched beside its index, and
    the snapshot items not servable now (taken down, outside their window).

    Rows: the snapshot's `[0, n)`, the live items' from `segment.offset` on; one bitmap
    covers both (`allowed`). A new segment makes a new LiveCatalog (`with_segment`), so a
    request that holds one sees one consistent catalog.
    """

    catalog: CatalogSnapshot
    filters: CatalogFilters
    segment: LiveSegment
    servable: np.ndarray  # the rows servable now, both parts (read-only: copy to change)
    counts: dict[str, float] = field(default_factory=dict)  # recent plays per item id
    recent_scale: float = 1.0  # what the recent counts are divided by in the blend
    trending: np.ndarray = field(default_factory=lambda: np.zeros(0))  # recent counts per row
    trending_order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    popular_order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    popular_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # inverse
    popular_score: np.ndarray = field(default_factory=lambda: np.zeros(0))  # blended, per row
    live_recent: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per live item
    live_popular: np.ndarray = field(default_factory=lambda: np.zeros(0))  # blended, per live

    @staticmethod
    def of(catalog: CatalogSnapshot, segment: LiveSegment, counts: dict[str, float],
           blend: float) -> LiveCatalog:
        """Derive the serving state of a snapshot (and warm its fold-in solver and the
        retrieval kernels)."""
        _ = catalog.fold_in.gram  # pay for YtY at load, not on the first request
        warm_up()
        filters = CatalogFilters(catalog)
        live = LiveCatalog(catalog, filters, segment, _servable(filters, segment))
        live.set_trending(counts, blend)
        return live

    def with_segment(self, segment: LiveSegment, blend: float) -> LiveCatalog:
        """This catalog with another live segment (of the same snapshot); the snapshot's
        popularity order is kept (it is recomputed with the counts, `set_trending`)."""
        live = replace(self, segment=segment, servable=_servable(self.filters, segment))
        live._set_live_popularity(blend)
        return live

    def set_trending(self, counts: dict[str, float], blend: float) -> None:
        """Blend batch popularity with recent play counts into the fallback order."""
        catalog = self.catalog
        recent = np.zeros(len(catalog))
        for item_id, value in counts.items():
            row = catalog.item_index.get(item_id)
            if row is not None:
                recent[row] = value
        batch = catalog.popularity
        # One scale for the recent counts of both parts.
        most_recent = max([float(recent.max(initial=0.0)), 1e-9,
                           *(counts.get(i, 0.0) for i in self.segment.item_ids)])
        score = (1 - blend) * batch / max(float(batch.max()), 1e-9) + blend * recent / most_recent
        order = np.argsort(-recent, kind="stable")
        # Assigned last: a request reading the orders mid-refresh sees old or new, both valid.
        popular_order = np.argsort(-score, kind="stable")
        popular_rank = np.empty_like(popular_order)
        popular_rank[popular_order] = np.arange(len(popular_order))
        self.counts, self.recent_scale = counts, most_recent
        self._set_live_popularity(blend)
        self.trending, self.trending_order = recent, order[recent[order] > 0]
        self.popular_order, self.popular_rank = popular_order, popular_rank
        self.popular_score = score

    def _set_live_popularity(self, blend: float) -> None:
        """The live items' recent counts, and their popularity on the snapshot's scale."""
        live_recent = np.array([self.counts.get(i, 0.0) for i in self.segment.item_ids])
        self.live_recent, self.live_popular = live_recent, blend * live_recent / self.recent_scale

    # -- rows of both parts ---------------------------------------------------------------

    def allowed(self, spec: ItemFilter) -> np.ndarray | None:
        """A fresh bitmap of the servable rows the filter allows, or None when every row is
        allowed (FilterError for a genre neither part has, or a bad year range)."""
        segment = self.segment
        snapshot = self.filters.bitmap(spec, known=segment.genre_rows)
        if snapshot is None:  # an empty filter: every servable row
            return self.every() if len(segment.blocked) else None
        snapshot &= self.servable[:len(snapshot)]
        return _joined(snapshot, segment, segment.allows(spec)) if len(segment) else snapshot

    def every(self) -> np.ndarray:
        """A fresh bitmap of every servable row."""
        return self.servable.copy()

    def snapshot_part(self, allowed: np.ndarray | None) -> np.ndarray:
        """A copy of the bitmap with the live rows cleared."""
        part = self.every() if allowed is None else allowed.copy()
        part[self.segment.offset // 8:] = 0
        return part

    def row_of(self, item_id: str) -> int | None:
        """The row of a servable item (None: unknown, taken down, outside its window)."""
        row = self.catalog.item_index.get(item_id)
        if row is None:
            return self.segment.rows.get(item_id)
        return row if allows_rows(self.servable, np.array([row]))[0] else None

    def live_rows(self, item_ids: Sequence[str]) -> list[int]:
        """The rows of those of the items that are live."""
        rows = self.segment.rows
        return [rows[i] for i in item_ids if i in rows]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of the rows (item factors; the live items' own)."""
        offset = self.segment.offset
        if not len(rows) or rows.max() < offset:
            return self.catalog.item_factors[rows]
        out = np.empty((len(rows), self.catalog.dim), np.float32)
        live = rows >= offset
        out[~live] = self.catalog.item_factors[rows[~live]]
        out[live] = self.segment.vectors[rows[live] - offset]
        return out

    def item(self, row: int) -> CatalogItem:
        """The fields of the item at a row."""
        if row >= self.segment.offset:
            return self.segment.items[row - self.segment.offset]
        return snapshot_item(self.catalog, row)


def _servable(filters: CatalogFilters, segment: LiveSegment) -> np.ndarray:
    """The snapshot rows the segment does not block, and its own."""
    snapshot = filters.all.copy()
    clear(snapshot, segment.blocked)
    servable = _joined(snapshot, segment, np.ones(len(segment), bool)) if len(segment) \
        else snapshot
    servable.flags.writeable = False
    return servable


def _joined(snapshot: np.ndarray, segment: LiveSegment, live: np.ndarray) -> np.ndarray:
    """One bitmap of a snapshot part and the live items' (packed from `segment.offset`)."""
    padding = segment.offset // 8 - len(snapshot)
    return np.concatenate([snapshot, np.zeros(padding, np.uint8), pack(live)])


class Ranker:
    """Recommend, SimilarItems, RankItems and HomePage over the live catalog and the user
    store."""

    def __init__(self, snapshots: Path, store: UserStore, config: RankingConfig) -> None:
        """Load the live snapshot (SnapshotError if it cannot be)."""
        self.snapshots, self.store, self.config = snapshots, store, config
        self._live_items: dict[str, LiveItem] = {}  # as of `_live_version` (maintenance)
        self._live_version = -1
        self._rebuilt_at = 0.0
        self.catalogs = SnapshotFollower(snapshots, self._serving,
                                         lambda live: live.catalog.model_version)

    @property
    def live(self) -> LiveCatalog:
        """The catalog served now, with its derived state."""
        return self.catalogs.live

    def _serving(self, version: str) -> LiveCatalog:
        """A snapshot with the live catalog as stored now (so nothing taken down shows)."""
        catalog = CatalogSnapshot.load(self.snapshots, version, mmap=True)
        at = catalog_version(self.store)
        segment = LiveSegment.of(read_items(self.store), catalog, time.time(), at)
        return LiveCatalog.of(catalog, segment, self._counts(), self.config.popularity_blend)

    def refresh_trending(self) -> None:
        """Re-read the event service's recent play counts into the popularity order."""
        self.live.set_trending(self._counts(), self.config.popularity_blend)

    def _counts(self) -> dict[str, float]:
        return self.store.item_counts(time.time())

    def refresh_live(self) -> bool:
        """Follow the store's live catalog into a new segment: puts, take-downs and windows
        that opened or closed at once, what live items learned from plays at most every
        `live_learn_refresh_s` (a rebuild costs ~30 ms at 10,000 live items, and a premiere
        is played many times a second); whether it changed. Maintenance thread only."""
        now, served = time.time(), self.live.segment
        latest = catalog_version(self.store)
        structural = now >= served.next_change
        if latest != self._live_version:
            changed = changed_since(self.store, self._live_version) \
                if self._live_version >= 0 else None
            if changed is None:
                self._live_items, structural = read_items(self.store), True
            else:
                latest, ids = changed
                for item_id, item in read_items(self.store, ids).items():
                    before = self._live_items.get(item_id)
                    structural |= before is None or (before.item, before.taken_down) != \
                        (item.item, item.taken_down)
                    self._live_items[item_id] = item
            self._live_version = latest
        if latest == served.version and not structural or not structural and \
                now - self._rebuilt_at < self.config.live_learn_refresh_s:
            return False
        self._rebuilt_at = now
        items, blend = dict(self._live_items), self.config.popularity_blend
        self.catalogs.update(lambda live: live.with_segment(
            LiveSegment.of(items, live.catalog, now, latest), blend))
        return True

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
        allowed = self._without(live, live.allowed(spec),
                                self._excluded(live, record, watched=not include_watched))
        query = self._query(live, record, retrieval)
        retrieve = self.retriever(live)
        if query is None:
            return Ranking(retrieve.popular(k, allowed), POPULAR, UserState.of(record), live)
        return Ranking(retrieve.personal(query, k, allowed), PERSONALIZED, UserState.of(record),
                       live)

    def similar(self, item_id: str, k: int, spec: ItemFilter,
                retrieval: str | None = None) -> tuple[list[Scored], LiveCatalog]:
        """Items most like `item_id` (itself excluded); NotFound if it is not servable."""
        live = self.live
        row = live.row_of(item_id)
        if row is None:
            raise NotFound(f"unknown item {item_id!r}")
        allowed = self._without(live, live.allowed(spec), [row])
        return self.retriever(live).personal(self._item_query(live, row, retrieval),
                                             k, allowed), live

    def rank(self, user_id: str, item_ids: list[str], spec: ItemFilter,
             retrieval: str | None = None) -> Ranking:
        """The given items the filter allows and the user has not dismissed, ordered for the
        user (by popularity for a user with nothing to go on); the ids not servable in
        `unknown`."""
        live = self.live
        rows = [live.row_of(item_id) for item_id in item_ids]
        unknown = tuple(i for i, row in zip(item_ids, rows, strict=True) if row is None)
        given = np.array([row for row in rows if row is not None], np.int64)
        within = live.allowed(spec)
        allowed = only(live.every() if within is None else within, given)
        record = self._user(live.catalog, user_id)
        clear(allowed, self._excluded(live, record, watched=False))
        query = self._query(live, record, retrieval)
        retrieve = self.retriever(live)
        if query is None:
            return Ranking(retrieve.popular_among(given, allowed), POPULAR, UserState.of(record),
                           live, unknown)
        return Ranking(retrieve.rank(query, given, allowed), PERSONALIZED, UserState.of(record),
                       live, unknown)

    def home(self, user_id: str, k: int, spec: ItemFilter,
             retrieval: str | None = None) -> HomePage:
        """The home page rows, no item repeated across rows."""
        live = self.live
        catalog = live.catalog
        record = self._user(catalog, user_id)
        query = self._query(live, record, retrieval)
        # What is left to show: the filter's items, less the watched ones and (as the rows
        # fill) those shown in an earlier row. One private bitmap, cleared in place.
        left = self._without(live, live.allowed(spec), self._excluded(live, record),
                             always_copy=True)
        assert left is not None
        retrieve = self.retriever(live)
        rows: list[Row] = []

        def add(row_id: str, title: str, items: list[Scored], personal: bool) -> None:
            if items:
                rows.append(Row(row_id, title, items, PERSONALIZED if personal else POPULAR))
                clear(left, [s.row for s in items])

        def best(of: Query | None, within: np.ndarray | None = None, n: int = k,
                 trending: bool = False) -> list[Scored]:
            allowed = left if within is None else within & left
            return retrieve.personal(of, n, allowed) if of is not None else \
                retrieve.popular(n, allowed, by_trending=trending)

        if query is not None and len(query.played):
            last = int(query.played[0])
            add("because_you_watched", f"Because you watched {catalog.titles[last]}",
                best(self._item_query(live, last, retrieval, WATCHED)), True)
        add("top_picks", "Top picks for you", best(query), query is not None)
        # New releases: the titles put since the snapshot first, then its recent years.
        fresh = retrieve.new_releases(query, k, left)
        recent_from = max(spec.min_year, live.filters.last_year - self.config.new_release_years)
        if len(fresh) < k and (not spec.max_year or spec.max_year >= recent_from):
            new_spec = ItemFilter(spec.genres_any, spec.genres_none, recent_from, spec.max_year)
            within = live.snapshot_part(live.allowed(new_spec))
            fresh += best(query, within, k - len(fresh))
        add("new_releases", "New releases for you", fresh, query is not None)
        add("trending", "Trending now", best(None, trending=True), False)
        return HomePage(rows, UserState.of(record), live)

    # -- internals -----------------------------------------------------------------------

    def _user(self, catalog: CatalogSnapshot, user_id: str) -> UserRecord | None:
        """The user's latest record, with rows for this catalog (remapped if from another)."""
        record = self.store.get_user(user_id)
        return None if record is None else catalog.fit(record)

    def _query(self, live: LiveCatalog, record: UserRecord | None,
               retrieval: str | None) -> Query | None:
        """What a user's recommendations are retrieved from (None: nothing to go on). Plays
        of items not servable now name no reason and reach no neighbours."""
        catalog = live.catalog
        vector = self._vector(catalog, record)
        if vector is None or record is None:
            return None
        played, weights = recent_plays(record.rows, record.last_at, self.config.recent_plays,
                                       self.config.recent_half_life_plays)
        if len(live.segment.blocked):
            servable = allows_rows(live.servable, played)
            played, weights = played[servable], weights[servable]
        return Query.of(catalog.neighbours, vector, played, weights,
                        retrieval or self.config.retrieval, segment=live.segment)

    def _item_query(self, live: LiveCatalog, row: int, retrieval: str | None,
                    reason: str = LIKE) -> Query:
        """Items like the one at `row`, every one given `reason` with it as the anchor (a
        live item has no neighbours yet: its vector alone)."""
        neighbours = live.catalog.neighbours if row < len(live.catalog) else None
        return Query.of(neighbours, live.vectors(np.array([row]))[0].astype(np.float32),
                        np.array([row], np.int64), np.ones(1),
                        retrieval or self.config.retrieval, reason, live.segment)

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
    def _excluded(live: LiveCatalog, record: UserRecord | None,
                  watched: bool = True) -> np.ndarray:
        """Rows never shown to the user: the items they dismissed, and (`watched`) those in
        their history (the live ones among the history items the snapshot does not have)."""
        if record is None:
            return np.zeros(0, np.int64)
        index = live.catalog.item_index
        dismissed = [r for r in map(index.get, record.dismissed) if r is not None]
        dismissed += live.live_rows(record.dismissed)
        if not watched:
            return np.array(dismissed, np.int64)
        unknown = np.flatnonzero(record.rows < 0)
        played_live = live.live_rows([record.item_id(int(i)) for i in unknown]) \
            if len(live.segment) and len(unknown) else []
        return np.concatenate([np.array(dismissed + played_live, np.int64),
                               record.rows[record.rows >= 0]])

    @staticmethod
    def _without(live: LiveCatalog, allowed: np.ndarray | None, rows: Sequence[int] | np.ndarray,
                 always_copy: bool = False) -> np.ndarray | None:
        """`allowed` (None: every row) less `rows`, as a new bitmap (or None, unchanged)."""
        if not len(rows) and not always_copy:
            return allowed
        allowed = live.every() if allowed is None else allowed.copy()
        clear(allowed, rows)
        return allowed
