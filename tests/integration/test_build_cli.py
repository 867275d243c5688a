"""`python -m index build` end to end: MovieLens-100K, synthetic data and CSV files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.cli import main
from index.store import UserStore


def _cli(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "index", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _check(data_dir: Path, items: int, users: int) -> CatalogSnapshot:
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir))
    assert len(catalog) == items
    with UserStore(users_dir(data_dir), readonly=True) as store:
        assert store.count("users") == users
    return catalog


def test_build_movielens_100k(tmp_path: Path) -> None:
    # Fetched at run time from the recbole wheel (its licence forbids committing it).
    report = _cli("build", "--dataset", "movielens-100k", "--data-dir", str(tmp_path / "d"),
                  "--cache-dir", str(tmp_path / "cache"), "--factors", "32")
    assert report["items"] == 1682 and report["users_bootstrapped"] == 943
    catalog = _check(tmp_path / "d", 1682, 943)
    star_wars = catalog.item_index["50"]
    assert catalog.titles[star_wars] == "Star Wars" and catalog.years[star_wars] == 1977


def test_build_synthetic_with_hnsw(tmp_path: Path) -> None:
    report = _cli("build", "--dataset", "synthetic", "--n-items", "3000", "--n-users", "500",
                  "--index", "hnsw", "--factors", "16", "--data-dir", str(tmp_path / "d"))
    assert report["model_version"].startswith("synthetic-")
    assert _check(tmp_path / "d", 3000, 500).manifest.index_type == "HNSW32,SQ8"


def test_build_from_csv_files_with_until(tmp_path: Path) -> None:
    with (tmp_path / "items.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "title", "genres", "year"])
        writer.writerows([f"m{i}", f"Movie {i}", "Drama|Comedy" if i % 2 else "Horror", 1990 + i]
                         for i in range(40))
    with (tmp_path / "plays.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "weight", "timestamp"])
        writer.writerows([f"user{u}", f"m{(u * 7 + j) % 40}", 1.0, 1000 + u * 10 + j]
                         for u in range(30) for j in range(8))
    _cli("build", "--interactions", str(tmp_path / "plays.csv"), "--items",
         str(tmp_path / "items.csv"), "--until", "1200", "--factors", "8",
         "--data-dir", str(tmp_path / "d"), "--version", "csv-v1")
    catalog = _check(tmp_path / "d", 40, 20)  # users 0..19 have plays before t=1200
    assert catalog.model_version == "csv-v1" and catalog.genres_of(1) == ["Comedy", "Drama"]


def test_build_errors_are_reported_not_raised(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "--interactions", str(tmp_path / "missing.csv"), "--items",
                 str(tmp_path / "missing-items.csv"), "--data-dir", str(tmp_path / "d")])
    assert code == 2
    assert "missing-items.csv: no such file" in capsys.readouterr().err
