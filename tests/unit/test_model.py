"""ALS fold-in: parity with implicit, order independence, planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
from implicit.cpu.als import AlternatingLeastSquares

from index.catalog import CatalogSnapshot
from index.model import FoldIn, History, confidence_matrix
from index.tables import Dataset
from tests.conftest import record_of


def _histories(dataset: Dataset, catalog: CatalogSnapshot, n: int) -> list[History]:
    records = {}
    inter = dataset.interactions
    for user, item, weight, at in zip(inter.user_ids, inter.item_ids, inter.weights,
                                      inter.timestamps, strict=True):
        records.setdefault(user, []).append((item, float(weight), float(at)))
        if len(records) > n:
            records.pop(user)
            break
    return [catalog.history(record_of(catalog, p, u)) for u, p in records.items()]


def test_confidence_matrix_accumulates_repeat_plays() -> None:
    matrix = confidence_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]),
                               np.array([0.5, 0.25, 1.0], np.float32), (2, 3), alpha=4.0)
    assert matrix[0, 2] == pytest.approx(1 + 4 * 0.75)
    assert matrix[1, 0] == pytest.approx(1 + 4 * 1.0)
    assert matrix.nnz == 2


def test_exact_fold_in_matches_implicit_recalculate_user(
    small_dataset: Dataset, catalog: CatalogSnapshot
) -> None:
    histories = _histories(small_dataset, catalog, 50)
    als = catalog.manifest.als
    reference = AlternatingLeastSquares(factors=catalog.dim, regularization=als["regularization"],
                                        alpha=1.0, num_threads=1)
    reference.item_factors = np.array(catalog.item_factors)  # implicit needs a writable copy
    rows = np.repeat(np.arange(len(histories)), [len(h.items) for h in histories])
    matrix = confidence_matrix(rows, np.concatenate([h.items for h in histories]),
                               np.concatenate([h.weights for h in histories]),
                               (len(histories), len(catalog)), als["alpha"])
    expected = reference.recalculate_user(np.arange(len(histories)), matrix)
    ours = catalog.fold_in.exact(histories)
    assert np.abs(ours - expected).max() <= 1e-4
    assert np.linalg.norm(ours, axis=1).min() > 0.1  # a real answer, not zeros


def test_fold_in_does_not_depend_on_event_order(catalog: CatalogSnapshot) -> None:
    rng = np.random.default_rng(3)
    plays = [(catalog.item_ids[i], float(rng.uniform(0.1, 1)), float(t))
             for t, i in enumerate(rng.integers(0, len(catalog), 60))]
    vectors = []
    for permutation in (np.arange(60), rng.permutation(60), rng.permutation(60)):
        record = record_of(catalog, [plays[i] for i in permutation])
        vectors.append(catalog.fold_in.exact([catalog.history(record)]))
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)


def test_empty_history_folds_in_to_zero(catalog: CatalogSnapshot) -> None:
    empty = History(np.zeros(0, np.int64), np.zeros(0, np.float32))
    assert not catalog.fold_in.exact([empty]).any()


def test_fold_in_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="2-d"):
        FoldIn(np.zeros(4, np.float32), 0.1, 1.0)
    with pytest.raises(ValueError, match="one length"):
        History(np.array([0, 1]), np.array([1.0]))


def test_planted_cluster_user_gets_cluster_items_in_exact_top10(
    small_dataset: Dataset, catalog: CatalogSnapshot
) -> None:
    assert small_dataset.item_clusters is not None
    clusters = small_dataset.item_clusters
    rng = np.random.default_rng(11)
    for cluster in range(3):
        members = np.flatnonzero(clusters == cluster)
        watched = rng.choice(members, 15, replace=False)
        history = History(watched.astype(np.int64), np.ones(15, np.float32))
        vector = catalog.fold_in.exact([history])[0]
        scores = np.asarray(catalog.item_factors) @ vector
        scores[watched] = -np.inf
        top10 = np.argsort(-scores)[:10]
        assert (clusters[top10] == cluster).all(), (cluster, clusters[top10])
