"""Applying a group of checked events in one write txn: dedupe, histories, counts, fold-in.

Each step is a small function of the write txn and `apply_group` runs them in order. The
writer calls it inside `UserStore.transact`, which reruns it after growing the map, so a
step touches nothing but the txn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from index.catalog import CatalogSnapshot
from index.events import Event, EventWeights, Rejection
from index.model import History
from index.store import StoreWriter
from index.user_record import MAX_HISTORY, Play, UserRecord

FOLD_IN_METHODS = ("cg", "exact")


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
    max_history: int = MAX_HISTORY

    def __post_init__(self) -> None:
        if self.method not in FOLD_IN_METHODS:
            raise ValueError(f"fold-in method must be one of {FOLD_IN_METHODS}, "
                             f"got {self.method!r}")


@dataclass(frozen=True)
class Outcome:
    """What applying one event did."""

    duplicate: bool
    item_known: bool  # False: kept in the history and counts, but it cannot move the vector
    user_version: int  # the user's version after the group


def apply_group(writer: StoreWriter, catalog: CatalogSnapshot, events: Sequence[Event],
                weights: EventWeights, policy: FoldInPolicy, now: float) -> list[Outcome]:
    """Apply valid events in one txn; one outcome per event, in order."""
    fresh = mark_seen(writer, events, now)
    plays = weighed_plays(events, fresh, weights)
    count_items(writer, plays, now)
    records = refresh_users(writer, catalog, plays, policy, now)
    versions = {user: record.version for user, record in records.items()}
    return [Outcome(not new, event.item_id in catalog.item_index,
                    versions.get(event.user_id) or _version(writer, event.user_id))
            for event, new in zip(events, fresh, strict=True)]


def mark_seen(writer: StoreWriter, events: Sequence[Event], now: float) -> list[bool]:
    """Dedupe by event_id (against the store and within the group); True for a new event."""
    fresh = []
    for event in events:
        new = not writer.seen(event.event_id)
        if new:
            writer.mark_seen(event.event_id, now)  # a repeat later in the group sees it
        fresh.append(new)
    return fresh


def weighed_plays(events: Sequence[Event], fresh: Sequence[bool],
                  weights: EventWeights) -> dict[str, list[Play]]:
    """The new events as (item, weight, occurred_at) plays, per user, in arrival order."""
    plays: dict[str, list[Play]] = defaultdict(list)
    for event, new in zip(events, fresh, strict=True):
        if new:
            assert event.occurred_at is not None  # checked by check_batch
            plays[event.user_id].append((event.item_id, weights.weight(event),
                                         event.occurred_at))
    return plays


def count_items(writer: StoreWriter, plays: dict[str, list[Play]], now: float) -> None:
    """Add each play's weight to its item's decayed count (trending, popularity)."""
    for user_plays in plays.values():
        for item_id, weight, _ in user_plays:
            writer.add_item_count(item_id, weight, now)


def refresh_users(writer: StoreWriter, catalog: CatalogSnapshot,
                  plays: dict[str, list[Play]], policy: FoldInPolicy,
                  now: float) -> dict[str, UserRecord]:
    """Merge the plays into each touched user's history, fold in their vectors, write them."""
    records = [(writer.get_user(u) or UserRecord.new(u)).with_plays(p, policy.max_history)
               for u, p in plays.items()]
    histories = [catalog.history(r.item_ids, r.weights) for r in records]
    vectors = fold_in(catalog, records, histories, policy)
    out = {}
    for record, history, vector in zip(records, histories, vectors, strict=True):
        usable = vector if len(history.items) else np.zeros(0, np.float32)
        updated = replace(record, vector=usable, model_version=catalog.model_version,
                          updated_at=now)
        writer.put_user(updated)
        out[updated.user_id] = updated
    return out


def fold_in(catalog: CatalogSnapshot, records: list[UserRecord], histories: list[History],
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


def keep_rejected(writer: StoreWriter, rejected: Sequence[tuple[Rejection, Event]], now: float,
                  sequence: Iterator[int]) -> None:
    """Keep each rejected event with its reason in the rejected DB."""
    for rejection, event in rejected:
        writer.put_rejected(now, next(sequence), {**event.__dict__, **rejection.__dict__})


def _version(writer: StoreWriter, user_id: str) -> int:
    record = writer.get_user(user_id)
    return record.version if record else 0
