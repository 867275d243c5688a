"""The dashboard and the alert rules query only metrics the services export."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import yaml

from event_service.metrics import WorkerMetrics
from eventlog.cluster import free_port
from ranking_service.metrics import RankingMetrics
from recsys.v1 import events_pb2, ranking_pb2
from tests.integration.conftest import EventProcess, RunningRanking, playback

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b(freshrec_[a-z0-9_]+)")
BUILT_IN = {"up"}  # Prometheus's own series


def _exported(port: int) -> set[str]:
    """The series names a /metrics serves (a histogram's _bucket/_sum/_count included)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                               if kind == "histogram" else set())
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _queried() -> dict[str, set[str]]:
    """Metric names per expression source: the dashboard's panels, the alert rules."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = {f"panel {p['title']!r}": t["expr"] for p in dashboard["panels"]
             for t in p["targets"]}
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    exprs |= {f"alert {r['alert']}": r["expr"] for g in rules["groups"] for r in g["rules"]}
    return {where: set(METRIC.findall(expr)) for where, expr in exprs.items()}


def _served(metrics: RankingMetrics | WorkerMetrics) -> int:
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    return port


def test_every_metric_the_dashboard_and_alerts_query_is_exported(
        events_process: EventProcess, ranking: RunningRanking) -> None:
    events_process.stub.Track(events_pb2.TrackRequest(event=playback("o1", "obs", "i1")))
    ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="obs", k=3))
    # The event service's own process, the ranking server's registry, and a log-mode
    # worker's (the same class its process serves).
    exported = _exported(events_process.metrics_port) | \
        _exported(_served(ranking.deps.metrics)) | _exported(_served(WorkerMetrics()))
    queried = _queried()
    assert len(queried) >= 20
    missing = {where: sorted(names - exported - BUILT_IN)
               for where, names in queried.items() if names - exported - BUILT_IN}
    assert not missing, missing
    assert all(queried.values()), "an expression queries no freshrec metric"
