"""Load generation against the ranking service from client processes, and the floors.

Clients run in separate processes (spawned), so they share no GIL with each other or with
the servers: N clients = up to 4 processes x N/4 threads, each calling back to back.
The floors, measured in the same run: a minimal grpcio server answering with an empty
response (one Python gRPC round trip) and exact numpy search in-process (the search).
Each run also counts the CPU per call of its clients and its server: on 2 cores shared by
both, throughput is about 2 / (their sum), so that sum says what a figure is bound by.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from index.catalog import CatalogSnapshot
from recsys.v1 import ranking_pb2, ranking_pb2_grpc

MAX_CLIENT_PROCS = 4
_TICK = os.sysconf("SC_CLK_TCK")


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99/p99.9 in milliseconds."""
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000
    return {f"p{q:g}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99, 99.9)}


# What the benchmark drives: the name in its tables, and the RPC it calls.
RPCS = {"Recommend": "Recommend", "Recommend (vector)": "Recommend", "HomePage": "HomePage"}
# Blended Recommends to `bench.fixed_answer`, which answers each with its first answer.
FIXED_ANSWER = "Recommend (fixed answer)"
_METHODS = {**RPCS, FIXED_ANSWER: "Recommend"}  # every name `drive` takes: the RPC it calls
# The report's order: from the serving stack alone to the most work per call.
LADDER = (FIXED_ANSWER, "Recommend (vector)", "Recommend", "HomePage")


def _request(name: str, user: str) -> Any:
    if name == "HomePage":
        return ranking_pb2.HomePageRequest(user_id=user, k_per_row=10)
    retrieval = ranking_pb2.RETRIEVAL_VECTOR if name == "Recommend (vector)" else \
        ranking_pb2.RETRIEVAL_BLEND
    return ranking_pb2.RecommendRequest(user_id=user, k=10, retrieval=retrieval)


def _client_process(target: str, rpc: str, users: list[str], threads: int, seconds: float,
                    seed: int, go: Any, out: Any) -> None:
    stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(target))
    call = getattr(stub, _METHODS[rpc])
    call(_request(rpc, users[0]), timeout=10)  # connect before the clock starts
    out.put(None)  # ready
    go.wait()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds

    def loop(thread: int) -> None:
        rng = np.random.default_rng(seed * 1000 + thread)
        while time.perf_counter() < deadline:
            request = _request(rpc, users[rng.integers(len(users))])
            started = time.perf_counter()
            try:
                call(request, timeout=5)
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((latencies, errors, time.process_time() - cpu))


def drive(target: str, rpc: str, users: list[str], clients: int, seconds: float,
          server_cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """`clients` concurrent callers of `rpc` (a name of RPCS) for `seconds`: throughput,
    latency, errors, and the CPU per call of the clients and (`server_cpu`: the server's
    CPU seconds so far) of the server, over the timed window."""
    procs_n = min(clients, MAX_CLIENT_PROCS)
    context = multiprocessing.get_context("spawn")
    out, go = context.Queue(), context.Event()
    procs = [context.Process(target=_client_process,
                             args=(target, rpc, users, clients // procs_n, seconds, p, go, out))
             for p in range(procs_n)]
    for proc in procs:
        proc.start()
    for _ in procs:
        out.get()  # every client connected
    server_before = server_cpu() if server_cpu else 0.0
    go.set()
    results = [out.get() for _ in procs]
    server_used = server_cpu() - server_before if server_cpu else None
    for proc in procs:
        proc.join()
    latencies = [x for lat, _, _ in results for x in lat]
    errors: dict[str, int] = {}
    for _, errs, _ in results:
        for code, n in errs.items():
            errors[code] = errors.get(code, 0) + n
    calls = max(len(latencies), 1)
    cpu = {"client_cpu_ms_per_call": round(sum(c for _, _, c in results) * 1000 / calls, 3)}
    if server_used is not None:
        cpu["server_cpu_ms_per_call"] = round(server_used * 1000 / calls, 3)
    return {"rpc": rpc, "clients": clients, "requests": len(latencies),
            "requests_per_s": round(len(latencies) / seconds), "errors": errors,
            **percentiles(latencies), **cpu, "_latencies": latencies}


def cpu_seconds(pid: int, descendants: bool = True) -> float:
    """User + system CPU seconds of a process and (`descendants`) of every process under it
    (Linux /proc; a process that ended meanwhile is left out)."""
    if not descendants:
        return _stat(pid)[1]
    stats: dict[int, tuple[int, float]] = {}  # pid: (parent, cpu seconds)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = _stat(int(entry.name))
            except OSError:
                continue
    tree, grew = {pid}, True
    while grew:
        grew = False
        for child, (parent, _) in stats.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return sum(stats[p][1] for p in tree if p in stats)


def _stat(pid: int) -> tuple[int, float]:
    """A process's parent and its user + system CPU seconds (OSError: no such process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


class _Echo(ranking_pb2_grpc.RankingServiceServicer):
    def Recommend(self, request: Any, context: Any) -> ranking_pb2.RecommendResponse:
        return ranking_pb2.RecommendResponse()


@contextmanager
def echo_server() -> Iterator[str]:
    """The floor's server (an empty Recommend answer) for the `with` block: its target."""
    server = grpc.server(futures.ThreadPoolExecutor(16))
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def echo_floor(target: str, clients: list[int], seconds: float) -> list[dict[str, Any]]:
    """The floor of a Python gRPC round trip at each client count, same client code (the
    server runs in this process: `echo_server`)."""
    return [drive(target, "Recommend", ["u"], n, seconds,
                  lambda: cpu_seconds(os.getpid(), descendants=False)) for n in clients]


def beside_echo(run: dict[str, Any], echo: str, seconds: float) -> dict[str, Any]:
    """The run with the echo floor measured right after it at its client count (`echo`):
    on a shared machine a floor measured minutes apart is another machine's."""
    (floor,) = echo_floor(echo, [run["clients"]], seconds)
    return {**run, "echo": {k: floor[k] for k in ("p50_ms", "p99_ms", "requests_per_s",
                                                  "client_cpu_ms_per_call",
                                                  "server_cpu_ms_per_call")}}


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


def recall_at_10(catalog: CatalogSnapshot, vectors: np.ndarray) -> float:
    """recall@10 of the snapshot's index against exact search, on real user vectors."""
    exact = np.argsort(-(vectors @ np.asarray(catalog.item_factors).T), axis=1)[:, :10]
    ids, _ = catalog.search(vectors, 10)
    return round(float(np.mean([len(set(a) & set(e)) / 10
                                for a, e in zip(ids, exact, strict=True)])), 4)
