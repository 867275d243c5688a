"""The user record: binary format, and the history policy (accumulate, keep the most recent)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.user_record import UserRecord

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
    with pytest.raises(ValueError, match="shorter than its header"):
        UserRecord.decode("u", raw[:10])


def test_history_accumulates_repeats_and_keeps_the_most_recent() -> None:
    record = UserRecord.new("u").with_plays(
        [("a", 0.5, 10.0), ("b", 1.0, 20.0), ("a", 0.25, 30.0), ("c", 1.0, 5.0)], max_history=2)
    assert record.version == 4
    assert record.recent_item_ids() == ["a", "b"]
    assert dict(zip(record.item_ids, record.weights.tolist(), strict=True)) == {"a": 0.75,
                                                                                 "b": 1.0}




def _reference(plays: list[tuple[str, float, float]], cap: int) -> dict[str, tuple[float, float]]:
    """The history policy spelled out: sum weights per item, latest time, keep the newest."""
    merged: dict[str, list[float]] = {}
    for item, weight, at in plays:
        entry = merged.setdefault(item, [0.0, at])
        entry[0] += weight
        entry[1] = max(entry[1], at)
    # Ties in time keep the item first seen (the stable order of the history).
    kept = sorted(merged, key=lambda i: -merged[i][1])[:cap]
    return {i: (merged[i][0], merged[i][1]) for i in kept}


plays_st = st.lists(st.tuples(st.sampled_from([f"i{n}" for n in range(30)]),
                              st.floats(0.0, 1.0), st.integers(0, 50).map(float)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(plays_st, max_size=5), cap=st.integers(1, 20))
def test_plays_added_in_groups_match_the_policy(chunks: list[list[tuple[str, float, float]]],
                                                cap: int) -> None:
    record = UserRecord.new("u")
    for chunk in chunks:  # as the writer does: a group at a time
        record = record.with_plays(chunk, cap)
    flat = [p for chunk in chunks for p in chunk]
    assert record.version == len(flat)
    got = {i: (float(w), float(t)) for i, w, t in
           zip(record.item_ids, record.weights.tolist(), record.last_at.tolist(), strict=True)}
    expected = _reference(flat, cap)
    # Items evicted in an early group cannot come back with their old weight: compare the
    # items a single pass keeps whenever no eviction happened before the last group.
    if all(len(_reference([p for c in chunks[:k] for p in c], cap)) < cap
           for k in range(1, len(chunks))):
        assert got.keys() == expected.keys()
        for item, (weight, at) in expected.items():
            assert got[item][0] == pytest.approx(weight, rel=1e-6, abs=1e-6)
            assert got[item][1] == at
    assert len(got) <= cap and len(set(record.item_ids)) == len(record.item_ids)
