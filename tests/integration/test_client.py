"""The Python client against real servers: its calls, gRPC's retries, and an event stream
that survives a kill -9 and restart of the event service with nothing lost or applied twice."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.services import start_process, stop
from eventlog.cluster import free_port
from freshrec.client import Client, EventStream, playback
from index.catalog import CatalogSnapshot
from recsys.v1 import events_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from tests.integration.conftest import EventProcess, RunningEvents, RunningRanking


def test_every_call_answers_with_its_deadline_and_reasons(
        events_process: EventProcess, ranking: RunningRanking, catalog: CatalogSnapshot) -> None:
    events = events_process
    item = catalog.item_ids[0]
    with Client(f"127.0.0.1:{events.port}", f"127.0.0.1:{ranking.port}") as client:
        tracked = client.track("c1", "client-user", item)
        assert tracked.user_version == 1 and tracked.occurred_at_defaulted
        assert client.track("c1", "client-user", item).duplicate  # a retry is harmless
        assert client.get_user("client-user").recent_item_ids == [item]
        top = client.recommend("client-user", k=5)
        assert top.source == ranking_pb2.PERSONALIZED and len(top.items) == 5
        assert all(i.reason.text for i in top.items)
        rows = client.home_page("client-user", k_per_row=3).rows
        assert [r.id for r in rows][0] == "because_you_watched"
        assert len(client.similar_items(item, k=4).items) == 4
        ranked = client.rank_items("client-user", [catalog.item_ids[5], "gone", item])
        assert list(ranked.unknown_item_ids) == ["gone"] and len(ranked.items) == 2
        with pytest.raises(grpc.RpcError) as error:
            client.recommend("", timeout=1)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class _Flaky(ranking_pb2_grpc.RankingServiceServicer):
    """Answers UNAVAILABLE to the first `failures` calls."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def Recommend(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return ranking_pb2.RecommendResponse(user_version=7)


def test_a_stream_that_cannot_go_on_fails_its_callers_instead_of_hanging(
        events: RunningEvents) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{events.port}") as channel:
        stream = EventStream(events_pb2_grpc.EventServiceStub(channel), max_inflight=1,
                             on_ack=lambda _: 1 / 0)
        stream.send([playback("f1", "fail-user", "i1")])
        with pytest.raises(ZeroDivisionError):
            stream.flush(timeout=10)
        with pytest.raises(ZeroDivisionError):
            stream.send([playback("f2", "fail-user", "i2")], timeout=10)
    with grpc.insecure_channel("127.0.0.1:1") as nowhere:  # nothing listens: never acked
        stream = EventStream(events_pb2_grpc.EventServiceStub(nowhere), max_backoff_s=0.1)
        stream.send([playback("f3", "fail-user", "i3")])
        with pytest.raises(TimeoutError):
            stream.close(timeout=0.5)
        stream._thread.join(5)
        assert not stream._thread.is_alive()  # it gave up the batch, as close said


def test_grpc_retries_a_safe_call_through_the_service_config() -> None:
    flaky = _Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client("127.0.0.1:1", f"127.0.0.1:{port}") as client:
            assert client.recommend("u", timeout=5).user_version == 7
        assert flaky.calls == 3
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # without the config
            flaky.calls = 0
            with pytest.raises(grpc.RpcError):
                ranking_pb2_grpc.RankingServiceStub(plain).Recommend(
                    ranking_pb2.RecommendRequest(user_id="u"), timeout=5)
    finally:
        server.stop(0)


def test_a_stream_survives_a_kill_and_restart_with_nothing_lost_or_applied_twice(
        fresh_data_dir: Path, catalog: CatalogSnapshot) -> None:
    port = free_port()
    server, _ = start_process("event_service", fresh_data_dir, port=port)
    users = [f"stream-{u}" for u in range(40)]
    sent: Counter[str] = Counter()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stream = EventStream(events_pb2_grpc.EventServiceStub(channel), max_inflight=16,
                             max_backoff_s=0.5)
        done = threading.Event()

        def produce() -> None:
            for batch in range(300):
                events = [playback(f"s{batch}-{j}", users[(batch + j) % len(users)],
                                   catalog.item_ids[(batch * 7 + j) % len(catalog)])
                          for j in range(8)]
                stream.send(events, timeout=60)
                sent.update(e.user_id for e in events)
                time.sleep(0.002)
            done.set()

        producer = threading.Thread(target=produce)
        producer.start()
        deadline = time.monotonic() + 60
        while stream.acked.batches < 60:
            assert time.monotonic() < deadline, f"only {stream.acked.batches} batches acked"
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # mid-stream, batches in flight
        server.wait(10)
        server, _ = start_process("event_service", fresh_data_dir, port=port)
        producer.join(120)
        assert done.is_set()
        acked = stream.close(timeout=60)
        channel.close()
        assert acked.batches == 300 and acked.reconnects >= 1
        assert acked.accepted + acked.duplicates == 300 * 8 and not acked.rejections
        with Client(f"127.0.0.1:{port}", "127.0.0.1:1") as client:
            versions = {u: client.get_user(u).version for u in users}
        assert versions == dict(sent)  # each event applied exactly once: 0 lost, 0 twice
    finally:
        assert stop([server]) == [0]
