"""Playback events: the domain EventType mirrors the proto; batches are checked event by event."""

from __future__ import annotations

import pytest

from index.errors import InvalidArgument
from index.events import Event, EventType, Limits, check_batch
from recsys.v1 import events_pb2


def test_event_type_matches_the_proto() -> None:
    proto = {name.removeprefix("EVENT_TYPE_"): value
             for name, value in events_pb2.EventType.items()}
    assert proto == {member.name: member.value for member in EventType}


def _event(event_id: str, **changes: object) -> Event:
    fields: dict[str, object] = {"event_id": event_id, "user_id": "u", "item_id": "i",
                                 "type": int(EventType.PLAY_COMPLETE), "occurred_at": 100.0,
                                 "watch_fraction": 1.0, **changes}
    return Event(**fields)  # type: ignore[arg-type]


def test_a_batch_keeps_its_good_events_and_names_the_bad_ones() -> None:
    events = [_event("a"), _event("b", watch_fraction=2.0), _event("", user_id="u2"),
              _event("d", occurred_at=None), _event("e")]
    batch = check_batch(events, now=100.0, limits=Limits(require_occurred_at=True), offset=10)
    assert [e.event_id for e in batch.valid] == ["a", "e"]
    assert [(r.index, r.event_id, r.reason) for r, _ in batch.rejected] == [
        (11, "b", "watch_fraction_out_of_range"), (12, "", "missing_event_id"),
        (13, "d", "missing_occurred_at")]


def test_an_event_without_occurred_at_happened_when_it_was_received() -> None:
    events = [_event("a", occurred_at=None), _event("b"), _event("c", occurred_at=None,
                                                                  watch_fraction=2.0)]
    batch = check_batch(events, now=250.0, limits=Limits())
    assert [(e.event_id, e.occurred_at) for e in batch.valid] == [("a", 250.0), ("b", 100.0)]
    assert batch.received_at == 1  # "c" is rejected for its fraction, not counted
    assert [r.reason for r, _ in batch.rejected] == ["watch_fraction_out_of_range"]


def test_an_oversized_batch_is_refused_whole() -> None:
    with pytest.raises(InvalidArgument, match="3 events in one message; the limit is 2"):
        check_batch([_event(str(i)) for i in range(3)], now=100.0,
                    limits=Limits(max_batch_events=2))
