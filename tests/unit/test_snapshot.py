"""Catalog snapshots: round trip, ANN recall per index type, refusal of bad snapshots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.snapshot import (
    CURRENT,
    FACTORS_FILE,
    INDEX_FILE,
    MANIFEST,
    IndexSpec,
    SnapshotError,
    current_version,
    set_current,
    write_snapshot,
)
from index.tables import Dataset
from tests.conftest import SMALL_ALS


@pytest.fixture()
def snapshot_copy(tmp_path: Path, data_dir: Path) -> Path:
    """A private copy of the session's snapshots dir, free to damage."""
    root = tmp_path / "snapshots"
    shutil.copytree(snapshots_dir(data_dir), root)
    return root


def test_round_trip_keeps_items_and_metadata(
    catalog: CatalogSnapshot, small_dataset: Dataset
) -> None:
    items = small_dataset.items
    assert catalog.model_version == "small-v1"
    assert (len(catalog), catalog.dim) == (len(items), SMALL_ALS.factors)
    assert catalog.item_ids == items.item_ids and catalog.titles == items.titles
    assert all(sorted(catalog.genres_of(r)) == sorted(items.genres[r]) for r in range(50))
    np.testing.assert_array_equal(catalog.years, items.years)
    assert catalog.popularity.sum() == len(small_dataset.interactions)
    assert catalog.manifest.als["alpha"] == SMALL_ALS.alpha


def test_search_returns_exact_top_k_for_flat(catalog: CatalogSnapshot) -> None:
    query = np.asarray(catalog.item_factors[5])
    ids, scores = catalog.search(query, 10)
    expected = np.argsort(-(np.asarray(catalog.item_factors) @ query))[:10]
    assert set(ids[0]) == set(expected)
    assert np.all(np.diff(scores[0]) <= 1e-6)


@pytest.mark.parametrize("index", ["hnsw", "ivfpq"])
def test_ann_recall_at_10_against_exact(
    tmp_path: Path, catalog: CatalogSnapshot, small_dataset: Dataset, index: str
) -> None:
    # Queries are real user vectors (latent-structured), as in serving.
    rng = np.random.default_rng(1)
    factors = np.asarray(catalog.item_factors)
    queries = factors[rng.choice(len(catalog), 200, replace=False)] + \
        rng.normal(0, 0.05, (200, catalog.dim)).astype(np.float32)
    spec = IndexSpec.preset(index, len(catalog), catalog.dim)
    write_snapshot(tmp_path, index, factors, small_dataset.items, catalog.popularity, spec,
                   SMALL_ALS)
    ann = CatalogSnapshot.load(tmp_path, index)
    exact_ids, _ = catalog.search(queries, 10)
    ann_ids, _ = ann.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann_ids, exact_ids, strict=True)])
    assert recall >= 0.95, f"{spec.factory}: recall@10 {recall:.3f}"


def test_current_is_replaced_atomically(snapshot_copy: Path, small_dataset: Dataset) -> None:
    catalog = CatalogSnapshot.load(snapshot_copy)
    write_snapshot(snapshot_copy, "v2", np.asarray(catalog.item_factors), small_dataset.items,
                   catalog.popularity, IndexSpec("Flat"), SMALL_ALS, make_current=False)
    assert current_version(snapshot_copy) == "small-v1"
    set_current(snapshot_copy, "v2")
    assert CatalogSnapshot.load(snapshot_copy).model_version == "v2"
    assert not [p for p in snapshot_copy.iterdir() if p.name.startswith(".")]


def _damage(root: Path, how: str) -> Path:
    version = root / "small-v1"
    if how == "truncated index":
        data = (version / INDEX_FILE).read_bytes()
        (version / INDEX_FILE).write_bytes(data[: len(data) // 2])
        return version / INDEX_FILE
    if how == "bit-flipped factors":
        data = bytearray((version / FACTORS_FILE).read_bytes())
        data[-7] ^= 0x10
        (version / FACTORS_FILE).write_bytes(bytes(data))
        return version / FACTORS_FILE
    manifest = json.loads((version / MANIFEST).read_text())
    if how == "missing manifest":
        (version / MANIFEST).unlink()
    elif how == "wrong dimension":
        manifest["dim"] = 48
        (version / MANIFEST).write_text(json.dumps(manifest))
        return version / FACTORS_FILE
    elif how == "not json":
        (version / MANIFEST).write_text("{not json")
    return version / MANIFEST


@pytest.mark.parametrize("how", ["truncated index", "bit-flipped factors", "missing manifest",
                                 "wrong dimension", "not json"])
def test_corrupt_snapshot_is_refused_naming_the_file(snapshot_copy: Path, how: str) -> None:
    bad_file = _damage(snapshot_copy, how)
    with pytest.raises(SnapshotError) as error:
        CatalogSnapshot.load(snapshot_copy)
    assert str(bad_file) in str(error.value)


def test_truncated_index_does_not_crash_the_interpreter(snapshot_copy: Path) -> None:
    _damage(snapshot_copy, "truncated index")
    code = ("import sys; from pathlib import Path; from index.catalog import CatalogSnapshot;"
            "from index.snapshot import SnapshotError\n"
            "try:\n CatalogSnapshot.load(Path(sys.argv[1]))\n"
            "except SnapshotError as e:\n print('refused:', e); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code, str(snapshot_copy)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 3, done.stderr
    assert INDEX_FILE in done.stdout


def test_missing_current_and_bad_versions_are_refused(snapshot_copy: Path, tmp_path: Path) -> None:
    (snapshot_copy / CURRENT).write_text("../../etc\n")
    with pytest.raises(SnapshotError, match="invalid version"):
        CatalogSnapshot.load(snapshot_copy)
    (snapshot_copy / CURRENT).unlink()
    with pytest.raises(SnapshotError, match="CURRENT: missing"):
        CatalogSnapshot.load(snapshot_copy)
    outside = tmp_path / "elsewhere"
    shutil.copytree(snapshot_copy / "small-v1", outside)
    (snapshot_copy / "escape").symlink_to(outside)
    with pytest.raises(SnapshotError, match="outside"):
        CatalogSnapshot.load(snapshot_copy, "escape")


def test_write_refuses_bad_versions_and_shapes(tmp_path: Path, catalog: CatalogSnapshot,
                                               small_dataset: Dataset) -> None:
    factors = np.asarray(catalog.item_factors)
    with pytest.raises(ValueError, match="bad model version"):
        write_snapshot(tmp_path, "../x", factors, small_dataset.items, catalog.popularity,
                       IndexSpec("Flat"), SMALL_ALS)
    with pytest.raises(ValueError, match="one row per item"):
        write_snapshot(tmp_path, "v", factors[:10], small_dataset.items, catalog.popularity,
                       IndexSpec("Flat"), SMALL_ALS)
    with pytest.raises(ValueError, match="bad FAISS factory"):
        write_snapshot(tmp_path, "v", factors, small_dataset.items, catalog.popularity,
                       IndexSpec("NoSuchIndex"), SMALL_ALS)
