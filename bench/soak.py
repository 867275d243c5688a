"""Soak: steady ingest + ranking load + periodic catalog reloads; is memory flat?

`python -m bench.soak --data-dir D --minutes 10` runs both services on a working copy of D
for a bounded time, and samples each server process's memory and open files every 30 s.
It passes when anonymous memory and open files stay within 10% from the end of the
warm-up to the end, with no failed call.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.ingest import EventFactory, paced
from bench.run import user_sample, working_copy
from bench.services import start_process, stop
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.model import AlsParams
from index.snapshot import IndexSpec, write_snapshot
from recsys.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    events_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
)


def process_tree(pid: int) -> list[int]:
    """The pid and its children (the ranking service's workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return [pid, *children]


def sample(pids: list[int]) -> dict[int, dict[str, int]]:
    """Anonymous RSS (heap: what a leak grows), file-backed RSS and open files per process.

    File-backed RSS is mostly LMDB's and the index's mapped pages: it grows with the store
    under ingest by design, so it is reported but not judged.
    """
    out = {}
    for pid in pids:
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        out[pid] = {"rss_anon_kib": int(fields["RssAnon"].split()[0]),
                    "rss_file_kib": int(fields["RssFile"].split()[0]),
                    "open_files": len(os.listdir(f"/proc/{pid}/fd"))}
    return out


def _alternate_snapshot(data_dir: Path) -> tuple[str, str]:
    """Write a second snapshot (same model, new name) to reload back and forth."""
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir))
    write_snapshot(snapshots_dir(data_dir), "soak-alternate", np.asarray(catalog.item_factors),
                   catalog.item_table(), catalog.popularity,
                   IndexSpec(catalog.manifest.index_type, catalog.manifest.search),
                   AlsParams.of(catalog.manifest.als), make_current=False)
    return catalog.model_version, "soak-alternate"


class Load:
    """The background load: ingest, ranking clients and reloads, counting calls and errors."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()

    def count(self, name: str, error: grpc.RpcError | None = None) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            if error is not None:
                key = f"{name}:{error.code().name}"
                self.errors[key] = self.errors.get(key, 0) + 1

    def ingest(self, target: str, factory: EventFactory, rate: float) -> None:
        stub = events_pb2_grpc.EventServiceStub(grpc.insecure_channel(target))

        try:
            for _ in stub.IngestStream(paced(factory, rate, 50, lambda _: not self.stop.is_set())):
                self.count("IngestStream batch")
        except grpc.RpcError as error:
            self.count("IngestStream batch", error)

    def rank(self, target: str, users: list[str], seed: int) -> None:
        stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(target))
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            user = users[rng.integers(len(users))]
            try:
                if rng.random() < 0.8:
                    stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10), timeout=5)
                else:
                    stub.HomePage(ranking_pb2.HomePageRequest(user_id=user, k_per_row=10),
                                  timeout=5)
                self.count("ranking")
            except grpc.RpcError as error:
                self.count("ranking", error)

    def reload(self, target: str, versions: tuple[str, str], every_s: float) -> None:
        admin = catalog_pb2_grpc.CatalogServiceStub(grpc.insecure_channel(target))
        n = 0
        while not self.stop.wait(every_s):
            n += 1
            try:
                admin.ReloadCatalog(catalog_pb2.ReloadCatalogRequest(
                    model_version=versions[n % 2]), timeout=120)
                self.count("ReloadCatalog")
            except grpc.RpcError as error:
                self.count("ReloadCatalog", error)


def run(data_dir: Path, minutes: float, rate: float, clients: int, reload_s: float,
        port: int, users_n: int) -> dict[str, Any]:
    """Soak for `minutes`; RSS and open files every 30 s, judged from warm-up to end.

    The warm-up (a fifth of the run) lets caches fill and the users' bounded histories
    reach their cap: the writer's working set is touched users x history, which grows
    until then by design, and a leak is what keeps growing after.
    """
    with tempfile.TemporaryDirectory() as tmp:
        copy = working_copy(data_dir, Path(tmp) / "data")
        versions = _alternate_snapshot(copy)
        catalog = CatalogSnapshot.load(snapshots_dir(copy), with_index=False)
        users, _ = user_sample(copy, catalog, users_n)
        ranking, _ = start_process("ranking_service", copy, port=port, workers=2)
        events, events_port = start_process("event_service", copy)
        load = Load()
        factory = EventFactory(catalog.item_ids, users, seed=3, prefix=f"soak-{time.time_ns()}")
        workers = [threading.Thread(target=load.ingest, daemon=True,
                                    args=(f"127.0.0.1:{events_port}", factory, rate)),
                   threading.Thread(target=load.reload, daemon=True,
                                    args=(f"127.0.0.1:{port}", versions, reload_s)),
                   *(threading.Thread(target=load.rank, daemon=True,
                                      args=(f"127.0.0.1:{port}", users, n))
                     for n in range(clients))]
        for worker in workers:
            worker.start()
        series: list[dict[int, dict[str, int]]] = []
        try:
            pids = [events.pid, *process_tree(ranking.pid)]
            for _ in range(max(1, round(minutes * 2))):
                time.sleep(30.0 if minutes >= 0.5 else minutes * 60)
                series.append(sample(pids))
        finally:
            load.stop.set()
            stop([ranking, events])
    return _report(minutes, len(users), load, series,
                   {"event_service": events.pid, "ranking": process_tree(ranking.pid)})


def _report(minutes: float, users: int, load: Load, series: list[dict[int, dict[str, int]]],
            pids: dict[str, Any]) -> dict[str, Any]:
    """The figures, judged from the end of the warm-up (a fifth of the run) to the end."""
    start, end = series[len(series) // 5], series[-1]
    growth = {pid: {k: round(end[pid][k] / max(start[pid][k], 1), 3) for k in start[pid]}
              for pid in start}
    flat = all(g[k] <= 1.10 for g in growth.values() for k in ("rss_anon_kib", "open_files"))
    return {"minutes": minutes, "users": users, "calls": load.calls, "errors": load.errors,
            "pids": pids, "after_warm_up": start, "end": end, "end_over_warm_up": growth,
            "series_rss_anon_kib": {pid: [s[pid]["rss_anon_kib"] for s in series]
                                    for pid in start},
            "passed": flat and not load.errors}


def main() -> None:
    """CLI: print the figures as JSON; exit 1 if memory or files grew past 10%."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("bench/data/movielens-100k"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--ingest-rate", type=float, default=1_000.0, help="events/s")
    parser.add_argument("--clients", type=int, default=4, help="ranking client threads")
    parser.add_argument("--reload-every", type=float, default=20.0, help="seconds")
    parser.add_argument("--users", type=int, default=200, help="users the load touches")
    parser.add_argument("--port", type=int, default=50162)
    args = parser.parse_args()
    report = run(args.data_dir, args.minutes, args.ingest_rate, args.clients,
                 args.reload_every, args.port, args.users)
    print(json.dumps(report, indent=2))
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
