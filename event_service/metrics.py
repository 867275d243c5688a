"""Prometheus metrics of the event service (one registry per server instance)."""

from __future__ import annotations

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
        labels, registry = ["partition"], self.registry
        self.owned = Gauge("freshrec_partition_owned", "1 while this worker owns the partition",
                           labels, registry=registry)
        self.epoch = Gauge("freshrec_partition_epoch", "Fencing epoch this worker holds",
                           labels, registry=registry)
        self.position = Gauge("freshrec_partition_position",
                              "Last event stream sequence committed in the shard", labels,
                              registry=registry)
        self.lag = Gauge("freshrec_partition_lag",
                         "Events stream last sequence of the partition - committed", labels,
                         registry=registry)
        self.handovers = Counter("freshrec_partition_handovers_total",
                                 "Partitions this worker took over (claims fenced in)", labels,
                                 registry=registry)
        self.fenced = Counter("freshrec_partition_fenced_total",
                              "Commits refused because a newer owner fenced the shard", labels,
                              registry=registry)
        self.snapshot_seq = Gauge("freshrec_partition_snapshot_changelog_seq",
                                  "Changelog sequence of the shard's latest snapshot", labels,
                                  registry=registry)
        self.takeover_seconds = Histogram(
            "freshrec_partition_takeover_seconds", "From claim to live: changelog restore and "
            "fence", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=registry)
