"""A user's record: vector, model version, version counter and bounded, time-decayed history.

History policy: an item's weights accumulate (``weights``, as played) and so do its
decayed weights (``decayed``: each play's weight times ``0.5 ** (age / half_life_s)``,
its age taken from the user's latest play of an item in the model's catalog, so it
depends on the plays alone, not on when or in what order they arrived, and a play of an
item the model does not know moves nothing); the item keeps its latest play time; past
`max_history` items the least recently played one is evicted (of equally recent ones,
the one that entered the history last), and its earlier plays are forgotten with it.
Items outside the model have no decayed weight; when a later model knows them it is
derived from their summed weight and latest play (exact for items played once), as it is
for every item when the half-life changes.

Binary form (never pickle), little-endian: a header (format, flags, dim, history length,
model-version length, ids-blob length, version, updated_at, half_life_s), the model
version (UTF-8), the vector (float32 x dim), then per item its row in that model's
catalog (int32, -1 if not in it), summed weight (float32), decayed weight (float64) and
latest play time (float64), then the item ids joined by NUL. Every array decodes as a
view of the stored bytes; the ids are split only when asked for. Format 1 (no rows, no
decayed weights) is still read.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TypeVar

import numpy as np

RECORD_FORMAT = 2
MAX_HISTORY = 500  # items kept per user: the fold-in and watched-exclusion see these
ROWS_VALID = 1  # header flag: the rows index the catalog of the record's model version
_HEADER = struct.Struct("<BBHHHIQdd")
_HEADER_V1 = struct.Struct("<BBHHHIQd")
Play = tuple[str, float, float]  # (item_id, weight, occurred_at)
T = TypeVar("T", float, np.ndarray)
_EMPTY_F8 = np.zeros(0, np.float64)


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
    entered: np.ndarray  # known rows new to the history
    left: np.ndarray  # known rows evicted from it


@dataclass(frozen=True)
class UserRecord:
    """A user's vector, the model it belongs to, a version counter and a bounded history."""

    user_id: str
    vector: np.ndarray  # float32; empty when the user has no usable vector
    model_version: str  # of the vector and the rows
    version: int
    updated_at: float
    half_life_s: float  # the decay the decayed weights were computed with
    rows: np.ndarray  # int32 row of each item in the model's catalog, -1 if not in it
    rows_valid: bool  # False for a record of format 1 (no rows stored)
    weights: np.ndarray  # float32, summed weight per item
    decayed: np.ndarray  # float64, summed decayed weight per item, as of the latest play
    last_at: np.ndarray  # float64, unix time of the item's latest play
    ids_blob: bytes  # the item ids, NUL-joined

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def item_ids(self) -> tuple[str, ...]:
        """History item ids, in history order."""
        return tuple(self.ids_blob.decode("utf-8").split("\0")) if len(self) else ()

    @property
    def reference(self) -> float:
        """Time of the latest play of a known item, which the decay counts ages from
        (-inf when there is none)."""
        known = self.last_at[self.rows >= 0]
        return float(known.max()) if len(known) else float("-inf")

    def encode(self) -> bytes:
        """Compact binary form (never pickle)."""
        model = self.model_version.encode("utf-8")
        header = _HEADER.pack(RECORD_FORMAT, ROWS_VALID if self.rows_valid else 0,
                              len(self.vector), len(self), len(model), len(self.ids_blob),
                              self.version, self.updated_at, self.half_life_s)
        return b"".join((header, model, self.vector.astype("<f4").tobytes(),
                         self.rows.astype("<i4").tobytes(), self.weights.astype("<f4").tobytes(),
                         self.decayed.astype("<f8").tobytes(),
                         self.last_at.astype("<f8").tobytes(), self.ids_blob))

    @staticmethod
    def decode(user_id: str, raw: bytes | memoryview) -> UserRecord:
        """Parse a record written by `encode` (or format 1); ValueError if it is not one."""
        raw = bytes(raw)
        if len(raw) < _HEADER_V1.size:
            raise ValueError(f"user {user_id!r}: record shorter than its header")
        if raw[0] == 1:
            return _decode_v1(user_id, raw)
        if raw[0] != RECORD_FORMAT or len(raw) < _HEADER.size:
            raise ValueError(f"user {user_id!r}: unknown record format {raw[0]}")
        fmt, flags, dim, n, model_len, ids_len, version, updated_at, half_life = \
            _HEADER.unpack_from(raw)
        at = _HEADER.size + model_len
        if at + 4 * dim + 24 * n + ids_len != len(raw):
            raise ValueError(f"user {user_id!r}: record length does not match its header")
        vector, at = _view(raw, "<f4", dim, at)
        rows, at = _view(raw, "<i4", n, at)
        weights, at = _view(raw, "<f4", n, at)
        decayed, at = _view(raw, "<f8", n, at)
        last_at, at = _view(raw, "<f8", n, at)
        blob = raw[at:]
        if (blob.count(b"\0") + 1 if n else 0) != n or (not n and blob):
            raise ValueError(f"user {user_id!r}: the item ids do not match the header")
        return UserRecord(user_id, vector, raw[_HEADER.size:_HEADER.size + model_len].decode(),
                          version, updated_at, half_life, rows, bool(flags & ROWS_VALID),
                          weights, decayed, last_at, blob)

    @staticmethod
    def new(user_id: str) -> UserRecord:
        """An empty record for a user seen for the first time."""
        empty = np.zeros(0, np.float32)
        return UserRecord(user_id, empty, "", 0, 0.0, 0.0, np.zeros(0, np.int32), True, empty,
                          _EMPTY_F8, _EMPTY_F8, b"")

    def under(self, model_version: str, row_of: Mapping[str, int],
              half_life_s: float) -> UserRecord:
        """This record for another model (rows remapped, no vector yet) or decay setting.

        A new half-life re-weighs each item as if all its plays were at its latest one
        (exact for items played once); the record's own is kept when it already matches.
        """
        if self.fits(model_version, half_life_s):
            return self
        rows = np.fromiter((row_of.get(i, -1) for i in self.item_ids), np.int32, len(self))
        moved = replace(self, rows=rows)
        reference = moved.reference
        # Known items are at most as recent as the reference; unknown ones get no weight.
        age = np.maximum(reference - self.last_at, 0.0) if reference > -np.inf \
            else np.zeros(len(self))
        derived = self.weights * decay(age, half_life_s)
        if self.rows_valid and half_life_s == self.half_life_s and \
                -np.inf < self.reference <= reference:
            kept = (self.rows >= 0) & (rows >= 0)  # known before and after: rescale only
            derived[kept] = self.decayed[kept] * decay(reference - self.reference, half_life_s)
        # The vector is a function of model, decay and history: it survives only a remap.
        same = (model_version, half_life_s) == (self.model_version, self.half_life_s)
        return replace(moved, model_version=model_version, half_life_s=half_life_s,
                       rows_valid=True, decayed=np.where(rows >= 0, derived, 0.0),
                       vector=self.vector if same else np.zeros(0, np.float32))

    def fits(self, model_version: str, half_life_s: float) -> bool:
        """True if rows, decayed weights (and the vector, if any) are for this model and decay."""
        return self.rows_valid and (model_version, half_life_s) == (self.model_version,
                                                                    self.half_life_s)

    def with_plays(self, plays: Sequence[Play], row_of: Mapping[str, int],
                   max_history: int = MAX_HISTORY) -> tuple[UserRecord, Change]:
        """Merge plays into the history (the version counts each); the record and the change.

        `row_of` maps item ids of this record's model to rows (see `under`). A group
        brings a user a few distinct items: they are handled one by one, the history as
        whole arrays.
        """
        assert self.rows_valid, "remap the record with under() first"
        before = self.reference
        reference = max([before] + [at for item, _, at in plays if row_of.get(item, -1) >= 0])
        added = _merge(plays, reference, self.half_life_s, row_of)
        scale = float(decay(reference - before, self.half_life_s)) if before > -np.inf else 1.0
        rows = [row_of.get(item, -1) for item in added]
        found = [self._find(item, row) for item, row in zip(added, rows, strict=True)]
        grown = _grow(self, added, rows, found, scale)
        evicted = _evicted(grown[3], max_history)
        change = _change(self, added, rows, found, evicted, scale)
        new_ids = [item for item, k in zip(added, found, strict=True) if k < 0]
        if evicted:
            keep = np.ones(len(grown[0]), bool)
            keep[evicted] = False
            grown = tuple(column[keep] for column in grown)
        rows_, weights, decayed, last_at = grown
        record = replace(self, version=self.version + len(plays), rows=rows_,
                         weights=weights.astype(np.float32), decayed=decayed, last_at=last_at,
                         ids_blob=_cut_ids(_append_ids(self.ids_blob, new_ids), evicted))
        return record, change

    def known(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, decayed weights) of the history items in the model's catalog."""
        mask = self.rows >= 0
        return self.rows[mask].astype(np.int64), self.decayed[mask]

    def recent_item_ids(self, n: int | None = None) -> list[str]:
        """History item ids, most recent first."""
        order = np.argsort(-self.last_at, kind="stable")[:n]
        return [self.item_ids[i] for i in order]

    def _find(self, item_id: str, row: int) -> int:
        """Position of the item in the history, or -1: by row if known, else by id."""
        if row >= 0:
            hits = np.flatnonzero(self.rows == row)
            return int(hits[0]) if len(hits) else -1
        padded = b"\0" + self.ids_blob + b"\0"
        at = padded.find(b"\0" + item_id.encode("utf-8") + b"\0") if len(self) else -1
        return -1 if at < 0 else padded.count(b"\0", 0, at + 1) - 1


def _merge(plays: Sequence[Play], reference: float, half_life_s: float,
           row_of: Mapping[str, int]) -> dict[str, tuple[float, float, float]]:
    """A group's plays by item: (summed weight, summed decayed weight, latest time)."""
    merged: dict[str, list[float]] = {}
    for item, weight, at in plays:
        entry = merged.setdefault(item, [0.0, 0.0, at])
        entry[0] += weight
        if item in row_of:  # an item outside the model has no decayed weight
            entry[1] += weight * decay(reference - at, half_life_s)
        entry[2] = max(entry[2], at)
    return {item: (w, d, t) for item, (w, d, t) in merged.items()}


def _grow(record: UserRecord, added: dict[str, tuple[float, float, float]], rows: list[int],
          found: list[int], scale: float) -> tuple[np.ndarray, ...]:
    """(rows, weights, decayed, last_at) with the group merged in, before eviction."""
    decayed = record.decayed * scale if scale != 1.0 else record.decayed.copy()
    weights, last_at = record.weights.astype(np.float64), record.last_at.copy()
    new = []
    for (weight, contribution, at), row, k in zip(added.values(), rows, found, strict=True):
        if k >= 0:
            decayed[k] += contribution
            weights[k] += weight
            last_at[k] = max(last_at[k], at)
        else:
            new.append((row, weight, contribution, at))
    if not new:
        return record.rows, weights, decayed, last_at
    columns = list(zip(*new, strict=True))
    return (np.concatenate([record.rows, np.array(columns[0], np.int32)]),
            np.concatenate([weights, columns[1]]), np.concatenate([decayed, columns[2]]),
            np.concatenate([last_at, columns[3]]))


def _evicted(last_at: np.ndarray, max_history: int) -> list[int]:
    """Positions evicted: all but the `max_history` most recent (earlier-entered first)."""
    n = len(last_at)
    if n <= max_history:
        return []
    if n == max_history + 1:  # the usual case at the cap: one out, found in O(n)
        return [int(np.flatnonzero(last_at == last_at.min())[-1])]
    kept = np.argsort(-last_at, kind="stable")[:max_history]
    return np.setdiff1d(np.arange(n), kept).tolist()  # type: ignore[no-any-return]


def _change(record: UserRecord, added: dict[str, tuple[float, float, float]], rows: list[int],
            found: list[int], evicted: list[int], scale: float) -> Change:
    """What moved among the known items: played ones, new ones, evicted ones."""
    out = set(evicted)
    changed: list[tuple[int, float]] = []
    entered = []
    position = len(record)
    for (_, contribution, _), row, k in zip(added.values(), rows, found, strict=True):
        if k < 0:
            k, position = position, position + 1
            if row >= 0 and k not in out:
                entered.append(row)
        if row >= 0 and k not in out:
            changed.append((row, contribution))
    left = [(int(record.rows[e]), -scale * float(record.decayed[e])) for e in evicted
            if e < len(record) and record.rows[e] >= 0]
    changed += left
    return Change(scale, np.array([r for r, _ in changed], np.int64),
                  np.array([d for _, d in changed], np.float64), np.array(entered, np.int64),
                  np.array([r for r, _ in left], np.int64))


def _append_ids(blob: bytes, new_ids: list[str]) -> bytes:
    return b"\0".join(([blob] if blob else []) + [i.encode("utf-8") for i in new_ids])


def _cut_ids(blob: bytes, evicted: list[int]) -> bytes:
    """The ids blob without the ids at these positions."""
    if not evicted:
        return blob
    ends = np.append(np.flatnonzero(np.frombuffer(blob, np.uint8) == 0), len(blob))
    starts = np.concatenate([[0], ends[:-1] + 1])
    keep, at = [], 0
    for e in evicted:  # few: copy the runs between them
        if e > at:
            keep.append(blob[starts[at]:ends[e - 1]])
        at = e + 1
    if at < len(starts):
        keep.append(blob[starts[at]:])
    return b"\0".join(keep)


def _view(raw: bytes, dtype: str, count: int, at: int) -> tuple[np.ndarray, int]:
    array = np.frombuffer(raw, dtype, count, at)
    return array, at + array.nbytes


def _decode_v1(user_id: str, raw: bytes) -> UserRecord:
    """A format-1 record: no rows (remapped on first use) and undecayed weights."""
    _, _, dim, n, model_len, ids_len, version, updated_at = _HEADER_V1.unpack_from(raw)
    at = _HEADER_V1.size + model_len
    if at + 4 * dim + 12 * n + ids_len != len(raw):
        raise ValueError(f"user {user_id!r}: record length does not match its header")
    vector, at = _view(raw, "<f4", dim, at)
    weights, at = _view(raw, "<f4", n, at)
    last_at, at = _view(raw, "<f8", n, at)
    return UserRecord(user_id, vector, raw[_HEADER_V1.size:_HEADER_V1.size + model_len].decode(),
                      version, updated_at, 0.0, np.full(n, -1, np.int32), False, weights,
                      weights.astype(np.float64), last_at, raw[at:])
