"""Settings of the event service, read once at start-up from flags and FRESHREC_* env."""

from __future__ import annotations

from dataclasses import dataclass, field

from index.events import EventWeights, FoldInPolicy, Limits
from rpc.settings import MiB, ServerSettings


@dataclass(frozen=True, kw_only=True)
class Settings(ServerSettings):
    """Everything the event service can be told; defaults are the production ones."""

    port: int = field(default=50051, metadata={"help": "gRPC port (0 = pick a free one)"})
    # Each open stream holds a pool thread for its whole life.
    max_workers: int = 64
    max_concurrent_rpcs: int = 48
    max_message_bytes: int = 16 * MiB
    max_batch_events: int = 10_000
    max_future_skew_s: float = 300.0
    queue_max_events: int = 200_000
    group_max_events: int = 20_000
    group_window_ms: float = 1.0
    stream_max_inflight: int = 256
    fold_in: str = field(default="cg", metadata={"help": "cg (warm-started) or exact"})
    cg_iterations: int = 8
    cg_min_users: int = field(default=4, metadata={
        "help": "groups with fewer warm users are solved exactly (cheaper there)"})
    max_history: int = 500
    dedupe_retention_s: float = 7 * 86_400.0
    item_half_life_s: float = 86_400.0
    snapshot_poll_s: float = 2.0
    store_map_bytes: int = field(default=4 << 30, metadata={
        "help": "initial LMDB map size (virtual; the file grows as used)"})
    store_max_bytes: int = field(default=1 << 40, metadata={
        "help": "the map doubles up to this; past it writes get RESOURCE_EXHAUSTED"})
    weight_start: float = 0.1
    weight_progress: float = 0.5
    weight_complete: float = 1.0

    def __post_init__(self) -> None:
        self.check_security()
        if self.fold_in not in ("cg", "exact"):
            raise ValueError(f"fold_in must be 'cg' or 'exact', got {self.fold_in!r}")
        if self.max_batch_events > self.queue_max_events:
            raise ValueError("max_batch_events must not exceed queue_max_events")

    @property
    def limits(self) -> Limits:
        """Per-event bounds."""
        return Limits(self.max_id_length, self.max_future_skew_s)

    @property
    def weights(self) -> EventWeights:
        """Event weighting."""
        return EventWeights(self.weight_start, self.weight_progress, self.weight_complete)

    @property
    def policy(self) -> FoldInPolicy:
        """Fold-in method and history bound."""
        return FoldInPolicy(self.fold_in, self.cg_iterations, self.cg_min_users,
                            self.max_history)
