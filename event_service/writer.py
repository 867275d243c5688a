"""The single writer: groups submitted batches into one LMDB write txn each, then acks them.

Handlers check and submit; only this thread writes. LMDB allows one write txn at a time,
and a durable commit costs two fsyncs (~0.2-0.3 ms) whatever it holds, so one txn per
group of submissions is what makes durable ingest fast. A submission is completed only
after the txn that applied it has committed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from event_service.metrics import EventMetrics
from index.apply import FoldInPolicy, Outcome, apply_group, keep_rejected, refold
from index.catalog import CatalogSnapshot
from index.errors import Exhausted, Unavailable
from index.events import Batch, EventWeights
from index.follower import SnapshotFollower
from index.live import Written, prune_changes, refold_items
from index.snapshot import SnapshotError
from index.store import DEFAULT_ITEM_HALF_LIFE_S, USERS_MODEL_KEY, StoreWriter, UserStore
from index.user_stats import StatsCache

log = logging.getLogger("freshrec.events")


class QueueFull(Exhausted):
    """The writer's queue is full (overload): retry later."""


class WriterStopped(Unavailable):
    """The writer is shutting down and takes no new work."""


# A write of the live catalog, run in the writer's txn against the live snapshot.
CatalogWrite = Callable[[StoreWriter, CatalogSnapshot, float], Written]


@dataclass
class Submission:
    """A checked batch (or a catalog write) waiting for its commit; `wait` returns once it
    is durable."""

    batch: Batch = field(default_factory=lambda: Batch([], []))
    write: CatalogWrite | None = None
    received_at: float = field(default_factory=time.time)
    outcomes: list[Outcome] | None = None
    written: Written | None = None
    error: Exception | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        """Queue cost: events carried (at least 1, so empty batches still count)."""
        return max(1, len(self.batch.valid) + len(self.batch.rejected))

    def finish(self, outcomes: list[Outcome] | None, error: Exception | None = None,
               written: Written | None = None) -> None:
        """Complete the submission (called by the writer after commit, or on failure)."""
        self.outcomes, self.error, self.written = outcomes, error, written
        self._done.set()

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Block until committed; one outcome per valid event. Raises the writer's error,
        or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError("the write was not committed before the deadline")
        if self.error is not None:
            raise self.error
        assert self.outcomes is not None
        return self.outcomes


@dataclass(frozen=True, kw_only=True)
class WriterConfig:
    """How the writer groups, folds in and maintains the store."""

    weights: EventWeights = EventWeights()
    policy: FoldInPolicy = FoldInPolicy()
    queue_max_events: int = 200_000
    group_max_events: int = 20_000
    group_window_s: float = 0.001
    item_half_life_s: float = DEFAULT_ITEM_HALF_LIFE_S
    dedupe_retention_s: float = 7 * 86_400.0
    snapshot_poll_s: float = 2.0
    refold_per_s: float = 2_000.0  # users scanned (and re-folded) per second, model changed
    refold_batch: int = 200  # users per re-fold txn: a short pause for ingest
    stats_cache_bytes: int = 1 << 30  # fold-in statistics of active users (17 KB each, d=64)


class Writer:
    """Owns the store's write side and follows the live snapshot it folds in against."""

    def __init__(self, store: UserStore, catalogs: SnapshotFollower[CatalogSnapshot],
                 config: WriterConfig, metrics: EventMetrics) -> None:
        self.store, self.catalogs = store, catalogs
        self.config, self.metrics = config, metrics
        self._queue: deque[Submission] = deque()
        self._queued = 0
        # Two conditions on one lock: producers wait for space, the writer for work, so a
        # submission wakes only the writer (and only when it is idle).
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._has_space = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_housekeeping = 0.0
        self._rejected_seq = itertools.count()
        self.stats = StatsCache(config.stats_cache_bytes)  # used by the writer thread only
        # Background re-fold after a model change: the last user id scanned (None: done).
        self._refold_after: str | None = None
        self._refold_due = 0.0

    def start(self) -> None:
        """Record the item half-life with the data, then start the writer thread."""
        if self.store.item_half_life() != self.config.item_half_life_s:
            self.store.transact(lambda w: w.set_item_half_life(self.config.item_half_life_s))
        if self.store.get_meta(USERS_MODEL_KEY) != self.catalogs.version:
            self._refold_after = ""  # users may be stored under another model: re-fold them
        self.metrics.model_version.labels(self.catalogs.version).set(1)
        self._thread = threading.Thread(target=self._run, name="freshrec-writer", daemon=True)
        self._thread.start()

    def submit(self, submission: Submission, block: bool,
               still_wanted: Callable[[], bool] = lambda: True) -> None:
        """Queue a submission; when full, wait (block=True: flow control) or raise QueueFull."""
        with self._lock:
            while self._queued + submission.size > self.config.queue_max_events:
                if self._stopping:
                    raise WriterStopped("the event service is shutting down")
                if not block:
                    raise QueueFull(f"writer queue full ({self._queued} events waiting)")
                self._has_space.wait(0.1)
                if not still_wanted():
                    raise WriterStopped("the call ended while waiting for queue space")
            if self._stopping:
                raise WriterStopped("the event service is shutting down")
            self._queue.append(submission)
            self._queued += submission.size
            if len(self._queue) == 1:
                self._has_work.notify()

    def stop(self, timeout: float) -> None:
        """Take no new work, commit what is queued, and stop the thread."""
        with self._lock:
            self._stopping = True
            self._has_work.notify_all()
            self._has_space.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            group = self._take()
            if group:
                self._commit(group)
            elif self._stopping:
                return
            if time.monotonic() >= self._next_housekeeping:
                self._housekeeping()
            if self._refold_after is not None and time.monotonic() >= self._refold_due:
                self._refold()

    def _take(self) -> list[Submission]:
        """Wait for work; give more a short window to arrive; take up to a group's worth."""
        idle_wait = 0.5 if self._refold_after is None else 0.02
        with self._lock:
            self._has_work.wait_for(lambda: self._queue or self._stopping, timeout=idle_wait)
            if not self._queue:
                return []
        # Sleeping through the window (rather than waking per arrival) keeps the GIL free
        # for the handlers that are receiving the rest of the group.
        if self.config.group_window_s > 0:
            time.sleep(self.config.group_window_s)
        with self._lock:
            group: list[Submission] = []
            events = 0
            while self._queue and (not group or events + self._queue[0].size
                                   <= self.config.group_max_events):
                submission = self._queue.popleft()
                self._queued -= submission.size
                events += submission.size
                group.append(submission)
            self.metrics.queue_events.set(self._queued)
            self._has_space.notify_all()
            return group

    def _commit(self, group: list[Submission]) -> None:
        started = time.perf_counter()
        try:
            outcomes = self.store.transact(lambda w: self._apply(w, group, time.time()))
        except Exception as exc:  # the batch is not acked; the writer keeps going
            log.error("write of %d batches failed: %s", len(group), exc)
            for submission in group:
                submission.finish(None, exc)
            return
        self._record(group, [mine for mine, _ in outcomes], time.perf_counter() - started,
                     time.time())
        for submission, (mine, written) in zip(group, outcomes, strict=True):
            submission.finish(mine, written=written)

    def _apply(self, writer: StoreWriter, group: list[Submission],
               now: float) -> list[tuple[list[Outcome], Written | None]]:
        """One txn for the group: the catalog writes, then the events; the outcomes of each
        submission's valid events, and what its catalog write did."""
        catalog = self.catalogs.live
        written = [s.write(writer, catalog, now) if s.write is not None else None
                   for s in group]
        keep_rejected(writer, [r for s in group for r in s.batch.rejected], now,
                      self._rejected_seq)
        events = [e for s in group for e in s.batch.valid]
        outcomes = iter(apply_group(writer, catalog, events, self.config.weights,
                                    self.config.policy, self.stats, now))
        return [([next(outcomes) for _ in s.batch.valid], w)
                for s, w in zip(group, written, strict=True)]

    def _record(self, group: list[Submission], outcomes: list[list[Outcome]], seconds: float,
                committed: float) -> None:
        metrics = self.metrics
        metrics.commit_seconds.observe(seconds)
        flat = [o for mine in outcomes for o in mine]
        metrics.group_size.observe(len(flat))
        duplicates = sum(o.duplicate for o in flat)
        metrics.events.labels("duplicate").inc(duplicates)
        metrics.events.labels("accepted").inc(len(flat) - duplicates)
        metrics.events.labels("unknown_item").inc(
            sum(not o.item_known and not o.duplicate for o in flat))
        metrics.events.labels("rejected").inc(sum(len(s.batch.rejected) for s in group))
        for submission in group:
            metrics.event_to_commit_seconds.observe(committed - submission.received_at)

    def _housekeeping(self) -> None:
        """Forget old event ids, reap dead readers, follow snapshots/CURRENT to a new model."""
        self._next_housekeeping = time.monotonic() + self.config.snapshot_poll_s
        try:
            cutoff = time.time() - self.config.dedupe_retention_s
            self.store.transact(lambda w: (w.prune_seen(cutoff, limit=10_000),
                                           prune_changes(w)))
            self.store.reap_stale_readers()
            self._follow()
        except Exception as exc:  # housekeeping must never stop the writer
            log.error("housekeeping failed: %s", exc)

    def _follow(self) -> None:
        before = self.catalogs.version
        try:
            if self.catalogs.follow() is None:
                return
        except SnapshotError as exc:
            log.error("refusing new snapshot, keeping %s: %s", before, exc)
            return
        log.info("switched to model %s; re-folding every user in the background",
                 self.catalogs.version)
        self.metrics.model_version.labels(before).set(0)
        self.metrics.model_version.labels(self.catalogs.version).set(1)
        self._refold_after = ""

    def _refold(self) -> None:
        """Re-fold the next batch of users stored under another model, at a bounded rate."""
        batch, catalog = self.config.refold_batch, self.catalogs.live
        after = self._refold_after or ""

        def work(writer: StoreWriter) -> tuple[list[str], int]:
            ids = writer.user_ids_after(after, batch)
            done = refold(writer, catalog, ids, self.stats, time.time())
            if len(ids) < batch:  # the last batch: every user is under this model now,
                writer.put_meta(USERS_MODEL_KEY, catalog.model_version)
                refold_items(writer, catalog)  # so the live items can learn from them
            return ids, done

        try:
            ids, done = self.store.transact(work)
        except Exception as exc:  # retried on the next round; ingest goes on
            log.error("re-fold failed: %s", exc)
            return
        self.metrics.refolded.inc(done)
        self._refold_after = ids[-1] if len(ids) == batch else None
        self._refold_due = time.monotonic() + batch / self.config.refold_per_s
        if self._refold_after is None:
            log.info("every user is folded in under model %s", catalog.model_version)

    def status(self) -> dict[str, Any]:
        """Queue depth and live model, for health and logs."""
        return {"queued_events": self._queued, "model_version": self.catalogs.version}
