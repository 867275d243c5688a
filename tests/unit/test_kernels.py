"""The compiled retrieval kernels against plain-Python statements of what they compute."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.filters import pack
from index.kernels import allowed_top, blend_top, clear_rows, mix, reach, readonly
from index.neighbours import recent_plays


def _reference(found: list[int], sums: list[float], anchors: list[int], mask: list[bool],
               n_best: int, ann: list[int], factors: np.ndarray, vector: np.ndarray,
               weight: float, k: int, n_snapshot: int
               ) -> tuple[list[int], list[float], list[int]]:
    """blend_top's docstring, spelled out (`factors`: the snapshot's and the live
    segment's rows, one table)."""
    allowed = [i for i in range(len(found)) if mask[found[i]]]
    ranked = sorted(allowed, key=lambda i: (-sums[i], i))[:n_best]
    kept = sorted(ranked)  # position order
    rows = [found[i] for i in kept]
    rows += [a for a in ann if a not in rows]
    by_vector = [float(factors[r] @ vector) for r in rows] if weight < 1 else [0.0] * len(rows)
    by_neighbours = [sums[i] for i in kept] + [0.0] * (len(rows) - len(kept))
    v_max, n_max = max([*by_vector, 0.0]), max([*by_neighbours, 0.0])
    from_vector = [(1 - weight) * (v / v_max if v_max > 0 else v) for v in by_vector]
    from_neighbours = [weight * (n / n_max if n_max > 0 else n) for n in by_neighbours]
    mixed = [a + b for a, b in zip(from_vector, from_neighbours, strict=True)]
    top = sorted(range(len(rows)), key=lambda t: (-mixed[t], t))[:k]
    out_anchors = [anchors[kept[t]] if t < len(kept) and 2 * from_neighbours[t] > mixed[t]
                   else -1 for t in top]
    return [rows[t] for t in top], [mixed[t] for t in top], out_anchors


@st.composite
def _inputs(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    n_items = draw(st.integers(1, 30))
    dim = draw(st.integers(1, 4))
    found = draw(st.permutations(range(n_items)))[:draw(st.integers(0, n_items))]
    # Small integers and eighths: every dot product and sum is exact in float32 and float64,
    # so ties are ties in both statements.
    sums = [draw(st.integers(0, 32)) / 8 for _ in found]
    anchors = [draw(st.integers(0, n_items - 1)) for _ in found]
    mask = draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items))
    allowed_rows = [r for r in range(n_items) if mask[r]]
    ann = draw(st.permutations(allowed_rows))[:draw(st.integers(0, len(allowed_rows)))]
    factors = np.array(draw(st.lists(st.integers(-3, 3), min_size=n_items * dim,
                                     max_size=n_items * dim)), np.float32).reshape(n_items, dim)
    vector = np.array(draw(st.lists(st.integers(-3, 3), min_size=dim, max_size=dim)),
                      np.float32)
    return {"found": found, "sums": sums, "anchors": anchors, "mask": mask, "ann": ann,
            "factors": factors, "vector": vector, "n_best": draw(st.integers(1, 12)),
            "n_snapshot": draw(st.integers(0, n_items)),
            "weight": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])), "k": draw(st.integers(1, 12))}


@settings(max_examples=300, deadline=None)
@given(case=_inputs())
def test_blend_top_is_its_statement(case: dict) -> None:  # type: ignore[type-arg]
    rows, scores, anchors = blend_top(
        np.array(case["found"], np.int64), np.array(case["sums"], np.float64),
        np.array(case["anchors"], np.int64), pack(np.array(case["mask"], bool)),
        case["n_best"], np.array(case["ann"], np.int64),
        readonly(case["factors"][:case["n_snapshot"]]),
        readonly(case["factors"][case["n_snapshot"]:]), case["n_snapshot"],
        readonly(case["vector"]), case["weight"], case["k"])
    want_rows, want_scores, want_anchors = _reference(**case)
    assert rows.tolist() == want_rows
    assert scores.tolist() == want_scores
    assert anchors.tolist() == want_anchors


def test_an_empty_bitmap_allows_every_row() -> None:
    factors = readonly(np.eye(3, dtype=np.float32))
    rows, _, anchors = blend_top(np.array([2, 0], np.int64), np.array([1.0, 3.0]),
                                 np.array([1, 1], np.int64), np.zeros(0, np.uint8), 5,
                                 np.zeros(0, np.int64), factors, factors[:0], 3,
                                 readonly(np.zeros(3, np.float32)), 1.0, 5)
    assert rows.tolist() == [0, 2] and anchors.tolist() == [1, 1]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(1, 4), st.integers(0, 3), st.integers(1, 12),
       st.sampled_from([0.05, 0.3, 0.7, 1.0]), st.randoms(use_true_random=False))
def test_allowed_top_is_the_exact_top_k_of_the_allowed_rows(m: int, dim: int, first_byte: int,
                                                          k: int, density: float,
                                                          rnd) -> None:  # type: ignore[no-untyped-def]
    vectors = np.array([[rnd.randint(-3, 3) for _ in range(dim)] for _ in range(m)],
                       np.float32).reshape(m, dim)
    vector = np.array([rnd.randint(-3, 3) for _ in range(dim)], np.float32)
    mask = [rnd.random() < density for _ in range(m)]  # sparse ones skip whole bytes
    bitmap = np.concatenate([np.zeros(first_byte, np.uint8), pack(np.array(mask, bool))])
    rows, scores = allowed_top(readonly(vectors), bitmap, first_byte, readonly(vector), k)
    scored = [(float(vectors[i] @ vector), i) for i in range(m) if mask[i]]
    want = sorted(scored, key=lambda p: (-p[0], p[1]))[:k]
    assert rows.tolist() == [i for _, i in want]
    assert scores.tolist() == [s for s, _ in want]
    every, _ = allowed_top(readonly(vectors), np.zeros(0, np.uint8), 0, readonly(vector), m or 1)
    assert sorted(every.tolist()) == list(range(m))


def test_mix_puts_both_sources_on_one_scale() -> None:
    mixed, from_neighbours = mix(np.array([2.0, 1.0, 0.0]), np.array([0.0, 5.0, 10.0]), 0.5)
    assert mixed.tolist() == [0.5, 0.5, 0.5]
    assert from_neighbours.tolist() == [0.0, 0.25, 0.5]
    only_vector, _ = mix(np.array([2.0, 1.0]), np.zeros(2), 0.0)
    assert only_vector.tolist() == [1.0, 0.5]
    negative, _ = mix(np.array([-2.0, -1.0]), np.zeros(2), 0.5)  # max <= 0: unscaled
    assert negative.tolist() == [-1.0, -0.5]


@settings(max_examples=300, deadline=None)
@given(n_items=st.integers(2, 20), k=st.integers(1, 6), data=st.data())
def test_reach_is_its_statement(n_items: int, k: int, data: st.DataObject) -> None:
    table = np.full((n_items, k), -1, np.int32)
    scores = np.zeros((n_items, k), np.float32)
    for row in range(n_items):
        others = [r for r in range(n_items) if r != row]
        picked = data.draw(st.permutations(others))[
            :data.draw(st.integers(0, min(k, n_items - 1)))]
        table[row, :len(picked)] = picked
        # eighths, best first: sums and ties exact in float32 and float64
        scores[row, :len(picked)] = sorted((data.draw(st.integers(1, 8)) / 8
                                            for _ in picked), reverse=True)
    played = data.draw(st.lists(st.integers(0, n_items - 1), max_size=6, unique=True))
    weights = [data.draw(st.sampled_from([0.25, 0.5, 1.0])) for _ in played]
    found, sums, anchors = reach(readonly(table), readonly(scores), np.array(played, np.int64),
                                 np.array(weights, np.float64))
    # The statement: every neighbour of a play, its weighted similarities summed, the play
    # that gave the most (ties: the earlier play), in the order first reached.
    order: dict[int, list[tuple[float, int]]] = {}
    for play, weight in zip(played, weights, strict=True):
        for row, score in zip(table[play], scores[play], strict=True):
            if row >= 0:
                order.setdefault(int(row), []).append((weight * float(score), play))
    assert found.tolist() == list(order)
    assert sums.tolist() == [sum(c for c, _ in parts) for parts in order.values()]
    assert anchors.tolist() == [max(parts, key=lambda p: p[0])[1] for parts in order.values()]


def _recent_statement(rows: np.ndarray, last_at: np.ndarray, recent: int,
                      half_life: float) -> tuple[np.ndarray, np.ndarray]:
    """The rule in numpy: stable newest-first order of the known plays, the first `recent`;
    weight 0.5 ** (plays strictly newer / half_life), 1 without decay."""
    known = np.flatnonzero(rows >= 0)
    latest = known[np.argsort(-last_at[known], kind="stable")[:recent]]
    if half_life <= 0:
        return rows[latest].astype(np.int64), np.ones(len(latest))
    newest_first = -last_at[latest]
    later = np.searchsorted(newest_first, newest_first, side="left")
    return rows[latest].astype(np.int64), 0.5 ** (later / half_life)


@settings(max_examples=300, deadline=None)
@given(plays=st.lists(st.tuples(st.integers(-1, 50), st.sampled_from([0.0, 1.0, 2.5, 7.0, 1e9])),
                      max_size=40),
       recent=st.integers(1, 25), half_life=st.sampled_from([0.0, 1.0, 3.0, 10.0]))
def test_recent_plays_is_the_statement(plays: list[tuple[int, float]], recent: int,
                                       half_life: float) -> None:
    rows = readonly(np.array([r for r, _ in plays], np.int32))
    last_at = readonly(np.array([t for _, t in plays], np.float64))
    played, weights = recent_plays(rows, last_at, recent, half_life)
    want_played, want_weights = _recent_statement(rows, last_at, recent, half_life)
    assert played.tolist() == want_played.tolist()
    assert weights.tolist() == want_weights.tolist()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 100), data=st.data())
def test_clear_rows_clears_exactly_those_bits(n: int, data: st.DataObject) -> None:
    start = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    rows = data.draw(st.lists(st.integers(0, n - 1), max_size=30))
    bitmap = pack(np.array(start))
    clear_rows(bitmap, np.array(rows, np.int64))
    expected = np.array(start)
    expected[rows] = False
    assert bitmap.tolist() == pack(expected).tolist()
    for outside in (-1, len(bitmap) * 8):
        with pytest.raises(IndexError):
            clear_rows(bitmap, np.array([outside], np.int64))
