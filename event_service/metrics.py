"""Prometheus metrics of the event service (one registry per server instance)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EventMetrics:
    """Counters and histograms the writer and handlers update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("freshrec_events_total", "Events by outcome", ["outcome"],
                              registry=self.registry)
        self.group_size = Histogram("freshrec_commit_group_events", "Events per write txn",
                                    buckets=(1, 10, 100, 500, 1000, 5000, 20000),
                                    registry=self.registry)
        self.commit_seconds = Histogram("freshrec_commit_seconds", "Write txn time incl. fold-in",
                                        buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.event_to_commit_seconds = Histogram(
            "freshrec_event_to_commit_seconds", "From receipt of an event to its commit",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_events = Gauge("freshrec_queue_events", "Events waiting for the writer",
                                  registry=self.registry)
        self.model_version = Gauge("freshrec_model_info", "Live model version", ["version"],
                                   registry=self.registry)
        self.received_at = Counter(
            "freshrec_events_occurred_at_defaulted_total",
            "Accepted events without occurred_at, given the time of receipt",
            registry=self.registry)
        self.refolded = Counter("freshrec_refolded_users_total",
                                "Users re-folded in the background under a new model",
                                registry=self.registry)

    def serve(self, port: int, host: str) -> None:
        """Expose /metrics over HTTP."""
        start_http_server(port, addr=host, registry=self.registry)


class WorkerMetrics(EventMetrics):
    """The event metrics, plus one series per partition of the log (log-mode workers)."""

    def __init__(self) -> None:
        super().__init__()
        def per_partition(kind: type[Gauge] | type[Counter], name: str, text: str) -> Any:
            return kind(f"freshrec_partition_{name}", text, ["partition"],
                        registry=self.registry)

        self.owned = per_partition(Gauge, "owned", "1 while this worker owns the partition")
        self.epoch = per_partition(Gauge, "epoch", "Fencing epoch this worker holds")
        self.position = per_partition(Gauge, "position",
                                      "Last event stream sequence committed in the shard")
        self.lag = per_partition(Gauge, "lag",
                                 "Events stream last sequence of the partition - committed")
        self.handovers = per_partition(Counter, "handovers_total",
                                       "Partitions this worker took over (claims fenced in)")
        self.fenced = per_partition(Counter, "fenced_total",
                                    "Commits refused because a newer owner fenced the shard")
        self.snapshot_seq = per_partition(Gauge, "snapshot_changelog_seq",
                                          "Changelog sequence of the shard's latest snapshot")
        self.takeover_seconds = Histogram(
            "freshrec_partition_takeover_seconds", "From claim to live: changelog restore and "
            "fence", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry)
