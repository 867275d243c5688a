"""The single writer: groups submitted batches into one LMDB write txn each, then acks them.

Handlers validate and submit; only this thread writes (LMDB allows one write txn at a
time, and one txn per group is what makes durable commits cheap: see PITFALLS). A
submission is completed only after the txn that applied it has committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from event_service.metrics import EventMetrics
from index.catalog import CatalogSnapshot
from index.events import Event, EventWeights, FoldInPolicy, GroupResult, Rejection, apply_group
from index.snapshot import SnapshotError, current_version
from index.store import StoreWriter, UserStore

log = logging.getLogger("freshrec.events")


class QueueFull(Exception):
    """The writer's queue is full (overload): retry later."""


class WriterStopped(Exception):
    """The writer is shutting down and takes no new work."""


@dataclass
class Submission:
    """A validated batch waiting for its commit; `wait` returns once it is durable."""

    events: list[Event]
    rejected: list[tuple[Rejection, Event]]
    received_at: float = field(default_factory=time.time)
    result: GroupResult | None = None
    error: Exception | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        """Queue cost: events carried (at least 1, so empty batches still count)."""
        return max(1, len(self.events) + len(self.rejected))

    def finish(self, result: GroupResult | None, error: Exception | None = None) -> None:
        """Complete the submission (called by the writer after commit, or on failure)."""
        self.result, self.error = result, error
        self._done.set()

    def wait(self, timeout: float | None = None) -> GroupResult:
        """Block until committed; raises the writer's error, or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError("the write was not committed before the deadline")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass(frozen=True)
class WriterConfig:
    """How the writer groups, folds in and maintains the store."""

    weights: EventWeights
    policy: FoldInPolicy
    queue_max_events: int
    group_max_events: int
    group_window_s: float
    item_half_life_s: float
    dedupe_retention_s: float
    snapshot_poll_s: float


class Writer:
    """Owns the store's write side and the live catalog (item factors) it folds in against."""

    def __init__(self, store: UserStore, snapshots: Path, catalog: CatalogSnapshot,
                 config: WriterConfig, metrics: EventMetrics) -> None:
        self.store, self.snapshots, self.catalog = store, snapshots, catalog
        self.config, self.metrics = config, metrics
        self._queue: deque[Submission] = deque()
        self._queued = 0
        # Two conditions on one lock: producers wait for space, the writer for work, so a
        # submission wakes only the writer (and only when it is idle).
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._has_space = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="freshrec-writer", daemon=True)
        self._next_housekeeping = 0.0
        self._refused_version = ""
        self._rejected_seq = 0

    def start(self) -> None:
        """Start the writer thread."""
        self.metrics.model_version.labels(self.catalog.model_version).set(1)
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

    def _take(self) -> list[Submission]:
        """Wait for work; give more a short window to arrive; take up to a group's worth."""
        with self._lock:
            self._has_work.wait_for(lambda: self._queue or self._stopping, timeout=0.5)
            if not self._queue:
                return []
        # Sleeping through the window (rather than waking per arrival) keeps the GIL free
        # for the handlers that are receiving the rest of the group.
        if self.config.group_window_s > 0:
            time.sleep(self.config.group_window_s)
        with self._lock:
            group = self._drain([])
            self.metrics.queue_events.set(self._queued)
            self._has_space.notify_all()
            return group

    def _drain(self, group: list[Submission]) -> list[Submission]:
        events = 0
        while self._queue and (not group or events + self._queue[0].size
                               <= self.config.group_max_events):
            submission = self._queue.popleft()
            self._queued -= submission.size
            events += submission.size
            group.append(submission)
        return group

    def _commit(self, group: list[Submission]) -> None:
        events = [e for s in group for e in s.events]
        started = time.perf_counter()
        now = time.time()
        try:
            result = self.store.transact(lambda w: self._apply(w, group, events, now))
        except Exception as exc:  # the batch is not acked; the writer keeps going
            log.error("write of %d events failed: %s", len(events), exc)
            for submission in group:
                submission.finish(None, exc)
            return
        committed = time.time()
        self._record(group, result, time.perf_counter() - started, committed)
        offset = 0
        for submission in group:
            n = len(submission.events)
            submission.finish(GroupResult(result.duplicate[offset:offset + n],
                                          result.item_known[offset:offset + n],
                                          result.user_version[offset:offset + n]))
            offset += n

    def _apply(self, writer: StoreWriter, group: list[Submission], events: list[Event],
               now: float) -> GroupResult:
        for submission in group:
            for rejection, event in submission.rejected:
                self._rejected_seq += 1
                writer.put_rejected(now, self._rejected_seq, {**event.__dict__,
                                                              **rejection.__dict__})
        config = self.config
        return apply_group(writer, self.catalog, events, config.weights, config.policy, now,
                           config.item_half_life_s)

    def _record(self, group: list[Submission], result: GroupResult, seconds: float,
                committed: float) -> None:
        metrics = self.metrics
        metrics.commit_seconds.observe(seconds)
        metrics.group_size.observe(len(result.duplicate))
        duplicates = sum(result.duplicate)
        metrics.events.labels("duplicate").inc(duplicates)
        metrics.events.labels("accepted").inc(len(result.duplicate) - duplicates)
        metrics.events.labels("unknown_item").inc(
            sum(k is False and not d for k, d in zip(result.item_known, result.duplicate,
                                                     strict=True)))
        metrics.events.labels("rejected").inc(sum(len(s.rejected) for s in group))
        for submission in group:
            metrics.event_to_commit_seconds.observe(committed - submission.received_at)

    def _housekeeping(self) -> None:
        """Forget old event ids, reap dead readers, follow snapshots/CURRENT to a new model."""
        self._next_housekeeping = time.monotonic() + self.config.snapshot_poll_s
        try:
            cutoff = time.time() - self.config.dedupe_retention_s
            self.store.transact(lambda w: w.prune_seen(cutoff, limit=10_000))
            self.store.reap_stale_readers()
            self._follow_current()
        except Exception as exc:  # housekeeping must never stop the writer
            log.error("housekeeping failed: %s", exc)

    def _follow_current(self) -> None:
        version = current_version(self.snapshots)
        if version in (self.catalog.model_version, self._refused_version):
            return
        try:
            catalog = CatalogSnapshot.load(self.snapshots, version, with_index=False)
        except SnapshotError as exc:
            self._refused_version = version
            log.error("refusing new snapshot %s, keeping %s: %s", version,
                      self.catalog.model_version, exc)
            return
        log.info("switched to model %s; users are recomputed when next touched", version)
        self.metrics.model_version.labels(self.catalog.model_version).set(0)
        self.metrics.model_version.labels(version).set(1)
        self.catalog = catalog

    def status(self) -> dict[str, Any]:
        """Queue depth and live model, for health and logs."""
        return {"queued_events": self._queued, "model_version": self.catalog.model_version}
