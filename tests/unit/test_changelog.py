"""The changelog: a commit's writes, recorded, replay to the same bytes (or not at all)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from index.apply import FoldInPolicy, apply_group, keep_rejected
from index.catalog import CatalogSnapshot
from index.changelog import ChangelogError, RecordingWriter, encode, replay
from index.events import Event, EventType, EventWeights, Rejection
from index.store import DB_NAMES, UserStore
from index.user_stats import StatsCache


def _events(catalog: CatalogSnapshot, n: int) -> list[Event]:
    return [Event(f"e{i}", f"u{i % 7}", catalog.item_ids[i * 3 % len(catalog)],
                  int(EventType.PLAY_COMPLETE), 1_000.0 + i, 1.0) for i in range(n)]


def _dump(store: UserStore, skip: tuple[str, ...] = ()) -> dict[str, list[tuple[bytes, bytes]]]:
    with store.env.begin() as txn:
        return {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store.dbs[name])]
                for name in DB_NAMES if name not in skip}


def _commit(store: UserStore, catalog: CatalogSnapshot, events: list[Event]) -> bytes:
    """Apply a group as a worker does, returning its changelog payload."""
    cache = StatsCache(1 << 26)

    def work(writer):  # type: ignore[no-untyped-def]
        recorder = RecordingWriter(writer)
        recorder.set_item_half_life(3_600.0)
        keep_rejected(recorder, [(Rejection(0, "bad", "invalid_type", "no"), events[0])],
                      2_000.0, itertools.count())
        apply_group(recorder, catalog, events, EventWeights(), FoldInPolicy(stats_min_history=5),
                    cache, 2_000.0)
        return encode(recorder.ops)

    return store.transact(work)


def test_replaying_the_changelog_rebuilds_the_store_byte_for_byte(
        tmp_path: Path, catalog: CatalogSnapshot) -> None:
    events = _events(catalog, 300)
    with UserStore(tmp_path / "owner") as owner, UserStore(tmp_path / "copy") as copy:
        payloads = [_commit(owner, catalog, events[:150]), _commit(owner, catalog, events[100:])]
        for payload in payloads:  # the second group repeats 50 events: deduplicated
            copy.transact(lambda w, p=payload: replay(w, p))
        assert _dump(copy) == _dump(owner)
        assert owner.get_user("u0").version == len([e for e in events if e.user_id == "u0"])


def test_a_replica_keeps_users_counts_and_meta_but_not_dedupe_state(
        tmp_path: Path, catalog: CatalogSnapshot) -> None:
    with UserStore(tmp_path / "owner") as owner, UserStore(tmp_path / "replica") as replica:
        payload = _commit(owner, catalog, _events(catalog, 40))
        assert replica.transact(lambda w: replay(w, payload, users_only=True)) == 7
        kept = ("seen", "seen_by_time", "rejected")
        assert _dump(replica, skip=kept) == _dump(owner, skip=kept)
        assert replica.count("seen") == replica.count("rejected") == 0


@pytest.mark.parametrize("cut", [1, 5, -3])
def test_a_truncated_or_corrupt_message_is_refused_and_writes_nothing(
        tmp_path: Path, catalog: CatalogSnapshot, cut: int) -> None:
    with UserStore(tmp_path / "owner") as owner, UserStore(tmp_path / "copy") as copy:
        payload = _commit(owner, catalog, _events(catalog, 20))
        for bad in (payload[:cut], b"X" + payload, payload[:cut] + b"\xff" * 9):
            with pytest.raises(ChangelogError):
                copy.transact(lambda w, b=bad: replay(w, b))
        assert all(not rows for rows in _dump(copy).values())
