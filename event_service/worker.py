"""The log-mode worker: `python -m event_service.worker --log-urls URLS --data-dir D`.

Workers share the partitions of the event log (`eventlog.config`) among themselves:

- **Membership**: each worker heartbeats its key in the members bucket; a worker whose key
  has not changed for `lease_s` (as this worker's own clock sees it, so no clocks are
  compared) is gone. With n live workers, each holds between floor(P/n) and ceil(P/n)
  partitions: one below the floor claims free or expired ones, one above the ceiling (or
  the busiest, while another is below its floor) hands partitions back.
- **Leases**: partition p's owner renews key ``p<p>`` of the owners bucket with a
  compare-and-set on its revision; a claim is a compare-and-set too, so one claim wins,
  and its revision is the new owner's **epoch** (revisions only grow). A lease says who
  should own a partition; the changelog says who did: the fencing, restore and commits
  are `event_service.partition`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from typing import TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from event_service.config import WorkerSettings
from event_service.metrics import WorkerMetrics
from event_service.partition import Owned, PartitionServer
from eventlog import snapshots
from eventlog.jetstream import (
    close,
    connect,
    ensure_log,
    last_sequence,
)
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.follower import SnapshotFollower
from index.snapshot import SnapshotError
from rpc.server import configure_logging, pin_native_threads

log = logging.getLogger("freshrec.worker")
T = TypeVar("T")
_COMMIT_HEADROOM = 64 << 10  # below the max payload, for headers


class Worker:
    """Membership, leases and the partitions this worker owns, on one asyncio loop; the
    LMDB and fold-in work on one shard thread."""

    def __init__(self, settings: WorkerSettings, catalogs: SnapshotFollower[CatalogSnapshot],
                 metrics: WorkerMetrics) -> None:
        self.settings, self.config, self.log = settings, settings.writer, settings.log
        self.catalogs, self.metrics = catalogs, metrics
        self.id = settings.worker_id
        self.partitions = PartitionServer(settings, catalogs, metrics)
        self.owned: dict[int, Owned] = {}
        self._seen: dict[str, tuple[int, float]] = {}  # KV key -> (revision, first seen)
        self._free_since: dict[int, float] = {}
        self._healthy_since = time.monotonic()  # since the last failed tick
        self._closing: dict[int, asyncio.Task[None]] = {}  # released: final snapshot
        self.stopping = asyncio.Event()

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
        self.partitions.attach(self.js, await snapshots.bucket(self.js, self.log))
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
        self.partitions.shutdown()

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
        owned.task = asyncio.create_task(self.partitions.serve(owned), name=f"partition-{p}")
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
            self.partitions.close(owned, final_snapshot=True))
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
