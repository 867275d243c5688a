"""A user's record: vector, model version, version counter and bounded, time-decayed history.

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

Binary form (never pickle), little-endian: a header (format, flags, dim, history length,
model-version length, ids length, version, updated_at, half_life_s, reference), the
model version (UTF-8), the vector (float32 x dim), then per item its row in that model's
catalog (int32, -1 if not in it), summed weight (float32), decayed weight (float64),
latest play time (float64) and id length (uint16), then the ids, concatenated. Every
array decodes as a view of the stored bytes; the ids are split only when asked for.
Format 1 (no rows, no decayed weights) is still read.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np

RECORD_FORMAT = 2
MAX_HISTORY = 500  # items kept per user: the fold-in and watched-exclusion see these
MAX_ID_BYTES = 65_535  # an id's length is stored in 16 bits
ROWS_VALID = 1  # header flag: the rows index the catalog of the record's model version
_HEADER = struct.Struct("<BBHHHIQddd")
_HEADER_V1 = struct.Struct("<BBHHHIQd")
Play = tuple[str, float, float]  # (item_id, weight, occurred_at)
T = TypeVar("T", float, np.ndarray)
_EMPTY_F8 = np.zeros(0, np.float64)
_DERIVED = ("item_ids", "known_count", "_offsets")  # cached from the fields: never copied


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


@dataclass(frozen=True)
class UserRecord:
    """A user's vector, the model it belongs to, a version counter and a bounded history."""

    user_id: str
    vector: np.ndarray  # float32; empty when the user has no usable vector
    model_version: str  # of the vector and the rows
    version: int
    updated_at: float
    half_life_s: float  # the decay the decayed weights were computed with
    reference: float  # the latest play of a known item (-inf: none); ages count from it
    rows: np.ndarray  # int32 row of each item in the model's catalog, -1 if not in it
    rows_valid: bool  # False for a record of format 1 (no rows stored)
    weights: np.ndarray  # float32, summed weight per item
    decayed: np.ndarray  # float64, summed decayed weight per item, as of the reference
    last_at: np.ndarray  # float64, unix time of the item's latest play
    id_lengths: np.ndarray  # uint16, bytes of each item id in `ids`
    ids: bytes  # the item ids (UTF-8), concatenated

    def __len__(self) -> int:
        return len(self.rows)

    def evolve(self, **changes: object) -> UserRecord:
        """A copy with some fields changed: `dataclasses.replace` without its per-call
        introspection (this runs for every user of every group)."""
        copy = object.__new__(UserRecord)
        state = {name: value for name, value in self.__dict__.items() if name not in _DERIVED}
        copy.__dict__.update(state, **changes)
        return copy

    @cached_property
    def _offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.id_lengths, dtype=np.int64)])

    def item_id(self, k: int) -> str:
        """The id of the k-th history item."""
        return self.ids[self._offsets[k]:self._offsets[k + 1]].decode("utf-8")

    @cached_property
    def item_ids(self) -> tuple[str, ...]:
        """History item ids, in history order."""
        ends = self._offsets.tolist()
        return tuple(self.ids[a:b].decode("utf-8") for a, b in zip(ends, ends[1:], strict=False))

    @cached_property
    def known_count(self) -> int:
        """How many history items the model's catalog has."""
        return int(np.count_nonzero(self.rows >= 0))

    def encode(self) -> bytes:
        """Compact binary form (never pickle)."""
        model = self.model_version.encode("utf-8")
        header = _HEADER.pack(RECORD_FORMAT, ROWS_VALID if self.rows_valid else 0,
                              len(self.vector), len(self), len(model), len(self.ids),
                              self.version, self.updated_at, self.half_life_s, self.reference)
        return b"".join((header, model, _bytes(self.vector, "<f4"), _bytes(self.rows, "<i4"),
                         _bytes(self.weights, "<f4"), _bytes(self.decayed, "<f8"),
                         _bytes(self.last_at, "<f8"), _bytes(self.id_lengths, "<u2"), self.ids))

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
        _, flags, dim, n, model_len, ids_len, version, updated_at, half_life, reference = \
            _HEADER.unpack_from(raw)
        at = _HEADER.size + model_len
        if at + 4 * dim + 26 * n + ids_len != len(raw):
            raise ValueError(f"user {user_id!r}: record length does not match its header")
        vector, at = _view(raw, "<f4", dim, at)
        rows, at = _view(raw, "<i4", n, at)
        weights, at = _view(raw, "<f4", n, at)
        decayed, at = _view(raw, "<f8", n, at)
        last_at, at = _view(raw, "<f8", n, at)
        lengths, at = _view(raw, "<u2", n, at)
        return UserRecord(user_id, vector, raw[_HEADER.size:_HEADER.size + model_len].decode(),
                          version, updated_at, half_life, reference, rows,
                          bool(flags & ROWS_VALID), weights, decayed, last_at, lengths, raw[at:])

    @staticmethod
    def new(user_id: str) -> UserRecord:
        """An empty record for a user seen for the first time."""
        empty = np.zeros(0, np.float32)
        return UserRecord(user_id, empty, "", 0, 0.0, 0.0, float("-inf"),
                          np.zeros(0, np.int32), True, empty, _EMPTY_F8, _EMPTY_F8,
                          np.zeros(0, np.uint16), b"")

    def under(self, model_version: str, row_of: Mapping[str, int],
              half_life_s: float) -> UserRecord:
        """This record for another model (rows remapped, no vector yet) or decay setting.

        Items known before and after keep their decayed weights (rescaled if the
        reference moved on); the others' are derived from their sums (see the policy).
        """
        if self.fits(model_version, half_life_s):
            return self
        rows = np.fromiter((row_of.get(i, -1) for i in self.item_ids), np.int32, len(self))
        known = rows >= 0
        reference = float(self.last_at[known].max()) if known.any() else float("-inf")
        # Known items are at most as recent as the reference; unknown ones get no weight.
        age = np.maximum(reference - self.last_at, 0.0) if known.any() else np.zeros(len(self))
        derived = self.weights * decay(age, half_life_s)
        if self.rows_valid and half_life_s == self.half_life_s and \
                -np.inf < self.reference <= reference:
            kept = (self.rows >= 0) & known  # known before and after: rescale only
            derived[kept] = self.decayed[kept] * decay(reference - self.reference, half_life_s)
        # The vector is a function of model, decay and history: it survives only a remap.
        same = (model_version, half_life_s) == (self.model_version, self.half_life_s)
        return self.evolve(model_version=model_version, half_life_s=half_life_s,
                           reference=reference, rows=rows, rows_valid=True,
                           decayed=np.where(known, derived, 0.0),
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
        whole arrays, and an item that enters a full history takes an evicted one's place.
        """
        assert self.rows_valid, "remap the record with under() first"
        reference = max([self.reference] + [at for item, _, at in plays if item in row_of])
        merge = _Merge(self, plays, row_of, reference)
        victims = merge.victims(max_history)
        change = merge.change(victims)
        record = merge.apply(victims, change, len(plays))
        return record, change

    def known(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, decayed weights) of the history items in the model's catalog."""
        mask = self.rows >= 0
        return self.rows[mask].astype(np.int64), self.decayed[mask]

    def recent_item_ids(self, n: int | None = None) -> list[str]:
        """History item ids, most recent first."""
        order = np.argsort(-self.last_at, kind="stable")[:n]
        return [self.item_id(int(k)) for k in order]

    def find(self, item_id: str, row: int) -> int:
        """Position of the item in the history, or -1: by row if known, else by id."""
        if row >= 0:
            if not len(self):
                return -1
            equal = self.rows == row
            k = int(equal.argmax())
            return k if equal[k] else -1
        wanted = item_id.encode("utf-8")
        for k in np.flatnonzero((self.rows < 0) & (self.id_lengths == len(wanted))).tolist():
            if self.ids[self._offsets[k]:self._offsets[k + 1]] == wanted:
                return k
        return -1


class _Merge:
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

    def apply(self, victims: tuple[list[int], set[int]], change: Change,
              plays: int) -> UserRecord:
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
        appended = entering[len(old_out):]
        columns: tuple[np.ndarray, ...] = (rows, self.weights, self.decayed, self.last_at, lengths)
        emptied = old_out[len(entering):]  # more out than in: a history past a lowered cap
        if emptied:
            ends = np.cumsum(lengths, dtype=np.int64).tolist()
            ids = b"".join(ids[end - length:end] for k, (end, length) in
                           enumerate(zip(ends, lengths.tolist(), strict=True))
                           if k not in set(emptied))
            keep = np.ones(len(rows), bool)
            keep[emptied] = False
            columns = tuple(c[keep] for c in columns)
        if appended:
            tail = [[self.rows[j] for j in appended], [self.items[j][1][0] for j in appended],
                    [self.items[j][1][1] for j in appended],
                    [self.items[j][1][2] for j in appended],
                    [len(encoded[j]) for j in appended]]
            columns = tuple(np.concatenate([c, np.asarray(t, c.dtype)])
                            for c, t in zip(columns, tail, strict=True))
            ids += b"".join(encoded[j] for j in appended)
        rows, weights, decayed, last_at, lengths = columns
        known = record.known_count + int(change.membership.sum())
        merged = record.evolve(version=record.version + plays,
                               reference=self.reference if known else float("-inf"), rows=rows,
                               weights=weights.astype(np.float32), decayed=decayed,
                               last_at=last_at, id_lengths=lengths, ids=ids)
        merged.__dict__["known_count"] = known  # what the cached property would count
        return merged


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


def _bytes(array: np.ndarray, dtype: str) -> bytes:
    return array.astype(dtype, copy=False).tobytes()


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
    ids = raw[at:].split(b"\0") if n else []
    if len(ids) != n:
        raise ValueError(f"user {user_id!r}: {len(ids)} item ids, header says {n}")
    return UserRecord(user_id, vector, raw[_HEADER_V1.size:_HEADER_V1.size + model_len].decode(),
                      version, updated_at, 0.0, float("-inf"), np.full(n, -1, np.int32), False,
                      weights, weights.astype(np.float64), last_at,
                      np.array([len(i) for i in ids], np.uint16), b"".join(ids))
