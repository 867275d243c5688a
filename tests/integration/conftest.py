"""Real servers on real ports, over copies of the session's built data dir."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bench.services import start_process, stop
from event_service.config import Settings
from event_service.server import Deps, create_server, open_deps
from eventlog.cluster import free_port
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.model import AlsParams
from index.snapshot import IndexSpec, write_snapshot
from ranking_service.config import Settings as RankingSettings
from ranking_service.server import create_server as create_ranking_server
from ranking_service.server import open_deps as open_ranking_deps
from recsys.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
)

COMPLETE = events_pb2.PLAY_COMPLETE


def allows(item: ranking_pb2.ScoredItem, spec: ranking_pb2.Filter) -> bool:
    """True if a returned item satisfies the filter (the test oracle for filters)."""
    genres = set(item.genres)
    return ((not spec.genres_any or bool(genres & set(spec.genres_any)))
            and not genres & set(spec.genres_none)
            and (not spec.min_year or item.year >= spec.min_year)
            and (not spec.max_year or item.year <= spec.max_year))


def playback(event_id: str, user: str, item: str, type: int = COMPLETE,
             fraction: float = 1.0, at: float | None = None) -> events_pb2.PlaybackEvent:
    """A PlaybackEvent message (occurred_at = now unless given)."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return events_pb2.PlaybackEvent(event_id=event_id, user_id=user, item_id=item, type=type,
                                    occurred_at=stamp, watch_fraction=fraction)


@pytest.fixture()
def fresh_data_dir(tmp_path: Path, data_dir: Path) -> Path:
    """A private, writable copy of the built data dir."""
    target = tmp_path / "data"
    shutil.copytree(data_dir, target)
    return target


def event_settings(data_dir: Path, **overrides: object) -> Settings:
    """Test settings: port 0, fast snapshot polling."""
    return Settings(**{"data_dir": data_dir, "port": 0, "snapshot_poll_s": 0.2, **overrides})


def status_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def second_snapshot(data_dir: Path, catalog: CatalogSnapshot, version: str,
                    spec: IndexSpec | None = None) -> None:
    """Write the catalog again in another model space (factors reversed), not as CURRENT."""
    spec = spec or IndexSpec("Flat")
    rotated = np.asarray(catalog.item_factors)[:, ::-1].copy()
    write_snapshot(snapshots_dir(data_dir), version, rotated, catalog.item_table(),
                   catalog.popularity, spec, AlsParams.of(catalog.manifest.als),
                   make_current=False)


def within(seconds: float, check: Callable[[], bool]) -> None:
    """Poll `check` until it holds (AssertionError once `seconds` have passed)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds:.3f} s"
        time.sleep(0.01)


def worker_channels(port: int, per_worker: int, workers: int = 2
                    ) -> dict[str, list[grpc.Channel]]:
    """Channels to the port, each on its own connection, grouped by the worker process it
    reached (SO_REUSEPORT keeps a connection on one worker; GetCatalogInfo names it)."""
    found: dict[str, list[grpc.Channel]] = {}
    for _ in range(100):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                        options=[("grpc.use_local_subchannel_pool", 1)])
        info = catalog_pb2_grpc.CatalogServiceStub(channel).GetCatalogInfo(
            catalog_pb2.GetCatalogInfoRequest(), timeout=10)
        chosen = found.setdefault(info.server_id, [])
        if len(chosen) < per_worker:
            chosen.append(channel)
        else:
            channel.close()
        if len(found) == workers and all(len(c) == per_worker for c in found.values()):
            return found
    raise AssertionError(f"connections reached {len(found)} worker(s), not {workers}")


class RunningEvents:
    """An in-process event server and a stub to call it."""

    def __init__(self, settings: Settings, deps: Deps | None = None) -> None:
        self.settings = settings
        self.deps = deps or open_deps(settings)
        self.server, self.port = create_server(settings, self.deps)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = events_pb2_grpc.EventServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=2)


@dataclass
class EventProcess:
    """The event service as its own process (so an in-process ranking server can open the
    same store), with its /metrics port."""

    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    stub: events_pb2_grpc.EventServiceStub


@pytest.fixture()
def events_process(fresh_data_dir: Path) -> Iterator[EventProcess]:
    """An event service process over the test's private data dir (stopped by pid)."""
    metrics_port = free_port()
    proc, port = start_process("event_service", fresh_data_dir, "--metrics-port",
                               str(metrics_port))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield EventProcess(proc, port, metrics_port, events_pb2_grpc.EventServiceStub(channel))
    finally:
        channel.close()
        assert stop([proc]) == [0]


@pytest.fixture()
def events(fresh_data_dir: Path) -> Iterator[RunningEvents]:
    """An event service on a free port over a private data dir."""
    running = RunningEvents(event_settings(fresh_data_dir))
    yield running
    running.close()


class RunningRanking:
    """An in-process ranking server and stubs to call it."""

    def __init__(self, settings: RankingSettings) -> None:
        self.settings = settings
        self.deps = open_ranking_deps(settings)
        self.server, self.port = create_ranking_server(settings, self.deps)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)
        self.admin = catalog_pb2_grpc.CatalogServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=2)


def ranking_settings(data_dir: Path, **overrides: object) -> RankingSettings:
    """Test settings: port 0, fast catalog polling."""
    return RankingSettings(**{"data_dir": data_dir, "port": 0, "workers": 1,
                              "catalog_poll_s": 0.2, **overrides})


@pytest.fixture()
def ranking(fresh_data_dir: Path) -> Iterator[RunningRanking]:
    """A ranking service on a free port over a private data dir."""
    running = RunningRanking(ranking_settings(fresh_data_dir))
    yield running
    running.close()
