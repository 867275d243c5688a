"""A ranking host's read replica in log mode: every shard's changelog, followed into LMDB.

Ranking replicas share no disk with the workers. Each host follows the shards' changelog
(one ordered consumer over every partition's subject, in stream order) into its own
`UserStore`, the same store the embedded mode reads, so the ranker is unchanged: a
request reads a local record in microseconds, where asking the owning worker would cost
a network round trip (the echo floor alone is ~0.4 ms here) and fail during hand-overs.
Item counts from every shard add up in the replica (they are sums), which is how trending
merges across shards. Per partition the replica keeps the last event-log sequence it has
applied (``log.position.<p>``), in the same txn as the records: `wait_for` turns it into
read-your-writes for a client holding a Track's log sequence.

The live catalog is the host's too: the replica follows the log's catalog stream (the
front end's puts and take-downs, from the start: it is kept for good) into the store, and
learns the live items from the plays it sees in the records the changelog writes (the
weight a live item's history entry gained), by the same item-side fold-in as the
embedded writer (`index.live`), so the ranking workers serve it as in the embedded mode.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import api

from eventlog import snapshots
from eventlog.config import LogConfig
from eventlog.jetstream import Loop, close, commit_stand, connect, ensure_log
from index.catalog import CatalogSnapshot
from index.changelog import CHANGELOG_KEY, POSITION_KEY, ChangelogError, replay
from index.follower import SnapshotFollower
from index.live import (
    apply_message,
    learn,
    parse_message,
    plays_between,
    read_items,
    refold_items,
)
from index.store import HALF_LIFE_KEY, StoreWriter, UserStore, reached_within
from index.user_record import UserRecord

log = logging.getLogger("freshrec.replica")
FOLLOWED_KEY = "log.followed_seq"  # the last changelog message applied
CATALOG_KEY = "log.catalog_seq"  # the last catalog stream message applied


def position_key(partition: int) -> str:
    """The meta key of a partition's applied event-log position in a replica."""
    return f"log.position.{partition}"


def changelog_key(partition: int) -> str:
    """The meta key of the last changelog message of a partition in a replica."""
    return f"log.changelog.{partition}"


class Replica:
    """Follows the changelog into `store`, from where it stopped (a part of the service)."""

    def __init__(self, config: LogConfig, store: UserStore, snapshots: Path,
                 batch: int = 500, max_id_length: int = 128) -> None:
        self.config, self.store, self.batch = config, store, batch
        self.max_id_length = max_id_length
        # The snapshot the live catalog is learned against (the item factors only).
        self.catalogs = SnapshotFollower(
            snapshots, lambda v: CatalogSnapshot.load(snapshots, v, with_index=False),
            lambda catalog: catalog.model_version)
        self._stale_items = True  # re-fold the live items (of another model) when ready
        # The ids the live catalog has (puts only add): read once, kept by `_apply_catalog`.
        self._live_ids = set(read_items(store))
        self._loop: Loop | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="freshrec-replica")
        self._pending: list[Msg] = []
        self._arrived: asyncio.Event | None = None
        self.applied = 0

    def start(self) -> None:
        """Connect and start following (the store is what this host served before)."""
        self._loop = Loop("freshrec-replica")
        self._loop.run(self._start(), 90)

    async def _start(self) -> None:
        self.client, self.js = await connect(self.config, "freshrec-replica")
        await ensure_log(self.js, self.config)
        self._arrived = asyncio.Event()
        if self.store.get_meta(FOLLOWED_KEY) is None:
            await self._bootstrap()
        self._changelog = {p: int(self.store.get_meta(changelog_key(p)) or 0)
                           for p in range(self.config.partitions)}
        start = int(self.store.get_meta(FOLLOWED_KEY) or 0) + 1
        self._sub = await self.js.subscribe(
            f"{self.config.prefix}.shard.*", cb=self._receive, ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=start))
        self._task = asyncio.create_task(self._apply_loop())
        log.info("following the shards' changelog from message %d", start)
        catalog_from = int(self.store.get_meta(CATALOG_KEY) or 0) + 1
        self._catalog_sub = await self.js.subscribe(
            self.config.catalog_subject, cb=self._receive_catalog, ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=catalog_from))

    async def _receive_catalog(self, msg: Msg) -> None:
        # In the one thread that writes the store, in stream order (an ordered consumer
        # delivers one message at a time to this callback), until it is stored.
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._thread, self._apply_catalog, msg)
                return
            except Exception as exc:  # the disk (full, failing): try again
                log.error("replica could not store a catalog write: %s; retrying", exc)
                await asyncio.sleep(1.0)

    def _apply_catalog(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            parsed = parse_message(msg.data, self.max_id_length)
        except ValueError as exc:  # never applied, and never in the way of the next
            log.error("catalog message %d refused (not from the front end?): %s", seq, exc)
            parsed = None

        def work(writer: StoreWriter) -> None:
            writer.put_meta(CATALOG_KEY, str(seq))
            if parsed is not None:
                apply_message(writer, self.catalogs.live, parsed, time.time())

        self.store.transact(work)
        if parsed is not None:
            self._live_ids.update(item.item_id for item in parsed[0])

    async def _bootstrap(self) -> None:
        """An empty replica starts from the shards' snapshots (the changelog before them
        may have aged out of the log), then follows the changelog after each."""
        bucket = await snapshots.bucket(self.js, self.config)
        for p in range(self.config.partitions):
            if self.store.get_meta(changelog_key(p)) is not None:
                continue  # adopted before a restart: its counts must not add up twice
            if not await snapshots.latest(bucket, p):
                continue
            with tempfile.TemporaryDirectory(dir=self.store.path.parent) as tmp:
                await snapshots.download(bucket, p, Path(tmp) / "shard")
                with UserStore(Path(tmp) / "shard", readonly=True) as shard:
                    await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._adopt, p, shard)
        # Every changelog message up to the oldest snapshot's is in the snapshots.
        followed = min(int(self.store.get_meta(changelog_key(p)) or 0)
                       for p in range(self.config.partitions))
        self.store.transact(lambda w: w.put_meta(FOLLOWED_KEY, str(followed)))

    def _adopt(self, partition: int, shard: UserStore) -> None:
        def work(writer: StoreWriter) -> None:
            with shard.env.begin(buffers=True) as txn:
                for key, value in txn.cursor(db=shard.dbs["users"]):
                    writer.txn.put(bytes(key), bytes(value), db=writer.dbs["users"])
            for item, (count, at) in shard.item_count_entries().items():  # sums: add up
                writer.add_item_count(item, count, at)
            for mine, theirs in ((position_key(partition), POSITION_KEY),
                                 (changelog_key(partition), CHANGELOG_KEY)):
                writer.put_meta(mine, shard.get_meta(theirs) or "0")
            half_life = shard.get_meta(HALF_LIFE_KEY.decode())
            if half_life is not None:
                writer.put_meta(HALF_LIFE_KEY.decode(), half_life)

        self.store.transact(work)
        log.info("partition %d: adopted its snapshot (%d users)", partition,
                 shard.count("users"))

    async def _receive(self, msg: Msg) -> None:
        self._pending.append(msg)
        assert self._arrived is not None
        self._arrived.set()
        while len(self._pending) > 20 * self.batch:  # hold the consumer back
            await asyncio.sleep(0.01)

    async def _apply_loop(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            batch, self._pending = self._pending[:self.batch], self._pending[self.batch:]
            if not self._pending:
                self._arrived.clear()
            while True:
                try:
                    await loop.run_in_executor(self._thread, self._apply, batch)
                    break
                except (ChangelogError, ValueError) as exc:  # never skipped: stop here
                    log.error("replica stopped at a changelog message it cannot apply: "
                              "%s", exc)
                    return
                except Exception as exc:  # the disk (full, failing): try again
                    log.error("replica could not store the changelog: %s; retrying", exc)
                    await asyncio.sleep(1.0)

    def _apply(self, msgs: list[Msg]) -> None:
        done = dict(self._changelog)
        if self.catalogs.follow() is not None:
            self._stale_items = True
        catalog = self.catalogs.live

        def work(writer: StoreWriter) -> None:
            done.update(self._changelog)  # (a rerun after growing the map starts again)
            live_ids = self._live_ids
            for msg, partition, position in _entries(msgs):
                seq = msg.metadata.sequence.stream
                if seq <= done[partition]:
                    continue  # in the snapshot this replica started from
                changes: dict[str, tuple[UserRecord | None, UserRecord]] | None = \
                    {} if live_ids else None
                replay(writer, msg.data, users_only=True, changes=changes)
                if changes:
                    self._learn(writer, catalog, changes, live_ids)
                writer.put_meta(position_key(partition), str(position))
                writer.put_meta(changelog_key(partition), str(seq))
                done[partition] = seq
            writer.put_meta(FOLLOWED_KEY, str(msgs[-1].metadata.sequence.stream))
            waiting.clear()
            if self._stale_items:
                refold_items(writer, catalog, waiting)

        waiting: set[str] = set()
        self.store.transact(work)
        self._stale_items = self._stale_items and bool(waiting)
        self._changelog = done
        self.applied += len(msgs)

    @staticmethod
    def _learn(writer: StoreWriter, catalog: CatalogSnapshot,
               changes: dict[str, tuple[UserRecord | None, UserRecord]],
               live_ids: set[str]) -> None:
        """The plays of live items in the records a changelog message wrote, learned."""
        records = {u: catalog.fit(after) for u, (_, after) in changes.items()}
        plays = {u: p for u, (before, _) in changes.items()
                 if (p := plays_between(before, records[u], live_ids))}
        if plays:
            learn(writer, catalog, plays, records)

    def stop(self, timeout: float) -> None:
        """Stop following (what was applied stays)."""
        if self._loop is not None:
            try:
                self._loop.run(self._close(), min(timeout, 10) + 1)
            finally:
                self._loop.stop()
        self._thread.shutdown()

    async def _close(self) -> None:
        self._task.cancel()
        for sub in (self._sub, self._catalog_sub):
            await sub.unsubscribe()
        await close(self.client)


def _entries(msgs: list[Msg]) -> Iterator[tuple[Msg, int, int]]:
    for msg in msgs:
        yield msg, LogConfig.partition_of_subject(msg.subject), commit_stand(msg)[1]


async def wait_for(store: UserStore, config: LogConfig, user_id: str, sequence: int,
                   timeout: float) -> int:
    """Wait until the user's partition is applied up to `sequence`; the position reached
    (whatever it is at the timeout)."""
    key = position_key(config.partition(user_id))
    return await reached_within(lambda: int(store.get_meta(key) or 0), sequence, timeout)
