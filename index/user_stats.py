"""Per-user sufficient statistics of the fold-in, kept exact by rank-1 updates, in memory.

For a user with history items i (rows in the model's catalog) and decayed weights D_i:

    P = sum D_i y_i y_i^T   (symmetric, float64: its upper triangle is kept)
    s = sum y_i
    m = sum D_i y_i

so that the exact fold-in with confidences c = 1 + alpha * D is
``x = (Y^T Y + lambda I + alpha P)^-1 (s + alpha m)``. A merge (`index.history.Change`)
rescales every D by one factor when the latest play moves (P and m scale with it) and
changes the D of a few items (played, entering, leaving): one rank-1 term each (BLAS
dsyr), O(d^2) whatever the history's length, then one Cholesky solve (LAPACK dposv).
Float64, since float32 sums drift by ~1e-5 over 10k updates; they are rebuilt from the
history now and then all the same (`FoldInPolicy.stats_rebuild_every`).

They are derived data, so they are never stored: the history in the user's record is the
truth. The writer keeps those of recently active users in a `StatsCache` (LRU, bounded
in bytes); a user who is not in it (evicted, or after a restart) gets them rebuilt from
the history on their next event, one re-solve, and O(d^2) updates from then on. Writing
them with every event would cost tens of KB of LMDB pages per event. P is held as a
full d x d array whose upper triangle is maintained: twice the memory of packed storage,
but LAPACK's packed Cholesky (dppsv) took 21 us at d = 64 where dposv takes 9.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from index.history import Change
from index.user_record import UserRecord


@dataclass(frozen=True)
class UserStats:
    """P, s and m of one user, for one model version, decay and record version.

    Never changed in place: a cached value stays valid for the record it matches even if
    the write txn that made a newer one fails.
    """

    model_version: str
    half_life_s: float
    record_version: int  # the version of the user record they were computed with
    updates: int  # since the last rebuild from the history
    upper: np.ndarray  # float64 d x d, C order; its upper triangle is P's
    linear: np.ndarray  # float64, d: s
    weighted: np.ndarray  # float64, d: m

    @property
    def dim(self) -> int:
        """Dimension of the model."""
        return len(self.linear)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return int(self.upper.nbytes + self.linear.nbytes + self.weighted.nbytes)

    def matches(self, record: UserRecord) -> bool:
        """True if these are the statistics of exactly this record."""
        return (self.model_version, self.half_life_s, self.record_version) == (
            record.model_version, record.half_life_s, record.version) and record.rows_valid

    @staticmethod
    def build(record: UserRecord, factors: np.ndarray) -> UserStats:
        """From the record's history: its known rows and their decayed weights."""
        rows, decayed = record.known()
        y = np.asarray(factors[rows], np.float64).reshape(len(rows), factors.shape[1])
        return UserStats(record.model_version, record.half_life_s, record.version, 0,
                         (y.T * decayed) @ y, y.sum(axis=0), y.T @ decayed)

    def updated(self, record: UserRecord, change: Change, factors: np.ndarray) -> UserStats:
        """The statistics of `record`, merged from these by `change`: the rescale, then one
        term per changed item."""
        upper, weighted = self.upper * change.scale, self.weighted * change.scale
        linear = self.linear
        if len(change.rows):
            y = np.asarray(factors[change.rows], np.float64)
            for row, delta in zip(y, change.deltas.tolist(), strict=True):
                # upper += delta * row row^T, in place: the transpose is Fortran-ordered,
                # and its lower triangle is our upper one.
                blas.dsyr(delta, row, a=upper.T, lower=1, overwrite_a=1)
            weighted += y.T @ change.deltas
            linear = linear + change.membership @ y  # items entering and leaving
        return UserStats(self.model_version, self.half_life_s, record.version, self.updates + 1,
                         upper, linear, weighted)


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
