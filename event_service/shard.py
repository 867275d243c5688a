"""One partition's LMDB shard in log mode: apply a batch of log messages, replay changelog.

The shard is a `UserStore` (the embedded mode's store, one per partition) whose meta also
holds where it stands: the last events-stream sequence applied (`log.position`), the
fencing epoch of its owner (`log.epoch`) and the last changelog message it contains
(`log.changelog_seq`), each written in the same txn as the state they describe. Every
write runs on the worker's one shard thread (LMDB allows one write txn per env);
snapshot copies read it from another (`UserStore.copy_to`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lmdb
from google.protobuf.message import DecodeError

from event_service.server import to_event
from event_service.writer import WriterConfig
from index.apply import Outcome, apply_group, keep_rejected
from index.catalog import CatalogSnapshot
from index.changelog import (
    CHANGELOG_KEY,
    EPOCH_KEY,
    POSITION_KEY,
    RecordingWriter,
    encode,
    replay,
)
from index.events import Event, Limits, Rejection, check_batch
from index.store import StoreWriter, UserStore
from index.user_stats import StatsCache
from recsys.v1 import events_pb2


@dataclass(frozen=True)
class LogMessage:
    """An event message as read from the log: its stream sequence and payload."""

    sequence: int
    payload: bytes


@dataclass(frozen=True)
class ChangelogEntry:
    """A changelog message: its stream sequence, the epoch and position it commits."""

    sequence: int
    epoch: int
    position: int
    payload: bytes


@dataclass
class Prepared:
    """An open write txn and the changelog payload that must be published before it
    commits."""

    txn: lmdb.Transaction
    payload: bytes
    position: int
    applied: int  # new events
    duplicates: int
    rejected: int
    unknown_items: int = 0  # new events of items the model does not know


class Shard:
    """A partition's store and position; opened by its owner (or a new owner)."""

    def __init__(self, partition: int, path: Path, map_size: int, max_map_size: int) -> None:
        self.partition = partition
        self.store = UserStore(path, map_size=map_size, max_map_size=max_map_size)
        self.position = int(self.store.get_meta(POSITION_KEY) or 0)
        self.epoch = int(self.store.get_meta(EPOCH_KEY) or 0)
        self.changelog_seq = int(self.store.get_meta(CHANGELOG_KEY) or 0)
        self._rejected_seq = itertools.count(int(time.time() * 1e6))

    def replay(self, entries: Sequence[ChangelogEntry]) -> None:
        """Apply changelog entries past the shard's own, in one txn (restore, catch-up)."""
        def work(writer: StoreWriter) -> tuple[int, int, int]:
            stand = (self.position, self.epoch, self.changelog_seq)
            for entry in entries:
                if entry.sequence <= stand[2]:
                    continue  # already in this shard (the changelog sequence is exact)
                replay(writer, entry.payload)
                stand = (entry.position, entry.epoch, entry.sequence)
            for key, value in zip((POSITION_KEY, EPOCH_KEY, CHANGELOG_KEY), stand,
                                  strict=True):
                writer.put_meta(key, str(value))
            return stand

        self.position, self.epoch, self.changelog_seq = self.store.transact(work)

    def prepare(self, messages: Sequence[LogMessage], epoch: int, catalog: CatalogSnapshot,
                config: WriterConfig, limits: Limits, stats: StatsCache,
                partition_of: Callable[[str], int]) -> Prepared:
        """Apply a batch of log messages in an open txn; the changelog of what it wrote.

        Messages that do not decode, fail the event checks, or carry a user of another
        partition are kept as rejections (with a reason) and never move any state.
        """
        now = time.time()
        events, rejected = self._decode(messages, now, limits, partition_of)
        position = messages[-1].sequence

        def work(writer: StoreWriter) -> tuple[bytes, list[Outcome]]:
            recorder = RecordingWriter(writer)
            keep_rejected(recorder, rejected, now, self._rejected_seq)
            outcomes = apply_group(recorder, catalog, events, config.weights, config.policy,
                                   stats, now)
            writer.put_meta(POSITION_KEY, str(position))
            writer.put_meta(EPOCH_KEY, str(epoch))
            return encode(recorder.ops), outcomes

        txn, (payload, outcomes) = self.store.prepare(work)
        duplicates = sum(o.duplicate for o in outcomes)
        return Prepared(txn, payload, position, len(events) - duplicates, duplicates,
                        len(rejected), sum(not o.item_known and not o.duplicate
                                           for o in outcomes))

    def prepare_claim(self, epoch: int, item_half_life_s: float) -> Prepared:
        """The fencing commit of a new owner: its epoch and the shard's item half-life."""
        def work(writer: StoreWriter) -> bytes:
            recorder = RecordingWriter(writer)
            recorder.set_item_half_life(item_half_life_s)
            writer.put_meta(EPOCH_KEY, str(epoch))
            return encode(recorder.ops)

        txn, payload = self.store.prepare(work)
        return Prepared(txn, payload, self.position, 0, 0, 0)

    def finish(self, prepared: Prepared, epoch: int, changelog_seq: int) -> None:
        """Commit a prepared txn once its changelog message is in the log at `changelog_seq`."""
        try:
            StoreWriter(prepared.txn, self.store.dbs).put_meta(CHANGELOG_KEY,
                                                               str(changelog_seq))
            self.store.commit(prepared.txn)
        except BaseException:
            prepared.txn.abort()  # (an open txn would hold the env); the changelog has it
            raise
        self.position, self.epoch, self.changelog_seq = prepared.position, epoch, changelog_seq

    @staticmethod
    def abort(prepared: Prepared) -> None:
        """Drop a prepared txn (its changelog was refused). The fold-in statistics it put
        in the cache are of record versions never stored: the next event rebuilds them."""
        prepared.txn.abort()

    def _decode(self, messages: Sequence[LogMessage], now: float, limits: Limits,
                partition_of: Callable[[str], int]
                ) -> tuple[list[Event], list[tuple[Rejection, Event]]]:
        events: list[Event] = []
        rejected: list[tuple[Rejection, Event]] = []
        for index, message in enumerate(messages):
            try:
                event = to_event(events_pb2.PlaybackEvent.FromString(message.payload))
            except DecodeError as exc:
                blank = Event("", "", "", 0, None, 0.0)
                rejected.append((Rejection(index, "", "malformed",
                                           f"log message {message.sequence}: {exc}"), blank))
                continue
            if partition_of(event.user_id) != self.partition:
                rejected.append((Rejection(index, event.event_id, "wrong_partition",
                                           f"user {event.user_id!r} is not in partition "
                                           f"{self.partition}"), event))
                continue
            events.append(event)
        # A log message must carry its time (the front end stamps an untimed event with its
        # time of receipt before publishing): a replay must give the same state.
        batch = check_batch(events, now, replace(limits, max_batch_events=max(len(events), 1),
                                                 require_occurred_at=True))
        return batch.valid, rejected + batch.rejected

    def close(self) -> None:
        """Close the shard's env."""
        self.store.close()
