"""1,000 alternating reloads on 2 worker processes under load: no failure, no step back.

Each client channel has its own connection (a local subchannel pool), and SO_REUSEPORT
keeps a connection on one worker, so every response is attributed to the worker that
GetCatalogInfo on the same channel names.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.services import start_process, stop
from eventlog.cluster import free_port
from index.catalog import CatalogSnapshot
from recsys.v1 import catalog_pb2, catalog_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from tests.integration.conftest import second_snapshot, worker_channels

VERSIONS = ("small-v1", "small-v2")
RELOADS = 1_000
POLL_S = 0.02  # a poll every 20 ms: many polls land beside reloads


@dataclass(frozen=True)
class Call:
    """One call as the test saw it (monotonic times of this process)."""

    worker: str
    started: float
    ended: float
    version: str


@dataclass
class Log:
    """Everything the clients and the reloader saw."""

    responses: list[Call] = field(default_factory=list)
    reloads: list[Call] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _recommend(channel: grpc.Channel, worker: str, n: int, log: Log,
               done: threading.Event) -> None:
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    while not done.is_set():
        started = time.monotonic()
        try:
            response = stub.Recommend(ranking_pb2.RecommendRequest(user_id=f"u{n}", k=10),
                                      timeout=10)
        except grpc.RpcError as error:
            log.failures.append(f"Recommend: {error.code()} {error.details()}")
            continue
        log.responses.append(Call(worker, started, time.monotonic(), response.model_version))
        if len(response.items) != 10:
            log.failures.append(f"Recommend gave {len(response.items)} items")


def _reload(admins: dict[str, catalog_pb2_grpc.CatalogServiceStub], log: Log) -> None:
    rng = random.Random(9)
    for i in range(RELOADS):
        worker = rng.choice(sorted(admins))
        started = time.monotonic()
        try:
            info = admins[worker].ReloadCatalog(catalog_pb2.ReloadCatalogRequest(
                model_version=VERSIONS[(i + 1) % 2]), timeout=30)
        except grpc.RpcError as error:
            log.failures.append(f"ReloadCatalog: {error.code()} {error.details()}")
            continue
        assert info.server_id == worker
        log.reloads.append(Call(worker, started, time.monotonic(), info.model_version))
        time.sleep(rng.uniform(0, POLL_S))  # quiet spells, where only one version is right


def _stale(log: Log) -> list[str]:
    """Responses carrying a version older than the last reload their worker answered.

    A response that began after reload n (answered by its worker) settled may carry the
    version of reload n, or of any later reload that began before the response ended.
    """
    stale = []
    for r in log.responses:
        mine = [n for n, c in enumerate(log.reloads)
                if c.worker == r.worker and c.ended < r.started]
        if not mine:
            continue
        allowed = {log.reloads[n].version for n in range(mine[-1], len(log.reloads))
                   if n == mine[-1] or log.reloads[n].started < r.ended}
        if r.version not in allowed:
            stale.append(f"{r} after reload {mine[-1]}: {log.reloads[mine[-1]]}")
    return stale


def test_alternating_reloads_on_two_workers_never_fail_or_step_back(
    fresh_data_dir: Path, catalog: CatalogSnapshot
) -> None:
    second_snapshot(fresh_data_dir, catalog, VERSIONS[1])
    port = free_port()
    proc, _ = start_process("ranking_service", fresh_data_dir, "--catalog-poll-s", str(POLL_S),
                            port=port, workers=2)
    log, done = Log(), threading.Event()
    try:
        channels = worker_channels(port, per_worker=3)  # 2 clients and 1 admin per worker
        clients = [threading.Thread(target=_recommend, args=(c, w, n, log, done))
                   for n, (w, c) in enumerate((w, c) for w, cs in channels.items()
                                              for c in cs[:2])]
        for client in clients:
            client.start()
        _reload({w: catalog_pb2_grpc.CatalogServiceStub(cs[2]) for w, cs in channels.items()},
                log)
        done.set()
        for client in clients:
            client.join(30)
        settled = time.monotonic()
        final = {w: catalog_pb2_grpc.CatalogServiceStub(cs[0]) for w, cs in channels.items()}
        while any(a.GetCatalogInfo(catalog_pb2.GetCatalogInfoRequest()).model_version
                  != log.reloads[-1].version for a in final.values()):
            assert time.monotonic() - settled < POLL_S + 5, "a worker did not follow CURRENT"
            time.sleep(0.02)
    finally:
        done.set()
        stop([proc], signal.SIGTERM)
    assert log.failures == []
    assert len(log.reloads) == RELOADS and {c.worker for c in log.reloads} == set(channels)
    assert len(log.responses) > 1_000
    assert _stale(log) == []
