"""Settings of the ranking service, read once at start-up from flags and FRESHREC_* env.

Ranking defaults come from `RankingConfig`, so each is stated once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from index.ranking import RankingConfig
from rpc.settings import ServerSettings


@dataclass(frozen=True, kw_only=True)
class Settings(ServerSettings):
    """Everything the ranking service can be told; defaults are the production ones."""

    port: int = field(default=50052, metadata={"help": "gRPC port (0 = pick a free one)"})
    metrics_port: int = field(default=0, metadata={
        "help": "Prometheus HTTP port of worker 0 (worker i uses port + i; 0 = off)"})
    # Measured with `make bench` (2 cores): 2 processes serve 1.6-1.8x the requests/s of
    # one at 16 clients, with the same single-client latency.
    workers: int = field(default=2, metadata={
        "help": "server processes sharing the port (SO_REUSEPORT); needs a fixed port"})
    max_k: int = 500
    max_rank_items: int = field(default=500, metadata={"help": "most item_ids in RankItems"})
    catalog_poll_s: float = 1.0
    live_poll_s: float = field(default=0.2, metadata={
        "help": "how often the live catalog (puts, take-downs, learned items) is followed"})
    live_learn_refresh_s: float = field(default=RankingConfig.live_learn_refresh_s, metadata={
        "help": "at most this often, what live items learned from plays is served"})
    trending_refresh_s: float = 5.0
    brute_force_below: int = RankingConfig.brute_force_below
    popularity_blend: float = RankingConfig.popularity_blend
    new_release_years: int = RankingConfig.new_release_years
    retrieval: str = field(default=RankingConfig.retrieval, metadata={
        "help": "default candidate source: blend | vector | neighbours"})
    blend_weight: float = field(default=RankingConfig.blend_weight, metadata={
        "help": "weight of the neighbours' scores against the vector's, in [0, 1]"})
    recent_plays: int = RankingConfig.recent_plays
    recent_half_life_plays: float = RankingConfig.recent_half_life_plays
    neighbour_candidates: int = RankingConfig.neighbour_candidates
    max_log_wait_s: float = field(default=2.0, metadata={
        "help": "log mode: longest wait for a request's min_log_sequence"})
    max_version_wait_s: float = field(default=2.0, metadata={
        "help": "longest wait for a request's min_user_version"})

    def __post_init__(self) -> None:
        self.check_security()
        if self.workers < 1 or (self.workers > 1 and self.port == 0):
            raise ValueError("workers must be >= 1, and several workers need a fixed --port")
        if not 0 < self.live_poll_s <= 60 or not 0 < self.catalog_poll_s <= 3600:
            raise ValueError("live_poll_s must be in (0, 60] and catalog_poll_s in (0, 3600]")
        if self.max_k < 1 or self.max_rank_items < 1:
            raise ValueError(f"max_k and max_rank_items must be >= 1, got {self.max_k} and "
                             f"{self.max_rank_items}")
        _ = self.ranking  # its own checks

    @property
    def ranking(self) -> RankingConfig:
        """The ranker's tuning."""
        return RankingConfig(**{f.name: getattr(self, f.name) for f in fields(RankingConfig)})
