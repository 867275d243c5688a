"""Freshness as a contract: a minimum user version waited for within the deadline, the
state's version and time in every answer, and the age of what was served as a metric."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from recsys.v1 import events_pb2, ranking_pb2
from tests.integration.conftest import EventProcess, RunningRanking, playback, ranking_settings


def test_a_read_waits_for_the_version_a_write_will_reach(
        events_process: EventProcess, ranking: RunningRanking) -> None:
    events = events_process
    first = events.stub.Track(events_pb2.TrackRequest(event=playback("w1", "ryw", "i1")))
    late = threading.Timer(0.3, lambda: events.stub.Track(
        events_pb2.TrackRequest(event=playback("w2", "ryw", "i2"))))
    started = time.monotonic()
    late.start()
    answer = ranking.stub.Recommend(ranking_pb2.RecommendRequest(
        user_id="ryw", k=3, min_user_version=first.user_version + 1), timeout=5)
    late.join()
    assert answer.user_version == first.user_version + 1
    assert time.monotonic() - started >= 0.25  # it waited for the write, no client sleep
    assert abs(answer.user_updated_at.ToNanoseconds() / 1e9 - time.time()) < 5
    for call, request in ((ranking.stub.HomePage, ranking_pb2.HomePageRequest(
            user_id="ryw", k_per_row=2, min_user_version=2)),
            (ranking.stub.RankItems, ranking_pb2.RankItemsRequest(
                user_id="ryw", item_ids=["i3", "i4"], min_user_version=2))):
        reply = call(request, timeout=5)
        assert reply.user_version == 2 and reply.HasField("user_updated_at")
    served = ranking.deps.metrics.registry.get_sample_value(
        "freshrec_served_user_age_seconds_count")
    assert served == 3


def test_a_version_never_reached_is_deadline_exceeded_at_the_deadline(
        ranking: RunningRanking) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        ranking.stub.Recommend(ranking_pb2.RecommendRequest(
            user_id="u4", k=3, min_user_version=10**9), timeout=0.8)
    elapsed = time.monotonic() - started
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "is at version" in (error.value.details() or "") and 0.6 < elapsed < 1.5


def test_waiting_reads_hold_up_no_other_call(ranking: RunningRanking) -> None:
    # The handlers share one event loop per process: a read waiting for a version sleeps
    # on it, so calls keep being answered while 8 of them wait.
    waiting = [ranking.stub.Recommend.future(ranking_pb2.RecommendRequest(
        user_id="u4", k=3, min_user_version=10**9), timeout=1.5) for _ in range(8)]
    time.sleep(0.1)
    started = time.monotonic()
    for _ in range(20):
        assert len(ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u1", k=3),
                                          timeout=5).items) == 3
    assert time.monotonic() - started < 1.0  # not behind the waits (1.5 s each)
    assert all(not w.done() for w in waiting)
    for wait in waiting:
        with pytest.raises(grpc.RpcError) as error:
            wait.result()
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_without_a_deadline_the_wait_is_bounded_by_the_server(fresh_data_dir: Path) -> None:
    ranking = RunningRanking(ranking_settings(fresh_data_dir, max_version_wait_s=0.3))
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            ranking.stub.HomePage(ranking_pb2.HomePageRequest(
                user_id="nobody", k_per_row=3, min_user_version=1))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # the server's cap: retry
        assert "'nobody' is at version 0, not 1" in (error.value.details() or "")
        assert time.monotonic() - started < 2
    finally:
        ranking.close()
