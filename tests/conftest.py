"""Shared fixtures: a small seeded synthetic catalog, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from index import snapshots_dir
from index.build import BuildReport, build
from index.catalog import CatalogSnapshot
from index.history import Play
from index.kernels import warm_up
from index.model import AlsParams
from index.synthetic import synthetic
from index.tables import Dataset
from index.user_record import UserRecord
from rpc.server import pin_native_threads

SMALL_ALS = AlsParams(factors=32, regularization=0.1, alpha=10.0, iterations=10, seed=0)
pin_native_threads()  # as the services' entry points do: in-process servers behave alike
warm_up()  # compile the retrieval kernels into their disk cache before servers start


def record_of(catalog: CatalogSnapshot, plays: list[Play], user: str = "u") -> UserRecord:
    """A new user's record under this catalog after these plays (one group)."""
    return catalog.fit(UserRecord.new(user)).with_plays(plays, catalog.item_index)[0]


def _quiet(_: str) -> None:
    """Build progress is not part of what tests check."""


@pytest.fixture(scope="session")
def small_dataset() -> Dataset:
    """2,000 items in 10 planted clusters, 600 users with 40 plays each."""
    return synthetic(n_items=2_000, n_users=600, per_user=40, n_clusters=10, seed=7)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, small_dataset: Dataset) -> BuildReport:
    """A data dir with a Flat snapshot and a bootstrapped store (treat as read-only)."""
    data_dir = tmp_path_factory.mktemp("data")
    report = build(small_dataset, data_dir, SMALL_ALS, index="flat", version="small-v1", log=_quiet)
    return report


@pytest.fixture(scope="session")
def data_dir(built: BuildReport) -> Path:
    """The data dir of the session's built snapshot."""
    return built.snapshot_path.parent.parent


@pytest.fixture(scope="session")
def catalog(data_dir: Path) -> CatalogSnapshot:
    """The session's catalog snapshot, loaded and verified."""
    return CatalogSnapshot.load(snapshots_dir(data_dir))
