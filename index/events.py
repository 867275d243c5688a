"""Playback events: validation, weighting, and applying a group of them in one write txn.

Weighting (configurable, see `EventWeights`): a completed play weighs its watch fraction
(1 when unset), progress weighs half its watch fraction, a start weighs 0.1. Weights of
an item accumulate in the user's history and enter the model as ``c = 1 + alpha * w``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum

import numpy as np

from index.catalog import CatalogSnapshot
from index.model import History
from index.store import StoreWriter, UserRecord


class EventType(IntEnum):
    """Mirrors recsys.v1.EventType."""

    UNSPECIFIED = 0
    PLAY_START = 1
    PLAY_PROGRESS = 2
    PLAY_COMPLETE = 3


@dataclass(frozen=True)
class Event:
    """One playback event, as received (not yet validated)."""

    event_id: str
    user_id: str
    item_id: str
    type: int
    occurred_at: float | None  # unix seconds; None when the client did not set it (invalid)
    watch_fraction: float


@dataclass(frozen=True)
class Limits:
    """Bounds an event must respect."""

    max_id_length: int = 128
    max_future_skew_s: float = 300.0


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
    if event.type not in (EventType.PLAY_START, EventType.PLAY_PROGRESS, EventType.PLAY_COMPLETE):
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


@dataclass
class GroupResult:
    """Per-event outcome of one applied group, in submission order."""

    duplicate: list[bool] = field(default_factory=list)
    item_known: list[bool] = field(default_factory=list)
    user_version: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FoldInPolicy:
    """Exact solve, or CG warm-started from the stored vector (exact when it cannot be).

    CG pays a fixed cost per iteration in numpy calls, so it only beats the exact solve
    for a batch of users (bench/foldin.py: 1 user, history 50: exact 46 us, CG 140 us;
    256 users: exact 63 us, CG 16 us per user): smaller groups are solved exactly.
    """

    method: str = "cg"
    cg_iterations: int = 8
    cg_min_users: int = 4
    max_history: int = 500


def apply_group(writer: StoreWriter, catalog: CatalogSnapshot, events: Sequence[Event],
                weights: EventWeights, policy: FoldInPolicy, now: float,
                item_half_life_s: float) -> GroupResult:
    """Apply valid events in one txn: dedupe, histories, item counts, then batched fold-in.

    Must only touch `writer`'s txn (it reruns if the map had to grow).
    """
    result = GroupResult()
    plays: dict[str, list[tuple[str, float, float]]] = {}
    seen_now: set[str] = set()
    for event in events:
        duplicate = event.event_id in seen_now or writer.seen(event.event_id)
        result.duplicate.append(duplicate)
        result.item_known.append(event.item_id in catalog.item_index)
        if duplicate:
            continue
        seen_now.add(event.event_id)
        writer.mark_seen(event.event_id, now)
        weight = weights.weight(event)
        writer.add_item_count(event.item_id, weight, now, item_half_life_s)
        assert event.occurred_at is not None  # validated
        plays.setdefault(event.user_id, []).append((event.item_id, weight, event.occurred_at))
    records = _refresh_users(writer, catalog, plays, policy, now)
    for event in events:
        record = records.get(event.user_id) or writer.get_user(event.user_id)
        result.user_version.append(record.version if record else 0)
    return result


def _refresh_users(writer: StoreWriter, catalog: CatalogSnapshot,
                   plays: dict[str, list[tuple[str, float, float]]], policy: FoldInPolicy,
                   now: float) -> dict[str, UserRecord]:
    """New records for the touched users, with vectors recomputed in one batched fold-in."""
    records = [(writer.get_user(u) or UserRecord.new(u)).with_plays(p, policy.max_history)
               for u, p in plays.items()]
    histories = [catalog.history(r.item_ids, r.weights) for r in records]
    vectors = _fold_in(catalog, records, histories, policy)
    out = {}
    for record, history, vector in zip(records, histories, vectors, strict=True):
        usable = vector if len(history.items) else np.zeros(0, np.float32)
        updated = replace(record, vector=usable, model_version=catalog.model_version,
                          updated_at=now)
        writer.put_user(updated)
        out[updated.user_id] = updated
    return out


def _fold_in(catalog: CatalogSnapshot, records: list[UserRecord], histories: list[History],
             policy: FoldInPolicy) -> np.ndarray:
    """CG for users whose stored vector is in this model's space, exact for the rest."""
    warm = np.array([policy.method == "cg" and r.model_version == catalog.model_version
                     and len(r.vector) == catalog.dim for r in records], dtype=bool)
    if warm.sum() < policy.cg_min_users:
        warm[:] = False
    vectors = np.zeros((len(records), catalog.dim), np.float32)
    if (~warm).any():
        vectors[~warm] = catalog.fold_in.exact([h for h, w in zip(histories, warm, strict=True)
                                                if not w])
    if warm.any():
        start = np.stack([r.vector for r, w in zip(records, warm, strict=True) if w])
        vectors[warm] = catalog.fold_in.cg([h for h, w in zip(histories, warm, strict=True) if w],
                                           start, policy.cg_iterations)
    return vectors
