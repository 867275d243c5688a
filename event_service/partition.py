"""Serving one partition in log mode: restore, fence, consume, commit, snapshot.

A `PartitionServer` does what a worker does for each partition it holds a lease on
(`event_service.worker` decides which): bring the shard up to the changelog (from the
latest snapshot in the object store when that is ahead, then the messages after it),
publish a claim that fences any older owner out, then read the partition's events in
stream order from the shard's position and commit them in groups, each commit one
changelog message published before its LMDB txn commits. All LMDB and fold-in work runs
on one shard thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

from event_service.metrics import WorkerMetrics
from event_service.shard import ChangelogEntry, LogMessage, Prepared, Shard
from eventlog import snapshots
from eventlog.jetstream import (
    EPOCH,
    KIND,
    MAX_PAYLOAD,
    OWNER,
    POSITION,
    commit_stand,
    is_wrong_last_sequence,
    last_sequence,
)
from index.catalog import CatalogSnapshot
from index.follower import SnapshotFollower
from index.user_stats import StatsCache

if TYPE_CHECKING:
    from event_service.config import WorkerSettings

log = logging.getLogger("freshrec.worker")
T = TypeVar("T")
_COMMIT_HEADROOM = 64 << 10  # below the max payload, for headers


class Fenced(Exception):
    """A newer owner has claimed the partition: stop, commit nothing more."""


@dataclass
class Owned:
    """A partition this worker holds a lease on, and the task that serves it."""

    partition: int
    epoch: int
    revision: int  # the lease's revision as last written by this worker
    claimed_at: float = field(default_factory=time.monotonic)
    shard: Shard | None = None
    live: bool = False
    snapshot_seq: int = 0  # the changelog sequence of the last snapshot uploaded
    snapshotting: asyncio.Task[None] | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class PartitionServer:
    """Restores, fences and serves the partitions a worker holds; one per worker."""

    def __init__(self, settings: WorkerSettings, catalogs: SnapshotFollower[CatalogSnapshot],
                 metrics: WorkerMetrics) -> None:
        self.settings, self.config, self.log = settings, settings.writer, settings.log
        self.catalogs, self.metrics = catalogs, metrics
        self.id = settings.worker_id
        self.shards_root = settings.data_dir / "shards"
        self.stats = StatsCache(self.config.stats_cache_bytes)  # shard thread only
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="freshrec-shard")
        self._published = 0

    def attach(self, js: JetStreamContext, bucket: ObjectStore) -> None:
        """The log to serve from, and its snapshot bucket (once connected)."""
        self.js, self.snapshots = js, bucket

    async def on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the shard thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def shutdown(self) -> None:
        """Let the shard thread finish what it has, then stop it."""
        self._thread.shutdown(wait=True)

    async def close(self, owned: Owned, final_snapshot: bool) -> None:
        if owned.shard is None:
            return
        if final_snapshot and owned.live:
            await self.snapshot(owned)
        await self.on_thread(owned.shard.close)

    async def serve(self, owned: Owned) -> None:
        """Restore the shard from the changelog, fence the partition, then consume it."""
        p = owned.partition
        path = self.shards_root / f"p{p:04d}"
        owned.shard = shard = await self.open(owned, path)
        try:
            await self.fence(owned)
        except Fenced:
            log.warning("partition %d: a newer owner holds it", p)
            return
        owned.live = True
        self.metrics.handovers.labels(str(p)).inc()
        self.metrics.takeover_seconds.observe(time.monotonic() - owned.claimed_at)
        log.info("partition %d live at position %d (epoch %d, %.2f s after the claim)", p,
                 shard.position, owned.epoch, time.monotonic() - owned.claimed_at)
        while not owned.stopping.is_set():
            try:
                await self._consume(owned)
            except Fenced:
                self.metrics.fenced.labels(str(p)).inc()
                log.warning("partition %d fenced by a newer owner; stopping", p)
                return
            except Exception as exc:  # the log or the disk: start again from the shard
                log.warning("partition %d: %s; resuming from position %d", p, exc,
                            shard.position)
                await asyncio.sleep(0.5)
                await self._restore(owned)

    async def open(self, owned: Owned, path: Path) -> Shard:
        """The partition's shard: the local one, or the snapshot in the log if it is ahead
        (a new host, or one that has been away)."""
        sizes = (self.settings.store_map_bytes, self.settings.store_max_bytes)
        shard = await self.on_thread(Shard, owned.partition, path, *sizes)
        try:
            newest = await snapshots.latest(self.snapshots, owned.partition)
        except BaseException:
            await self.on_thread(shard.close)  # else this process could not open it again
            raise
        if newest > shard.changelog_seq:
            await self.on_thread(shard.close)
            await snapshots.download(self.snapshots, owned.partition, path)
            shard = await self.on_thread(Shard, owned.partition, path, *sizes)
        owned.snapshot_seq = newest
        return shard

    async def snapshot(self, owned: Owned) -> None:
        """Upload a copy of the shard (a read txn: commits go on meanwhile)."""
        shard = owned.shard
        assert shard is not None
        seq = shard.changelog_seq
        try:
            size = await snapshots.upload(
                self.snapshots, owned.partition, shard.store.path, seq,
                shard.store.copy_to)
        except Exception as exc:  # the next round tries again; the changelog has it all
            log.warning("partition %d: snapshot failed: %s", owned.partition, exc)
            return
        owned.snapshot_seq = seq
        self.metrics.snapshot_seq.labels(str(owned.partition)).set(seq)
        if size:
            log.info("partition %d: snapshot at changelog %d (%d bytes)", owned.partition,
                     seq, size)

    async def _restore(self, owned: Owned) -> None:
        """Replay changelog messages the shard does not have yet, in order."""
        shard = owned.shard
        assert shard is not None
        subject = self.log.shard_subject(owned.partition)
        last = await last_sequence(self.js, self.log.shards_stream, subject)
        if last <= shard.changelog_seq:
            return
        sub = await self.js.subscribe(subject, ordered_consumer=True, config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=shard.changelog_seq + 1))
        try:
            batch: list[ChangelogEntry] = []
            while shard.changelog_seq < last:
                msg = await sub.next_msg(timeout=10)
                batch.append(_entry(msg))
                if len(batch) >= 100 or batch[-1].sequence >= last:
                    await self.on_thread(shard.replay, batch)
                    batch = []
        finally:
            await sub.unsubscribe()
        if shard.epoch > owned.epoch:
            raise Fenced(f"partition {owned.partition} is at epoch {shard.epoch}")

    async def fence(self, owned: Owned) -> None:
        """Catch up with the changelog, then publish this owner's claim after its last
        message: any commit of an older owner after it is refused by the log."""
        shard = owned.shard
        assert shard is not None
        while True:
            await self._restore(owned)
            prepared = await self.on_thread(shard.prepare_claim, owned.epoch,
                                             self.config.item_half_life_s)
            if await self._publish(owned, prepared, "claim"):
                return

    async def _publish(self, owned: Owned, prepared: Prepared, kind: str) -> bool:
        """Publish a prepared commit's changelog and commit it; False (aborted) if the
        changelog moved on meanwhile. Aborts and re-raises on any other failure."""
        shard = owned.shard
        assert shard is not None
        headers = {"Nats-Expected-Last-Subject-Sequence": str(shard.changelog_seq),
                   KIND: kind, EPOCH: str(owned.epoch), POSITION: str(prepared.position),
                   OWNER: self.id}
        try:
            ack = await self.js.publish(self.log.shard_subject(owned.partition),
                                        prepared.payload, headers=headers, timeout=5)
        except BaseException as exc:  # (cancelled too: an open txn would hold the env)
            await self.on_thread(Shard.abort, prepared)
            if isinstance(exc, Exception) and is_wrong_last_sequence(exc):
                return False
            raise
        self._published += 1
        if self._published == self.settings.crash_after_commits:
            os.kill(os.getpid(), signal.SIGKILL)  # in the window between the log and LMDB
        await self.on_thread(shard.finish, prepared, owned.epoch, int(ack.seq))
        return True

    async def _consume(self, owned: Owned) -> None:
        """Read the partition's events in stream order from the shard's position and
        commit them in groups, until the partition is released."""
        shard = owned.shard
        assert shard is not None
        inbox: list[LogMessage] = []
        arrived, room = asyncio.Event(), asyncio.Event()

        async def receive(msg: Msg) -> None:
            inbox.append(LogMessage(msg.metadata.sequence.stream, msg.data))
            arrived.set()
            while len(inbox) >= self.settings.inbox_max_events:  # hold back the consumer
                room.clear()
                await room.wait()

        sub = await self.js.subscribe(
            self.log.events_subject(owned.partition), cb=receive, ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=shard.position + 1))
        due = [time.monotonic() + self.settings.snapshot_every_s, 0.0]  # snapshot, prune
        try:
            while not owned.stopping.is_set():
                await self._upkeep(owned, due)
                try:
                    await asyncio.wait_for(arrived.wait(), 0.5)
                except TimeoutError:
                    continue
                await asyncio.sleep(self.config.group_window_s)
                group = inbox[:self.config.group_max_events]
                del inbox[:len(group)]
                room.set()
                if not inbox:
                    arrived.clear()
                # In stream order, a sequence at or below the position is this very message
                # again (a consumer reset); every other repeat is caught by event_id.
                group = [m for m in group if m.sequence > shard.position]
                if group:
                    await self.commit(owned, group)
        finally:
            await sub.unsubscribe()

    async def _upkeep(self, owned: Owned, due: list[float]) -> None:
        """Between commits (never beside an open txn of the shard): start a snapshot, and
        forget old event ids, when each is due."""
        shard = owned.shard
        assert shard is not None
        now = time.monotonic()
        if now >= due[0] and shard.changelog_seq > owned.snapshot_seq and (
                owned.snapshotting is None or owned.snapshotting.done()):
            due[0] = now + self.settings.snapshot_every_s
            owned.snapshotting = asyncio.create_task(self.snapshot(owned))
        if now >= due[1]:
            due[1] = now + self.config.snapshot_poll_s
            cutoff = time.time() - self.config.dedupe_retention_s
            await self.on_thread(shard.store.transact,
                                 lambda w: w.prune_seen(cutoff, limit=10_000))

    async def commit(self, owned: Owned, group: list[LogMessage]) -> None:
        """Apply and commit a group (halved until its changelog fits in one message)."""
        shard = owned.shard
        assert shard is not None
        started = time.perf_counter()
        prepared = await self.on_thread(
            shard.prepare, group, owned.epoch, self.catalogs.live, self.config,
            self.settings.limits, self.stats, self.log.partition)
        if len(prepared.payload) > MAX_PAYLOAD - _COMMIT_HEADROOM and len(group) > 1:
            await self.on_thread(Shard.abort, prepared)
            half = len(group) // 2
            await self.commit(owned, group[:half])
            await self.commit(owned, group[half:])
            return
        if not await self._publish(owned, prepared, "commit"):
            await self._restore(owned)  # raises Fenced if a newer owner wrote it
            raise RuntimeError("the changelog moved on (an unacknowledged commit of ours)")
        metrics = self.metrics
        metrics.commit_seconds.observe(time.perf_counter() - started)
        metrics.group_size.observe(len(group))
        metrics.events.labels("accepted").inc(prepared.applied)
        metrics.events.labels("duplicate").inc(prepared.duplicates)
        metrics.events.labels("rejected").inc(prepared.rejected)
        metrics.events.labels("unknown_item").inc(prepared.unknown_items)

def _entry(msg: Msg) -> ChangelogEntry:
    return ChangelogEntry(msg.metadata.sequence.stream, *commit_stand(msg), msg.data)


