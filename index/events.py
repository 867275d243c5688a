"""Playback events: what one is, how it is checked, and how much it weighs.

Weighting (configurable, see `EventWeights`): a completed play weighs its watch fraction
(1 when unset), progress weighs half its watch fraction, a start weighs 0.1. Weights of
an item accumulate in the user's history and enter the model as ``c = 1 + alpha * w``.
NOT_INTERESTED is not a play: the item is excluded from the user's recommendations, and
the vector does not move (implicit-feedback ALS has no negative preference to fold in).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

from index.errors import InvalidArgument


class EventType(IntEnum):
    """Mirrors recsys.v1.EventType (a test checks that the two agree)."""

    UNSPECIFIED = 0
    PLAY_START = 1
    PLAY_PROGRESS = 2
    PLAY_COMPLETE = 3
    NOT_INTERESTED = 4  # a dismissal, not a play


@dataclass(frozen=True)
class Event:
    """One playback event, as received (not yet validated)."""

    event_id: str
    user_id: str
    item_id: str
    type: int
    occurred_at: float | None  # unix seconds; None when the client did not set it
    watch_fraction: float


@dataclass(frozen=True)
class Limits:
    """Bounds an event, and a batch of them, must respect."""

    max_id_length: int = 128
    max_future_skew_s: float = 300.0
    max_batch_events: int = 10_000
    # An event without occurred_at happened when it was received (as analytics pipelines
    # assume); True rejects it instead ("missing_occurred_at").
    require_occurred_at: bool = False


@dataclass(frozen=True)
class EventWeights:
    """How much one event says the user likes the item."""

    start: float = 0.1
    progress: float = 0.5
    complete: float = 1.0

    def weight(self, event: Event) -> float:
        """The implicit-feedback weight w of a valid event."""
        if event.type == EventType.PLAY_COMPLETE:
            return self.complete * (event.watch_fraction or 1.0)
        if event.type == EventType.PLAY_PROGRESS:
            return self.progress * event.watch_fraction
        return self.start


@dataclass(frozen=True)
class Rejection:
    """Why an event of a batch was not applied."""

    index: int
    event_id: str
    reason: str
    message: str


def _check_id(name: str, value: str, limits: Limits) -> tuple[str, str] | None:
    if not value:
        return f"missing_{name}", f"{name} is empty"
    if len(value.encode("utf-8")) > limits.max_id_length:
        return f"{name}_too_long", f"{name} is longer than {limits.max_id_length} bytes"
    if not value.isprintable():
        return f"invalid_{name}", f"{name} {value!r} contains control characters"
    return None


def validate(event: Event, now: float, limits: Limits) -> tuple[str, str] | None:
    """(reason, message) if the event is invalid, else None."""
    for name in ("event_id", "user_id", "item_id"):
        problem = _check_id(name, getattr(event, name), limits)
        if problem:
            return problem
    if event.type not in (EventType.PLAY_START, EventType.PLAY_PROGRESS, EventType.PLAY_COMPLETE,
                          EventType.NOT_INTERESTED):
        return "unknown_event_type", f"event type {event.type} is not a known EventType"
    if not math.isfinite(event.watch_fraction):
        return "watch_fraction_not_finite", f"watch_fraction is {event.watch_fraction}"
    if not 0.0 <= event.watch_fraction <= 1.0:
        return "watch_fraction_out_of_range", f"watch_fraction {event.watch_fraction} not in [0, 1]"
    at = event.occurred_at
    if at is None:
        return "missing_occurred_at", "occurred_at is not set"
    if not math.isfinite(at) or at < 0:
        return "invalid_occurred_at", f"occurred_at {at} is not a valid time"
    if at > now + limits.max_future_skew_s:
        return "occurred_at_in_future", f"occurred_at is {at - now:.0f} s in the future"
    return None


@dataclass(frozen=True)
class Batch:
    """A checked batch: the events to apply, the rejected ones with their reasons, and how
    many of the valid ones were given the time of receipt for a missing occurred_at."""

    valid: list[Event]
    rejected: list[tuple[Rejection, Event]]
    received_at: int = 0


def check_batch(events: Sequence[Event], now: float, limits: Limits, offset: int = 0) -> Batch:
    """Split a batch received at `now` into valid and rejected events (indexes counted from
    `offset`); an event without occurred_at gets `now` unless the limits require it.

    A batch over `limits.max_batch_events` is refused whole (InvalidArgument): a single
    bad event never is.
    """
    if len(events) > limits.max_batch_events:
        raise InvalidArgument(f"{len(events)} events in one message; the limit is "
                              f"{limits.max_batch_events}")
    valid, rejected, received_at = [], [], 0
    for index, event in enumerate(events):
        untimed = event.occurred_at is None and not limits.require_occurred_at
        if untimed:
            event = replace(event, occurred_at=now)
        problem = validate(event, now, limits)
        if problem is None:
            valid.append(event)
            received_at += untimed
        else:
            rejected.append((Rejection(offset + index, event.event_id, *problem), event))
    return Batch(valid, rejected, received_at)
