"""Recommend latency and throughput of the ranking service, from client processes over gRPC.

`python -m bench.ranking --data-dir D [--workers 1,2]` starts the ranking service on D and
reports, for each worker count: p50/p99/p99.9 latency with 1 client, and requests/s with
16 concurrent clients (4 client processes x 4 threads, so clients do not share a GIL with
each other or with the server). In the same run, two floors to read the figures against:
an exact numpy search in-process (the search alone) and a minimal grpcio echo server (one
Python gRPC round trip). Also recall@10 of the snapshot's index against exact search.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.store import UserStore
from recsys.v1 import ranking_pb2, ranking_pb2_grpc

CLIENT_PROCS, THREADS_PER_PROC = 4, 4


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99/p99.9 in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {f"p{q:g}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99, 99.9)}


def _users(data_dir: Path, n: int) -> list[str]:
    with UserStore(users_dir(data_dir), readonly=True) as store, store.env.begin() as txn:
        cursor = txn.cursor(db=store.dbs["users"])
        return [bytes(k).decode() for k, _ in zip(cursor.iternext(values=False), range(n),
                                                  strict=False)]


def _client(target: str, users: list[str], seconds: float, seed: int,
            out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One client process: THREADS_PER_PROC threads calling Recommend back to back."""
    channel = grpc.insecure_channel(target)
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    def loop(thread: int) -> None:
        rng = np.random.default_rng(seed * 100 + thread)
        while time.perf_counter() < deadline:
            request = ranking_pb2.RecommendRequest(user_id=users[rng.integers(len(users))], k=10)
            started = time.perf_counter()
            try:
                stub.Recommend(request, timeout=5)
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    threads = [threading.Thread(target=loop, args=(t,)) for t in range(THREADS_PER_PROC)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((latencies, errors))


def sequential(target: str, users: list[str], calls: int) -> dict[str, float]:
    """One client, one call at a time."""
    stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(target))
    rng = np.random.default_rng(0)
    for _ in range(200):  # warm-up
        stub.Recommend(ranking_pb2.RecommendRequest(user_id=users[0], k=10))
    latencies = []
    for _ in range(calls):
        request = ranking_pb2.RecommendRequest(user_id=users[rng.integers(len(users))], k=10)
        started = time.perf_counter()
        stub.Recommend(request)
        latencies.append(time.perf_counter() - started)
    return {"calls": calls, **percentiles(latencies)}


def concurrent(target: str, users: list[str], seconds: float) -> dict[str, object]:
    """16 clients in 4 processes for `seconds`: requests/s and latency."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_client, args=(target, users, seconds, p, out))
             for p in range(CLIENT_PROCS)]
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    latencies = [x for lat, _ in results for x in lat]
    errors: dict[str, int] = {}
    for _, errs in results:
        for code, n in errs.items():
            errors[code] = errors.get(code, 0) + n
    return {"clients": CLIENT_PROCS * THREADS_PER_PROC, "requests": len(latencies),
            "requests_per_s": round(len(latencies) / seconds), "errors": errors,
            **percentiles(latencies)}


def exact_floor(catalog: CatalogSnapshot, vectors: np.ndarray) -> dict[str, float]:
    """In-process exact search (matmul + top-10) per query: the floor of the search itself."""
    factors = np.asarray(catalog.item_factors)
    latencies = []
    for vector in vectors:
        started = time.perf_counter()
        scores = factors @ vector
        top = np.argpartition(-scores, 10)[:10]
        top[np.argsort(-scores[top])]
        latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


def recall(catalog: CatalogSnapshot, vectors: np.ndarray) -> float:
    """recall@10 of the snapshot's index against exact search, on real user vectors."""
    exact = np.argsort(-(vectors @ np.asarray(catalog.item_factors).T), axis=1)[:, :10]
    ids, _ = catalog.search(vectors, 10)
    return round(float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact,
                                                                             strict=True)])), 4)


class _Echo(ranking_pb2_grpc.RankingServiceServicer):
    def Recommend(self, request, context):  # type: ignore[no-untyped-def]
        return ranking_pb2.RecommendResponse(user_version=1)


def echo_floor(calls: int) -> dict[str, float]:
    """A minimal grpcio server answering Recommend with an empty response, in-process."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        return sequential(f"127.0.0.1:{port}", ["u"], calls)
    finally:
        server.stop(0)


def start_ranking(data_dir: Path, workers: int, port: int) -> subprocess.Popen[bytes]:
    """Start the ranking service and wait until it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "ranking_service", "--data-dir",
                             str(data_dir), "--port", str(port), "--workers", str(workers)],
                            stderr=None, env={**os.environ,
                                                            "PYTHONPATH": os.getcwd()})
    stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + 120
    while True:
        try:
            stub.Recommend(ranking_pb2.RecommendRequest(user_id="x", k=1), timeout=1)
            return proc
        except grpc.RpcError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the ranking service did not start") from None
            time.sleep(0.2)


def run(data_dir: Path, workers: list[int], calls: int, seconds: float,
        port: int) -> dict[str, object]:
    """All measurements for one data dir."""
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir))
    users = _users(data_dir, 5000)
    with UserStore(users_dir(data_dir), readonly=True) as store:
        vectors = np.stack([r.vector for u in users[:500] if (r := store.get_user(u))
                            and len(r.vector) == catalog.dim])
    report: dict[str, object] = {
        "catalog": {"model_version": catalog.model_version, "items": len(catalog),
                    "dim": catalog.dim, "index": catalog.manifest.index_type},
        "recall_at_10": recall(catalog, vectors),
        "floor_exact_numpy_search": exact_floor(catalog, vectors[:300]),
        "floor_grpc_echo_1_client": echo_floor(calls),
    }
    for n in workers:
        proc = start_ranking(data_dir, n, port)
        try:
            target = f"127.0.0.1:{port}"
            report[f"workers_{n}"] = {"one_client": sequential(target, users, calls),
                                      "sixteen_clients": concurrent(target, users, seconds)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return report


def main() -> None:
    """CLI: print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--calls", type=int, default=3000, help="sequential calls (1 client)")
    parser.add_argument("--seconds", type=float, default=10.0, help="16-client run length")
    parser.add_argument("--port", type=int, default=50152)
    args = parser.parse_args()
    report = run(args.data_dir, [int(w) for w in args.workers.split(",")], args.calls,
                 args.seconds, args.port)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
