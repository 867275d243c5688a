"""Starting the real services as subprocesses for benchmarks and crash tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from recsys.v1 import ranking_pb2, ranking_pb2_grpc


def start_event_service(data_dir: Path, *args: str) -> tuple[subprocess.Popen[str], int, float]:
    """Start the event service on a free port; returns (process, port, seconds to listen)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "event_service", "--data-dir", str(data_dir),
                             "--port", "0", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r" on [\d.]+:(\d+) ", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(found.group(1)), time.perf_counter() - started
    raise RuntimeError(f"event service did not start (exit {proc.wait()})")


def start_ranking(data_dir: Path, workers: int, port: int) -> subprocess.Popen[bytes]:
    """Start the ranking service on a fixed port and wait until it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "ranking_service", "--data-dir",
                             str(data_dir), "--port", str(port), "--workers", str(workers)],
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + 300
    while True:
        try:
            stub.Recommend(ranking_pb2.RecommendRequest(user_id="x", k=1), timeout=1)
            return proc
        except grpc.RpcError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the ranking service did not start") from None
            time.sleep(0.2)
