"""The LMDB user store: record format, history rules, dedupe, counts, map growth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index import users_dir
from index.build import BuildReport
from index.catalog import CatalogSnapshot
from index.store import UserRecord, UserStore

ids = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
              min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(user=ids, dim=st.integers(0, 128), model=st.text(max_size=30),
       version=st.integers(0, 2**63), items=st.lists(ids, max_size=50, unique=True))
def test_record_round_trips(user: str, dim: int, model: str, version: int,
                            items: list[str]) -> None:
    rng = np.random.default_rng(len(items))
    record = UserRecord(user, rng.normal(size=dim).astype(np.float32), model, version, 1.5e9,
                        tuple(items), rng.uniform(size=len(items)).astype(np.float32),
                        rng.uniform(0, 2e9, len(items)))
    decoded = UserRecord.decode(user, record.encode())
    assert decoded.item_ids == record.item_ids
    assert (decoded.model_version, decoded.version) == (model, version)
    np.testing.assert_array_equal(decoded.vector, record.vector)
    np.testing.assert_array_equal(decoded.weights, record.weights)
    np.testing.assert_array_equal(decoded.last_at, record.last_at)


def test_decode_refuses_a_truncated_record() -> None:
    raw = UserRecord.new("u").with_plays([("a", 1.0, 5.0)], 10).encode()
    with pytest.raises(ValueError, match="record length"):
        UserRecord.decode("u", raw[:-1])


def test_history_accumulates_repeats_and_keeps_the_most_recent() -> None:
    record = UserRecord.new("u").with_plays(
        [("a", 0.5, 10.0), ("b", 1.0, 20.0), ("a", 0.25, 30.0), ("c", 1.0, 5.0)], max_history=2)
    assert record.version == 4
    assert record.recent_item_ids() == ["a", "b"]
    assert dict(zip(record.item_ids, record.weights.tolist(), strict=True)) == {"a": 0.75,
                                                                                 "b": 1.0}


def test_writes_are_visible_to_a_read_only_env_in_another_process(tmp_path: Path) -> None:
    with UserStore(tmp_path / "db") as writer:
        writer.transact(lambda w: w.put_user(
            UserRecord.new("alice").with_plays([("x", 1.0, 1.0)], 10)))
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


def test_item_counts_decay_with_half_life(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "db")
    store.transact(lambda w: w.add_item_count("x", 1.0, at=0.0, half_life=10.0))
    store.transact(lambda w: w.add_item_count("x", 1.0, at=10.0, half_life=10.0))
    assert store.item_counts(now=20.0, half_life=10.0)["x"] == pytest.approx(0.75)


def test_rejected_events_are_kept_newest_first(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "db")
    store.transact(lambda w: [w.put_rejected(float(i), i, {"reason": f"r{i}"})
                              for i in range(3)])
    assert [r["reason"] for r in store.rejected(limit=2)] == ["r2", "r1"]


def test_map_full_grows_the_map_and_keeps_every_write(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "db", map_size=256 * 1024)
    big = UserRecord.new("u").with_plays([(f"item-{i}", 1.0, float(i)) for i in range(400)], 500)
    for batch in range(20):
        store.transact(lambda w, b=batch: [
            w.put_user(UserRecord(f"u{b}-{i}", *list(big.__dict__.values())[1:]))
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
    expected = catalog.fold_in.exact([catalog.history(record.item_ids, record.weights)])[0]
    np.testing.assert_allclose(record.vector, expected, atol=1e-6)
    assert record.version == 40  # one per batch interaction
    assert bootstrap_version == catalog.model_version
