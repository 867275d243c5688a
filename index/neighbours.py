"""Co-visitation neighbours: per item, the items the same viewers played near it.

Built in the batch job (`co_visitation`) and kept in the snapshot (two `.npy` files); the
ranking service turns the neighbours of a user's recent plays into candidates
(`candidates`). The score of a pair is the cosine of co-occurrence over distinct
(user, item) plays, ``c_ij / sqrt(n_i * n_j)``, counting a pair of a user's plays only
if at most `window` other distinct plays lie between them in the user's time order
(0: anywhere in the history) — Gorse's item-to-item score when the window is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from index.kernels import reach, readonly, recent_known

MAX_K = 1000
MAX_ENTRIES = 1 << 22  # a query's recent plays x neighbours


@dataclass(frozen=True, kw_only=True)
class NeighbourParams:
    """How neighbours are built: how many are kept per item and the co-visitation window."""

    # Chosen on the validation window (`python -m bench.tune --blend`).
    k: int = 100
    window: int = 20
    max_per_user: int = 500  # a user's latest distinct plays counted (bounds heavy users)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"neighbour k must be in [1, {MAX_K}], got {self.k}")
        if self.window < 0 or self.max_per_user < 2:
            raise ValueError("neighbour window must be >= 0 and max_per_user >= 2")

    def as_dict(self) -> dict[str, int]:
        """The manifest's record of these parameters."""
        return {"k": self.k, "window": self.window, "max_per_user": self.max_per_user}


@dataclass(frozen=True)
class Neighbours:
    """Top-k neighbour rows per item (-1 padded at the end) and their scores, best first."""

    rows: np.ndarray  # int32 (n_items, k)
    scores: np.ndarray  # float32 (n_items, k), 0 where rows is -1
    params: dict[str, int] = field(default_factory=dict)  # how they were built

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", readonly(self.rows))
        object.__setattr__(self, "scores", readonly(self.scores))

    def check(self, n_items: int) -> tuple[str, str] | None:
        """What is wrong with these arrays for a catalog of n_items, as ("rows" or "scores",
        the problem); None: nothing."""
        rows, scores = self.rows, self.scores
        if rows.dtype != np.int32 or rows.ndim != 2 or rows.shape[0] != n_items \
                or not 1 <= rows.shape[1] <= MAX_K:
            return "rows", f"{rows.dtype} {rows.shape}, expected int32 ({n_items}, k <= {MAX_K})"
        if scores.dtype != np.float32 or scores.shape != rows.shape:
            return "scores", f"{scores.dtype} {scores.shape}, expected float32 {rows.shape}"
        if ((rows < -1) | (rows >= n_items)).any():
            return "rows", "a neighbour row is outside the catalog"
        if (rows == np.arange(n_items, dtype=np.int32)[:, None]).any():
            return "rows", "an item is its own neighbour"
        if (np.diff((rows < 0).view(np.int8), axis=1) < 0).any():
            return "rows", "padding (-1) is not only at the end of a row"
        sorted_rows = np.sort(np.where(rows < 0, -1 - np.arange(rows.shape[1]), rows), axis=1)
        if (np.diff(sorted_rows, axis=1) == 0).any():
            return "rows", "an item has a neighbour twice"
        if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1 + 1e-5).any():
            return "scores", "scores are not in [0, 1]"
        if (np.diff(scores, axis=1) > 1e-6).any() or (scores[rows < 0] != 0).any():
            return "scores", "scores are not best first, or padding has a score"
        return None


def co_visitation(user_codes: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
                  n_items: int, params: NeighbourParams) -> Neighbours:
    """Neighbours from a play log (user code, item row, time per play)."""
    users, items = _distinct_plays(user_codes, item_rows, timestamps, params.max_per_user)
    played_by = np.bincount(items, minlength=n_items).astype(np.float64)
    pairs, counts = _pair_counts(users, items, n_items, params.window)
    first, second = pairs // n_items, pairs % n_items
    cosine = counts / np.sqrt(played_by[first] * played_by[second])
    # Both directions; then each item's k best, ties to the lower row.
    source = np.concatenate([first, second])
    target = np.concatenate([second, first])
    score = np.concatenate([cosine, cosine])
    order = np.lexsort((target, -score, source))
    source, target, score = source[order], target[order], score[order]
    starts = np.searchsorted(source, np.arange(n_items))
    rank = np.arange(len(source)) - starts[source]
    keep = rank < params.k
    rows = np.full((n_items, params.k), -1, np.int32)
    scores = np.zeros((n_items, params.k), np.float32)
    rows[source[keep], rank[keep]] = target[keep]
    scores[source[keep], rank[keep]] = np.minimum(score[keep], 1.0)
    return Neighbours(rows, scores, params.as_dict())


def _distinct_plays(user_codes: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
                    max_per_user: int) -> tuple[np.ndarray, np.ndarray]:
    """One play per (user, item) at its latest time, sorted by user then time, each user's
    latest `max_per_user` kept."""
    user_codes, item_rows = user_codes.astype(np.int64), item_rows.astype(np.int64)
    order = np.lexsort((-timestamps, item_rows, user_codes))
    u, i, t = user_codes[order], item_rows[order], timestamps[order]
    first = np.ones(len(u), bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i, t = u[first], i[first], t[first]
    order = np.lexsort((-t, u))  # latest first within a user
    u, i = u[order], i[order]
    starts = np.searchsorted(u, u)
    keep = np.arange(len(u)) - starts < max_per_user
    u, i = u[keep][::-1], i[keep][::-1]  # back to oldest first
    return u, i


def _pair_counts(users: np.ndarray, items: np.ndarray, n_items: int,
                 window: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct unordered item pairs (as a * n_items + b, a < b) and how many users had them.

    Memory is 8 bytes per pair of plays counted (users x window on a big log: the 1M-item
    benchmark catalog, 200,000 users x 50 plays at window 10, has ~10^8).
    """
    longest = int(np.bincount(np.unique(users, return_inverse=True)[1]).max(initial=0))
    reach = longest - 1 if window == 0 else min(window + 1, longest - 1)
    keys = [np.zeros(0, np.int64)]
    for offset in range(1, reach + 1):
        same = users[offset:] == users[:-offset]
        a, b = items[:-offset][same], items[offset:][same]
        keys.append(np.minimum(a, b) * n_items + np.maximum(a, b))
    pairs, counts = np.unique(np.concatenate(keys), return_counts=True)
    return pairs, counts.astype(np.float64)


@dataclass(frozen=True)
class Candidates:
    """Items reached from a user's recent plays (in the order first reached), their summed
    weighted similarities, and the played row behind each (its reason's anchor)."""

    rows: np.ndarray  # int64
    scores: np.ndarray  # float64
    anchors: np.ndarray  # int64

    @staticmethod
    def empty() -> Candidates:
        """No candidates."""
        return Candidates(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))


def recent_plays(rows: np.ndarray, last_at: np.ndarray, recent: int,
                 half_life_plays: float) -> tuple[np.ndarray, np.ndarray]:
    """A user's latest `recent` known plays (newest first; `rows` < 0 are unknown) and their
    recency weights, ``0.5 ** (later / half_life_plays)``, `later` counting the plays after
    it (plays at the same time weigh the same; 0 = no decay)."""
    played, later = recent_known(rows, last_at, recent)
    if half_life_plays <= 0:
        return played, np.ones(len(played))
    return played, 0.5 ** (later / half_life_plays)


def candidates(neighbours: Neighbours, played: np.ndarray, weights: np.ndarray) -> Candidates:
    """The neighbours of the played rows, each scored by the weighted sum of its similarities,
    with the play that contributed most to it (ties: the most recent) as its anchor."""
    if not len(played):
        return Candidates.empty()
    if len(played) * neighbours.rows.shape[1] > MAX_ENTRIES:
        raise ValueError(f"{len(played)} plays x {neighbours.rows.shape[1]} neighbours; at "
                         f"most {MAX_ENTRIES} entries")
    return Candidates(*reach(neighbours.rows, neighbours.scores,
                             np.ascontiguousarray(played, np.int64),
                             np.ascontiguousarray(weights, np.float64)))
