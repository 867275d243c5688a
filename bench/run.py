"""`make bench`: latency, throughput, freshness and recall of the running services.

For each catalog (MovieLens-100K, synthetic 100k and 1M items, d=64; built once into
bench/data/), the real event and ranking services are started on a copy of its data dir
and driven from client processes (then again beside 10,000 live items, `bench.live`); then
the same service with every Recommend answered by its first answer (`bench.fixed_answer`),
so a run shows what the serving stack costs apart from the work.
Floors measured in the same run: a minimal grpcio echo
server (first, and again right after each 1- and 16-client run: the ratios are read against
that one) and exact numpy search. Results: bench/results/<UTC time>.json, a Markdown table
(printed and written beside it) and a PNG (latency CDFs, throughput vs clients).
`--quick` (make bench QUICK=1) runs MovieLens-100K only with short stages, in about a minute.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from bench import freshness, ingest, live, load, report
from bench.prefill import prefill
from bench.services import start_process, stop
from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.files import atomic_write
from index.snapshot import NEIGHBOUR_FILES, SnapshotError, current_version
from index.store import UserStore
from recsys.v1 import events_pb2_grpc

T = TypeVar("T")
CATALOGS = {
    "movielens-100k": ["--dataset", "movielens-100k"],
    "synthetic-100k": ["--dataset", "synthetic", "--n-items", "100000", "--index", "hnsw"],
    # A 10-play co-visitation window keeps the 1M build's pair count near 10^8.
    "synthetic-1m": ["--dataset", "synthetic", "--n-items", "1000000", "--n-users", "200000",
                     "--per-user", "50", "--index", "hnsw", "--neighbour-window", "10"],
}
CLIENTS = [1, 4, 16]
PAIRED = (1, 16)  # the client counts whose figures are read against the echo's
LIVE_ITEMS = 10_000  # put through ItemService for the live-segment stage
FULL_USERS = {False: 10_000, True: 1_000}  # users prefilled to the cap, full and quick runs


def stage(name: str, work: Callable[[], T]) -> T:
    """Run one stage with a progress line on stderr."""
    print(f"  {name} ...", end="", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = work()
    print(f" {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return result


def prepared(name: str, root: Path) -> Path:
    """The catalog's data dir under bench/data/, built on first use (and again if it was
    built before snapshots had neighbours)."""
    data_dir = root / name
    if not _has_neighbours(snapshots_dir(data_dir)):
        shutil.rmtree(data_dir, ignore_errors=True)
        stage(f"building {name} (once)", lambda: subprocess.run(
            [sys.executable, "-m", "index", "build", *CATALOGS[name], "--data-dir",
             str(data_dir)], check=True, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.getcwd()}))
    return data_dir


def _has_neighbours(snapshots: Path) -> bool:
    try:
        return (snapshots / current_version(snapshots) / NEIGHBOUR_FILES[0]).exists()
    except SnapshotError:  # none built yet
        return False


def working_copy(data_dir: Path, target: Path) -> Path:
    """Snapshots hard-linked (read-only), the user store copied (the bench writes to it)."""
    shutil.copytree(snapshots_dir(data_dir), snapshots_dir(target), copy_function=os.link)
    shutil.copytree(users_dir(data_dir), users_dir(target))
    return target


def user_sample(data_dir: Path, catalog: CatalogSnapshot, n: int) -> tuple[list[str],
                                                                            np.ndarray]:
    """Up to n bootstrapped user ids and their vectors."""
    with UserStore(users_dir(data_dir), readonly=True) as store:
        with store.env.begin() as txn:
            keys = [bytes(k).decode() for k, _ in zip(
                txn.cursor(db=store.dbs["users"]).iternext(values=False), range(n),
                strict=False)]
        records = [store.get_user(k) for k in keys]
    vectors = [r.vector for r in records if r is not None and len(r.vector) == catalog.dim]
    return keys, np.stack(vectors)


def measure(name: str, data_dir: Path, quick: bool, port: int, echo: str) -> dict[str, Any]:
    """Every stage for one catalog, against services on a working copy; the 1- and
    16-client runs each with the echo floor right after it (`echo`: its target)."""
    seconds, scale = (2.0, 0.05) if quick else (8.0, 1.0)
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir))
    users, vectors = user_sample(data_dir, catalog, 5000)
    result: dict[str, Any] = {
        "items": len(catalog), "dim": catalog.dim, "index": catalog.manifest.index_type,
        "recall_at_10": stage("recall", lambda: load.recall_at_10(catalog, vectors[:500])),
        "floor_exact_search": stage("exact numpy search",
                                    lambda: load.exact_floor(catalog, vectors[:300])),
    }
    with tempfile.TemporaryDirectory() as tmp:
        copy = working_copy(data_dir, Path(tmp) / "data")
        full_users = stage(f"prefilling {FULL_USERS[quick]:,} users to the history cap",
                           lambda: prefill(copy, FULL_USERS[quick]))
        ranking, _ = stage("starting ranking (2 workers)", lambda: start_process(
            "ranking_service", copy, port=port, workers=2))
        events, events_port = start_process("event_service", copy)
        target, events_target = f"127.0.0.1:{port}", f"127.0.0.1:{events_port}"
        try:
            for rpc in load.RPCS:
                result[rpc] = clients_runs(target, ranking.pid, rpc, users, seconds, echo)
            fixed, fixed_port = stage("starting the fixed answer's ranking (2 workers)",
                                      lambda: start_process("bench.fixed_answer", copy,
                                                            port=port + 1, workers=2))
            try:
                result[load.FIXED_ANSWER] = clients_runs(
                    f"127.0.0.1:{fixed_port}", fixed.pid, load.FIXED_ANSWER, users, seconds,
                    echo)
            finally:
                stop([fixed])
            result["live_catalog"] = stage(f"Recommend beside {LIVE_ITEMS:,} live items",
                                           lambda: live.suite(
                events_target, target, users, catalog.manifest.genres, LIVE_ITEMS, seconds,
                1 if quick else 3))
            stub = events_pb2_grpc.EventServiceStub(grpc.insecure_channel(events_target))
            result["ingest"] = stage("ingest", lambda: ingest.suite(
                stub, catalog.item_ids, users, scale, 5_000.0, 2_000.0))
            result["freshness"] = stage("freshness", lambda: freshness.probe(
                events_target, target, catalog.item_ids, users, 30 if quick else 200, 1_000.0))
            result["full_history"] = stage("ingest, full histories", lambda: {
                **ingest.full_history(stub, catalog.item_ids, full_users, scale, 5_000.0),
                "freshness": freshness.probe(events_target, target, catalog.item_ids,
                                             full_users, 30 if quick else 200, 1_000.0)})
        finally:
            stop([ranking, events])
    return result


def clients_runs(target: str, pid: int, rpc: str, users: list[str], seconds: float,
                 echo: str) -> list[dict[str, Any]]:
    """`rpc` at each client count against the server at `target` (process `pid` and its
    workers), the 1- and 16-client runs each with the echo right after it."""
    server_cpu = functools.partial(load.cpu_seconds, pid)
    runs = [stage(f"{rpc}, {n} clients", functools.partial(
        load.drive, target, rpc, users, n, seconds, server_cpu)) for n in CLIENTS]
    return [stage(f"echo beside it, {run['clients']} clients", functools.partial(
        load.beside_echo, run, echo, seconds)) if run["clients"] in PAIRED else run
        for run in runs]


def main() -> None:
    """CLI: measure, then write JSON, Markdown and PNG."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="MovieLens-100K only, short stages")
    parser.add_argument("--catalogs", help=f"comma-separated, from {sorted(CATALOGS)}")
    parser.add_argument("--data", type=Path, default=Path("bench/data"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--port", type=int, default=50152)
    args = parser.parse_args()
    names = args.catalogs.split(",") if args.catalogs else \
        (["movielens-100k"] if args.quick else list(CATALOGS))
    seconds = 2.0 if args.quick else 8.0
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "quick": args.quick,
                               "catalogs": {}}
    with load.echo_server() as echo:
        print("floors", file=sys.stderr)
        results["floor_grpc_echo"] = stage("grpc echo server", lambda: load.echo_floor(
            echo, CLIENTS, seconds))
        for name in names:
            print(name, file=sys.stderr)
            results["catalogs"][name] = measure(name, prepared(name, args.data), args.quick,
                                                args.port, echo)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    table = report.markdown(results)
    print(table)
    atomic_write(args.out / f"{stamp}.md", table.encode())
    report.plot(results, args.out / f"{stamp}.png")
    atomic_write(args.out / f"{stamp}.json",
                 json.dumps(report.without_samples(results), indent=2).encode())
    print(f"wrote {args.out / stamp}.{{json,md,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
