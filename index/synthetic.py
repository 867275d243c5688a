"""Seeded synthetic data with planted taste clusters, so tests know the right answer."""

from __future__ import annotations

import numpy as np

from index.tables import Dataset, DatasetError, Interactions, ItemTable

SYNTHETIC_END = 1_700_000_000
SYNTHETIC_SPAN_S = 90 * 86_400
SYNTHETIC_ZIPF_EXPONENT = 0.5


def synthetic(
    n_items: int,
    n_users: int | None = None,
    per_user: int = 40,
    n_clusters: int = 20,
    seed: int = 0,
    in_cluster: float = 0.9,
) -> Dataset:
    """Random log with planted taste clusters: item i is in cluster i % n_clusters.

    Each user has one uniform primary cluster; each of their `per_user` plays is, with
    probability `in_cluster`, an item of that cluster (Zipf-like skew, exponent 0.5, over a
    random order), else a uniform item. Repeat plays are allowed. Weights are uniform in
    [0.3, 1.0]; timestamps uniform over the 90 days ending at SYNTHETIC_END (inclusive).
    """
    n_users = max(200, n_items // 5) if n_users is None else n_users
    _check_synthetic_args(n_items, n_users, per_user, n_clusters, in_cluster)
    rng = np.random.default_rng(seed)
    item_clusters = (np.arange(n_items) % n_clusters).astype(np.int32)
    primary = rng.integers(0, n_clusters, size=n_users)
    user_rows = np.repeat(np.arange(n_users), per_user)
    item_rows = _draw_items(rng, primary[user_rows], n_items, n_clusters, in_cluster)
    user_names, item_names = _names("u", n_users), _names("i", n_items)
    log = _synthetic_log(rng, user_names[user_rows], item_names[item_rows])
    items = _synthetic_items(rng, item_names.tolist(), item_clusters)
    user_clusters = dict(zip(user_names.tolist(), primary.tolist(), strict=True))
    return Dataset("synthetic", log, items, item_clusters, user_clusters)


def _check_synthetic_args(
    n_items: int, n_users: int, per_user: int, n_clusters: int, in_cluster: float
) -> None:
    """Reject sizes that would leave a cluster empty or the log empty."""
    if not 1 <= n_clusters <= n_items:
        raise DatasetError(f"synthetic: need 1 <= n_clusters ({n_clusters}) <= n_items ({n_items})")
    if n_users < 1 or per_user < 1:
        raise DatasetError(f"synthetic: need n_users ({n_users}), per_user ({per_user}) >= 1")
    if not 0.0 <= in_cluster <= 1.0:
        raise DatasetError(f"synthetic: in_cluster ({in_cluster}) must be in [0, 1]")


def _names(prefix: str, count: int) -> np.ndarray:
    """Object array of ids prefix0 .. prefix<count-1>."""
    return np.array([f"{prefix}{i}" for i in range(count)], dtype=object)


def _draw_items(
    rng: np.random.Generator, row_clusters: np.ndarray, n_items: int, n_clusters: int,
    in_cluster: float,
) -> np.ndarray:
    """Item index per row: a skewed pick from the row's cluster, or with 1 - in_cluster uniform."""
    sizes = np.bincount(np.arange(n_items) % n_clusters, minlength=n_clusters)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    # A random permutation grouped stably by cluster: each block is that cluster's
    # popularity order, so rank 0 is an arbitrary item rather than the lowest id.
    permutation = rng.permutation(n_items)
    ranked = permutation[np.argsort(permutation % n_clusters, kind="stable")]
    ranks = _zipf_ranks(rng, sizes[row_clusters])
    picked = ranked[starts[row_clusters] + ranks]
    uniform = rng.integers(0, n_items, size=len(row_clusters))
    return np.where(rng.random(len(row_clusters)) < in_cluster, picked, uniform)


def _zipf_ranks(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    """Per row a rank r in [0, size) with P(r) proportional to (r + 1) ** -exponent."""
    ranks = np.arange(1, int(sizes.max()) + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-SYNTHETIC_ZIPF_EXPONENT)
    targets = rng.random(len(sizes)) * cdf[sizes - 1]
    return np.minimum(np.searchsorted(cdf, targets, side="right"), sizes - 1)


def _synthetic_log(rng: np.random.Generator, users: np.ndarray, items: np.ndarray) -> Interactions:
    """Interactions for the given rows with watch-fraction weights and random timestamps."""
    weights = rng.uniform(0.3, 1.0, size=len(users)).astype(np.float32)
    start = SYNTHETIC_END - SYNTHETIC_SPAN_S
    times = rng.integers(start, SYNTHETIC_END, size=len(users), dtype=np.int64, endpoint=True)
    return Interactions(users, items, weights, times)


def _synthetic_items(
    rng: np.random.Generator, item_ids: list[str], clusters: np.ndarray
) -> ItemTable:
    """Item table: cluster c has genre c % 8, every third item also genre (c + 3) % 8."""
    n_items = len(item_ids)
    combos = [
        (f"genre-{g:02d}", f"genre-{(g + 3) % 8:02d}")[: 1 + second]
        for g in range(8) for second in (0, 1)
    ]
    keys = (clusters % 8) * 2 + (np.arange(n_items) % 3 == 0)
    genres = [combos[key] for key in keys.tolist()]
    titles = [f"Item {i}" for i in range(n_items)]
    years = rng.integers(1950, 2025, size=n_items, endpoint=True).astype(np.int16)
    return ItemTable(item_ids, titles, genres, years)
