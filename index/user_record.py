"""A user's record: vector, model version, version counter and bounded, time-decayed history.

History policy: an item's weights accumulate (``weights``, as played) and so do its
decayed weights (``decayed``: each play's weight times ``0.5 ** (age / half_life_s)``,
its age taken from the user's latest play, so it depends on the plays alone, not on when
or in what order they arrived); the item keeps its latest play time; past
`max_history` items the least recently played one is evicted (of equally recent ones,
the one that entered the history last), and its earlier plays are forgotten with it.

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

import numpy as np

RECORD_FORMAT = 2
MAX_HISTORY = 500  # items kept per user: the fold-in and watched-exclusion see these
ROWS_VALID = 1  # header flag: the rows index the catalog of the record's model version
_HEADER = struct.Struct("<BBHHHIQdd")
_HEADER_V1 = struct.Struct("<BBHHHIQd")
Play = tuple[str, float, float]  # (item_id, weight, occurred_at)
_EMPTY_F8 = np.zeros(0, np.float64)


def decay(age_s: np.ndarray | float, half_life_s: float) -> np.ndarray | float:
    """How much a play of this age still counts: 0.5 ** (age / half-life); 1 when off (0)."""
    return 0.5 ** (np.asarray(age_s) / half_life_s) if half_life_s > 0 else np.ones_like(age_s)


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
    def latest(self) -> float:
        """Time of the latest play (-inf with no history)."""
        return float(self.last_at.max()) if len(self) else float("-inf")

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
        decayed = self.decayed if half_life_s == self.half_life_s \
            else self.weights * decay(self.latest - self.last_at, half_life_s)
        # The vector is a function of model, decay and history: it survives only a remap.
        same = (model_version, half_life_s) == (self.model_version, self.half_life_s)
        return replace(self, model_version=model_version, half_life_s=half_life_s, rows=rows,
                       rows_valid=True, decayed=np.asarray(decayed, np.float64),
                       vector=self.vector if same else np.zeros(0, np.float32))

    def fits(self, model_version: str, half_life_s: float) -> bool:
        """True if rows, decayed weights (and the vector, if any) are for this model and decay."""
        return self.rows_valid and (model_version, half_life_s) == (self.model_version,
                                                                    self.half_life_s)

    def with_plays(self, plays: Sequence[Play], row_of: Mapping[str, int],
                   max_history: int = MAX_HISTORY) -> tuple[UserRecord, Change]:
        """Merge plays into the history (the version counts each); the record and the change.

        `row_of` maps item ids of this record's model to rows (see `under`).
        """
        assert self.rows_valid, "remap the record with under() first"
        merged = _merge(plays, max(self.latest, max(at for _, _, at in plays)),
                        self.half_life_s)
        scale = float(decay(merged.latest - self.latest, self.half_life_s)) if len(self) \
            else 1.0
        found = [self._find(item, row_of.get(item, -1)) for item in merged.ids]
        grown = _Grown.of(self, merged, found, [row_of.get(i, -1) for i in merged.ids], scale)
        kept = _keep(grown.last_at, max_history)
        change = grown.change(kept, len(self), scale)
        blob = _join_ids(self.ids_blob, len(self), [merged.ids[j] for j, k in
                                                     enumerate(found) if k < 0], kept)
        record = replace(self, version=self.version + len(plays), rows=grown.rows[kept],
                         weights=grown.weights[kept].astype(np.float32),
                         decayed=grown.decayed[kept], last_at=grown.last_at[kept],
                         ids_blob=blob)
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


@dataclass(frozen=True)
class _Merged:
    """A group's plays by item: ids, summed weight, decayed weight, latest time."""

    ids: list[str]
    weights: np.ndarray
    decayed: np.ndarray
    last_at: np.ndarray
    latest: float


def _merge(plays: Sequence[Play], latest: float, half_life_s: float) -> _Merged:
    position: dict[str, int] = {}
    index = np.fromiter((position.setdefault(item, len(position)) for item, _, _ in plays),
                        np.int64, len(plays))
    weights = np.fromiter((w for _, w, _ in plays), np.float64, len(plays))
    times = np.fromiter((at for _, _, at in plays), np.float64, len(plays))
    last_at = np.full(len(position), -np.inf)
    np.maximum.at(last_at, index, times)
    return _Merged(list(position), np.bincount(index, weights, len(position)),
                   np.bincount(index, weights * decay(latest - times, half_life_s),
                               len(position)), last_at, latest)


@dataclass(frozen=True)
class _Grown:
    """The history with the group merged in, before eviction (old items, then new ones)."""

    rows: np.ndarray
    weights: np.ndarray
    decayed: np.ndarray
    last_at: np.ndarray
    before: np.ndarray  # each item's decayed weight before the merge, scaled (new: 0)

    @staticmethod
    def of(record: UserRecord, merged: _Merged, found: list[int], rows: list[int],
           scale: float) -> _Grown:
        new = np.array([j for j, k in enumerate(found) if k < 0], np.int64)
        old = np.array([(j, k) for j, k in enumerate(found) if k >= 0], np.int64).reshape(-1, 2)
        before = np.concatenate([record.decayed * scale, np.zeros(len(new))])
        decayed, weights = before.copy(), np.concatenate([record.weights, merged.weights[new]])
        last_at = np.concatenate([record.last_at, merged.last_at[new]])
        decayed[len(record) + np.arange(len(new))] = merged.decayed[new]
        decayed[old[:, 1]] += merged.decayed[old[:, 0]]
        weights[old[:, 1]] += merged.weights[old[:, 0]]
        last_at[old[:, 1]] = np.maximum(last_at[old[:, 1]], merged.last_at[old[:, 0]])
        all_rows = np.concatenate([record.rows, np.array(rows, np.int32)[new]]).astype(np.int32)
        return _Grown(all_rows, weights, decayed, last_at, before)

    def change(self, kept: np.ndarray, n_old: int, scale: float) -> Change:
        after = np.zeros(len(self.rows))
        after[kept] = self.decayed[kept]
        delta = after - self.before
        known = self.rows >= 0
        changed = known & (delta != 0)
        stays = np.zeros(len(self.rows), bool)
        stays[kept] = True
        position = np.arange(len(self.rows))
        return Change(scale, self.rows[changed].astype(np.int64), delta[changed],
                      self.rows[known & stays & (position >= n_old)].astype(np.int64),
                      self.rows[known & ~stays & (position < n_old)].astype(np.int64))


def _keep(last_at: np.ndarray, max_history: int) -> np.ndarray:
    """Positions kept: the `max_history` most recent (the earlier-entered of equals first)."""
    n = len(last_at)
    if n <= max_history:
        return np.arange(n)
    if n == max_history + 1:  # the usual case at the cap: one out, found in O(n)
        ties = np.flatnonzero(last_at == last_at.min())
        return np.delete(np.arange(n), ties[-1])
    return np.sort(np.argsort(-last_at, kind="stable")[:max_history])


def _join_ids(blob: bytes, n_old: int, new_ids: list[str], kept: np.ndarray) -> bytes:
    """The ids blob with the new ids appended and the evicted ones cut out."""
    grown = b"\0".join(([blob] if n_old else []) + [i.encode("utf-8") for i in new_ids])
    if len(kept) == n_old + len(new_ids):
        return grown
    ends = np.append(np.flatnonzero(np.frombuffer(grown, np.uint8) == 0), len(grown))
    starts = np.concatenate([[0], ends[:-1] + 1])
    # Kept positions come in a few contiguous runs (evictions are few): copy run by run.
    breaks = np.flatnonzero(np.diff(kept) != 1) + 1
    firsts, lasts = np.split(kept, breaks), None
    lasts = [run[-1] for run in firsts]
    return b"\0".join(grown[starts[run[0]]:ends[last]] for run, last in zip(firsts, lasts,
                                                                             strict=True))


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
