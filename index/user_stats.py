"""Per-user sufficient statistics of the fold-in, kept exact by rank-1 updates.

For a user with history items i (rows in the model's catalog) and decayed weights D_i:

    P = sum D_i y_i y_i^T   (symmetric: its upper triangle is stored, float64)
    s = sum y_i
    m = sum D_i y_i

so that the exact fold-in with confidences c = 1 + alpha * D is
``x = (Y^T Y + lambda I + alpha P)^-1 (s + alpha m)``. A merge (`index.user_record.Change`)
rescales every D by one factor when the latest play moves (P and m scale with it) and
changes the D of a few items (played, entering, leaving): one rank-1 term each, O(d^2)
whatever the history's length. Float64, since float32 sums drift by ~1e-5 over 10k
updates; they are rebuilt from the history now and then all the same (`rebuild_every`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache

import numpy as np

from index.user_record import Change, UserRecord

STATS_FORMAT = 1
# format, dim, model-version length, updates since the last rebuild, record version, half-life
_HEADER = struct.Struct("<BxHHIQd")


@cache
def _upper(dim: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(dim)


@dataclass(frozen=True)
class UserStats:
    """P (packed), s and m of one user, for one model version, decay and record version."""

    model_version: str
    half_life_s: float
    record_version: int  # the version of the user record they were computed with
    updates: int  # since the last rebuild from the history
    packed: np.ndarray  # float64, d (d + 1) / 2: the upper triangle of P, row by row
    linear: np.ndarray  # float64, d: s
    weighted: np.ndarray  # float64, d: m

    @property
    def dim(self) -> int:
        """Dimension of the model."""
        return len(self.linear)

    def matches(self, record: UserRecord) -> bool:
        """True if these are the statistics of exactly this record."""
        return (self.model_version, self.half_life_s, self.record_version) == (
            record.model_version, record.half_life_s, record.version) and record.rows_valid

    @staticmethod
    def build(record: UserRecord, factors: np.ndarray) -> UserStats:
        """From the record's history: its known rows and their decayed weights."""
        rows, decayed = record.known()
        y = np.asarray(factors[rows], np.float64).reshape(len(rows), factors.shape[1])
        p = (y.T * decayed) @ y
        return UserStats(record.model_version, record.half_life_s, record.version, 0,
                         p[_upper(y.shape[1])], y.sum(axis=0), y.T @ decayed)

    def updated(self, record: UserRecord, change: Change, factors: np.ndarray) -> UserStats:
        """The statistics of `record`, merged from these by `change`: the rescale, then one
        term per changed item."""
        upper = _upper(self.dim)
        packed, weighted = self.packed * change.scale, self.weighted * change.scale
        linear = self.linear.copy()
        if len(change.rows):
            y = np.asarray(factors[change.rows], np.float64)
            packed += ((y.T * change.deltas) @ y)[upper]
            weighted += y.T @ change.deltas
        if len(change.entered):
            linear += np.asarray(factors[change.entered], np.float64).sum(axis=0)
        if len(change.left):
            linear -= np.asarray(factors[change.left], np.float64).sum(axis=0)
        return UserStats(self.model_version, self.half_life_s, record.version, self.updates + 1,
                         packed, linear, weighted)

    def matrix(self) -> np.ndarray:
        """P as a full symmetric d x d matrix."""
        full = np.zeros((self.dim, self.dim))
        rows, cols = _upper(self.dim)
        full[rows, cols] = self.packed
        full[cols, rows] = self.packed
        return full

    def encode(self) -> bytes:
        """Binary form: header, model version, then packed P, s and m (float64)."""
        model = self.model_version.encode("utf-8")
        return b"".join((_HEADER.pack(STATS_FORMAT, self.dim, len(model), self.updates,
                                      self.record_version, self.half_life_s), model,
                         self.packed.astype("<f8").tobytes(), self.linear.astype("<f8").tobytes(),
                         self.weighted.astype("<f8").tobytes()))

    @staticmethod
    def decode(user_id: str, raw: bytes | memoryview) -> UserStats:
        """Parse `encode`'s output; ValueError if it is not one."""
        raw = bytes(raw)
        if len(raw) < _HEADER.size or raw[0] != STATS_FORMAT:
            raise ValueError(f"user {user_id!r}: not a stats record of format {STATS_FORMAT}")
        _, dim, model_len, updates, record_version, half_life = _HEADER.unpack_from(raw)
        at = _HEADER.size + model_len
        floats = dim * (dim + 1) // 2 + 2 * dim
        if at + 8 * floats != len(raw):
            raise ValueError(f"user {user_id!r}: stats length does not match their header")
        values = np.frombuffer(raw, "<f8", floats, at)
        packed = dim * (dim + 1) // 2
        return UserStats(raw[_HEADER.size:at].decode("utf-8"), half_life, record_version,
                         updates, values[:packed], values[packed:packed + dim],
                         values[packed + dim:])
