"""The log-mode worker: `python -m event_service.worker --log-urls URLS --data-dir D`.

Workers share the partitions of the event log (`eventlog.config`) among themselves:

- **Membership**: each worker heartbeats its key in the members bucket; a worker whose key
  has not changed for `lease_s` (as this worker's own clock sees it, so no clocks are
  compared) is gone. With n live workers, each holds between floor(P/n) and ceil(P/n)
  partitions: one above the ceiling releases partitions, one below the floor claims free
  or expired ones.
- **Leases**: partition p's owner renews key ``p<p>`` of the owners bucket with a
  compare-and-set on its revision; a claim is a compare-and-set too, so one claim wins,
  and its revision is the new owner's **epoch** (revisions only grow).
- **Fencing**: a lease says who should own a partition; the changelog says who did. Every
  commit of a shard is one message on the shard's changelog subject, published with
  ``Nats-Expected-Last-Subject-Sequence`` = the last changelog message the owner knows.
  A new owner first brings its shard up to the changelog (from the latest shard
  snapshot in the object store when that is ahead of its own copy or it has none, then
  the messages after it), then publishes a claim the same way: from
  then on an older owner's commit fails the check, so two owners cannot both commit.
- **Commit**: a batch of a partition's events (read in stream order from the shard's
  position with an ordered consumer) is applied by `index.apply.apply_group` in an
  open LMDB txn; the txn's writes go to the changelog; the txn commits only after the
  changelog publish is acked, with the new position and the changelog sequence in it.
  Events are deduplicated by event_id (a producer's resend outside the server's window
  is a second message); the position only says where to resume reading.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from event_service.config import Settings
from event_service.metrics import WorkerMetrics
from event_service.shard import ChangelogEntry, LogMessage, Prepared, Shard
from eventlog import snapshots
from eventlog.jetstream import (
    EPOCH,
    KIND,
    MAX_PAYLOAD,
    OWNER,
    POSITION,
    close,
    commit_stand,
    connect,
    ensure_log,
    is_wrong_last_sequence,
    last_sequence,
)
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.follower import SnapshotFollower
from index.snapshot import SnapshotError
from index.user_stats import StatsCache
from rpc.server import configure_logging, pin_native_threads

log = logging.getLogger("freshrec.worker")
T = TypeVar("T")
_COMMIT_HEADROOM = 64 << 10  # below the max payload, for headers


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(Settings):
    """The event service's settings, plus who this worker is and how long a lease lasts."""

    worker_id: str = field(default="", metadata={
        "help": "unique name of this worker (default: host-pid)"})
    lease_s: float = field(default=3.0, metadata={
        "help": "a partition whose owner has not renewed it for this long is taken over"})
    inbox_max_events: int = 20_000  # read ahead of the shard thread, per partition
    snapshot_every_s: float = field(default=300.0, metadata={
        "help": "copy each owned shard to the log's object store this often (a takeover "
                "then replays only the changelog after the latest copy)"})
    crash_after_commits: int = field(default=0, metadata={
        "help": "fault injection (tests): kill -9 this process after publishing this many "
                "changelog messages, before the last one's LMDB commit (0 = never)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.log_urls:
            raise ValueError("a worker needs --log-urls")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{socket.gethostname()}-{os.getpid()}")
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")
        if self.dedupe_retention_s < self.log_retention_s:
            raise ValueError("dedupe_retention_s must cover the log's retention "
                             f"({self.log_retention_s} s): an event can be read again "
                             "from anywhere in it")
        if not 0 < self.snapshot_every_s < self.log_retention_s / 2:
            raise ValueError("snapshot_every_s must be > 0 and well inside the log's "
                             f"retention ({self.log_retention_s} s): the changelog before "
                             "a snapshot ages out")


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


class Worker:
    """Membership, leases and the partitions this worker owns, on one asyncio loop; the
    LMDB and fold-in work on one shard thread."""

    def __init__(self, settings: WorkerSettings, catalogs: SnapshotFollower[CatalogSnapshot],
                 metrics: WorkerMetrics) -> None:
        self.settings, self.config, self.log = settings, settings.writer, settings.log
        self.catalogs, self.metrics = catalogs, metrics
        self.id = settings.worker_id
        self.shards_root = settings.data_dir / "shards"
        self.stats = StatsCache(self.config.stats_cache_bytes)  # shard thread only
        self.owned: dict[int, Owned] = {}
        self._seen: dict[str, tuple[int, float]] = {}  # KV key -> (revision, first seen)
        self._free_since: dict[int, float] = {}
        self._healthy_since = time.monotonic()  # since the last failed tick
        self._closing: dict[int, asyncio.Task[None]] = {}  # released: final snapshot
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="freshrec-shard")
        self._published = 0
        self.stopping = asyncio.Event()

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- the worker's life -------------------------------------------------------------

    async def run(self) -> None:
        """Join, hold a fair share of the partitions until asked to stop, then leave."""
        self.client, self.js = await connect(self.log, f"freshrec-worker {self.id}")
        await ensure_log(self.js, self.log)
        # Leases go through a context with a short timeout: a renewal stuck on a node that
        # went away must give way to the next try well inside the lease.
        leases = self.client.jetstream(timeout=self.settings.lease_s / 6)
        self.owners = await leases.key_value(self.log.owners_bucket)
        self.members = await leases.key_value(self.log.members_bucket)
        self.snapshots = await snapshots.bucket(self.js, self.log)
        self._beat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        await asyncio.sleep(self.settings.lease_s / 3)  # see the others that start with us
        log.info("worker %s joined the log at %s (%d partitions)", self.id, self.log.urls,
                 self.log.partitions)
        next_housekeeping, last_tick = 0.0, time.monotonic()
        self._healthy_since = last_tick  # a newcomer first watches a lease: who is alive
        while not self.stopping.is_set():
            if time.monotonic() - last_tick > self.settings.lease_s:
                self._healthy_since = time.monotonic()  # this process was paused itself
            last_tick = time.monotonic()
            try:
                await self._tick()
                if time.monotonic() >= next_housekeeping:
                    next_housekeeping = time.monotonic() + self.config.snapshot_poll_s
                    await self._housekeeping()
            except Exception as exc:  # a NATS hiccup: try again on the next tick
                log.warning("membership tick: %s", exc)
                self._healthy_since = time.monotonic()
            try:
                await asyncio.wait_for(self.stopping.wait(), self.settings.lease_s / 6)
            except TimeoutError:
                pass
        try:
            await asyncio.wait_for(self._leave(), 3 * snapshots.TRANSFER_TIMEOUT_S)
        except TimeoutError:  # the log is gone: the leases run out by themselves
            log.warning("worker %s: its last snapshots and closes did not finish in time",
                        self.id)
        self._thread.shutdown(wait=True)

    async def _leave(self) -> None:
        """Finish what is in flight, hand every partition back, and say goodbye."""
        for owned in list(self.owned.values()):
            await self._release(owned)
        await asyncio.gather(*self._closing.values())
        self._beat.cancel()
        try:
            await self.members.delete(self.id)
        except Exception as exc:
            log.warning("could not remove the member key: %s", exc)
        await close(self.client)
        log.info("worker %s left", self.id)

    # -- membership and leases ---------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Say this worker is alive and renew its leases, on its own, every lease/6: never
        behind a claim, a hand-back or the shard thread."""
        async def beat(what: str, call: Awaitable[object]) -> None:
            try:
                await call
            except Exception as exc:  # the next beat tries again
                log.warning("heartbeat (%s): %s", what, exc)

        while True:
            await asyncio.gather(beat("member", self.members.put(self.id, b"1")), *(
                beat(f"lease {o.partition}", self._renew(o))
                for o in list(self.owned.values()) if not o.stopping.is_set()))
            await asyncio.sleep(self.settings.lease_s / 6)

    async def _tick(self) -> None:
        """Balance: claim free partitions below the fair share, hand back above it."""
        alive = await self._live_members()
        partitions = self.log.partitions
        high, low = math.ceil(partitions / len(alive)), partitions // len(alive)
        for owned in list(self.owned.values()):
            if owned.stopping.is_set() or (owned.task is not None and owned.task.done()):
                await self._release(owned)  # lost, fenced or failed: it is claimed anew
        # Every lease is looked at on every tick, so a dead owner's is seen going stale
        # from the moment it stops, whatever this worker's share is then.
        held: Counter[str] = Counter({self.id: len(self.owned)})
        claimable: list[tuple[int, KeyValue.Entry | None]] = []
        for p in range(partitions):
            closing = self._closing.get(p)
            if p in self.owned or (closing is not None and not closing.done()):
                continue  # (a shard still being closed here cannot be opened again yet)
            entry = await self._lease(p)
            if entry is None or self._free(f"p{p}", entry):
                self._free_since.setdefault(p, time.monotonic())
                claimable.append((p, entry))
            else:
                self._free_since.pop(p, None)
                held[_owner(entry)] += 1
        # Above the ceiling, hand back; above the floor too, one a tick, when nothing is
        # free, another live worker is below the floor, and this one holds the most.
        starving = not claimable and any(held[m] < low for m in alive)
        busiest = max(alive, key=lambda m: (held[m], m)) == self.id
        while len(self.owned) > high or (starving and busiest and len(self.owned) > low):
            await self._release(self.owned[max(self.owned)])
            starving = False
        if not self._trusted():  # only what nobody holds: never claimed, or handed back
            claimable = [(p, e) for p, e in claimable if e is None or not _owner(e)]
        for p, entry in claimable:
            free_for = time.monotonic() - self._free_since[p]
            if len(self.owned) < low or (len(self.owned) < high
                                         and free_for > self.settings.lease_s):
                await self._claim(p, entry)
        self._export()

    async def _live_members(self) -> set[str]:
        try:
            keys = await self.members.keys()
        except Exception:  # nats-py raises NoKeysError when the bucket is empty
            keys = []
        alive = {self.id}
        for key in keys:
            try:
                entry = await self.members.get(key)
            except KeyNotFoundError:
                continue
            if not self._stale(f"m:{key}", int(entry.revision or 0)):
                alive.add(key)
        return alive

    def _stale(self, key: str, revision: int) -> bool:
        """True once a key's revision has not changed for a lease, as seen from here."""
        seen = self._seen.get(key)
        now = time.monotonic()
        if seen is None or seen[0] != revision:
            self._seen[key] = (revision, now)
            return False
        return now - seen[1] > self.settings.lease_s

    async def _lease(self, p: int) -> KeyValue.Entry | None:
        try:
            return await self.owners.get(f"p{p}")
        except KeyNotFoundError:
            return None

    def _trusted(self) -> bool:
        """Whether this worker has watched the log for a whole lease without a gap: only
        then is a key it saw unchanged really unrenewed (after joining, after it could not
        reach the log, or after it was paused itself, the others may be fine)."""
        return time.monotonic() - self._healthy_since > self.settings.lease_s

    def _free(self, key: str, entry: KeyValue.Entry) -> bool:
        """Released, or not renewed for a lease (as far as this worker can tell)."""
        stale = self._stale(key, int(entry.revision or 0))
        return not _owner(entry) or (stale and self._trusted())

    async def _claim(self, p: int, entry: KeyValue.Entry | None) -> None:
        value = json.dumps({"owner": self.id}).encode()
        try:
            revision = (await self.owners.create(f"p{p}", value) if entry is None else
                        await self.owners.update(f"p{p}", value, last=entry.revision))
        except KeyWrongLastSequenceError:
            return  # another worker claimed it first
        owned = Owned(p, revision, revision)
        self.owned[p] = owned
        self._free_since.pop(p, None)
        owned.task = asyncio.create_task(self._serve(owned), name=f"partition-{p}")
        log.info("claimed partition %d (epoch %d)", p, revision)

    async def _renew(self, owned: Owned) -> None:
        value = json.dumps({"owner": self.id}).encode()
        try:
            owned.revision = await self.owners.update(f"p{owned.partition}", value,
                                                      last=owned.revision)
        except KeyWrongLastSequenceError:
            entry = await self._lease(owned.partition)  # a renewal that timed out may
            if entry is not None and _owner(entry) == self.id:  # have landed all the same
                owned.revision = int(entry.revision or 0)
                return
            log.warning("lost the lease of partition %d", owned.partition)
            owned.stopping.set()  # the balancing tick hands it back (the lease stays theirs)

    async def _release(self, owned: Owned) -> None:
        """Stop serving a partition and free its lease at once; then leave a snapshot of
        it for the next owner in the background (until it lands, the next owner starts
        from the previous snapshot and a longer changelog tail: slower, as correct)."""
        await self._stop(owned)
        key = f"p{owned.partition}"
        try:
            entry = await self.owners.get(key)  # the latest revision: a beat may have renewed
            if _owner(entry) == self.id:
                await self.owners.update(key, json.dumps({"owner": ""}).encode(),
                                         last=entry.revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            pass  # someone else's now
        self._closing[owned.partition] = asyncio.create_task(
            self._close(owned, final_snapshot=True))
        log.info("released partition %d", owned.partition)

    async def _stop(self, owned: Owned) -> None:
        """Stop the partition's task and any snapshot of it in flight."""
        owned.stopping.set()
        for task in (owned.task, owned.snapshotting):
            try:
                if task is not None:
                    await task
            except Exception as exc:
                log.warning("partition %d ended: %s", owned.partition, exc)
        self.owned.pop(owned.partition, None)
        self.metrics.owned.labels(str(owned.partition)).set(0)

    async def _close(self, owned: Owned, final_snapshot: bool) -> None:
        if owned.shard is None:
            return
        if final_snapshot and owned.live:
            await self._snapshot(owned)
        await self._on_thread(owned.shard.close)

    # -- serving a partition -----------------------------------------------------------

    async def _serve(self, owned: Owned) -> None:
        """Restore the shard from the changelog, fence the partition, then consume it."""
        p = owned.partition
        path = self.shards_root / f"p{p:04d}"
        owned.shard = shard = await self._open(owned, path)
        try:
            await self._fence(owned)
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

    async def _open(self, owned: Owned, path: Path) -> Shard:
        """The partition's shard: the local one, or the snapshot in the log if it is ahead
        (a new host, or one that has been away)."""
        sizes = (self.settings.store_map_bytes, self.settings.store_max_bytes)
        shard = await self._on_thread(Shard, owned.partition, path, *sizes)
        try:
            newest = await snapshots.latest(self.snapshots, owned.partition)
        except BaseException:
            await self._on_thread(shard.close)  # else this process could not open it again
            raise
        if newest > shard.changelog_seq:
            await self._on_thread(shard.close)
            await snapshots.download(self.snapshots, owned.partition, path)
            shard = await self._on_thread(Shard, owned.partition, path, *sizes)
        owned.snapshot_seq = newest
        return shard

    async def _snapshot(self, owned: Owned) -> None:
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
                    await self._on_thread(shard.replay, batch)
                    batch = []
        finally:
            await sub.unsubscribe()
        if shard.epoch > owned.epoch:
            raise Fenced(f"partition {owned.partition} is at epoch {shard.epoch}")

    async def _fence(self, owned: Owned) -> None:
        """Catch up with the changelog, then publish this owner's claim after its last
        message: any commit of an older owner after it is refused by the log."""
        shard = owned.shard
        assert shard is not None
        while True:
            await self._restore(owned)
            prepared = await self._on_thread(shard.prepare_claim, owned.epoch,
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
            await self._on_thread(Shard.abort, prepared)
            if isinstance(exc, Exception) and is_wrong_last_sequence(exc):
                return False
            raise
        self._published += 1
        if self._published == self.settings.crash_after_commits:
            os.kill(os.getpid(), signal.SIGKILL)  # in the window between the log and LMDB
        await self._on_thread(shard.finish, prepared, owned.epoch, int(ack.seq))
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
        next_prune = 0.0
        next_snapshot = time.monotonic() + self.settings.snapshot_every_s
        try:
            while not owned.stopping.is_set():
                if time.monotonic() >= next_snapshot and shard.changelog_seq > \
                        owned.snapshot_seq and (owned.snapshotting is None
                                                or owned.snapshotting.done()):
                    next_snapshot = time.monotonic() + self.settings.snapshot_every_s
                    owned.snapshotting = asyncio.create_task(self._snapshot(owned))
                if time.monotonic() >= next_prune:  # here: never beside an open txn of it
                    next_prune = time.monotonic() + self.config.snapshot_poll_s
                    cutoff = time.time() - self.config.dedupe_retention_s
                    await self._on_thread(shard.store.transact,
                                          lambda w, c=cutoff: w.prune_seen(c, limit=10_000))
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
                    await self._commit(owned, group)
        finally:
            await sub.unsubscribe()

    async def _commit(self, owned: Owned, group: list[LogMessage]) -> None:
        """Apply and commit a group (halved until its changelog fits in one message)."""
        shard = owned.shard
        assert shard is not None
        started = time.perf_counter()
        prepared = await self._on_thread(
            shard.prepare, group, owned.epoch, self.catalogs.live, self.config,
            self.settings.limits, self.stats, self.log.partition)
        if len(prepared.payload) > MAX_PAYLOAD - _COMMIT_HEADROOM and len(group) > 1:
            await self._on_thread(Shard.abort, prepared)
            half = len(group) // 2
            await self._commit(owned, group[:half])
            await self._commit(owned, group[half:])
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

    # -- upkeep ------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Follow a new model; export each partition's lag."""
        try:
            if await asyncio.to_thread(self.catalogs.follow) is not None:  # not the shard thread
                log.info("switched to model %s", self.catalogs.version)
        except SnapshotError as exc:
            log.error("refusing new snapshot, keeping %s: %s", self.catalogs.version, exc)
        for owned in list(self.owned.values()):
            if owned.shard is not None and owned.live:
                last = await last_sequence(self.js, self.log.events_stream,
                                           self.log.events_subject(owned.partition))
                self.metrics.lag.labels(str(owned.partition)).set(
                    max(last - owned.shard.position, 0))

    def _export(self) -> None:
        for p, owned in self.owned.items():
            label = str(p)
            self.metrics.owned.labels(label).set(1 if owned.live else 0)
            self.metrics.epoch.labels(label).set(owned.epoch)
            if owned.shard is not None:
                self.metrics.position.labels(label).set(owned.shard.position)


def _owner(lease: KeyValue.Entry) -> str:
    """The worker a lease names ("" once handed back)."""
    return str(json.loads(lease.value or b"{}").get("owner", ""))


def _entry(msg: Msg) -> ChangelogEntry:
    return ChangelogEntry(msg.metadata.sequence.stream, *commit_stand(msg), msg.data)


def main(argv: list[str] | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT, then hand its partitions back and exit 0."""
    configure_logging()
    pin_native_threads()
    settings = WorkerSettings.from_args(argv)
    root = snapshots_dir(settings.data_dir)
    try:
        catalogs = SnapshotFollower(root, lambda v: CatalogSnapshot.load(root, v,
                                                                         with_index=False),
                                    lambda catalog: catalog.model_version)
    except SnapshotError as exc:
        log.error("cannot start: %s", exc)
        return 2
    metrics = WorkerMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.host)

    async def life() -> None:
        worker = Worker(settings, catalogs, metrics)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stopping.set)
        await worker.run()

    asyncio.run(life())
    return 0


if __name__ == "__main__":
    sys.exit(main())
