"""Settings of the event service, read once at start-up from flags and FRESHREC_* env.

Defaults come from the domain objects they configure (`Limits`, `EventWeights`,
`FoldInPolicy`, `WriterConfig`, the store's sizes), so each is stated once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from event_service.writer import WriterConfig
from index.apply import FoldInPolicy
from index.events import EventWeights, Limits
from index.store import DEFAULT_MAP_SIZE, MAX_MAP_SIZE
from rpc.settings import MiB, ServerSettings


@dataclass(frozen=True, kw_only=True)
class Settings(ServerSettings):
    """Everything the event service can be told; defaults are the production ones."""

    port: int = field(default=50051, metadata={"help": "gRPC port (0 = pick a free one)"})
    # Each open stream holds a pool thread for its whole life.
    max_workers: int = 64
    max_concurrent_rpcs: int = 48
    max_message_bytes: int = 16 * MiB
    max_batch_events: int = Limits.max_batch_events
    max_future_skew_s: float = Limits.max_future_skew_s
    require_occurred_at: bool = field(default=Limits.require_occurred_at, metadata={
        "help": "reject events without occurred_at (default: they happened when received)"})
    queue_max_events: int = WriterConfig.queue_max_events
    group_max_events: int = WriterConfig.group_max_events
    group_window_ms: float = WriterConfig.group_window_s * 1000
    stream_max_inflight: int = 256
    max_history: int = FoldInPolicy.max_history
    stats_min_history: int = field(default=FoldInPolicy.stats_min_history, metadata={
        "help": "users with this many known items keep fold-in statistics (O(d^2) updates)"})
    stats_rebuild_every: int = field(default=FoldInPolicy.stats_rebuild_every, metadata={
        "help": "rebuild a user's statistics from the history after this many updates"})
    dedupe_retention_s: float = WriterConfig.dedupe_retention_s
    item_half_life_s: float = field(default=WriterConfig.item_half_life_s, metadata={
        "help": "half-life of the item play counts; kept in the store, where the ranking "
                "service reads it"})
    snapshot_poll_s: float = WriterConfig.snapshot_poll_s
    refold_per_s: float = field(default=WriterConfig.refold_per_s, metadata={
        "help": "after a model change, users re-folded per second in the background"})
    stats_cache_mb: int = field(default=WriterConfig.stats_cache_bytes >> 20, metadata={
        "help": "memory for the fold-in statistics of active users (~17 KB each at d=64)"})
    store_map_bytes: int = field(default=DEFAULT_MAP_SIZE, metadata={
        "help": "initial LMDB map size (virtual; the file grows as used)"})
    store_max_bytes: int = field(default=MAX_MAP_SIZE, metadata={
        "help": "the map doubles up to this; past it writes get RESOURCE_EXHAUSTED"})
    weight_start: float = EventWeights.start
    weight_progress: float = EventWeights.progress
    weight_complete: float = EventWeights.complete

    def __post_init__(self) -> None:
        self.check_security()
        _ = self.writer  # the domain objects check their own values
        if self.max_batch_events > self.queue_max_events:
            raise ValueError("max_batch_events must not exceed queue_max_events")

    @property
    def limits(self) -> Limits:
        """Per-event and per-batch bounds."""
        return Limits(max_id_length=self.max_id_length, max_future_skew_s=self.max_future_skew_s,
                      max_batch_events=self.max_batch_events,
                      require_occurred_at=self.require_occurred_at)

    @property
    def writer(self) -> WriterConfig:
        """How the writer groups, weighs, folds in and maintains the store."""
        return WriterConfig(
            weights=EventWeights(start=self.weight_start, progress=self.weight_progress,
                                 complete=self.weight_complete),
            policy=FoldInPolicy(max_history=self.max_history,
                                stats_min_history=self.stats_min_history,
                                stats_rebuild_every=self.stats_rebuild_every),
            queue_max_events=self.queue_max_events, group_max_events=self.group_max_events,
            group_window_s=self.group_window_ms / 1000, item_half_life_s=self.item_half_life_s,
            dedupe_retention_s=self.dedupe_retention_s, snapshot_poll_s=self.snapshot_poll_s,
            refold_per_s=self.refold_per_s, stats_cache_bytes=self.stats_cache_mb << 20)


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
