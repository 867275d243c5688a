"""Storage faults: a full map, a full disk and dead readers never crash a server or ack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from index import users_dir
from index.store import UserStore
from recsys.v1 import events_pb2
from tests.integration.conftest import RunningEvents, event_settings, playback, status_of


def _track(running: RunningEvents, event_id: str) -> grpc.StatusCode:
    return status_of(running.stub.Track,
                     events_pb2.TrackRequest(event=playback(event_id, "u1", "i5")), timeout=10)


def _serving(running: RunningEvents) -> bool:
    health = health_pb2_grpc.HealthStub(running.channel)
    return health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING


def _fill_until_refused(running: RunningEvents,
                        limit: int) -> tuple[int, list[str], grpc.StatusCode]:
    """Ingest batches of long-id events until one is refused; (acked, the refused ids).

    A full map or disk is RESOURCE_EXHAUSTED; a commit that a full disk cuts short can
    also surface as an I/O error, UNAVAILABLE. Either way nothing of the batch is acked.
    """
    for batch in range(limit):
        ids = [f"fill-{batch}-{i}-" + "x" * 100 for i in range(500)]
        request = events_pb2.IngestRequest(events=[
            playback(event_id, f"filler-{i}-" + "y" * 100, f"i{i}")
            for i, event_id in enumerate(ids)])
        try:
            running.stub.Ingest(iter([request]), timeout=30)
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    grpc.StatusCode.UNAVAILABLE), error
            data_dir = running.settings.data_dir
            assert str(data_dir) not in error.details(), "the server's path reached the client"
            assert str(data_dir.resolve()) not in error.details()
            return batch * 500, ids, error.code()
    raise AssertionError("the store never filled up")


def test_a_store_at_its_size_limit_answers_resource_exhausted_and_acks_nothing(
    fresh_data_dir: Path,
) -> None:
    used = sum(f.stat().st_size for f in users_dir(fresh_data_dir).iterdir())
    running = RunningEvents(event_settings(fresh_data_dir, store_map_bytes=used + (1 << 20),
                                           store_max_bytes=used + (1 << 21)))
    try:
        acked, refused, code = _fill_until_refused(running, 200)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert acked > 0 and _serving(running)
        assert running.stub.GetUser(events_pb2.GetUserRequest(user_id="u1")).version > 0
        assert not any(running.deps.store.seen(event_id) for event_id in refused)
    finally:
        running.close()


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MB tmpfs (needs root, as CI has); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_commit_is_not_acked_and_the_service_recovers(
    small_disk: Path, fresh_data_dir: Path
) -> None:
    data = small_disk / "data"
    shutil.copytree(fresh_data_dir, data)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(free - 300_000, 0))
    running = RunningEvents(event_settings(data))
    try:
        _, refused, _ = _fill_until_refused(running, 200)
        assert _serving(running)
        assert not any(running.deps.store.seen(event_id) for event_id in refused)
        (small_disk / "filler").unlink()  # space comes back: so does ingest
        assert _track(running, "after-space-freed") == grpc.StatusCode.OK
        assert running.deps.store.seen("after-space-freed")
    finally:
        running.close()


def test_reader_slots_of_killed_processes_are_reaped(fresh_data_dir: Path) -> None:
    code = ("import os, signal, sys; from pathlib import Path; from index.store import UserStore\n"
            "store = UserStore(Path(sys.argv[1]), readonly=True)\n"
            "txn = store.env.begin()\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    for _ in range(3):
        subprocess.run([sys.executable, "-c", code, str(users_dir(fresh_data_dir))],
                       timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    with UserStore(users_dir(fresh_data_dir)) as store:  # reaps on open
        assert store.reap_stale_readers() == 0
    with UserStore(users_dir(fresh_data_dir)) as store:
        subprocess.run([sys.executable, "-c", code, str(users_dir(fresh_data_dir))],
                       timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert store.reap_stale_readers() == 1
