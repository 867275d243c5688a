"""Co-visitation neighbours: the scores on hand-made logs, the window, candidates and checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.neighbours import (
    NeighbourParams,
    Neighbours,
    candidates,
    co_visitation,
    recent_plays,
)


def _log(plays: list[tuple[int, int, float]], n_items: int,
         **params: int) -> Neighbours:
    """Neighbours of a log of (user, item, time) plays."""
    users, items, times = (np.array(c) for c in zip(*plays, strict=True))
    return co_visitation(users, items, times.astype(np.float64), n_items,
                         NeighbourParams(**params))


def _as_dict(table: Neighbours, row: int) -> dict[int, float]:
    return {int(r): round(float(s), 6) for r, s in zip(table.rows[row], table.scores[row],
                                                        strict=True) if r >= 0}


def test_scores_are_the_cosine_of_co_occurrence_over_distinct_plays() -> None:
    # A: 0 1 2 (and 0 again), B: 0 1, C: 2 3. Played by: 0: 2, 1: 2, 2: 2, 3: 1 users.
    table = _log([(0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 0, 4), (1, 0, 1), (1, 1, 2),
                  (2, 2, 1), (2, 3, 2)], 5, k=3, window=0)
    assert _as_dict(table, 0) == {1: 1.0, 2: 0.5}
    assert _as_dict(table, 2) == {3: round(1 / np.sqrt(2), 6), 0: 0.5, 1: 0.5}
    assert list(table.rows[2]) == [3, 0, 1]  # best first, ties to the lower row
    assert _as_dict(table, 4) == {}  # never played: no neighbours
    assert table.check(5) is None
    assert table.params == {"k": 3, "window": 0, "max_per_user": 500}


def test_the_window_counts_only_plays_close_in_the_users_time_order() -> None:
    plays = [(0, item, float(t)) for t, item in enumerate([0, 1, 2, 3])]
    assert set(_as_dict(_log(plays, 4, window=0), 0)) == {1, 2, 3}
    assert set(_as_dict(_log(plays, 4, window=1), 0)) == {1, 2}  # at most 1 play between
    # Time order, not log order: the same plays logged backwards.
    assert set(_as_dict(_log(plays[::-1], 4, window=1), 3)) == {2, 1}


def test_only_each_users_latest_plays_are_counted() -> None:
    plays = [(0, item, float(t)) for t, item in enumerate([0, 1, 2, 3])]
    table = _log(plays, 4, max_per_user=2)
    assert _as_dict(table, 0) == {} and set(_as_dict(table, 2)) == {3}


def test_k_bounds_the_neighbours_kept() -> None:
    plays = [(0, item, float(item)) for item in range(10)]
    table = _log(plays, 10, k=4)
    assert table.rows.shape == (10, 4) and (table.rows >= 0).all()


def test_candidates_sum_weighted_similarities_and_name_the_strongest_play() -> None:
    rows = np.array([[1, 2], [2, -1], [-1, -1]], np.int32)
    scores = np.array([[0.9, 0.3], [0.8, 0.0], [0.0, 0.0]], np.float32)
    table = Neighbours(rows, scores)
    assert table.check(3) is None
    found = candidates(table, np.array([0, 1]), np.array([1.0, 0.5]))
    assert found.rows.tolist() == [1, 2]  # in the order first reached
    assert np.allclose(found.scores, [0.9, 0.3 + 0.4])
    assert found.anchors.tolist() == [0, 1]  # 2 owes 0.4 to play 1, 0.3 to play 0
    tied = candidates(Neighbours(rows, np.array([[0.75, 0.25], [0.5, 0], [0, 0]], np.float32)),
                      np.array([1, 0]), np.array([0.5, 1.0]))
    assert tied.rows.tolist() == [2, 1]
    assert tied.anchors.tolist() == [1, 0]  # 2 owes 0.25 to each play: the earlier one
    empty = candidates(table, np.zeros(0, np.int64), np.zeros(0))
    assert len(empty.rows) == 0


@settings(max_examples=60, deadline=None)
@given(plays=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 14), st.integers(0, 50)),
                      min_size=1, max_size=120),
       k=st.integers(1, 6), window=st.integers(0, 4))
def test_any_log_gives_valid_symmetric_neighbours(plays: list[tuple[int, int, int]], k: int,
                                                  window: int) -> None:
    table = _log([(u, i, float(t)) for u, i, t in plays], 15, k=k, window=window)
    assert table.check(15) is None
    full = _log([(u, i, float(t)) for u, i, t in plays], 15, k=15, window=window)
    for a in range(15):
        for b, score in _as_dict(full, a).items():
            assert _as_dict(full, b)[a] == score  # the cosine is symmetric


def test_bad_parameters_are_refused() -> None:
    for params in ({"k": 0}, {"k": 1001}, {"window": -1}, {"max_per_user": 1}):
        with pytest.raises(ValueError):
            NeighbourParams(**params)


def test_recent_plays_weigh_by_how_many_plays_came_after() -> None:
    rows = np.array([5, -1, 7, 9, 11], np.int32)  # -1: an item outside the model
    last_at = np.array([10.0, 50.0, 30.0, 30.0, 20.0])
    played, weights = recent_plays(rows, last_at, 3, 1.0)
    assert played.tolist() == [7, 9, 11]  # newest first; ties in record order
    assert weights.tolist() == [1.0, 1.0, 0.25]  # the two at t=30 tie; two plays after 11
    assert recent_plays(rows, last_at, 10, 0.0)[1].tolist() == [1.0] * 4
