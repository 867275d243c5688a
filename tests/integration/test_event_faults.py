"""The event service under kill -9, SIGTERM and overload."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench import crash
from bench.services import start_process
from event_service.server import open_deps
from eventlog.cluster import free_port
from index import users_dir
from index.store import UserStore
from recsys.v1 import events_pb2, events_pb2_grpc
from tests.integration.conftest import RunningEvents, event_settings, playback


def test_kill_9_loses_no_acked_event_and_applies_none_twice(fresh_data_dir: Path) -> None:
    report = crash.run(fresh_data_dir, cycles=3, seed=1, max_uptime_s=1.0)
    assert report["events_acked"] > 0
    assert report["acked_lost"] == 0
    assert report["applied_twice"] == 0
    assert report["applied_missing_from_history"] == 0


def test_sigterm_drains_and_exits_0_with_every_ack_durable(fresh_data_dir: Path) -> None:
    metrics_port = free_port()
    proc, port = start_process("event_service", fresh_data_dir, "--metrics-port",
                               str(metrics_port))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = events_pb2_grpc.EventServiceStub(channel)
            acked = [stub.Track(events_pb2.TrackRequest(event=playback(f"t{i}", "u1", "i5")))
                     for i in range(20)]
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        assert b'freshrec_events_total{outcome="accepted"} 20.0' in scrape
        assert b"freshrec_event_to_commit_seconds_count" in scrape
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with UserStore(users_dir(fresh_data_dir)) as store:
        assert all(store.seen(f"t{i}") for i in range(20))
        record = store.get_user("u1")
    assert record is not None and record.version == acked[-1].user_version


class _GatedStore(UserStore):
    """A store whose commits wait for a gate, to hold the writer busy."""

    gate = threading.Event()

    def transact(self, work):  # type: ignore[no-untyped-def]
        self.gate.wait(30)
        return super().transact(work)


def test_a_full_queue_answers_resource_exhausted_and_loses_nothing(fresh_data_dir: Path) -> None:
    settings = event_settings(fresh_data_dir, queue_max_events=5, max_batch_events=5)
    running = RunningEvents(settings, open_deps(settings, _GatedStore(users_dir(fresh_data_dir))))
    try:
        first = running.stub.Ingest.future(iter([events_pb2.IngestRequest(
            events=[playback(f"q{i}", "u2", "i3") for i in range(5)])]))
        second = running.stub.Ingest.future(iter([events_pb2.IngestRequest(
            events=[playback(f"r{i}", "u2", "i4") for i in range(5)])]))
        deadline = time.monotonic() + 10
        while running.deps.writer.status()["queued_events"] < 5:  # one batch is held
            assert time.monotonic() < deadline                      # by the writer
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as error:
            running.stub.Track(events_pb2.TrackRequest(event=playback("late", "u2", "i5")),
                               timeout=5)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _GatedStore.gate.set()
        assert first.result(30).accepted == 5 and second.result(30).accepted == 5
    finally:
        _GatedStore.gate.set()
        running.close()


def test_past_max_concurrent_rpcs_calls_are_refused_at_once(fresh_data_dir: Path) -> None:
    running = RunningEvents(event_settings(fresh_data_dir, max_concurrent_rpcs=2))
    gate = threading.Event()

    def held_open():  # type: ignore[no-untyped-def]
        yield events_pb2.IngestStreamRequest(sequence=1)
        gate.wait(30)

    try:
        streams = [running.stub.IngestStream(held_open()) for _ in range(2)]
        for stream in streams:
            next(stream)  # both streams are being served
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            running.stub.GetUser(events_pb2.GetUserRequest(user_id="u1"), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 2
    finally:
        gate.set()
        running.close()
