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
    batch = check_batch(events, now=100.0, limits=Limits(), offset=10)
    assert [e.event_id for e in batch.valid] == ["a", "e"]
    assert [(r.index, r.event_id, r.reason) for r, _ in batch.rejected] == [
        (11, "b", "watch_fraction_out_of_range"), (12, "", "missing_event_id"),
        (13, "d", "missing_occurred_at")]


def test_an_oversized_batch_is_refused_whole() -> None:
    with pytest.raises(InvalidArgument, match="3 events in one message; the limit is 2"):
        check_batch([_event(str(i)) for i in range(3)], now=100.0,
                    limits=Limits(max_batch_events=2))
