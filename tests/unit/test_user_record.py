"""The user record: binary format, the history policy, the decay, and what a merge reports."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.history import decay
from index.user_record import UserRecord

ids = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
              min_size=1, max_size=40)
ROWS = {f"i{n}": n for n in range(0, 30, 2)}  # even items are in the catalog, odd ones not


def record_of(plays: list[tuple[str, float, float]], cap: int = 500, half_life_s: float = 0.0,
              chunks: int = 1) -> UserRecord:
    """A new user's record after these plays, merged `chunks` groups at a time."""
    record = UserRecord.new("u").under("m1", ROWS, half_life_s)
    for part in np.array_split(np.arange(len(plays)), chunks):
        if len(part):
            record, _ = record.with_plays([plays[i] for i in part], ROWS, cap)
    return record


@settings(max_examples=200, deadline=None)
@given(user=ids, dim=st.integers(0, 128), model=st.text(max_size=30),
       version=st.integers(0, 2**63), items=st.lists(ids, max_size=50, unique=True),
       dismissed=st.lists(st.text(st.characters(codec="utf-8", categories=("L", "N", "P")),
                                  min_size=1, max_size=20), max_size=8, unique=True))
def test_record_round_trips(user: str, dim: int, model: str, version: int,
                            items: list[str], dismissed: list[str]) -> None:
    rng = np.random.default_rng(len(items))
    n = len(items)
    encoded = [i.encode() for i in items]
    record = UserRecord(user, rng.normal(size=dim).astype(np.float32), model, version, 1.5e9,
                        30.0, 7.0, rng.integers(-1, 100, n).astype(np.int32), True,
                        rng.uniform(size=n).astype(np.float32), rng.uniform(size=n),
                        rng.uniform(0, 2e9, n), np.array([len(e) for e in encoded], np.uint16),
                        b"".join(encoded), tuple(dismissed))
    decoded = UserRecord.decode(user, record.encode())
    assert decoded.item_ids == tuple(items) and decoded.dismissed == tuple(dismissed)
    assert (decoded.model_version, decoded.version, decoded.half_life_s,
            decoded.reference) == (model, version, 30.0, 7.0)
    for name in ("vector", "rows", "weights", "decayed", "last_at", "id_lengths"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(record, name))


def test_decode_refuses_a_truncated_record() -> None:
    raw = record_of([("i2", 1.0, 5.0)]).encode()
    with pytest.raises(ValueError, match="record length"):
        UserRecord.decode("u", raw[:-1])
    with pytest.raises(ValueError, match="shorter than its header"):
        UserRecord.decode("u", raw[:10])
    with pytest.raises(ValueError, match="unknown record format 9"):
        UserRecord.decode("u", b"\x09" + raw[1:])


def test_a_format_2_record_is_read_with_nothing_dismissed() -> None:
    record = record_of([("i2", 1.0, 5.0), ("i3", 0.5, 6.0)])
    raw = record.encode()  # format 3 = format 2's header + the dismissed length, + that blob
    v2 = b"\x02" + raw[1:struct.calcsize("<BBHHHIQddd")] + raw[struct.calcsize("<BBHHHIQdddI"):]
    old = UserRecord.decode("u", v2)
    assert (old.item_ids, old.version, old.dismissed) == (("i2", "i3"), 2, ())
    np.testing.assert_array_equal(old.decayed, record.decayed)


def test_dismissals_keep_the_latest_and_count_as_versions() -> None:
    record = record_of([("i2", 1.0, 5.0)])
    after = record.with_dismissed(["i4", "i6", "i4"])
    assert after.dismissed == ("i6", "i4") and after.version == record.version + 3
    assert after.item_ids == record.item_ids and after.rows.tolist() == record.rows.tolist()
    many = after.with_dismissed([f"x{n}" for n in range(1_200)])
    assert len(many.dismissed) == 1_000 and many.dismissed[-1] == "x1199"


def test_a_format_1_record_is_read_and_remapped_on_use() -> None:
    header = struct.pack("<BBHHHIQd", 1, 0, 2, 2, 2, 5, 7, 1.5e9)
    raw = header + b"m1" + np.array([1, 2], "<f4").tobytes() + \
        np.array([0.5, 1.0], "<f4").tobytes() + np.array([10.0, 20.0], "<f8").tobytes() + \
        b"i4\0i5"
    old = UserRecord.decode("u", raw)
    assert (old.item_ids, old.version, old.rows_valid) == (("i4", "i5"), 7, False)
    fitted = old.under("m1", ROWS, 0.0)
    assert fitted.rows.tolist() == [4, -1] and len(fitted.vector) == 2  # same model: kept
    assert UserRecord.decode("u", fitted.encode()).rows_valid


def test_history_accumulates_repeats_and_keeps_the_most_recent() -> None:
    record = record_of([("i2", 0.5, 10.0), ("i4", 1.0, 20.0), ("i2", 0.25, 30.0),
                        ("i6", 1.0, 5.0)], cap=2)
    assert record.version == 4
    assert record.recent_item_ids() == ["i2", "i4"]
    assert dict(zip(record.item_ids, record.weights.tolist(), strict=True)) == {"i2": 0.75,
                                                                                 "i4": 1.0}
    assert record.rows.tolist() == [2, 4]


def test_decay_weighs_each_play_by_its_age_from_the_latest_known_one() -> None:
    plays = [("i2", 1.0, 0.0), ("i4", 1.0, 60.0), ("i2", 1.0, 120.0), ("i6", 0.5, 90.0),
             ("i5", 1.0, 600.0)]  # i5 is not in the catalog: it moves nothing
    record = record_of(plays, half_life_s=60.0)
    decayed = dict(zip(record.item_ids, record.decayed.tolist(), strict=True))
    assert record.reference == 120.0
    assert decayed["i2"] == pytest.approx(1.0 + 0.25)  # ages 0 and 120 s
    assert decayed["i4"] == pytest.approx(0.5)
    assert decayed["i6"] == pytest.approx(0.5 * 0.5 ** 0.5)
    assert decayed["i5"] == 0.0
    undecayed = record_of(plays)
    assert undecayed.decayed.tolist() == [1.0 * (i != "i5") * w for i, w in
                                          zip(undecayed.item_ids, undecayed.weights.tolist(),
                                              strict=True)]
    assert decay(np.array([0.0, 30.0]), 30.0).tolist() == [1.0, 0.5]


def _reference(plays: list[tuple[str, float, float]], cap: int,
               half_life_s: float) -> dict[str, tuple[float, float, float]]:
    """The policy spelled out: sums, decayed sums (ages from the latest known play), latest
    time per item, the newest kept (of equal times, the smaller ids)."""
    latest = max([at for item, _, at in plays if item in ROWS], default=0.0)
    merged: dict[str, list[float]] = {}
    for item, weight, at in plays:
        entry = merged.setdefault(item, [0.0, 0.0, at])
        entry[0] += weight
        entry[1] += weight * float(decay(latest - at, half_life_s)) if item in ROWS else 0.0
        entry[2] = max(entry[2], at)
    kept = sorted(merged, key=lambda i: (-merged[i][2], i.encode()))[:cap]
    return {i: (merged[i][0], merged[i][1], merged[i][2]) for i in kept}


plays_st = st.lists(st.tuples(st.sampled_from([f"i{n}" for n in range(30)]),
                              st.floats(0.0, 1.0), st.integers(0, 500).map(float)),
                    min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(plays=plays_st, chunks=st.integers(1, 6), half_life=st.sampled_from([0.0, 60.0]))
def test_plays_merged_in_groups_match_the_policy(
        plays: list[tuple[str, float, float]], chunks: int, half_life: float) -> None:
    cap = 500  # no eviction: then the policy is the same whatever the grouping
    record = record_of(plays, cap, half_life, chunks)
    assert record.version == len(plays)
    got = {i: (w, d, t) for i, w, d, t in zip(record.item_ids, record.weights.tolist(),
                                                record.decayed.tolist(),
                                                record.last_at.tolist(), strict=True)}
    expected = _reference(plays, cap, half_life)
    assert got.keys() == expected.keys()
    for item, (weight, decayed, at) in expected.items():
        assert got[item][0] == pytest.approx(weight, rel=1e-6, abs=1e-6)
        assert got[item][1] == pytest.approx(decayed, rel=1e-9, abs=1e-12)
        assert got[item][2] == at
    assert record.rows.tolist() == [ROWS.get(i, -1) for i in record.item_ids]


@settings(max_examples=200, deadline=None)
@given(plays=plays_st, cap=st.integers(1, 12))
def test_eviction_keeps_the_most_recent_items_in_one_pass(
        plays: list[tuple[str, float, float]], cap: int) -> None:
    record = record_of(plays, cap)
    assert set(record.item_ids) == set(_reference(plays, cap, 0.0))
    assert len(record) == min(cap, len({p[0] for p in plays}))
    assert len(record.ids) == sum(record.id_lengths.tolist())
    assert record.item_ids == tuple(record.item_id(k) for k in range(len(record)))


@settings(max_examples=200, deadline=None)
@given(before=plays_st, group=plays_st, cap=st.integers(1, 12),
       half_life=st.sampled_from([0.0, 60.0]))
def test_the_change_is_exactly_what_moved(before: list[tuple[str, float, float]],
                                          group: list[tuple[str, float, float]], cap: int,
                                          half_life: float) -> None:
    old = record_of(before, cap, half_life)
    new, change = old.with_plays(group, ROWS, cap)
    weight = {int(r): d for r, d in zip(*old.known(), strict=True)}
    after = {int(r): d for r, d in zip(*new.known(), strict=True)}
    moved = {int(r): delta for r, delta in zip(change.rows, change.deltas, strict=True)}
    for row in weight.keys() | after.keys():
        expected = after.get(row, 0.0) - change.scale * weight.get(row, 0.0)
        assert moved.get(row, 0.0) == pytest.approx(expected, abs=1e-12)
    assert set(change.entered.tolist()) == after.keys() - weight.keys()
    assert set(change.left.tolist()) == weight.keys() - after.keys()
    if -np.inf < old.reference and -np.inf < new.reference:  # else nothing known to scale
        assert change.scale == pytest.approx(float(decay(new.reference - old.reference,
                                                         half_life)))


def test_a_remap_to_another_model_drops_the_vector_and_maps_the_rows() -> None:
    record = record_of([("i2", 1.0, 1.0), ("i3", 1.0, 2.0)])
    record = UserRecord.decode("u", record.encode())
    moved = record.under("m2", {"i3": 7}, 0.0)
    assert moved.rows.tolist() == [-1, 7] and len(moved.vector) == 0
    assert moved.decayed.tolist() == [0.0, 1.0]  # i3 is known now: its weight is derived
    assert moved.fits("m2", 0.0) and not moved.fits("m2", 60.0)
    assert record.under("m1", ROWS, 0.0) is record


def test_a_remap_keeps_the_decay_of_items_known_before_and_after() -> None:
    record = record_of([("i2", 1.0, 0.0), ("i2", 1.0, 60.0), ("i3", 1.0, 120.0)],
                       half_life_s=60.0)
    assert record.reference == 60.0 and record.decayed.tolist() == [1.5, 0.0]
    moved = record.under("m2", {"i2": 1, "i3": 2}, 60.0)  # i3 known now: the latest play
    assert moved.reference == 120.0
    assert moved.decayed.tolist() == pytest.approx([0.75, 1.0])  # i2 rescaled, exactly
    respaced = record.under("m1", ROWS, 30.0)  # a new half-life: derived from the sums
    assert respaced.decayed.tolist() == pytest.approx([2.0 * 0.5 ** 0, 0.0])


def test_a_lowered_cap_evicts_down_to_it_and_reports_every_item_that_left() -> None:
    plays = [(f"i{2 * n}", 1.0, float(n)) for n in range(10)]
    record = record_of(plays, cap=10)
    smaller, change = record.with_plays([("i20", 1.0, 20.0)], ROWS, max_history=5)
    assert smaller.item_ids == ("i20", "i12", "i14", "i16", "i18")  # the slot of the oldest
    assert sorted(change.left.tolist()) == [0, 2, 4, 6, 8, 10]
    assert change.entered.tolist() == [20]
    assert len(smaller.ids) == sum(smaller.id_lengths.tolist())


def test_equally_recent_items_are_evicted_greatest_id_first_whatever_the_order() -> None:
    plays = [("i2", 1.0, 5.0), ("i10", 1.0, 5.0), ("i4", 1.0, 5.0), ("i6", 1.0, 9.0)]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        record = record_of([plays[k] for k in order], cap=2)
        assert sorted(record.item_ids) == ["i10", "i6"]  # "i4" > "i2" > "i10" as bytes
