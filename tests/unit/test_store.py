"""The LMDB user store: visibility across processes, dedupe, counts, map growth, bootstrap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index import users_dir
from index.build import BuildReport
from index.catalog import CatalogSnapshot
from index.store import DEFAULT_ITEM_HALF_LIFE_S, UserStore
from index.user_record import UserRecord


def test_writes_are_visible_to_a_read_only_env_in_another_process(tmp_path: Path) -> None:
    with UserStore(tmp_path / "db") as writer:
        writer.transact(lambda w: w.put_user(
            UserRecord.new("alice").with_plays([("x", 1.0, 1.0)], {})[0]))
        code = ("import sys; from pathlib import Path; from index.store import UserStore\n"
                "s = UserStore(Path(sys.argv[1]), readonly=True)\n"
                "a = s.get_user('alice')\n"
                "print(a.item_ids, a.version, s.get_user('bob'))")
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "db")], text=True,
                              capture_output=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.stdout.strip() == "('x',) 1 None", done.stderr


def test_seen_events_dedupe_and_prune_by_age(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "db")
    store.transact(lambda w: [w.mark_seen(f"e{i}", float(i)) for i in range(10)])
    assert store.seen("e3") and not store.seen("e10")
    assert store.transact(lambda w: w.prune_seen(before=5.0, limit=100)) == 5
    assert not store.seen("e3") and store.seen("e5")
    assert store.count("seen") == store.count("seen_by_time") == 5


def test_item_counts_decay_with_the_half_life_kept_in_the_store(tmp_path: Path) -> None:
    with UserStore(tmp_path / "db") as store:
        assert store.item_half_life() == DEFAULT_ITEM_HALF_LIFE_S
        store.transact(lambda w: w.set_item_half_life(10.0))
        store.transact(lambda w: w.add_item_count("x", 1.0, at=0.0))
        store.transact(lambda w: w.add_item_count("x", 1.0, at=10.0))
        assert store.item_counts(now=20.0)["x"] == pytest.approx(0.75)
        with pytest.raises(ValueError, match="half-life"):
            store.transact(lambda w: w.set_item_half_life(0.0))
    # A reader (the ranking service) decays them with the writer's value, not its own.
    with UserStore(tmp_path / "db", readonly=True) as reader:
        assert reader.item_half_life() == 10.0
        assert reader.item_counts(now=30.0)["x"] == pytest.approx(0.375)


def test_rejected_events_are_kept_newest_first(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "db")
    store.transact(lambda w: [w.put_rejected(float(i), i, {"reason": f"r{i}"})
                              for i in range(3)])
    assert [r["reason"] for r in store.rejected(limit=2)] == ["r2", "r1"]


def test_map_full_grows_the_map_and_keeps_every_write(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "db", map_size=256 * 1024)
    big, _ = UserRecord.new("u").with_plays([(f"item-{i}", 1.0, float(i)) for i in range(400)],
                                            {})
    for batch in range(20):
        store.transact(lambda w, b=batch: [
            w.put_user(big.evolve(user_id=f"u{b}-{i}"))
            for i in range(10)])
    assert store.env.info()["map_size"] > 256 * 1024
    assert store.count("users") == 200
    got = store.get_user("u19-9")
    assert got is not None and len(got.item_ids) == 400


def test_bootstrap_gives_every_batch_user_their_exact_vector(
    built: BuildReport, data_dir: Path, catalog: CatalogSnapshot
) -> None:
    with UserStore(users_dir(data_dir), readonly=True) as store:
        users = store.count("users")
        record = store.get_user("u17")
        bootstrap_version = store.get_meta("bootstrap_model_version")
    assert users == built.users_bootstrapped == 600
    assert record is not None and record.model_version == catalog.model_version
    expected = catalog.fold_in.exact([catalog.history(record)])[0]
    np.testing.assert_allclose(record.vector, expected, atol=1e-6)
    assert record.version == 40  # one per batch interaction
    assert bootstrap_version == catalog.model_version
