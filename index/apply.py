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
from index.user_stats import UserStats


@dataclass(frozen=True, kw_only=True)
class FoldInPolicy:
    """How users are folded in: the history bound, and where statistics are kept.

    Every vector is the exact fold-in. A user with at least `stats_min_history` known
    items keeps statistics (`index.user_stats`) updated by rank-1 terms, so an event costs
    O(d^2) whatever the history's length; a shorter history is cheaper to re-solve than
    its statistics are to store (bench/foldin.py). Statistics are rebuilt from the
    history every `stats_rebuild_every` updates, and whenever the model changes.
    """

    max_history: int = MAX_HISTORY
    stats_min_history: int = 64
    stats_rebuild_every: int = 1000

    def __post_init__(self) -> None:
        if self.max_history < 1 or self.stats_min_history < 1 or self.stats_rebuild_every < 1:
            raise ValueError("max_history, stats_min_history and stats_rebuild_every must be "
                             f">= 1, got {self}")


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
    merged = [_merge(writer, catalog, u, p, policy) for u, p in plays.items()]
    vectors = fold_in(catalog, [(m.record, m.stats) for m in merged])
    return {m.record.user_id: write_user(writer, m, vector, now)
            for m, vector in zip(merged, vectors, strict=True)}


@dataclass(frozen=True)
class Merged:
    """A user's new record, their statistics (if they keep them), and whether stored
    statistics may have to go."""

    record: UserRecord
    stats: UserStats | None
    drop_stored: bool


def _merge(writer: StoreWriter, catalog: CatalogSnapshot, user_id: str, plays: list[Play],
           policy: FoldInPolicy) -> Merged:
    stored = catalog.fit(writer.get_user(user_id) or UserRecord.new(user_id))
    record, change = stored.with_plays(plays, catalog.item_index, policy.max_history)
    may_have = len(stored) >= policy.stats_min_history  # histories only grow, to the cap
    if int((record.rows >= 0).sum()) < policy.stats_min_history:
        return Merged(record, None, may_have)
    stats = writer.get_stats(user_id) if may_have else None
    if stats is None or not stats.matches(stored) or stats.updates >= policy.stats_rebuild_every:
        return Merged(record, UserStats.build(record, catalog.item_factors), False)
    return Merged(record, stats.updated(record, change, catalog.item_factors), False)


def fold_in(catalog: CatalogSnapshot,
            users: list[tuple[UserRecord, UserStats | None]]) -> list[np.ndarray]:
    """Each user's exact vector: from their statistics, else from their history."""
    with_stats = [i for i, (_, stats) in enumerate(users) if stats is not None]
    others = [i for i, (_, stats) in enumerate(users) if stats is None]
    vectors: list[np.ndarray] = [np.zeros(0, np.float32)] * len(users)
    solved = catalog.fold_in.from_stats([users[i][1] for i in with_stats])  # type: ignore[misc]
    for i, vector in zip(with_stats, solved, strict=True):
        vectors[i] = vector
    histories = [History(*users[i][0].known()) for i in others]
    for i, history, vector in zip(others, histories, catalog.fold_in.exact(histories),
                                  strict=True):
        if len(history.items):  # no known item: no vector (the ranker falls back)
            vectors[i] = vector
    return vectors


def write_user(writer: StoreWriter, merged: Merged, vector: np.ndarray,
               now: float) -> UserRecord:
    """Store the record with its new vector, and its statistics (or drop stale ones)."""
    updated = replace(merged.record, vector=vector, updated_at=now)
    writer.put_user(updated)
    if merged.stats is not None:
        writer.put_stats(updated.user_id, merged.stats)
    elif merged.drop_stored:
        writer.delete_stats(updated.user_id)
    return updated


def refold(writer: StoreWriter, catalog: CatalogSnapshot, user_ids: Sequence[str],
           policy: FoldInPolicy, now: float) -> int:
    """Re-fold the users whose stored vector is not of this model (or decay); how many."""
    stale = [Merged(catalog.fit(record), None, True) for record in
             (writer.get_user(u) for u in user_ids)
             if record is not None and not record.fits(catalog.model_version,
                                                       catalog.half_life_s)]
    stale = [Merged(m.record, UserStats.build(m.record, catalog.item_factors), False)
             if int((m.record.rows >= 0).sum()) >= policy.stats_min_history else m
             for m in stale]
    vectors = fold_in(catalog, [(m.record, m.stats) for m in stale])
    for merged, vector in zip(stale, vectors, strict=True):
        write_user(writer, merged, vector, now)
    return len(stale)


def keep_rejected(writer: StoreWriter, rejected: Sequence[tuple[Rejection, Event]], now: float,
                  sequence: Iterator[int]) -> None:
    """Keep each rejected event with its reason in the rejected DB."""
    for rejection, event in rejected:
        writer.put_rejected(now, next(sequence), {**event.__dict__, **rejection.__dict__})


def _version(writer: StoreWriter, user_id: str) -> int:
    record = writer.get_user(user_id)
    return record.version if record else 0
