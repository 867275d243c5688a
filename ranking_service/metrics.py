"""Prometheus metrics of the ranking service (one registry per server instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class RankingMetrics:
    """Latency per RPC, fallbacks, and the catalog version served."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("freshrec_rpc_seconds", "Handler latency by RPC", ["rpc"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.responses = Counter("freshrec_recommend_total", "Recommend answers by source",
                                 ["source"], registry=self.registry)
        self.user_age = Histogram(
            "freshrec_served_user_age_seconds",
            "Age of the user state served: from its last applied event to the answer",
            buckets=(0.01, 0.05, 0.25, 1, 5, 30, 120, 600, 3600, 6 * 3600, 86400, 7 * 86400),
            registry=self.registry)
        self.catalog = Gauge("freshrec_catalog_info", "Catalog version served", ["version"],
                             registry=self.registry)
        self.live_items = Gauge("freshrec_live_items",
                                "Items served from the live segment (put since the snapshot)",
                                registry=self.registry)
        self.live_version = Gauge("freshrec_live_catalog_version",
                                  "Live catalog version this worker serves",
                                  registry=self.registry)
        self.live_followed = Gauge("freshrec_live_followed_at_seconds",
                                   "When this worker last followed the live catalog (unix s)",
                                   registry=self.registry)
        self.reloads = Counter("freshrec_catalog_reloads_total", "Catalog reloads by outcome",
                               ["outcome"], registry=self.registry)

    def switched(self, before: str, after: str, outcome: str | None) -> None:
        """The catalog served went from `before` to `after` (a reload or a follow)."""
        if before and before != after:
            self.catalog.labels(before).set(0)
        self.catalog.labels(after).set(1)
        if outcome is not None:
            self.reloads.labels(outcome).inc()

    def serve(self, port: int, host: str) -> None:
        """Expose /metrics over HTTP."""
        start_http_server(port, addr=host, registry=self.registry)
