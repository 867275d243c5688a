"""A user's record: vector, model version, version counter and bounded, time-decayed history.

The history policy (accumulate, decay, evict) is `index.history`'s.

Binary form (never pickle), little-endian: a header (format, flags, dim, history length,
model-version length, ids length, version, updated_at, half_life_s, reference, dismissed
length), the model version (UTF-8), the vector (float32 x dim), then per item its row in
that model's catalog (int32, -1 if not in it), summed weight (float32), decayed weight
(float64), latest play time (float64) and id length (uint16), then the ids,
concatenated, then the ids of the items the user dismissed ("not interested"), joined by
newlines (the events' checks keep item ids printable). Every array decodes as a view of
the stored bytes; the ids are split only when asked for. Formats 1 (no rows, no decayed
weights) and 2 (no dismissals) are still read.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from index.history import Change, HistoryMerge, Play, decay

RECORD_FORMAT = 3
MAX_HISTORY = 500  # items kept per user: the fold-in and watched-exclusion see these
MAX_DISMISSED = 1000  # "not interested" items kept per user, the latest
ROWS_VALID = 1  # header flag: the rows index the catalog of the record's model version
_HEADER = struct.Struct("<BBHHHIQdddI")
_HEADER_V2 = struct.Struct("<BBHHHIQddd")  # format 2: the same, without dismissals
_HEADER_V1 = struct.Struct("<BBHHHIQd")
_EMPTY_F8 = np.zeros(0, np.float64)
_DERIVED = ("item_ids", "known_count", "_offsets")  # cached from the fields: never copied


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
    dismissed: tuple[str, ...] = ()  # items the user is not interested in, oldest first

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
        dismissed = "\n".join(self.dismissed).encode("utf-8")
        header = _HEADER.pack(RECORD_FORMAT, ROWS_VALID if self.rows_valid else 0,
                              len(self.vector), len(self), len(model), len(self.ids),
                              self.version, self.updated_at, self.half_life_s, self.reference,
                              len(dismissed))
        return b"".join((header, model, _bytes(self.vector, "<f4"), _bytes(self.rows, "<i4"),
                         _bytes(self.weights, "<f4"), _bytes(self.decayed, "<f8"),
                         _bytes(self.last_at, "<f8"), _bytes(self.id_lengths, "<u2"), self.ids,
                         dismissed))

    @staticmethod
    def decode(user_id: str, raw: bytes | memoryview) -> UserRecord:
        """Parse a record written by `encode` (or format 1); ValueError if it is not one."""
        raw = bytes(raw)
        if len(raw) < _HEADER_V1.size:
            raise ValueError(f"user {user_id!r}: record shorter than its header")
        if raw[0] == 1:
            return _decode_v1(user_id, raw)
        header = {2: _HEADER_V2, RECORD_FORMAT: _HEADER}.get(raw[0])
        if header is None or len(raw) < header.size:
            raise ValueError(f"user {user_id!r}: unknown record format {raw[0]}")
        _, flags, dim, n, model_len, ids_len, version, updated_at, half_life, reference, \
            *dismissed_len = header.unpack_from(raw)
        at = header.size + model_len
        tail = sum(dismissed_len)
        (vector, rows, weights, decayed, last_at, lengths), ids = _columns(
            user_id, raw, at, ids_len + tail, [("<f4", dim), ("<i4", n), ("<f4", n),
                                               ("<f8", n), ("<f8", n), ("<u2", n)])
        dismissed = tuple(ids[ids_len:].decode("utf-8").split("\n")) if tail else ()
        return UserRecord(user_id, vector, raw[header.size:at].decode(), version, updated_at,
                          half_life, reference, rows, bool(flags & ROWS_VALID), weights,
                          decayed, last_at, lengths, ids[:ids_len], dismissed)

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
        merge = HistoryMerge(self, plays, row_of, reference)
        victims = merge.victims(max_history)
        change = merge.change(victims)
        record = merge.apply(victims, len(plays))
        return record, change

    def with_dismissed(self, item_ids: Sequence[str]) -> UserRecord:
        """The record after "not interested" events for these items (one version each):
        each is kept (a repeat moves to the latest), the latest MAX_DISMISSED of them.
        History and vector are untouched."""
        latest = dict.fromkeys(self.dismissed)
        for item_id in item_ids:
            latest.pop(item_id, None)
            latest[item_id] = None
        return self.evolve(dismissed=tuple(latest)[-MAX_DISMISSED:],
                           version=self.version + len(item_ids))

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


def _bytes(array: np.ndarray, dtype: str) -> bytes:
    return array.astype(dtype, copy=False).tobytes()


def _columns(user_id: str, raw: bytes, at: int, ids_len: int,
             layout: list[tuple[str, int]]) -> tuple[list[np.ndarray], bytes]:
    """Views of the arrays laid out from `at` (dtype, count each), and the ids after them."""
    end = at + sum(np.dtype(dtype).itemsize * count for dtype, count in layout)
    if end + ids_len != len(raw):
        raise ValueError(f"user {user_id!r}: record length does not match its header")
    arrays = []
    for dtype, count in layout:
        arrays.append(np.frombuffer(raw, dtype, count, at))
        at += arrays[-1].nbytes
    return arrays, raw[end:]


def _decode_v1(user_id: str, raw: bytes) -> UserRecord:
    """A format-1 record: no rows (remapped on first use) and undecayed weights."""
    _, _, dim, n, model_len, ids_len, version, updated_at = _HEADER_V1.unpack_from(raw)
    at = _HEADER_V1.size + model_len
    (vector, weights, last_at), blob = _columns(user_id, raw, at, ids_len,
                                                [("<f4", dim), ("<f4", n), ("<f8", n)])
    ids = blob.split(b"\0") if n else []
    if len(ids) != n:
        raise ValueError(f"user {user_id!r}: {len(ids)} item ids, header says {n}")
    return UserRecord(user_id, vector, raw[_HEADER_V1.size:at].decode(),
                      version, updated_at, 0.0, float("-inf"), np.full(n, -1, np.int32), False,
                      weights, weights.astype(np.float64), last_at,
                      np.array([len(i) for i in ids], np.uint16), b"".join(ids))
