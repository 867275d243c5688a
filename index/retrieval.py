"""Candidate sources and how they are merged: the ANN search on a vector (with the search
of the live segment beside it), the co-visitation neighbours of played items (and of the
live items), the popularity order, each restricted by an allowed-rows bitmap.

Every returned item carries its reason: the user's taste (the vector), similarity to a
played item (named by its row), new in the catalog, or popularity/trending (the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from index.filters import allows_rows, count
from index.kernels import allowed_top, blend_top, readonly
from index.neighbours import Candidates, Neighbours, candidates

if TYPE_CHECKING:
    from index.live import LiveSegment
    from index.ranking import LiveCatalog

BLEND, VECTOR, NEIGHBOURS = "blend", "vector", "neighbours"
RETRIEVALS = (BLEND, VECTOR, NEIGHBOURS)
# Reasons: the user's taste; similar to a recently watched item / to the requested item.
TASTE, WATCHED, LIKE = "taste", "similar_to_watched", "similar_to_item"
POPULAR, TRENDING, NEW = "popular", "trending", "new_release"
_POPULAR_BLOCK = 4096
LIVE_CANDIDATES = 4  # live items taken per item wanted by their codes, then re-scored
_EVERY_ROW = np.zeros(0, np.uint8)  # blend_top's empty bitmap: no restriction
_NO_VECTOR = readonly(np.zeros(0, np.float32))  # a query without one (weight 1: unused)


def _query_vector(vector: np.ndarray) -> np.ndarray:
    """A query vector as the kernels take it (one array type: float32, read-only)."""
    return readonly(np.ascontiguousarray(vector, np.float32))


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
           weights: np.ndarray, retrieval: str, anchored: str | None = None,
           segment: LiveSegment | None = None) -> Query:
        """A query whose played items, weighted, reach their neighbours in `table` (and the
        live items they are co-visited with, in `segment`)."""
        reached = Candidates.empty()
        if table is not None and retrieval != VECTOR:
            reached = candidates(table, played, weights)
            if segment is not None and len(segment.co_from):
                live = segment.reach(played, weights)
                reached = Candidates(*(np.concatenate([a, b]) for a, b in zip(
                    (reached.rows, reached.scores, reached.anchors),
                    (live.rows, live.scores, live.anchors), strict=True)))
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
        reached = query.reached
        if query.vector is None or query.retrieval == NEIGHBOURS:
            found = self._merged(query, reached, np.zeros(0, np.int64), 1.0, k, allowed)
            return found + self._fill(k - len(found), allowed, found)
        ann = self.search(query.vector, k, allowed)
        if query.retrieval == VECTOR or not len(reached.rows):
            rows, scores = self._ranked(query.vector, ann, k)
            return self._named(query, [Scored(r, s) for r, s in zip(
                rows.tolist(), scores.tolist(), strict=True)])
        return self._merged(query, reached, ann, self.blend_weight, k, allowed)

    def rank(self, query: Query, rows: np.ndarray, allowed: np.ndarray) -> list[Scored]:
        """The `rows` the bitmap allows (it allows no others), ordered for the query: each
        scored by the query's sources on one scale over these rows."""
        given = rows[allows_rows(allowed, rows)]
        weight = {VECTOR: 0.0, NEIGHBOURS: 1.0}.get(query.retrieval, self.blend_weight)
        return self._merged(query, query.reached, given, weight, len(given), allowed,
                            n_best=len(given))

    def _merged(self, query: Query, reached: Candidates, ann: np.ndarray, weight: float,
                k: int, allowed: np.ndarray | None, n_best: int = 0) -> list[Scored]:
        """The best of the neighbour candidates the bitmap allows and the ANN's rows, each
        scored by both sources on one scale (`kernels.blend_top`; weight 1: the neighbours
        alone). The ANN's top k suffice from the vector side: an item outside the
        neighbours has only its vector score, so no item outside both sets can beat them.
        """
        vector = _NO_VECTOR if query.vector is None else _query_vector(query.vector)
        segment = self.live.segment
        rows, scores, anchors = blend_top(
            reached.rows, reached.scores, reached.anchors,
            _EVERY_ROW if allowed is None else allowed, n_best or self.neighbour_candidates,
            ann, self.live.catalog.item_factors, segment.vectors, segment.offset, vector,
            weight, k)
        found = [Scored(r, s, WATCHED if a >= 0 else TASTE, a) for r, s, a in
                 zip(rows.tolist(), scores.tolist(), anchors.tolist(), strict=True)]
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

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
        """Up to k rows of the snapshot for the vector among those the bitmap allows (the
        ANN index's, or the exact top k when the bitmap is narrow or the index gave up
        early), then the live segment's top k (`_live`) unless none of it can compete
        (`LiveSegment.bound`)."""
        catalog = self.live.catalog
        budget = len(catalog) if allowed is None else count(allowed[:-(-len(catalog) // 8)])
        ids = None
        if budget > self.brute_force_below:
            ids = catalog.search(vector, k, allowed)[0][0]
            ids = ids[ids >= 0]
        if ids is None or len(ids) < min(k, budget):
            ids = allowed_top(catalog.item_factors, _EVERY_ROW if allowed is None else allowed,
                              0, _query_vector(vector), k)[0]
        segment = self.live.segment
        if not len(segment) or len(ids) >= k and segment.bound(vector) < float(
                np.min(catalog.item_factors[ids[:k]] @ vector)):
            return ids  # no live item can enter the top k
        return np.concatenate([ids, self._live(vector, k, allowed)[0]])

    def _live(self, vector: np.ndarray, k: int,
              allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The live segment's top k rows the bitmap allows, and their exact scores: the
        best `LIVE_CANDIDATES` x k by the 8-bit codes, re-scored with the vectors."""
        segment = self.live.segment
        query = _query_vector(vector)
        found, _ = allowed_top(segment.codes, _EVERY_ROW if allowed is None else allowed,
                            segment.offset // 8, readonly(query * segment.scale),
                            LIVE_CANDIDATES * k)
        scores = segment.vectors[found] @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return found[order] + segment.offset, scores[order]

    def new_releases(self, query: Query | None, k: int, allowed: np.ndarray) -> list[Scored]:
        """Up to k of the live items the bitmap allows: by the query's vector, else the
        newest first."""
        segment = self.live.segment
        if not len(segment):
            return []
        if query is not None and query.vector is not None:
            rows, scores = self._live(query.vector, k, allowed)
            return [Scored(r, s, NEW) for r, s in zip(rows.tolist(), scores.tolist(),
                                                      strict=True)]
        newest = segment.offset + np.arange(len(segment))[::-1]
        newest = newest[allows_rows(allowed, newest)][:k]
        return [Scored(r, float(segment.put_at[r - segment.offset]), NEW)
                for r in newest.tolist()]

    def _ranked(self, vector: np.ndarray, rows: np.ndarray,
                k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The rows (their best k) by their exact scores for the vector, and the scores (an
        index's own may be approximate: the preset's stores 8-bit codes)."""
        scores = self.live.vectors(rows) @ vector
        order = np.argsort(-scores, kind="stable")[:k]
        return rows[order], scores[order]

    def popular_among(self, rows: np.ndarray, allowed: np.ndarray) -> list[Scored]:
        """The `rows` the bitmap allows, in the popularity order (live items by their
        recent plays, on the same scale)."""
        live = self.live
        given = rows[allows_rows(allowed, rows)]
        offset = live.segment.offset
        snapshot = given < offset
        score = np.empty(len(given))
        score[snapshot] = live.popular_score[given[snapshot]]
        score[~snapshot] = live.live_popular[given[~snapshot] - offset]
        order = np.lexsort((given, -score))  # ties as the popularity order: by row
        return [Scored(r, float(s), POPULAR) for r, s in zip(
            given[order].tolist(), score[order].tolist(), strict=True)]

    def popular(self, k: int, allowed: np.ndarray | None,
                by_trending: bool = False) -> list[Scored]:
        """The fallback: the popularity (or trending) order, restricted by the bitmap; the
        live items played recently take their place in it."""
        live = self.live
        # With no recent plays yet, "trending" is the batch popularity.
        by_trending = by_trending and (len(live.trending_order) > 0 or
                                       bool(live.live_recent.any()))
        order = live.trending_order if by_trending else live.popular_order
        score = live.trending if by_trending else live.popular_score
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
        found = [Scored(r, float(score[r]), reason) for r in top]
        played = np.flatnonzero(live.live_recent > 0)
        if not len(played):
            return found
        rows = played + live.segment.offset
        if allowed is not None:
            rows = rows[allows_rows(allowed, rows)]
        by = live.live_recent if by_trending else live.live_popular
        found += [Scored(r, float(by[r - live.segment.offset]), reason) for r in rows.tolist()]
        return sorted(found, key=lambda s: -s.score)[:k]
