"""Per-user statistics: the same vector as an exact solve, and no drift from a rebuild."""

from __future__ import annotations

import numpy as np
import pytest
from implicit.cpu.als import AlternatingLeastSquares

from index.catalog import CatalogSnapshot
from index.model import FoldIn, History, confidence_matrix
from index.user_record import UserRecord
from index.user_stats import UserStats


def _plays(catalog: CatalogSnapshot, n: int, seed: int, spread_s: float = 600.0,
           pool: int = 300) -> list[tuple[str, float, float]]:
    """n plays of `pool` items (repeats), some unknown to the catalog, times mostly rising."""
    rng = np.random.default_rng(seed)
    items = [catalog.item_ids[i] for i in rng.choice(len(catalog), pool, replace=False)]
    items[::25] = [f"not-in-catalog-{i}" for i in range(len(items[::25]))]
    items[-1] = "not-in-catalog-last"  # and played last: it must not move the decay
    times = np.sort(rng.uniform(0, spread_s, n))
    times[::7] -= rng.uniform(0, spread_s / 10, len(times[::7]))  # some arrive late
    plays = [(items[int(rng.integers(pool))], float(rng.uniform(0.1, 1.0)), float(t))
             for t in times]
    return plays + [(items[-1], 1.0, float(times.max()) + 3_600.0)]


def _incremental(catalog: CatalogSnapshot, plays: list[tuple[str, float, float]],
                 half_life_s: float, cap: int = 500,
                 group: int = 1) -> tuple[UserRecord, UserStats]:
    """Merge the plays `group` at a time, updating statistics as the event service does."""
    record = UserRecord.new("u").under(catalog.model_version, catalog.item_index, half_life_s)
    stats = UserStats.build(record, catalog.item_factors)
    for start in range(0, len(plays), group):
        record, change = record.with_plays(plays[start:start + group], catalog.item_index, cap)
        stats = stats.updated(record, change, catalog.item_factors)
    return record, stats


def _solve(fold: FoldIn, stats: UserStats) -> np.ndarray:
    return fold.from_stats([stats])[0]


def test_undecayed_stats_give_implicits_recalculate_user(catalog: CatalogSnapshot) -> None:
    record, stats = _incremental(catalog, _plays(catalog, 400, seed=1), half_life_s=0.0)
    rows, weights = record.known()
    als = catalog.manifest.als
    reference = AlternatingLeastSquares(factors=catalog.dim, alpha=1.0, num_threads=1,
                                        regularization=als["regularization"])
    reference.item_factors = np.array(catalog.item_factors)  # implicit needs a writable copy
    matrix = confidence_matrix(np.zeros(len(rows), np.int64), rows, weights.astype(np.float32),
                               (1, len(catalog)), als["alpha"])
    ours = _solve(catalog.fold_in, stats)
    assert np.abs(ours - reference.recalculate_user(0, matrix)).max() <= 1e-4
    exact = catalog.fold_in.exact([History(rows, weights)])[0]
    assert np.abs(ours - exact).max() <= 1e-6
    assert np.linalg.norm(ours) > 0.1


@pytest.mark.parametrize("half_life_s", [30.0, 3600.0])
def test_decayed_stats_give_the_exact_solve_over_the_decayed_history(
        catalog: CatalogSnapshot, half_life_s: float) -> None:
    plays = _plays(catalog, 400, seed=2)
    record, stats = _incremental(catalog, plays, half_life_s, group=3)
    latest = max(at for item, _, at in plays if item in catalog.item_index)
    decayed: dict[int, float] = {}
    for item, weight, at in plays:  # the definition, spelled out
        if item in catalog.item_index:
            row = catalog.item_index[item]
            decayed[row] = decayed.get(row, 0.0) + weight * 0.5 ** ((latest - at) / half_life_s)
    rows = np.array(sorted(decayed))
    exact = catalog.fold_in.exact([History(rows, np.array([decayed[r] for r in rows]))])[0]
    assert np.abs(_solve(catalog.fold_in, stats) - exact).max() <= 1e-6


def test_10000_updates_with_repeats_evictions_and_unknown_items_do_not_drift(
        catalog: CatalogSnapshot) -> None:
    plays = _plays(catalog, 12_000, seed=3, spread_s=12_000 * 5.0, pool=400)
    record, stats = _incremental(catalog, plays, half_life_s=120.0, cap=150)
    assert stats.updates == 12_001 and len(record) == 150  # evictions happened all along
    assert (record.rows < 0).any()  # and unknown items are in the history
    rebuilt = UserStats.build(record, catalog.item_factors)
    for name in ("upper", "linear", "weighted"):
        ours, truth = getattr(stats, name), getattr(rebuilt, name)
        if name == "upper":
            ours, truth = np.triu(ours), np.triu(truth)
        assert np.abs(ours - truth).max() <= 1e-9 * max(np.abs(truth).max(), 1.0), name


def test_the_same_events_in_any_order_give_the_same_vector(catalog: CatalogSnapshot) -> None:
    plays = _plays(catalog, 300, seed=4)
    rng = np.random.default_rng(5)
    vectors = [_solve(catalog.fold_in, _incremental(catalog, [plays[i] for i in order], 60.0,
                                                    group=group)[1])
               for order, group in ((np.arange(300), 1), (rng.permutation(300), 1),
                                    (rng.permutation(300), 17))]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)


def test_stats_stay_exact_on_an_ill_conditioned_model() -> None:
    rng = np.random.default_rng(6)
    factors = (rng.normal(size=(500, 16)) * np.logspace(0, -2, 16)).astype(np.float32)
    fold = FoldIn(factors, regularization=1e-3, alpha=40.0)
    assert np.linalg.cond(fold.gram) > 1e4
    row_of = {f"i{n}": n for n in range(500)}
    record = UserRecord.new("u").under("m", row_of, 0.0)
    stats = UserStats.build(record, factors)
    for n in range(300):
        record, change = record.with_plays([(f"i{int(rng.integers(500))}", 1.0, float(n))],
                                           row_of, 100)
        stats = stats.updated(record, change, factors)
    exact = fold.exact([History(*record.known())])[0]
    assert np.abs(fold.from_stats([stats])[0] - exact).max() <= 1e-6 * np.abs(exact).max()


def test_stats_know_the_record_they_belong_to(catalog: CatalogSnapshot) -> None:
    record, stats = _incremental(catalog, _plays(catalog, 50, seed=7), 60.0)
    assert stats.matches(record)
    later, _ = record.with_plays([(catalog.item_ids[0], 1.0, 1e4)], catalog.item_index)
    assert not stats.matches(later)  # a record written without them: rebuild
    assert not stats.matches(record.under("another-model", catalog.item_index, 60.0))
    assert not stats.matches(record.under(record.model_version, catalog.item_index, 30.0))


def test_a_system_rounding_made_indefinite_is_still_solved() -> None:
    factors = np.eye(4, dtype=np.float32)
    fold = FoldIn(factors, regularization=0.1, alpha=1.0)
    negative = -3 * np.eye(4)  # G + alpha P = -1.9 I: no Cholesky
    stats = UserStats("m", 0.0, 0, 0, negative, np.ones(4), np.zeros(4))
    np.testing.assert_allclose(fold.from_stats([stats])[0], np.ones(4) / -1.9, rtol=1e-6)
