"""Applying groups to a real LMDB store: statistics kept where they pay, never across models."""


from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import snapshots_dir
from index.apply import FoldInPolicy, apply_group, refold
from index.catalog import CatalogSnapshot
from index.events import Event, EventType, EventWeights
from index.model import AlsParams
from index.snapshot import IndexSpec, write_snapshot
from index.store import UserStore
from index.user_record import UserRecord
from index.user_stats import StatsCache, UserStats

POLICY = FoldInPolicy(stats_min_history=10)


@pytest.fixture()
def cache() -> StatsCache:
    """The writer's in-memory statistics."""
    return StatsCache(1 << 26)


def _events(catalog: CatalogSnapshot, user: str, n: int, start: int = 0) -> list[Event]:
    return [Event(f"{user}-e{start + i}", user, catalog.item_ids[(start + i) * 7 % len(catalog)],
                  int(EventType.PLAY_COMPLETE), 1_000.0 + start + i, 0.8) for i in range(n)]


def _apply(store: UserStore, catalog: CatalogSnapshot, cache: StatsCache,
           events: list[Event]) -> None:
    store.transact(lambda w: apply_group(w, catalog, events, EventWeights(), POLICY, cache,
                                         5_000.0))


def _stored(store: UserStore, cache: StatsCache, user: str) -> tuple[UserRecord,
                                                                       UserStats | None]:
    record = store.get_user(user)
    assert record is not None
    return record, cache.get(user)


def _rotated(tmp_path: Path, catalog: CatalogSnapshot) -> CatalogSnapshot:
    """The catalog in another model space (its factors reversed)."""
    root = snapshots_dir(tmp_path / "data")
    write_snapshot(root, "small-rotated", np.asarray(catalog.item_factors)[:, ::-1].copy(),
                   catalog.item_table(), catalog.popularity, IndexSpec("Flat"),
                   AlsParams.of(catalog.manifest.als))
    return CatalogSnapshot.load(root, "small-rotated")


def _record(catalog: CatalogSnapshot) -> UserRecord:
    return catalog.fit(UserRecord.new("x"))


def _exact(catalog: CatalogSnapshot, record: UserRecord) -> np.ndarray:
    return catalog.fold_in.exact([catalog.history(record)])[0]


def test_statistics_appear_once_the_history_is_long_enough(
        tmp_path: Path, catalog: CatalogSnapshot, cache: StatsCache) -> None:
    with UserStore(tmp_path / "db") as store:
        _apply(store, catalog, cache, _events(catalog, "a", 9))
        record, stats = _stored(store, cache, "a")
        assert stats is None and len(record) == 9  # short: re-solved, nothing stored
        for n in range(9, 40, 3):  # then groups of 3, each updating the statistics
            _apply(store, catalog, cache, _events(catalog, "a", 3, start=n))
        record, stats = _stored(store, cache, "a")
        assert stats is not None and stats.matches(record) and stats.updates == 10
        np.testing.assert_allclose(record.vector, _exact(catalog, record), atol=1e-6)


def test_a_duplicate_in_the_group_or_the_store_changes_nothing(
        tmp_path: Path, catalog: CatalogSnapshot, cache: StatsCache) -> None:
    with UserStore(tmp_path / "db") as store:
        events = _events(catalog, "b", 12)
        _apply(store, catalog, cache, events + events[:3])
        before, stats = _stored(store, cache, "b")
        assert before.version == 12 and stats is not None
        _apply(store, catalog, cache, events)
        after, again = _stored(store, cache, "b")
        assert after.version == 12 and again is not None and again.updates == stats.updates
        np.testing.assert_array_equal(after.vector, before.vector)


def test_not_interested_is_kept_and_moves_neither_the_vector_nor_the_counts(
        tmp_path: Path, catalog: CatalogSnapshot, cache: StatsCache) -> None:
    with UserStore(tmp_path / "db") as store:
        _apply(store, catalog, cache, _events(catalog, "d", 12))
        before, _ = _stored(store, cache, "d")
        counts = store.item_count_entries()
        no = [Event(f"d-no{i}", "d", item, int(EventType.NOT_INTERESTED), 2_000.0, 0.0)
              for i, item in enumerate([catalog.item_ids[3], before.item_id(0), "not-in-it"])]
        plays = _events(catalog, "d", 1, start=20)
        _apply(store, catalog, cache, [no[0], *plays, no[1], no[2], no[0]])  # a duplicate too
        after, _ = _stored(store, cache, "d")
        assert after.dismissed == (catalog.item_ids[3], before.item_id(0), "not-in-it")
        assert after.version == before.version + 4  # three dismissals and one play
        assert len(after) == len(before) + 1  # only the play entered the history
        np.testing.assert_allclose(after.vector, _exact(catalog, after), atol=1e-6)
        now = store.item_count_entries()
        assert now.keys() - counts.keys() <= {plays[0].item_id}
        assert all(now.get(e.item_id) == counts.get(e.item_id) for e in no
                   if e.item_id != plays[0].item_id)  # a dismissal is not a play
        _apply(store, catalog, cache, [Event("e-only", "new-user", catalog.item_ids[0],
                                             int(EventType.NOT_INTERESTED), 2_000.0, 0.0)])
        fresh = store.get_user("new-user")
        assert fresh is not None and fresh.version == 1 and not len(fresh.vector)
        assert fresh.dismissed == (catalog.item_ids[0],) and len(fresh) == 0
        # A record with dismissals and no history yet is kept, not taken for a new user.
        _apply(store, catalog, cache, [Event("e-again", "new-user", catalog.item_ids[1],
                                             int(EventType.NOT_INTERESTED), 2_000.0, 0.0)])
        _apply(store, catalog, cache, _events(catalog, "new-user", 1))
        later = store.get_user("new-user")
        assert later is not None and later.version == 3 and len(later) == 1
        assert later.dismissed == (catalog.item_ids[0], catalog.item_ids[1])


def test_statistics_of_another_model_are_never_used(
        tmp_path: Path, catalog: CatalogSnapshot, cache: StatsCache) -> None:
    rotated = _rotated(tmp_path, catalog)
    with UserStore(tmp_path / "db") as store:
        _apply(store, catalog, cache, _events(catalog, "c", 30))
        _apply(store, catalog, cache, _events(catalog, "c", 1, start=30))
        assert _stored(store, cache, "c")[1].updates == 1  # type: ignore[union-attr]
        _apply(store, rotated, cache, _events(catalog, "c", 1, start=31))
        record, stats = _stored(store, cache, "c")
        assert stats is not None and stats.model_version == "small-rotated"
        assert stats.updates == 0  # rebuilt from the history, not carried over
        np.testing.assert_allclose(record.vector, _exact(rotated, record), atol=1e-6)


def test_refold_moves_stale_users_to_the_live_model(
        tmp_path: Path, catalog: CatalogSnapshot, cache: StatsCache) -> None:
    rotated = _rotated(tmp_path, catalog)
    with UserStore(tmp_path / "db") as store:
        for user, n in (("short", 3), ("long", 30)):
            _apply(store, catalog, cache, _events(catalog, user, n))
        assert cache.get("long") is not None
        moved = store.transact(lambda w: refold(w, rotated, ["short", "long", "nobody"],
                                                cache, 6_000.0))
        assert moved == 2
        for user in ("short", "long"):
            record, stats = _stored(store, cache, user)
            assert record.model_version == "small-rotated" and stats is None
            np.testing.assert_allclose(record.vector, _exact(rotated, record), atol=1e-6)
        assert store.transact(lambda w: refold(w, rotated, ["short", "long"], cache, 0.0)) == 0
        _apply(store, rotated, cache, _events(catalog, "long", 1, start=30))
        record, stats = _stored(store, cache, "long")  # the next event rebuilds them
        assert stats is not None and stats.matches(record) and stats.updates == 0


def test_the_cache_holds_what_fits_and_forgets_the_least_recent(
        tmp_path: Path, catalog: CatalogSnapshot) -> None:
    small = StatsCache(3 * UserStats.build(_record(catalog), catalog.item_factors).nbytes)
    with UserStore(tmp_path / "db") as store:
        for user in ("a", "b", "c", "d"):
            _apply(store, catalog, small, _events(catalog, user, 12))
        assert len(small) == 3 and small.get("a") is None  # evicted: the oldest
        _apply(store, catalog, small, _events(catalog, "a", 1, start=12))
        record, stats = _stored(store, small, "a")  # rebuilt from the history
        assert stats is not None and stats.matches(record) and stats.updates == 0
        np.testing.assert_allclose(record.vector, _exact(catalog, record), atol=1e-6)
