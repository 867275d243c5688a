"""The event service through its gRPC API, on a real port, over a real LMDB store."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.snapshot import set_current
from index.store import USERS_MODEL_KEY, UserStore
from recsys.v1 import events_pb2
from tests.integration.conftest import RunningEvents, event_settings, playback, second_snapshot


def _stream(requests: list[events_pb2.IngestStreamRequest]
            ) -> Iterator[events_pb2.IngestStreamRequest]:
    yield from requests


def test_track_updates_the_user_and_get_user_reads_it_back(events: RunningEvents,
                                                          catalog: CatalogSnapshot) -> None:
    before = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u3"))
    item = catalog.item_ids[1234]
    response = events.stub.Track(events_pb2.TrackRequest(event=playback("e1", "u3", item)))
    assert (response.duplicate, response.item_known) == (False, True)
    assert response.user_version == before.version + 1
    after = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u3"))
    assert after.version == response.user_version
    assert after.recent_item_ids[0] == item
    assert after.model_version == catalog.model_version
    assert np.abs(np.array(after.vector) - np.array(before.vector)).max() > 1e-4


def test_a_new_user_gets_a_real_vector_from_the_first_event(events: RunningEvents,
                                                           catalog: CatalogSnapshot) -> None:
    events.stub.Track(events_pb2.TrackRequest(event=playback("n1", "newbie", catalog.item_ids[7])))
    user = events.stub.GetUser(events_pb2.GetUserRequest(user_id="newbie"))
    assert (user.version, user.history_size, len(user.vector)) == (1, 1, catalog.dim)
    scores = np.asarray(catalog.item_factors) @ np.array(user.vector, np.float32)
    assert int(np.argmax(scores)) == 7 or scores[7] > np.percentile(scores, 95)


def test_track_twice_is_a_duplicate_and_changes_nothing(events: RunningEvents,
                                                        catalog: CatalogSnapshot) -> None:
    event = playback("dup-1", "u5", catalog.item_ids[3])
    first = events.stub.Track(events_pb2.TrackRequest(event=event))
    state = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u5"))
    second = events.stub.Track(events_pb2.TrackRequest(event=event))
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.user_version == first.user_version
    assert events.stub.GetUser(events_pb2.GetUserRequest(user_id="u5")) == state


BAD_EVENTS = {
    "missing_event_id": dict(event_id=""),
    "missing_user_id": dict(user=""),
    "missing_item_id": dict(item=""),
    "event_id_too_long": dict(event_id="x" * 129),
    "invalid_user_id": dict(user="bad\nuser"),
    "unknown_event_type": dict(type=0),
    "watch_fraction_out_of_range": dict(fraction=1.5),
    "watch_fraction_not_finite": dict(fraction=math.nan),
    "occurred_at_in_future": dict(at=time.time() + 86_400),
    "invalid_occurred_at": dict(at=-5.0),
}


def _bad(reason: str, index: int = 0) -> events_pb2.PlaybackEvent:
    fields: dict = {"event_id": f"bad-{reason}-{index}", "user": "u9", "item": "i1",
                    **BAD_EVENTS[reason]}
    return playback(fields.pop("event_id"), fields.pop("user"), fields.pop("item"), **fields)


@pytest.mark.parametrize("reason", sorted(BAD_EVENTS))
def test_track_rejects_each_bad_event_with_invalid_argument(events: RunningEvents,
                                                            reason: str) -> None:
    before = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u9"))
    with pytest.raises(grpc.RpcError) as error:
        events.stub.Track(events_pb2.TrackRequest(event=_bad(reason)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.value.details()
    assert events.stub.GetUser(events_pb2.GetUserRequest(user_id="u9")) == before


def _untimed(event_id: str, user: str, item: str) -> events_pb2.PlaybackEvent:
    event = playback(event_id, user, item)
    event.ClearField("occurred_at")
    return event


def test_untimed_events_happened_when_received_said_and_counted(events: RunningEvents) -> None:
    answer = events.stub.Track(events_pb2.TrackRequest(event=_untimed("t0", "untimed-u", "i1")))
    assert answer.occurred_at_defaulted and answer.user_version == 1
    timed = events.stub.Track(events_pb2.TrackRequest(event=playback("t1", "untimed-u", "i2")))
    assert not timed.occurred_at_defaulted
    summary = events.stub.Ingest(iter([events_pb2.IngestRequest(events=[
        _untimed("t2", "untimed-u", "i3"), playback("t3", "untimed-u", "i4"),
        _untimed("t4", "untimed-u", "i5")])]))
    assert (summary.accepted, summary.occurred_at_defaulted) == (3, 2)
    acks = list(events.stub.IngestStream(iter([events_pb2.IngestStreamRequest(
        sequence=1, events=[_untimed("t5", "untimed-u", "i6")])])))
    assert [(a.accepted, a.occurred_at_defaulted) for a in acks] == [(1, 1)]
    assert events.deps.metrics.registry.get_sample_value(
        "freshrec_events_occurred_at_defaulted_total") == 4


def test_with_require_occurred_at_an_untimed_event_is_rejected(fresh_data_dir: Path) -> None:
    strict = RunningEvents(event_settings(fresh_data_dir, require_occurred_at=True))
    try:
        with pytest.raises(grpc.RpcError) as error:
            strict.stub.Track(events_pb2.TrackRequest(event=_untimed("s0", "strict-u", "i1")))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing_occurred_at" in error.value.details()
        summary = strict.stub.Ingest(iter([events_pb2.IngestRequest(events=[
            _untimed("s1", "strict-u", "i1"), playback("s2", "strict-u", "i2")])]))
        assert (summary.accepted, summary.rejected, summary.occurred_at_defaulted) == (1, 1, 0)
        assert [r.reason for r in summary.rejections] == ["missing_occurred_at"]
    finally:
        strict.close()


def test_ingest_applies_the_good_events_of_mixed_batches(events: RunningEvents,
                                                         catalog: CatalogSnapshot) -> None:
    before = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u11")).version
    good = [playback(f"g{i}", "u11", catalog.item_ids[i]) for i in range(6)]
    requests = [events_pb2.IngestRequest(events=[good[0], _bad("missing_user_id"), good[1]]),
                events_pb2.IngestRequest(events=[good[2], good[3], _bad("unknown_event_type")]),
                events_pb2.IngestRequest(events=[good[4], good[5], good[0]])]
    summary = events.stub.Ingest(iter(requests))
    assert (summary.accepted, summary.duplicates, summary.rejected) == (6, 1, 2)
    assert [(r.index, r.reason) for r in summary.rejections] == [
        (1, "missing_user_id"), (5, "unknown_event_type")]
    after = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u11"))
    assert after.version == before + 6
    assert set(after.recent_item_ids[:6]) == {catalog.item_ids[i] for i in range(6)}


def test_rejected_events_are_kept_with_their_reason(events: RunningEvents) -> None:
    events.stub.Ingest(iter([events_pb2.IngestRequest(events=[_bad("watch_fraction_out_of_range")])]))
    events.server.stop(grace=2)
    with UserStore(users_dir(events.settings.data_dir), readonly=True) as store:
        kept = store.rejected(limit=5)
    assert kept[0]["reason"] == "watch_fraction_out_of_range"
    assert kept[0]["event_id"] == "bad-watch_fraction_out_of_range-0"


def test_ingest_stream_acks_each_batch_by_sequence(events: RunningEvents,
                                                   catalog: CatalogSnapshot) -> None:
    requests = [events_pb2.IngestStreamRequest(
        sequence=100 + s, events=[playback(f"s{s}-{i}", f"u{s}", catalog.item_ids[i])
                                  for i in range(5)]) for s in range(20)]
    requests.append(events_pb2.IngestStreamRequest(
        sequence=999, events=[_bad("missing_item_id"), playback("s0-0", "u0", "i0")]))
    responses = list(events.stub.IngestStream(_stream(requests)))
    assert [r.sequence for r in responses] == [100 + s for s in range(20)] + [999]
    assert all((r.accepted, r.duplicates) == (5, 0) for r in responses[:20])
    last = responses[-1]
    assert (last.accepted, last.duplicates) == (0, 1)
    assert [(r.index, r.reason) for r in last.rejections] == [(0, "missing_item_id")]


def test_unknown_item_is_kept_in_history_but_cannot_move_the_vector(
    events: RunningEvents,
) -> None:
    before = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u12"))
    response = events.stub.Track(events_pb2.TrackRequest(
        event=playback("unk-1", "u12", "not-in-catalog")))
    assert (response.item_known, response.user_version) == (False, before.version + 1)
    after = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u12"))
    assert after.recent_item_ids[0] == "not-in-catalog"
    np.testing.assert_allclose(after.vector, before.vector, atol=1e-3)
    summary = events.stub.Ingest(iter([events_pb2.IngestRequest(
        events=[playback("unk-2", "brand-new", "not-in-catalog")])]))
    assert (summary.accepted, summary.unknown_items) == (1, 1)
    newbie = events.stub.GetUser(events_pb2.GetUserRequest(user_id="brand-new"))
    assert (newbie.history_size, len(newbie.vector)) == (1, 0)


def test_get_user_errors(events: RunningEvents) -> None:
    for user_id, code in (("nobody", grpc.StatusCode.NOT_FOUND),
                          ("", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as error:
            events.stub.GetUser(events_pb2.GetUserRequest(user_id=user_id))
        assert error.value.code() == code


def test_too_many_events_in_one_message_is_invalid_argument(fresh_data_dir: Path) -> None:
    running = RunningEvents(event_settings(fresh_data_dir, max_batch_events=10))
    try:
        batch = [playback(f"m{i}", "u1", "i1") for i in range(11)]
        with pytest.raises(grpc.RpcError) as error:
            running.stub.Ingest(iter([events_pb2.IngestRequest(events=batch)]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit is 10" in error.value.details()
    finally:
        running.close()


def test_health_is_serving(events: RunningEvents) -> None:
    health = health_pb2_grpc.HealthStub(events.channel)
    for service in ("", "recsys.v1.EventService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _events_for(n: int, catalog: CatalogSnapshot, seed: int) -> list[events_pb2.PlaybackEvent]:
    rng = np.random.default_rng(seed)
    return [playback(f"bulk-{i}", f"u{rng.integers(0, 300)}",
                     catalog.item_ids[rng.integers(0, len(catalog))],
                     fraction=float(rng.uniform(0.2, 1.0)), at=1.6e9 + i) for i in range(n)]


def _send(running: RunningEvents, batch: list[events_pb2.PlaybackEvent]) -> list:
    requests = [events_pb2.IngestStreamRequest(sequence=s, events=batch[s:s + 500])
                for s in range(0, len(batch), 500)]
    return list(running.stub.IngestStream(_stream(requests)))


def _users(running: RunningEvents, n: int) -> dict[str, tuple[int, list[float]]]:
    return {f"u{i}": (u.version, list(u.vector)) for i in range(n)
            for u in (running.stub.GetUser(events_pb2.GetUserRequest(user_id=f"u{i}")),)}


def test_the_same_10000_events_twice_across_a_restart_change_nothing(
    fresh_data_dir: Path, catalog: CatalogSnapshot
) -> None:
    batch = _events_for(10_000, catalog, seed=5)
    running = RunningEvents(event_settings(fresh_data_dir))
    first = _send(running, batch)
    assert sum(r.accepted for r in first) == 10_000
    after_first = _users(running, 300)
    assert sum(r.duplicates for r in _send(running, batch)) == 10_000
    running.close()
    restarted = RunningEvents(event_settings(fresh_data_dir))
    try:
        again = _send(restarted, batch[::-1])
        assert sum(r.duplicates for r in again) == 10_000
        assert _users(restarted, 300) == after_first
    finally:
        restarted.close()


def test_a_new_snapshot_is_followed_and_every_user_is_refolded_in_the_background(
    fresh_data_dir: Path, catalog: CatalogSnapshot
) -> None:
    events = RunningEvents(event_settings(fresh_data_dir, refold_per_s=50_000.0))
    try:
        root = snapshots_dir(fresh_data_dir)
        second_snapshot(fresh_data_dir, catalog, "small-v2")  # another model space
        set_current(root, "small-v2")
        deadline = time.monotonic() + 30
        while events.deps.store.get_meta(USERS_MODEL_KEY) != "small-v2":
            assert time.monotonic() < deadline, "the users were not re-folded"
            time.sleep(0.05)
        assert events.deps.writer.catalogs.version == "small-v2"
        v2 = CatalogSnapshot.load(root, "small-v2")
        for user in ("u0", "u20", "u599"):  # without any event of theirs
            got = events.stub.GetUser(events_pb2.GetUserRequest(user_id=user))
            assert got.model_version == "small-v2"
            record = events.deps.store.get_user(user)
            assert record is not None
            expected = v2.fold_in.exact([v2.history(record)])[0]
            np.testing.assert_allclose(got.vector, expected, atol=1e-5)
        events.stub.Track(events_pb2.TrackRequest(event=playback("after-v2", "u20",
                                                                 catalog.item_ids[2])))
        after = events.stub.GetUser(events_pb2.GetUserRequest(user_id="u20"))
        record = events.deps.store.get_user("u20")
        assert after.model_version == "small-v2" and record is not None
        np.testing.assert_allclose(after.vector, v2.fold_in.exact([v2.history(record)])[0],
                                   atol=1e-5)
    finally:
        events.close()
