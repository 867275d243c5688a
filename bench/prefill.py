"""Users with full histories, written straight into a store, for the full-history ingest stage.

Each user gets `max_history` distinct random items played one per second, merged, folded
in and stored exactly as the event service would have left them, so that the stage
measures the steady state of a service whose users have reached the cap: every new item
evicts one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from index import snapshots_dir, users_dir
from index.apply import FoldInPolicy, Merged, fold_in, write_user
from index.catalog import CatalogSnapshot
from index.store import StoreWriter, UserStore
from index.user_record import UserRecord
from index.user_stats import StatsCache

_CHUNK = 500


def prefill(data_dir: Path, users: int, seed: int = 0) -> list[str]:
    """Write `users` users named full-<n> at the history cap; their ids."""
    policy = FoldInPolicy()  # the event service's defaults
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir), with_index=False)
    rng = np.random.default_rng(seed)
    names = [f"full-{n}" for n in range(users)]
    start = time.time() - policy.max_history - 1
    with UserStore(users_dir(data_dir)) as store:
        for first in range(0, users, _CHUNK):
            merged = [_full(catalog, name, rng, start, policy)
                      for name in names[first:first + _CHUNK]]
            store.transact(lambda w, m=merged: _write(w, catalog, m))  # type: ignore[misc]
    return names


def _full(catalog: CatalogSnapshot, user_id: str, rng: np.random.Generator, start: float,
          policy: FoldInPolicy) -> Merged:
    rows = rng.choice(len(catalog), policy.max_history, replace=False)
    plays = [(catalog.item_ids[r], float(rng.uniform(0.3, 1.0)), start + t)
             for t, r in enumerate(rows.tolist())]
    record, _ = catalog.fit(UserRecord.new(user_id)).with_plays(plays, catalog.item_index,
                                                                policy.max_history)
    return record, None


def _write(writer: StoreWriter, catalog: CatalogSnapshot, merged: list[Merged]) -> None:
    vectors = fold_in(catalog, merged)
    unused = StatsCache(0)  # statistics live in the event service's memory, not the store
    for (record, _), vector in zip(merged, vectors, strict=True):
        write_user(writer, unused, record, None, vector, time.time())
