"""The offline batch workflow: dataset (and the live catalog's items and plays) -> ALS ->
catalog snapshot -> bootstrapped user store."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.live import taken_in
from index.model import AlsParams, History, confidence_matrix, train_als
from index.neighbours import NeighbourParams, co_visitation
from index.snapshot import IndexSpec, write_snapshot
from index.store import USERS_MODEL_KEY, StoreWriter, UserStore
from index.tables import Dataset, DatasetError, Interactions, ItemTable
from index.user_record import MAX_HISTORY, UserRecord

Log = Callable[[str], None]
_BOOTSTRAP_CHUNK = 20_000
DEFAULT_NEIGHBOURS = NeighbourParams()


@dataclass(frozen=True)
class BuildReport:
    """What a build produced, with stage timings in seconds."""

    model_version: str
    snapshot_path: Path
    snapshot_bytes: int
    item_count: int
    users_bootstrapped: int
    timings: dict[str, float]


def default_version(name: str) -> str:
    """A sortable model version: dataset name and UTC build time."""
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def build(dataset: Dataset, data_dir: Path, als: AlsParams, *, index: str = "flat",
          version: str | None = None, threads: int = 0,
          max_history: int = MAX_HISTORY, log: Log = print,
          neighbours: NeighbourParams | None = DEFAULT_NEIGHBOURS) -> BuildReport:
    """Train, write the snapshot (made CURRENT) and bootstrap users into an empty store."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        timings[name] = time.perf_counter() - clock
        clock = time.perf_counter()
        log(f"  {name}: {timings[name]:.1f} s")

    dataset = with_live_items(dataset, data_dir, log)
    inter = dataset.interactions
    if len(inter) == 0:
        raise DatasetError(f"{dataset.name}: no interactions to train on")
    item_rows = _item_rows(dataset)
    users, user_codes = np.unique(inter.user_ids.astype(str), return_inverse=True)
    log(f"training ALS on {len(inter):,} interactions, {len(users):,} users, "
        f"{len(dataset.items):,} items (d={als.factors})")
    matrix = confidence_matrix(user_codes, item_rows, inter.weights,
                               (len(users), len(dataset.items)), als.alpha)
    _, item_factors = train_als(matrix, als, threads)
    stage("train")
    table = None
    if neighbours is not None:
        table = co_visitation(user_codes, item_rows, inter.timestamps, len(dataset.items),
                              neighbours)
        stage("neighbours")
    spec = IndexSpec.preset(index, len(dataset.items), als.factors)
    log(f"writing snapshot with index {spec.factory}")
    popularity = np.bincount(item_rows, minlength=len(dataset.items)).astype(np.float32)
    version = version or default_version(dataset.name)
    path = write_snapshot(snapshots_dir(data_dir), version, item_factors, dataset.items,
                          popularity, spec, als, neighbours=table)
    stage("snapshot")
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir), version)
    with UserStore(users_dir(data_dir)) as store:
        bootstrapped = bootstrap_users(store, catalog, inter, max_history, log)
    stage("bootstrap")
    size = sum(f.stat().st_size for f in path.iterdir())
    return BuildReport(version, path, size, len(dataset.items), bootstrapped, timings)


def with_live_items(dataset: Dataset, data_dir: Path, log: Log = print) -> Dataset:
    """The dataset and what the data dir's live catalog adds: the items put since the last
    build (as put) and their plays, so the model trains their factors."""
    if not (users_dir(data_dir) / "data.mdb").exists():
        return dataset
    with UserStore(users_dir(data_dir), readonly=True) as store:
        items, plays = taken_in(store, set(dataset.items.item_ids))
    if not items:
        return dataset
    log(f"taking in {len(items):,} live items and {len(plays):,} plays of them")
    table, inter = dataset.items, dataset.interactions
    users, item_ids, weights, times = zip(*plays, strict=True) if plays else ((), (), (), ())
    return replace(dataset, items=ItemTable(
        [*table.item_ids, *(i.item_id for i in items)], [*table.titles, *(i.title for i in items)],
        [*table.genres, *(i.genres for i in items)],
        np.concatenate([table.years, [i.year for i in items]])), interactions=Interactions(
        np.concatenate([inter.user_ids, np.array(users, dtype=object)]),
        np.concatenate([inter.item_ids, np.array(item_ids, dtype=object)]),
        np.concatenate([inter.weights, np.array(weights, np.float32)]),
        np.concatenate([inter.timestamps, np.array(times, np.float64).astype(np.int64)])))


def _item_rows(dataset: Dataset) -> np.ndarray:
    index = {item_id: row for row, item_id in enumerate(dataset.items.item_ids)}
    try:
        return np.fromiter((index[i] for i in dataset.interactions.item_ids), dtype=np.int64,
                           count=len(dataset.interactions))
    except KeyError as exc:
        raise DatasetError(f"{dataset.name}: interaction for unknown item {exc.args[0]!r}") \
            from exc


def bootstrap_users(store: UserStore, catalog: CatalogSnapshot, inter: Interactions,
                    max_history: int, log: Log = print) -> int:
    """Write every user of the batch log with their exact fold-in vector, if the store is empty.

    A store that already holds users keeps them: their histories include live events the
    batch log may not, and the services recompute them under the new model when touched.
    """
    if store.count("users"):
        log(f"user store {store.path} already has users: left as is")
        return 0
    records = _batch_records(catalog, inter, max_history)
    for start in range(0, len(records), _BOOTSTRAP_CHUNK):
        chunk = records[start:start + _BOOTSTRAP_CHUNK]
        vectors = catalog.fold_in.exact([History(*r.known()) for r in chunk])
        updated = [replace(r, vector=v if len(r.known()[0]) else np.zeros(0, np.float32))
                   for r, v in zip(chunk, vectors, strict=True)]
        store.transact(functools.partial(_put_users, updated))
        log(f"  bootstrapped {min(start + _BOOTSTRAP_CHUNK, len(records)):,}/{len(records):,} "
            "users")
    def done(writer: StoreWriter) -> None:
        writer.put_meta("bootstrap_model_version", catalog.model_version)
        writer.put_meta(USERS_MODEL_KEY, catalog.model_version)

    store.transact(done)
    return len(records)


def _put_users(records: list[UserRecord], writer: StoreWriter) -> None:
    for record in records:
        writer.put_user(record)


def _batch_records(catalog: CatalogSnapshot, inter: Interactions,
                   max_history: int) -> list[UserRecord]:
    """One record per user, by the same history policy as live events."""
    order = np.lexsort((inter.timestamps, inter.user_ids.astype(str)))
    user_ids = inter.user_ids[order]
    bounds = np.flatnonzero(user_ids[1:] != user_ids[:-1]) + 1
    now = time.time()
    records = []
    for rows in np.split(order, bounds):
        plays = list(zip(inter.item_ids[rows], inter.weights[rows].tolist(),
                         inter.timestamps[rows].astype(float).tolist(), strict=True))
        empty = catalog.fit(UserRecord.new(str(inter.user_ids[rows[0]])))
        record, _ = empty.with_plays(plays, catalog.item_index, max_history)
        records.append(replace(record, updated_at=now))
    return records
