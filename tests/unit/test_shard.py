"""A partition's shard: commits as changelog entries, replayed into a fresh shard."""

from __future__ import annotations

from pathlib import Path

from event_service.shard import ChangelogEntry, LogMessage, Shard
from event_service.writer import WriterConfig
from index.catalog import CatalogSnapshot
from index.events import Limits
from index.user_stats import StatsCache
from tests.integration.conftest import playback


def _commits(shard: Shard, catalog: CatalogSnapshot, rounds: int) -> list[ChangelogEntry]:
    """Commit `rounds` groups of 50 events as an owner does; the changelog they made."""
    entries, stats = [], StatsCache(1 << 26)
    for r in range(rounds):
        messages = [LogMessage(r * 50 + i + 1, playback(
            f"e{r}-{i}", f"u{i % 9}", catalog.item_ids[(r * 50 + i) % len(catalog)])
            .SerializeToString()) for i in range(50)]
        prepared = shard.prepare(messages, 1, catalog, WriterConfig(), Limits(), stats,
                                 lambda _: 0)
        entries.append(ChangelogEntry(r + 1, 1, prepared.position, prepared.payload))
        shard.finish(prepared, 1, r + 1)
    return entries


def _users(shard: Shard) -> dict[bytes, bytes]:
    with shard.store.env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=shard.store.dbs["users"])}


def test_replay_into_a_shard_whose_map_must_grow_applies_every_entry_once(
        tmp_path: Path, catalog: CatalogSnapshot) -> None:
    owner = Shard(0, tmp_path / "owner", 1 << 26, 1 << 30)
    entries = _commits(owner, catalog, 8)
    copy = Shard(0, tmp_path / "copy", 64 << 10, 1 << 30)  # too small: the txn is rerun
    copy.replay(entries[:3])
    copy.replay(entries)  # the first three again: skipped by their changelog sequence
    assert (copy.position, copy.changelog_seq, copy.epoch) == (400, 8, 1)
    assert _users(copy) == _users(owner)
    assert copy.store.count("seen") == owner.store.count("seen") == 400
    copy.close()
    reopened = Shard(0, tmp_path / "copy", 1 << 26, 1 << 30)  # where it stands is durable
    assert (reopened.position, reopened.changelog_seq) == (400, 8)
