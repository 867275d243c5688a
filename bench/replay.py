"""The offline replay protocol in-process: a time split of MovieLens-100K and rules scored on it.

Used by `bench.tune` (choosing the defaults on a validation window) and `bench.eval` (the
peers' rules beside the real services). Protocol, as in `bench.eval`: the log is sorted
by time (stable); a rule is built from the interactions before `start`; each later
interaction (up to `end`), in time order, is scored BEFORE the rule sees it: a hit if its
item is in the rule's top 10 for that user (items the user has interacted with excluded),
NDCG@10 = 1 / log2(rank + 2); then the rule is told of it.

Rules (each ranks item rows; a user with nothing to go on gets the popularity order):
* `DecayedFoldIn` — ours, as the event service computes it: the ALS fold-in over the user's
  last 500 distinct items, confidence ``1 + alpha * sum(w * 0.5 ** (age / half_life))``
  where a play's age is taken from the user's latest play;
* `ItemToItem` — Gorse's item-to-item recommender: the summed co-occurrence cosine (from
  the training log) of the user's last 100 feedbacks;
* `AverageVector` — Qdrant's recommend with the `average_vector` strategy over the user's
  last 20 positives (ALS item factors, dot product); positives are all plays, or plays
  with at least `min_weight`;
* `Popularity` — training interactions per item;
* `Neighbours` — ours: the co-visitation neighbours of the user's recent plays
  (`index.neighbours`, built from the training log), weighted by recency;
* `Blended` — ours, as the ranking service serves it: `DecayedFoldIn`'s scores and
  `Neighbours`' put on one scale and mixed (`index.neighbours.blend`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from index.kernels import mix
from index.model import AlsParams, confidence_matrix, train_als
from index.neighbours import NeighbourParams, candidates, co_visitation, recent_plays
from index.neighbours import Neighbours as NeighbourTable
from index.tables import Interactions

K = 10
HISTORY_CAP = 500
Play = tuple[int, float, float]  # (item row, weight, unix time)


@dataclass
class Score:
    """Hits and NDCG summed over scored events, and how many answers were POPULAR."""

    events: int = 0
    hits: int = 0
    ndcg: float = 0.0
    popular: int = 0

    def add(self, ranked: list[str] | list[int], item: str | int, popular: bool) -> None:
        """Score one recommendation list against the item the user went on to watch."""
        self.events += 1
        self.popular += popular
        top = list(ranked[:K])
        if item in top:
            self.hits += 1
            self.ndcg += 1 / math.log2(top.index(item) + 2)  # type: ignore[arg-type]

    def summary(self) -> dict[str, float]:
        """HR@10, NDCG@10 and the popularity-fallback share."""
        n = max(self.events, 1)
        return {"events": self.events, "hr_at_10": round(self.hits / n, 4),
                "ndcg_at_10": round(self.ndcg / n, 4), "popular_share": round(self.popular / n, 4)}


@dataclass
class Split:
    """A log cut in time: what rules are built from, and the interactions replayed after."""

    n_items: int
    item_ids: list[str]
    train: Interactions
    train_rows: np.ndarray
    replay_users: list[str]
    replay_rows: np.ndarray
    replay_weights: np.ndarray
    replay_times: np.ndarray

    @staticmethod
    def at(log: Interactions, item_ids: list[str], start: int, end: int | None = None) -> Split:
        """Build from interactions before `start`; replay those in [start, end)."""
        row_of = {item: row for row, item in enumerate(item_ids)}
        train = log.until(start)
        later = log.after(start).sorted_by_time()
        if end is not None:
            later = later.until(end)
        return Split(len(item_ids), item_ids, train,
                     np.array([row_of[i] for i in train.item_ids.tolist()], np.int64),
                     [str(u) for u in later.user_ids.tolist()],
                     np.array([row_of[i] for i in later.item_ids.tolist()], np.int64),
                     later.weights.astype(np.float64), later.timestamps.astype(np.float64))

    def first(self, n: int) -> Split:
        """The same split, replaying only its first n interactions."""
        return Split(self.n_items, self.item_ids, self.train, self.train_rows,
                     self.replay_users[:n], self.replay_rows[:n], self.replay_weights[:n],
                     self.replay_times[:n])

    def train_plays(self) -> Iterable[tuple[str, Play]]:
        """The training interactions in time order, as (user, play)."""
        order = np.argsort(self.train.timestamps, kind="stable")
        users = self.train.user_ids[order].tolist()
        for user, row, weight, at in zip(users, self.train_rows[order].tolist(),
                                         self.train.weights[order].tolist(),
                                         self.train.timestamps[order].tolist(), strict=True):
            yield str(user), (int(row), float(weight), float(at))

    @cached_property
    def user_codes(self) -> tuple[int, np.ndarray]:
        """The number of training users and each training interaction's user code."""
        users, codes = np.unique(self.train.user_ids.astype(str), return_inverse=True)
        return len(users), codes


def train_factors(split: Split, als: AlsParams, threads: int = 0) -> np.ndarray:
    """Item factors of ALS trained on the split's training part, as the batch build does."""
    n_users, codes = split.user_codes
    matrix = confidence_matrix(codes, split.train_rows, split.train.weights,
                               (n_users, split.n_items), als.alpha)
    return train_als(matrix, als, threads)[1].astype(np.float64)


class Rule(Protocol):
    """Ranks items for a user from the plays seen so far (None: nothing to go on)."""

    def scores(self, plays: list[Play]) -> np.ndarray | None: ...


class Popularity:
    """Items by number of training interactions."""

    def __init__(self, split: Split) -> None:
        self.counts = np.bincount(split.train_rows, minlength=split.n_items).astype(np.float64)

    def scores(self, plays: list[Play]) -> np.ndarray:
        return self.counts.copy()


class DecayedFoldIn:
    """Our rule: the exact ALS fold-in over the user's bounded, time-decayed history."""

    def __init__(self, factors: np.ndarray, als: AlsParams, half_life_s: float) -> None:
        self.factors, self.alpha, self.half_life_s = factors, als.alpha, half_life_s
        self.gram = factors.T @ factors + als.regularization * np.eye(factors.shape[1])

    def scores(self, plays: list[Play]) -> np.ndarray | None:
        if not plays:
            return None
        rows, weights, times = (np.array(column) for column in zip(*plays, strict=True))
        decayed = weights * (0.5 ** ((times.max() - times) / self.half_life_s)
                             if self.half_life_s > 0 else 1.0)
        items, inverse = np.unique(rows, return_inverse=True)
        summed = np.bincount(inverse, decayed)
        last = np.full(len(items), -np.inf)
        np.maximum.at(last, inverse, times)
        kept = np.argsort(-last, kind="stable")[:HISTORY_CAP]
        y, extra = self.factors[items[kept]], self.alpha * summed[kept]
        vector = np.linalg.solve(self.gram + (y.T * extra) @ y, y.T @ (1.0 + extra))
        return np.asarray(self.factors @ vector)


class ItemToItem:
    """Gorse's item-to-item: co-occurrence cosine of the last `last` feedbacks, summed."""

    def __init__(self, split: Split, last: int = 100) -> None:
        n_users, codes = split.user_codes
        played = sp.csr_matrix((np.ones(len(codes)), (codes, split.train_rows)),
                               shape=(n_users, split.n_items))
        played.data[:] = 1.0  # repeats count once
        together = (played.T @ played).toarray()
        counts = np.diag(together).copy()
        np.fill_diagonal(together, 0.0)
        self.similar = together / np.sqrt(np.maximum(np.outer(counts, counts), 1e-12))
        self.last = last

    def scores(self, plays: list[Play]) -> np.ndarray | None:
        if not plays:
            return None
        recent = [p[0] for p in sorted(plays, key=lambda p: p[2])[-self.last:]]
        return np.asarray(self.similar[recent].sum(axis=0))


class AverageVector:
    """Qdrant's recommend (`average_vector`): the mean factor of the last positives."""

    def __init__(self, factors: np.ndarray, last: int = 20, min_weight: float = 0.0) -> None:
        self.factors, self.last, self.min_weight = factors, last, min_weight

    def scores(self, plays: list[Play]) -> np.ndarray | None:
        positive = [p for p in sorted(plays, key=lambda p: p[2]) if p[1] >= self.min_weight]
        if not positive:
            return None
        query = self.factors[[p[0] for p in positive[-self.last:]]].mean(axis=0)
        return np.asarray(self.factors @ query)


def build_neighbours(split: Split, params: NeighbourParams) -> NeighbourTable:
    """The neighbours the batch build would compute from the split's training part."""
    return co_visitation(split.user_codes[1], split.train_rows, split.train.timestamps,
                         split.n_items, params)


class Neighbours:
    """Ours: the neighbours of the user's latest `recent` plays, weighted by recency."""

    def __init__(self, table: NeighbourTable, recent: int, half_life_plays: float) -> None:
        self.table, self.recent, self.half_life_plays = table, recent, half_life_plays

    def scores(self, plays: list[Play]) -> np.ndarray | None:
        if not plays:
            return None
        rows, last_at = _latest(plays)
        played, weights = recent_plays(rows, last_at, self.recent, self.half_life_plays)
        found = candidates(self.table, played, weights)
        dense = np.zeros(self.table.rows.shape[0])
        dense[found.rows] = found.scores
        return dense


class Blended:
    """Ours, as served: the fold-in's and the neighbours' scores blended with `weight`."""

    def __init__(self, vector: DecayedFoldIn, neighbours: Neighbours, weight: float) -> None:
        self.vector, self.neighbours, self.weight = vector, neighbours, weight

    def scores(self, plays: list[Play]) -> np.ndarray | None:
        if not plays:
            return None
        v, n = self.vector.scores(plays), self.neighbours.scores(plays)
        assert v is not None and n is not None
        unwatched = np.ones(len(v), bool)
        unwatched[[p[0] for p in plays]] = False  # on one scale over the candidates
        mixed = np.full(len(v), -np.inf)
        # On one scale as the service's candidates are (`index.kernels.mix`), here over
        # every unwatched item.
        mixed[unwatched] = mix(v[unwatched].astype(np.float64), n[unwatched], self.weight)[0]
        return mixed


def _latest(plays: list[Play]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows played and the time of each one's latest play."""
    rows = np.array([p[0] for p in plays])
    times = np.array([p[2] for p in plays])
    items, inverse = np.unique(rows, return_inverse=True)
    last = np.full(len(items), -np.inf)
    np.maximum.at(last, inverse, times)
    return items, last


def replay(split: Split, rules: dict[str, Rule]) -> dict[str, dict[str, dict[str, float]]]:
    """Replay the split through every rule; {rule: {all|known|new: summary}}."""
    plays: dict[str, list[Play]] = defaultdict(list)
    for user, play in split.train_plays():
        plays[user].append(play)
    known = set(plays)
    fallback = Popularity(split)
    totals: dict[tuple[str, str], Score] = {}
    for user, row, weight, at in zip(split.replay_users, split.replay_rows.tolist(),
                                     split.replay_weights.tolist(),
                                     split.replay_times.tolist(), strict=True):
        mine = plays[user]
        watched = [p[0] for p in mine]
        group = "known" if user in known else "new"
        for name, rule in rules.items():
            scores = rule.scores(mine)
            popular = scores is None
            ranked = _top(fallback.scores(mine) if scores is None else scores, watched)
            for key in ((name, "all"), (name, group)):
                totals.setdefault(key, Score()).add(ranked, row, popular)
        mine.append((row, weight, at))
    return {name: {g: totals.get((name, g), Score()).summary() for g in ("all", "known", "new")}
            for name in rules}


def _top(scores: np.ndarray, watched: list[int]) -> list[int]:
    scores = scores.astype(np.float64, copy=True)
    scores[watched] = -np.inf
    top = np.argpartition(-scores, K)[:K]
    return top[np.argsort(-scores[top], kind="stable")].tolist()
