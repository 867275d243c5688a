"""Merging a group's plays into a user's history: the policy, and what it changed.

History policy: an item's weights accumulate (``weights``, as played) and so do its
decayed weights (``decayed``: each play's weight times ``0.5 ** (age / half_life_s)``,
its age taken from the user's latest play of an item in the model's catalog, the
`reference`, so it depends on the plays alone, not on when or in what order they
arrived, and a play of an item the model does not know moves nothing); the item keeps
its latest play time; past `max_history` items the least recently played ones are
evicted (of equally recent ones, the greatest item id first), and an evicted item's
plays are forgotten with it. Items outside the model have no decayed weight; when a later
model knows them it is derived from their summed weight and latest play (exact for items
played once), as it is for every item when the half-life changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:  # the record imports this module; this one only needs its type
    from index.user_record import UserRecord

MAX_ID_BYTES = 65_535  # an id's length is stored in 16 bits
Play = tuple[str, float, float]  # (item_id, weight, occurred_at)
T = TypeVar("T", float, np.ndarray)


def decay(age_s: T, half_life_s: float) -> T:
    """How much a play of this age still counts: 0.5 ** (age / half-life); 1 when off (0)."""
    if half_life_s <= 0:
        return np.ones_like(age_s) if isinstance(age_s, np.ndarray) else 1.0  # type: ignore
    return 0.5 ** (age_s / half_life_s)  # type: ignore[return-value,operator]


@dataclass(frozen=True)
class Change:
    """What a merge did to the decayed weights of the known items (for `index.user_stats`)."""

    scale: float  # every decayed weight already there was first multiplied by this
    rows: np.ndarray  # known rows whose decayed weight then changed (entered, played, left)
    deltas: np.ndarray  # new decayed weight - scale * old (the old is 0 for those entering)
    membership: np.ndarray  # per row: +1 new to the history, -1 evicted from it, 0 neither

    @property
    def entered(self) -> np.ndarray:
        """Known rows new to the history."""
        return self.rows[self.membership > 0]

    @property
    def left(self) -> np.ndarray:
        """Known rows evicted from the history."""
        return self.rows[self.membership < 0]


class HistoryMerge:
    """One group's plays for one user, merged into copies of the history's columns."""

    def __init__(self, record: UserRecord, plays: Sequence[Play], row_of: Mapping[str, int],
                 reference: float) -> None:
        self.record, self.reference = record, reference
        half_life = record.half_life_s
        self.scale = float(decay(reference - record.reference, half_life)) \
            if record.reference > -np.inf else 1.0
        merged: dict[str, list[float]] = {}  # item -> [weight, decayed weight, latest time]
        for item, weight, at in plays:
            entry = merged.setdefault(item, [0.0, 0.0, at])
            entry[0] += weight
            if item in row_of:  # an item outside the model has no decayed weight
                entry[1] += weight * decay(reference - at, half_life)
            entry[2] = max(entry[2], at)
        self.items = list(merged.items())
        self.rows = [row_of.get(item, -1) for item in merged]
        self.found = [record.find(item, row) for item, row in zip(merged, self.rows,
                                                                  strict=True)]
        scaled = record.decayed * self.scale if self.scale != 1.0 else record.decayed.copy()
        self.before = scaled.copy()  # every old item's decayed weight after the rescale
        self.decayed, self.weights = scaled, record.weights.astype(np.float64)
        self.last_at = record.last_at.copy()
        self.new: list[int] = []  # indexes into `items` of items new to the history
        for j, ((_, (weight, contribution, at)), k) in enumerate(zip(self.items, self.found,
                                                                     strict=True)):
            if k < 0:
                self.new.append(j)
                continue
            self.decayed[k] += contribution
            self.weights[k] += weight
            self.last_at[k] = max(self.last_at[k], at)

    def victims(self, max_history: int) -> tuple[list[int], set[int]]:
        """(old positions, new-item indexes) evicted: the least recent past the cap."""
        excess = len(self.record) + len(self.new) - max_history
        if excess <= 0:
            return [], set()
        new_times = [self.items[j][1][2] for j in self.new]
        oldest = int(self.last_at.argmin()) if len(self.last_at) else -1
        if excess == 1 and oldest >= 0 and self.last_at[oldest] < min(new_times, default=np.inf) \
                and np.count_nonzero(self.last_at == self.last_at[oldest]) == 1:
            return [oldest], set()  # the usual case at the cap: one out, found in O(n)
        times = np.concatenate([self.last_at, new_times]).tolist()
        ids = list(self.record.item_ids) + [self.items[j][0] for j in self.new]
        out = sorted(range(len(times)), key=lambda k: (times[k], _desc(ids[k])))[:excess]
        n = len(self.record)
        return sorted(k for k in out if k < n), {self.new[k - n] for k in out if k >= n}

    def change(self, victims: tuple[list[int], set[int]]) -> Change:
        """What moved among the known items: played ones, new ones, evicted ones."""
        old_out, new_out = victims
        gone = set(old_out)
        changed: list[tuple[int, float, int]] = []  # (row, delta, membership)
        for j, (row, k) in enumerate(zip(self.rows, self.found, strict=True)):
            if row >= 0 and k not in gone and j not in new_out:
                changed.append((row, self.items[j][1][1], int(k < 0)))
        rows = self.record.rows
        changed += [(int(rows[k]), -float(self.before[k]), -1) for k in old_out if rows[k] >= 0]
        columns = list(zip(*changed, strict=True)) or [(), (), ()]
        return Change(self.scale, np.array(columns[0], np.int64),
                      np.array(columns[1], np.float64), np.array(columns[2], np.int8))

    def apply(self, victims: tuple[list[int], set[int]], plays: int) -> UserRecord:
        """The new record: surviving new items fill the evicted slots, the rest appended."""
        old_out, new_out = victims
        record = self.record
        entering = [j for j in self.new if j not in new_out]
        rows = record.rows.copy() if old_out else record.rows
        lengths = record.id_lengths.copy() if old_out else record.id_lengths
        encoded = {j: self.items[j][0].encode("utf-8") for j in entering}
        if any(len(e) > MAX_ID_BYTES for e in encoded.values()):
            raise ValueError(f"an item id of user {record.user_id!r} exceeds {MAX_ID_BYTES} B")
        ids = _replace_ids(record, dict(zip(old_out, (encoded[j] for j in entering),
                                             strict=False)))
        for k, j in zip(old_out, entering, strict=False):
            weight, contribution, at = self.items[j][1]
            rows[k], lengths[k] = self.rows[j], len(encoded[j])
            self.weights[k], self.decayed[k], self.last_at[k] = weight, contribution, at
        columns: tuple[np.ndarray, ...] = (rows, self.weights, self.decayed, self.last_at, lengths)
        emptied = old_out[len(entering):]  # more out than in: a history past a lowered cap
        if emptied:
            columns, ids = _drop(columns, ids, emptied)
        appended = entering[len(old_out):]
        if appended:
            tail = [[self.rows[j] for j in appended], [self.items[j][1][0] for j in appended],
                    [self.items[j][1][1] for j in appended],
                    [self.items[j][1][2] for j in appended],
                    [len(encoded[j]) for j in appended]]
            columns = tuple(np.concatenate([c, np.asarray(t, c.dtype)])
                            for c, t in zip(columns, tail, strict=True))
            ids += b"".join(encoded[j] for j in appended)
        rows, weights, decayed, last_at, lengths = columns
        known = bool(np.any(rows >= 0))
        return record.evolve(version=record.version + plays,
                             reference=self.reference if known else float("-inf"), rows=rows,
                             weights=weights.astype(np.float32), decayed=decayed,
                             last_at=last_at, id_lengths=lengths, ids=ids)


def _drop(columns: tuple[np.ndarray, ...], ids: bytes,
          positions: list[int]) -> tuple[tuple[np.ndarray, ...], bytes]:
    """The columns (id lengths last) and ids without the items at these positions."""
    lengths, gone = columns[-1].tolist(), set(positions)
    ends = np.cumsum(lengths, dtype=np.int64).tolist()
    kept_ids = b"".join(ids[end - length:end] for k, (end, length) in
                        enumerate(zip(ends, lengths, strict=True)) if k not in gone)
    keep = np.ones(len(lengths), bool)
    keep[positions] = False
    return tuple(c[keep] for c in columns), kept_ids


def _desc(item_id: str) -> tuple[int, ...]:
    """A sort key that orders ids from the greatest down."""
    return tuple(-b for b in item_id.encode("utf-8")) + (1,)


def _replace_ids(record: UserRecord, replaced: dict[int, bytes]) -> bytes:
    """The ids with those at some positions replaced (few: copy the runs between them)."""
    if not replaced:
        return record.ids
    pieces, at = [], 0
    for k in sorted(replaced):
        start = int(record.id_lengths[:k].sum(dtype=np.int64))
        pieces += [record.ids[at:start], replaced[k]]
        at = start + int(record.id_lengths[k])
    pieces.append(record.ids[at:])
    return b"".join(pieces)
