"""Where the log is and how it is laid out (no NATS import: the embedded mode reads this).

Subjects: events of partition p on ``<prefix>.events.<p>`` (stream ``<PREFIX>_EVENTS``),
the changelog of shard p on ``<prefix>.shard.<p>`` (stream ``<PREFIX>_SHARDS``), writes of
the live catalog on ``<prefix>.catalog`` (stream ``<PREFIX>_CATALOG``, kept for good: a new
ranking host replays it from the start); leases
in the KV bucket ``<prefix>_owners`` (key ``p<p>``), worker heartbeats in
``<prefix>_members``, shard snapshots in the object store ``<prefix>_snapshots``.
"""

from __future__ import annotations

from dataclasses import dataclass

from index.partitions import partition_of


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """The log's addresses and layout; every producer and consumer must agree on it."""

    urls: str  # comma-separated NATS URLs
    partitions: int = 16  # fixed when the stream is created: workers move whole partitions
    replicas: int = 3
    duplicate_window_s: float = 120.0  # the server drops a resent event_id within this
    retention_s: float = 7 * 86_400.0  # events, and the shards' changelog, kept this long
    prefix: str = "freshrec"

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("the log needs at least one NATS URL")
        if not 1 <= self.partitions <= 4096 or not 1 <= self.replicas <= 5:
            raise ValueError(f"partitions must be in [1, 4096] and replicas in [1, 5]: {self}")
        if not self.prefix.replace("_", "").isalnum():
            raise ValueError(f"the prefix must be alphanumeric (or _), got {self.prefix!r}")

    @property
    def servers(self) -> list[str]:
        return [url.strip() for url in self.urls.split(",") if url.strip()]

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def shards_stream(self) -> str:
        return f"{self.prefix.upper()}_SHARDS"

    @property
    def catalog_stream(self) -> str:
        return f"{self.prefix.upper()}_CATALOG"

    @property
    def catalog_subject(self) -> str:
        return f"{self.prefix}.catalog"

    @property
    def owners_bucket(self) -> str:
        return f"{self.prefix}_owners"

    @property
    def members_bucket(self) -> str:
        return f"{self.prefix}_members"

    @property
    def snapshots_bucket(self) -> str:
        return f"{self.prefix}_snapshots"

    def events_subject(self, partition: int) -> str:
        return f"{self.prefix}.events.{partition}"

    def shard_subject(self, partition: int) -> str:
        return f"{self.prefix}.shard.{partition}"

    def partition(self, user_id: str) -> int:
        """The partition of a user's events (see `index.partitions`)."""
        return partition_of(user_id, self.partitions)

    @staticmethod
    def partition_of_subject(subject: str) -> int:
        """The partition a subject of either stream names (its last token)."""
        return int(subject.rsplit(".", 1)[1])
