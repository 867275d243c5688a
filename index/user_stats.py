"""Per-user sufficient statistics of the fold-in, kept exact by rank-1 updates, in memory.

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

They are derived data, so they are never stored: the history in the user's record is the
truth. The writer keeps those of recently active users in a `StatsCache` (LRU, bounded
in bytes); a user who is not in it (evicted, or after a restart) gets them rebuilt from
the history on their next event, one re-solve, and O(d^2) updates from then on. Writing
them with every event would cost ~17 KB of LMDB pages per event at d = 64.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.linalg import blas

from index.user_record import Change, UserRecord


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

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return int(self.packed.nbytes + self.linear.nbytes + self.weighted.nbytes)

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
        packed, weighted = self.packed * change.scale, self.weighted * change.scale
        linear = self.linear.copy()
        if len(change.rows):
            y = np.asarray(factors[change.rows], np.float64)
            for row, delta in zip(y, change.deltas.tolist(), strict=True):
                # BLAS dspr: packed += delta * row row^T, in place (our packed layout is
                # LAPACK's lower-packed one, the transpose of a symmetric matrix: itself)
                blas.dspr(self.dim, delta, row, packed, lower=1, overwrite_ap=1)
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


class StatsCache:
    """The statistics of recently active users, least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, UserStats] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str) -> UserStats | None:
        """The user's statistics, if cached (they count as just used)."""
        stats = self._entries.get(user_id)
        if stats is not None:
            self._entries.move_to_end(user_id)
        return stats

    def put(self, user_id: str, stats: UserStats) -> None:
        """Cache the user's statistics, evicting the least recently used past the bound."""
        self.discard(user_id)
        self._entries[user_id] = stats
        self.nbytes += stats.nbytes
        while self.nbytes > self.max_bytes and self._entries:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def discard(self, user_id: str) -> None:
        """Forget the user's statistics, if cached."""
        stats = self._entries.pop(user_id, None)
        if stats is not None:
            self.nbytes -= stats.nbytes
