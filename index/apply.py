"""Applying a group of checked events in one write txn: dedupe, histories, counts, fold-in
(the users', then the live items' from their viewers).

Each step is a small function of the write txn and `apply_group` runs them in order. The
writer calls it inside `UserStore.transact`, which reruns it after growing the map, so a
step touches nothing but the txn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from index.catalog import CatalogSnapshot
from index.events import Event, EventType, EventWeights, Rejection
from index.history import Play
from index.live import learn
from index.model import History
from index.store import StoreWriter
from index.user_record import MAX_HISTORY, UserRecord
from index.user_stats import StatsCache, UserStats


@dataclass(frozen=True, kw_only=True)
class FoldInPolicy:
    """How users are folded in: the history bound, and where statistics are kept.

    Every vector is the exact fold-in. A user with at least `stats_min_history` known
    items keeps statistics (`index.user_stats`) updated by rank-1 terms, so an event costs
    O(d^2) whatever the history's length (bench/foldin.py: 46 us per user-event at 32
    items and 51 at 500, against 74 and 233 re-solving); shorter ones are re-solved,
    which costs less than the 33 KB their statistics would hold. Statistics are rebuilt
    from the history every `stats_rebuild_every` updates, and whenever the model changes.
    """

    max_history: int = MAX_HISTORY
    stats_min_history: int = 32
    stats_rebuild_every: int = 1000

    def __post_init__(self) -> None:
        if self.max_history < 1 or self.stats_min_history < 1 or self.stats_rebuild_every < 1:
            raise ValueError("max_history, stats_min_history and stats_rebuild_every must be "
                             f">= 1, got {self}")


@dataclass(frozen=True)
class Outcome:
    """What applying one event did."""

    duplicate: bool
    item_known: bool  # in the snapshot or live; False: kept in the history, moves nothing
    user_version: int  # the user's version after the group (0 in log mode: not applied yet)
    log_sequence: int = 0  # log mode: the event's sequence in the log (read-your-writes)


def apply_group(writer: StoreWriter, catalog: CatalogSnapshot, events: Sequence[Event],
                weights: EventWeights, policy: FoldInPolicy, cache: StatsCache,
                now: float) -> list[Outcome]:
    """Apply valid events in one txn; one outcome per event, in order."""
    fresh = mark_seen(writer, events, now)
    plays = weighed_plays(events, fresh, weights)
    count_items(writer, plays, now)
    records = refresh_users(writer, catalog, plays, policy, cache, now)
    learn(writer, catalog, plays, records)
    records |= dismiss(writer, _dismissals(events, fresh), records, now)
    versions = {user: record.version for user, record in records.items()}
    return [Outcome(not new, event.item_id in catalog.item_index or
                    writer.get_raw("live_items", event.item_id.encode("utf-8")) is not None,
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
        if new and event.type != EventType.NOT_INTERESTED:
            assert event.occurred_at is not None  # checked by check_batch
            plays[event.user_id].append((event.item_id, weights.weight(event),
                                         event.occurred_at))
    return plays


def _dismissals(events: Sequence[Event], fresh: Sequence[bool]) -> dict[str, list[str]]:
    """The new NOT_INTERESTED events' items, per user, in arrival order."""
    items: dict[str, list[str]] = defaultdict(list)
    for event, new in zip(events, fresh, strict=True):
        if new and event.type == EventType.NOT_INTERESTED:
            items[event.user_id].append(event.item_id)
    return items


def dismiss(writer: StoreWriter, items: dict[str, list[str]],
            written: dict[str, UserRecord], now: float) -> dict[str, UserRecord]:
    """Add the dismissed items to each user's record (after this group's plays, if any);
    the records written. History and vector stay as they are."""
    out = {}
    for user_id, dismissed in items.items():
        record = written[user_id] if user_id in written else _stored(writer, user_id)
        out[user_id] = record.with_dismissed(dismissed).evolve(updated_at=now)
        writer.put_user(out[user_id])
    return out


def count_items(writer: StoreWriter, plays: dict[str, list[Play]], now: float) -> None:
    """Add each play's weight to its item's decayed count (trending, popularity)."""
    for user_plays in plays.values():
        for item_id, weight, _ in user_plays:
            writer.add_item_count(item_id, weight, now)


def refresh_users(writer: StoreWriter, catalog: CatalogSnapshot,
                  plays: dict[str, list[Play]], policy: FoldInPolicy, cache: StatsCache,
                  now: float) -> dict[str, UserRecord]:
    """Merge the plays into each touched user's history, fold in their vectors, write them."""
    merged = [_merge(writer, catalog, cache, u, p, policy) for u, p in plays.items()]
    vectors = fold_in(catalog, merged)
    return {record.user_id: write_user(writer, cache, record, stats, vector, now)
            for (record, stats), vector in zip(merged, vectors, strict=True)}


Merged = tuple[UserRecord, UserStats | None]  # a record, and its statistics if it keeps them


def _merge(writer: StoreWriter, catalog: CatalogSnapshot, cache: StatsCache, user_id: str,
           plays: list[Play], policy: FoldInPolicy) -> Merged:
    stored = catalog.fit(_stored(writer, user_id))
    record, change = stored.with_plays(plays, catalog.item_index, policy.max_history)
    if record.known_count < policy.stats_min_history:
        return record, None
    stats = cache.get(user_id)
    if stats is None or not stats.matches(stored) or stats.updates >= policy.stats_rebuild_every:
        return record, UserStats.build(record, catalog.item_factors)
    return record, stats.updated(record, change, catalog.item_factors)


def fold_in(catalog: CatalogSnapshot, users: list[Merged]) -> list[np.ndarray]:
    """Each user's exact vector: from their statistics, else from their history."""
    with_stats = [(i, stats) for i, (_, stats) in enumerate(users) if stats is not None]
    others = [i for i, (_, stats) in enumerate(users) if stats is None]
    vectors: list[np.ndarray] = [np.zeros(0, np.float32)] * len(users)
    solved = catalog.fold_in.from_stats([stats for _, stats in with_stats])
    for (i, _), vector in zip(with_stats, solved, strict=True):
        vectors[i] = vector
    histories = [History(*users[i][0].known()) for i in others]
    for i, history, vector in zip(others, histories, catalog.fold_in.exact(histories),
                                  strict=True):
        if len(history.items):  # no known item: no vector (the ranker falls back)
            vectors[i] = vector
    return vectors


def write_user(writer: StoreWriter, cache: StatsCache, record: UserRecord,
               stats: UserStats | None, vector: np.ndarray, now: float) -> UserRecord:
    """Store the record with its new vector; keep its statistics (if any) in the cache."""
    updated = record.evolve(vector=vector, updated_at=now)
    writer.put_user(updated)
    if stats is not None:
        cache.put(updated.user_id, stats)
    else:
        cache.discard(updated.user_id)
    return updated


def refold(writer: StoreWriter, catalog: CatalogSnapshot, user_ids: Sequence[str],
           cache: StatsCache, now: float) -> int:
    """Re-fold the users whose stored vector is not of this model (or decay); how many.

    Their statistics are not rebuilt here: the next event of a user does that.
    """
    stale: list[Merged] = [
        (catalog.fit(record), None) for record in (writer.get_user(u) for u in user_ids)
        if record is not None and not record.fits(catalog.model_version, catalog.half_life_s)]
    vectors = fold_in(catalog, stale)
    for (record, _), vector in zip(stale, vectors, strict=True):
        write_user(writer, cache, record, None, vector, now)
    return len(stale)


def keep_rejected(writer: StoreWriter, rejected: Sequence[tuple[Rejection, Event]], now: float,
                  sequence: Iterator[int]) -> None:
    """Keep each rejected event with its reason in the rejected DB."""
    for rejection, event in rejected:
        writer.put_rejected(now, next(sequence), {**event.__dict__, **rejection.__dict__})


def _stored(writer: StoreWriter, user_id: str) -> UserRecord:
    """The user's record, or a new one. (A record with an empty history, e.g. dismissals
    only, is falsy: its length is its history's, so never test one with `or`.)"""
    record = writer.get_user(user_id)
    return UserRecord.new(user_id) if record is None else record


def _version(writer: StoreWriter, user_id: str) -> int:
    return _stored(writer, user_id).version
