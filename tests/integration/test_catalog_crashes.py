"""kill -9 during a catalog build or a reload: the old snapshot keeps serving, nothing half-read."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import grpc

from bench import crash
from bench.services import start_process, stop
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.snapshot import IndexSpec, current_version
from recsys.v1 import catalog_pb2, catalog_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from tests.integration.conftest import RunningRanking, ranking_settings, second_snapshot


def test_kill_9_during_builds_leaves_only_complete_snapshots(fresh_data_dir: Path) -> None:
    ranking = RunningRanking(ranking_settings(fresh_data_dir))
    try:
        report = crash.build_kills(fresh_data_dir, cycles=3, seed=2, max_delay_s=0.5)
        response = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u1", k=5))
    finally:
        ranking.close()
    assert report["incomplete_snapshot_dirs"] == 0
    assert report["builds_killed_mid_write"] >= 1  # the kills really hit a write
    assert len(response.items) == 5
    assert response.model_version in ("small-v1", *(f"killed-2-{i}" for i in range(3)))


def test_kill_9_during_reloads_restarts_serving_current(fresh_data_dir: Path,
                                                        catalog: CatalogSnapshot) -> None:
    second_snapshot(fresh_data_dir, catalog, "small-v2",
                    IndexSpec.preset("hnsw", len(catalog), catalog.dim))
    rng = random.Random(4)
    for _ in range(3):
        proc, port = start_process("ranking_service", fresh_data_dir)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        admin = catalog_pb2_grpc.CatalogServiceStub(channel)

        def reload_forever(admin: catalog_pb2_grpc.CatalogServiceStub = admin) -> None:
            try:
                for i in range(1000):
                    admin.ReloadCatalog(catalog_pb2.ReloadCatalogRequest(
                        model_version=("small-v1", "small-v2")[i % 2]))
            except grpc.RpcError:
                pass  # killed

        reloader = threading.Thread(target=reload_forever, daemon=True)
        reloader.start()
        time.sleep(rng.uniform(0.1, 0.6))
        stop([proc], signal.SIGKILL)
        reloader.join(10)
        channel.close()
    proc, port = start_process("ranking_service", fresh_data_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            response = stub.Recommend(ranking_pb2.RecommendRequest(user_id="u1", k=5))
    finally:
        stop([proc], signal.SIGKILL)
    assert response.model_version == current_version(snapshots_dir(fresh_data_dir))
    assert len(response.items) == 5
