"""Candidate sources and how they are merged: the ANN search on a vector, the co-visitation
neighbours of played items, the popularity order, each restricted by an allowed-rows bitmap.

Every returned item carries its reason: the user's taste (the vector), similarity to a
played item (named by its row), or popularity/trending (the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

from index.filters import allows_rows, count, unpack
from index.neighbours import Candidates, Neighbours, blend, candidates

if TYPE_CHECKING:
    from index.ranking import LiveCatalog

BLEND, VECTOR, NEIGHBOURS = "blend", "vector", "neighbours"
RETRIEVALS = (BLEND, VECTOR, NEIGHBOURS)
# Reasons: the user's taste; similar to a recently watched item / to the requested item.
TASTE, WATCHED, LIKE = "taste", "similar_to_watched", "similar_to_item"
POPULAR, TRENDING = "popular", "trending"
_POPULAR_BLOCK = 4096


@dataclass(frozen=True)
class Scored:
    """One ranked item: its catalog row, score and reason (`anchor`: the row of the item
    it is similar to, for WATCHED and LIKE; else -1)."""

    row: int
    score: float
    reason: str = TASTE
    anchor: int = -1


@dataclass(frozen=True, kw_only=True)
class Query:
    """What to retrieve for: a vector (the user's, or an item's factor), the played items,
    the candidates their neighbours reach (before any filter, so a request's rows share
    them), and how to merge them. With `anchored` (a reason), every item gets that reason
    and is named similar to the one played item, rather than telling taste from
    similarity."""

    vector: np.ndarray | None
    played: np.ndarray
    reached: Candidates
    retrieval: str = BLEND
    anchored: str | None = None

    @staticmethod
    def of(table: Neighbours | None, vector: np.ndarray | None, played: np.ndarray,
           weights: np.ndarray, retrieval: str, anchored: str | None = None) -> Query:
        """A query whose played items, weighted, reach their neighbours in `table`."""
        reached = candidates(table, played, weights) \
            if table is not None and retrieval != VECTOR else Candidates.empty()
        return Query(vector=vector, played=played, reached=reached, retrieval=retrieval,
                     anchored=anchored)


@dataclass(frozen=True, kw_only=True)
class Retriever:
    """Retrieval over one live catalog, with the ranker's tuning."""

    live: LiveCatalog
    brute_force_below: int
    blend_weight: float
    neighbour_candidates: int

    def personal(self, query: Query, k: int, allowed: np.ndarray | None) -> list[Scored]:
        """Top k for the query from its sources; popular items fill what they cannot."""
        neighbours = self._neighbours(query, allowed)
        use_vector = query.vector is not None and query.retrieval != NEIGHBOURS
        if query.retrieval == VECTOR or (use_vector and not len(neighbours.rows)):
            assert query.vector is not None
            return self._named(query, self.search(query.vector, k, allowed))
        if not use_vector:
            order = np.argsort(-neighbours.scores, kind="stable")[:k]
            found = [Scored(int(neighbours.rows[i]), float(neighbours.scores[i]), WATCHED,
                            int(neighbours.anchors[i])) for i in order.tolist()]
            return self._named(query, found) + self._fill(k - len(found), allowed, found)
        assert query.vector is not None
        return self._blended(query, query.vector, neighbours, k, allowed)

    def _neighbours(self, query: Query, allowed: np.ndarray | None) -> Candidates:
        """The query's neighbour candidates that the bitmap allows, the best few."""
        found = query.reached
        mask = None if allowed is None else allows_rows(allowed, found.rows)
        return found.best(mask, self.neighbour_candidates)

    def _blended(self, query: Query, vector: np.ndarray, neighbours: Candidates, k: int,
                 allowed: np.ndarray | None) -> list[Scored]:
        """Both sources' candidates, each scored by both, on one scale, mixed.

        The ANN's top k suffice from the vector side: an item outside the neighbours has
        only its vector score, so no item outside both sets can beat them.
        """
        ann = np.fromiter((s.row for s in self.search(vector, k, allowed)), np.int64)
        rows = np.concatenate([neighbours.rows, ann[~neighbours.find(ann)[1]]])
        by_vector = self.live.catalog.item_factors[rows] @ vector
        mixed, from_neighbours = blend(by_vector, neighbours.score_of(rows), self.blend_weight)
        top = np.argsort(-mixed, kind="stable")[:k]
        # rows[:len(neighbours.rows)] are the neighbours, in their order: an item is there
        # for its similarity to a play when that part of its score is the larger.
        similar = (top < len(neighbours.rows)) & (2 * from_neighbours[top] > mixed[top])
        anchors = np.full(len(top), -1)
        anchors[similar] = neighbours.anchors[top[similar]]
        found = [Scored(int(rows[t]), float(mixed[t]), WATCHED if a >= 0 else TASTE, int(a))
                 for t, a in zip(top.tolist(), anchors.tolist(), strict=True)]
        return self._named(query, found)

    @staticmethod
    def _named(query: Query, found: list[Scored]) -> list[Scored]:
        """An anchored query's items all get its reason, with the one played item."""
        if query.anchored is None:
            return found
        anchor = int(query.played[0])
        return [Scored(s.row, s.score, query.anchored, anchor) for s in found]

    def _fill(self, n: int, allowed: np.ndarray | None, found: list[Scored]) -> list[Scored]:
        """Up to n popular items not already found."""
        if n <= 0:
            return []
        taken = {s.row for s in found}
        return [s for s in self.popular(n + len(taken), allowed) if s.row not in taken][:n]

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Scored]:
        """ANN search restricted by a bitmap; exact over the allowed rows when it is narrow."""
        catalog = self.live.catalog
        budget = len(catalog) if allowed is None else count(allowed)
        if budget == 0:
            return []
        if budget <= self.brute_force_below:
            return self._exact(vector, k, allowed)
        selector = None if allowed is None else faiss.IDSelectorBitmap(
            len(catalog), faiss.swig_ptr(allowed))
        ids, scores = catalog.search(vector, k, selector)
        found = [Scored(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True)
                 if i >= 0]
        if len(found) < min(k, budget):  # the ANN index gave up early: be exact instead
            return self._exact(vector, k, allowed)
        return found

    def _exact(self, vector: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Scored]:
        catalog = self.live.catalog
        rows = np.arange(len(catalog)) if allowed is None else \
            np.flatnonzero(unpack(allowed, len(catalog)))
        scores = np.asarray(catalog.item_factors)[rows] @ vector
        top = np.argsort(-scores, kind="stable")[:k]
        return [Scored(int(rows[t]), float(scores[t])) for t in top]

    def popular(self, k: int, allowed: np.ndarray | None,
                by_trending: bool = False) -> list[Scored]:
        """The fallback: the popularity (or trending) order, restricted by the bitmap."""
        live = self.live
        # With no recent plays yet, "trending" is the batch popularity.
        by_trending = by_trending and len(live.trending_order) > 0
        order = live.trending_order if by_trending else live.popular_order
        score = live.trending if by_trending else live.catalog.popularity
        reason = TRENDING if by_trending else POPULAR
        top: list[int] = []
        # Walk the popularity order in blocks, testing bits in place: a filter rarely
        # needs more than the first block, and unpacking a 1M-item mask costs ~1 ms.
        for start in range(0, len(order), _POPULAR_BLOCK):
            rows = order[start:start + _POPULAR_BLOCK]
            if allowed is not None:
                rows = rows[allows_rows(allowed, rows)]
            top.extend(rows[:k - len(top)].tolist())
            if len(top) == k:
                break
        return [Scored(r, float(score[r]), reason) for r in top]
