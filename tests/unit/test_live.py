"""The live catalog's domain: checks, codecs, the content start, the item-side fold-in, the
store writes and the change feed, and the segment a ranking worker serves."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from index.catalog import CatalogSnapshot
from index.errors import InvalidArgument
from index.filters import ItemFilter, clear, unpack
from index.live import (
    CatalogItem,
    ItemStats,
    LiveItem,
    LiveSegment,
    apply_message,
    catalog_version,
    changed_since,
    check_ids,
    check_items,
    learn,
    learned_vector,
    parse_message,
    plays_between,
    prune_changes,
    put_items,
    read_items,
    refold_items,
    start_vector,
    take_down,
    taken_in,
    write_message,
)
from index.neighbours import Candidates
from index.ranking import LiveCatalog, Ranker, RankingConfig
from index.retrieval import Query, Retriever
from index.store import UserStore
from tests.conftest import record_of

ITEM = CatalogItem("new-1", "A premiere", ("genre-00", "genre-03"), 2026)


@pytest.mark.parametrize("bad", [
    replace(ITEM, item_id=""), replace(ITEM, item_id="x" * 129), replace(ITEM, item_id="a\tb"),
    replace(ITEM, title=""), replace(ITEM, title="a\nb"), replace(ITEM, title="t" * 501),
    replace(ITEM, year=-1), replace(ITEM, year=1799), replace(ITEM, year=2201),
    replace(ITEM, genres=("",)), replace(ITEM, genres=("a|b",)), replace(ITEM, genres=("g", "g")),
    replace(ITEM, genres=tuple(f"g{n}" for n in range(33))),
    replace(ITEM, available_from=math.nan), replace(ITEM, available_until=-1.0),
    replace(ITEM, available_from=20.0, available_until=10.0),
])
def test_a_bad_item_refuses_the_request_naming_it(bad: CatalogItem) -> None:
    with pytest.raises(InvalidArgument, match=r"items\[1\]"):
        check_items([ITEM, bad], 128)


def test_counts_and_duplicates_are_checked() -> None:
    check_items([ITEM, replace(ITEM, item_id="new-2", year=0, genres=())], 128)
    for items in ([], [ITEM] * 2, [replace(ITEM, item_id=f"x{n}") for n in range(1001)]):
        with pytest.raises(InvalidArgument):
            check_items(items, 128)
    for ids in ([], ["a", "a"], [""], ["x" * 129]):
        with pytest.raises(InvalidArgument):
            check_ids(ids, 128)


def test_codecs_round_trip() -> None:
    live = LiveItem(replace(ITEM, available_from=5.5), 12.25, True, "m1",
                    np.arange(4, dtype=np.float32), 3).co_visited(np.array([5, 2, 5]))
    back = LiveItem.decode(ITEM.item_id, live.encode())
    assert back.item == live.item and (back.put_at, back.taken_down) == (12.25, True)
    assert back.model_version == "m1" and back.learned_plays == 3 and back.viewers == 1
    assert back.vector.tolist() == [0, 1, 2, 3]
    assert back.co_rows.tolist() == [2, 5] and back.co_counts.tolist() == [1.0, 2.0]
    stats = ItemStats.empty("m1", 3).played(np.array([1.0, 2, 3]), 0.5, True)
    again = ItemStats.decode(stats.encode(), 3)
    assert again.model_version == "m1" and again.viewers == 1
    for name in ("outer", "upper", "linear", "weighted"):
        assert np.array_equal(getattr(again, name), getattr(stats, name))
    with pytest.raises(ValueError):
        ItemStats.decode(stats.encode(), 4)


def test_the_start_is_the_mean_of_its_genres_means(catalog: CatalogSnapshot) -> None:
    factors = np.asarray(catalog.item_factors, np.float64)
    means = [factors[[r for r in range(len(catalog)) if g in catalog.genres_of(r)]].mean(axis=0)
             for g in ITEM.genres]
    assert np.allclose(start_vector(catalog, ITEM.genres), np.mean(means, axis=0), atol=1e-6)
    assert np.allclose(start_vector(catalog, ("no-such",)), factors.mean(axis=0), atol=1e-6)


def test_the_item_fold_in_is_the_als_solution_over_the_viewers(catalog: CatalogSnapshot) -> None:
    rng = np.random.default_rng(1)
    viewers = rng.normal(size=(4, catalog.dim))
    weights = [1.0, 0.5, 2.0, 0.25]
    stats = ItemStats.empty(catalog.model_version, catalog.dim)
    for x, w in zip(viewers, weights, strict=True):
        stats = stats.played(x, w, True)
    stats = stats.played(viewers[0], 1.0, False)  # a second play by the first viewer
    als = catalog.manifest.als
    c = 1 + float(als["alpha"]) * np.array([2.0, 0.5, 2.0, 0.25])
    system = float(als["regularization"]) * np.eye(catalog.dim) + (viewers.T * c) @ viewers
    want = np.linalg.solve(system, viewers.T @ c)
    assert np.allclose(learned_vector(catalog, stats), want, rtol=1e-4, atol=1e-5)
    assert learned_vector(catalog, ItemStats.empty("m", catalog.dim)) is None


@pytest.fixture()
def store(tmp_path: Path) -> UserStore:
    return UserStore(tmp_path / "users.lmdb")


def test_puts_take_downs_and_the_change_feed(store: UserStore, catalog: CatalogSnapshot) -> None:
    snapshot_id = catalog.item_ids[7]
    written = store.transact(lambda w: put_items(
        w, catalog, [ITEM, CatalogItem(snapshot_id, "x", (), 0, 0.0, 99.0)], 10.0))
    assert (written.added, written.updated, written.catalog_version) == (1, 1, 2)
    items = read_items(store)
    assert np.allclose(items["new-1"].vector, start_vector(catalog, ITEM.genres))
    assert items["new-1"].model_version == catalog.model_version
    assert not len(items[snapshot_id].vector)  # a snapshot item's factor is the snapshot's
    down = store.transact(lambda w: take_down(w, catalog, ["new-1", catalog.item_ids[3], "no"],
                                              11.0))
    assert (down.taken_down, down.unknown, down.catalog_version) == (2, ("no",), 4)
    assert read_items(store)[catalog.item_ids[3]].taken_down
    assert changed_since(store, 0) == (4, ["new-1", snapshot_id, catalog.item_ids[3]])
    assert changed_since(store, 4) == (4, [])
    store.transact(lambda w: prune_changes(w, keep=1))
    assert changed_since(store, 1) is None  # the feed no longer reaches back: read all
    assert changed_since(store, 3) == (4, [catalog.item_ids[3]])
    again = store.transact(lambda w: put_items(w, catalog, [ITEM], 12.0))
    assert again.updated == 1 and not read_items(store)["new-1"].taken_down
    assert catalog_version(store) == 5


def test_plays_teach_live_items_and_are_kept_for_the_build(store: UserStore,
                                                           catalog: CatalogSnapshot) -> None:
    store.transact(lambda w: put_items(w, catalog, [ITEM], 1.0))
    fan = replace(record_of(catalog, [(catalog.item_ids[0], 1.0, 0.0)], "fan"),
                  vector=np.ones(catalog.dim, np.float32), model_version=catalog.model_version)
    vectorless = record_of(catalog, [], "new-user")
    plays = {"fan": [("new-1", 1.0, 5.0), (catalog.item_ids[1], 1.0, 5.0)],
             "new-user": [("new-1", 0.5, 6.0)], "absent": [("new-1", 1.0, 7.0)]}
    changed = store.transact(lambda w: learn(w, catalog, plays,
                                             {"fan": fan, "new-user": vectorless}))
    assert changed == ["new-1"]
    live = read_items(store)["new-1"]
    stats = ItemStats.empty(catalog.model_version, catalog.dim).played(fan.vector, 1.0, True)
    assert live.learned_plays == 1
    assert np.allclose(live.vector, learned_vector(catalog, stats), atol=1e-6)
    items, taken = taken_in(store, set(catalog.item_ids))
    assert [i.item_id for i in items] == ["new-1"]
    assert sorted(taken) == [("absent", "new-1", 1.0, 7.0), ("fan", "new-1", 1.0, 5.0),
                             ("new-user", "new-1", 0.5, 6.0)]
    assert taken_in(store, {*catalog.item_ids, "new-1"}) == ([], [])


def test_a_model_change_refolds_live_items_from_their_viewers(
        store: UserStore, catalog: CatalogSnapshot) -> None:
    store.transact(lambda w: put_items(w, catalog, [ITEM], 1.0))
    fan = replace(record_of(catalog, [(catalog.item_ids[0], 1.0, 0.0)], "fan"),
                  vector=np.ones(catalog.dim, np.float32), model_version=catalog.model_version)
    store.transact(lambda w: w.put_user(fan))
    store.transact(lambda w: learn(w, catalog, {"fan": [("new-1", 1.0, 5.0)]}, {"fan": fan}))
    learned = read_items(store)["new-1"].vector.copy()
    # Stored under another model: the re-fold recomputes it from the viewer's vector.
    store.transact(lambda w: w.put_raw("live_items", b"new-1", replace(
        read_items(store)["new-1"], model_version="old", vector=np.zeros(3, np.float32))
        .encode()))
    assert store.transact(lambda w: refold_items(w, catalog)) == 1
    again = read_items(store)["new-1"]
    assert again.model_version == catalog.model_version and again.learned_plays == 1
    assert np.allclose(again.vector, learned, atol=1e-5)
    assert store.transact(lambda w: refold_items(w, catalog)) == 0  # nothing stale now


def test_the_segment_serves_what_is_servable_now(catalog: CatalogSnapshot) -> None:
    n = len(catalog)
    items = {
        "a": LiveItem(replace(ITEM, item_id="a"), 3.0, model_version=catalog.model_version,
                      vector=np.full(catalog.dim, 2.0, np.float32)),
        "b": LiveItem(replace(ITEM, item_id="b", genres=("only-live",), year=1990), 1.0,
                      model_version="another", vector=np.ones(2, np.float32)),
        "later": LiveItem(replace(ITEM, item_id="later", available_from=200.0), 1.0),
        "down": LiveItem(replace(ITEM, item_id="down"), 1.0, taken_down=True),
        catalog.item_ids[5]: LiveItem(CatalogItem(catalog.item_ids[5], "t"), 1.0,
                                      taken_down=True),
        catalog.item_ids[6]: LiveItem(CatalogItem(catalog.item_ids[6], "t",
                                                  available_until=50.0), 1.0),
    }
    segment = LiveSegment.of(items, catalog, 100.0, 9)
    assert segment.item_ids == ("b", "a")  # in the order put
    assert segment.offset == -(-n // 8) * 8 and segment.rows["a"] == segment.offset + 1
    assert segment.blocked.tolist() == sorted([5, 6]) and segment.next_change == 200.0
    assert np.allclose(segment.vectors[0], start_vector(catalog, ("only-live",)))  # other model
    live = LiveCatalog.of(catalog, segment, {"a": 4.0}, 0.5)
    assert live.row_of(catalog.item_ids[5]) is None and live.row_of("down") is None
    assert live.row_of("a") == segment.offset + 1 and live.row_of(catalog.item_ids[1]) == 1
    every = unpack(live.every(), segment.offset + len(segment))
    assert not every[[5, 6]].any() and every[[0, 1, 7]].all()
    assert not every[n:segment.offset].any() and every[segment.offset:].all()
    by_genre = live.allowed(ItemFilter(genres_any=("only-live",)))
    assert by_genre is not None
    allowed = unpack(by_genre, segment.offset + len(segment))
    assert np.flatnonzero(allowed).tolist() == [segment.offset]  # "b" alone
    recent = unpack(live.allowed(ItemFilter(min_year=2000)), segment.offset + 2)  # type: ignore[arg-type]
    assert recent[segment.offset + 1] and not recent[segment.offset]
    assert live.live_popular[1] > 0 and live.live_popular[0] == 0
    assert LiveCatalog.of(catalog, LiveSegment.empty(catalog), {}, 0.5).allowed(
        ItemFilter()) is None


def test_the_live_search_finds_the_exact_top_k_through_its_8_bit_codes(
        catalog: CatalogSnapshot) -> None:
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(3000, catalog.dim)).astype(np.float32)
    items = {f"l{n}": LiveItem(replace(ITEM, item_id=f"l{n}"), float(n),
                               model_version=catalog.model_version, vector=vectors[n])
             for n in range(len(vectors))}
    segment = LiveSegment.of(items, catalog, 0.0, 1)
    live = LiveCatalog.of(catalog, segment, {}, 0.5)
    retrieve = Retriever(live=live, brute_force_below=0, blend_weight=0.5,
                         neighbour_candidates=10)
    allowed = live.every()
    clear(allowed, [segment.offset + 7])  # a bitmap is honoured
    found = exact = 0
    for query in rng.normal(size=(50, catalog.dim)).astype(np.float32):
        got = retrieve.new_releases(Query(vector=query, played=np.zeros(0, np.int64),
                                          reached=Candidates.empty()), 10, allowed)
        scores = vectors @ query
        scores[7] = -np.inf
        want = set((np.argsort(-scores)[:10] + segment.offset).tolist())
        found += len(want & {s.row for s in got})
        exact += all(abs(s.score - float(vectors[s.row - segment.offset] @ query)) < 1e-4
                     for s in got)
        assert segment.offset + 7 not in {s.row for s in got}
    assert found / 500 >= 0.99 and exact == 50


def test_live_items_are_co_visitation_neighbours_of_what_their_viewers_played(
        store: UserStore, catalog: CatalogSnapshot) -> None:
    store.transact(lambda w: put_items(w, catalog, [ITEM], 1.0))
    window = int(catalog.manifest.neighbours["window"])
    history = [(catalog.item_ids[r], 1.0, float(r)) for r in range(window + 5)]
    fan = catalog.fit(record_of(catalog, history, "fan"))
    store.transact(lambda w: learn(w, catalog, {"fan": [("new-1", 1.0, 99.0)]}, {"fan": fan}))
    live = read_items(store)["new-1"]
    # The latest window + 1 plays, as the batch build pairs them.
    assert live.viewers == 1 and sorted(live.co_rows.tolist()) == list(range(4, window + 5))
    segment = LiveSegment.of({"new-1": live}, catalog, 0.0, 1)
    row = segment.rows["new-1"]
    reached = segment.reach(np.array([10, 4, 0]), np.array([1.0, 0.5, 1.0]))
    score = 1 / np.sqrt(catalog.popularity[[10, 4]].astype(np.float64))
    assert reached.rows.tolist() == [row] and reached.anchors.tolist() == [10]
    assert np.isclose(reached.scores[0], score[0] + 0.5 * score[1])
    assert not len(segment.reach(np.array([0]), np.ones(1)).rows)


def test_log_mode_messages_apply_as_the_requests_do(store: UserStore,
                                                    catalog: CatalogSnapshot) -> None:
    windowed = replace(ITEM, available_from=5.0, available_until=50.0)
    put = parse_message(write_message(items=[windowed]), 128)
    store.transact(lambda w: apply_message(w, catalog, put, 1.0))
    assert read_items(store)["new-1"].item == windowed
    down = parse_message(write_message(take_down_ids=["new-1"]), 128)
    store.transact(lambda w: apply_message(w, catalog, down, 2.0))
    assert read_items(store)["new-1"].taken_down
    for bad in (b'{"op": "rename"}', write_message(items=[replace(ITEM, item_id="")]),
                b'{"op": "put", "items": [{"id": "x"}]}', b"[1, 2]", b"\xff",
                b'{"op": "put", "items": [{"id": "x", "title": {}, "genres": 5, "year": 1,'
                b' "from": 0, "until": 0}]}', b'{"op": "take_down", "ids": 3}'):
        with pytest.raises(ValueError):
            parse_message(bad, 128)


def test_a_hosts_plays_are_what_a_records_live_entries_gained(catalog: CatalogSnapshot) -> None:
    before = record_of(catalog, [("new-1", 1.0, 5.0), (catalog.item_ids[0], 1.0, 5.0)], "u")
    after, _ = before.with_plays([("new-1", 0.5, 9.0), ("new-2", 1.0, 8.0),
                                  (catalog.item_ids[1], 1.0, 9.0)], catalog.item_index, 500)
    plays = plays_between(before, after, {"new-1", "new-2"})
    assert sorted(plays) == [("new-1", 0.5, 9.0), ("new-2", 1.0, 8.0)]
    assert plays_between(None, before, {"new-1"}) == [("new-1", 1.0, 5.0)]
    assert plays_between(after, after, {"new-1", "new-2"}) == []


def test_a_worker_serves_puts_at_once_and_learned_vectors_at_most_every_interval(
        tmp_path: Path, data_dir: Path, catalog: CatalogSnapshot) -> None:
    shutil.copytree(data_dir, tmp_path / "data")
    with UserStore(tmp_path / "data" / "users.lmdb") as store:
        ranker = Ranker(tmp_path / "data" / "snapshots", store,
                        RankingConfig(live_learn_refresh_s=0.3))
        assert ranker.refresh_live()  # the first look reads everything
        assert not ranker.refresh_live()
        store.transact(lambda w: put_items(w, catalog, [ITEM], time.time()))
        assert ranker.refresh_live() and "new-1" in ranker.live.segment.rows  # at once
        fan = replace(record_of(catalog, [(catalog.item_ids[0], 1.0, 0.0)], "fan"),
                      vector=np.ones(catalog.dim, np.float32),
                      model_version=catalog.model_version)
        store.transact(lambda w: learn(w, catalog, {"fan": [("new-1", 1.0, 5.0)]}, {"fan": fan}))
        assert not ranker.refresh_live()  # learned: waits for the interval
        time.sleep(0.35)
        assert ranker.refresh_live()
        row = ranker.live.segment.rows["new-1"] - ranker.live.segment.offset
        assert np.allclose(ranker.live.segment.vectors[row], read_items(store)["new-1"].vector)
        store.transact(lambda w: take_down(w, catalog, ["new-1"], time.time()))
        assert ranker.refresh_live() and "new-1" not in ranker.live.segment.rows  # at once


def test_the_live_scan_is_skipped_only_when_no_live_item_can_enter_the_top_k(
        catalog: CatalogSnapshot) -> None:
    rng = np.random.default_rng(9)
    query = np.asarray(catalog.item_factors[3], np.float32)
    vectors = (rng.normal(size=(200, catalog.dim)) * 1e-3).astype(np.float32)  # no match
    items = {f"l{n}": LiveItem(replace(ITEM, item_id=f"l{n}"), float(n),
                               model_version=catalog.model_version, vector=vectors[n])
             for n in range(len(vectors))}

    def top(items: dict[str, LiveItem]) -> tuple[LiveSegment, list[int], set[int]]:
        segment = LiveSegment.of(items, catalog, 0.0, 1)
        live = LiveCatalog.of(catalog, segment, {}, 0.5)
        retrieve = Retriever(live=live, brute_force_below=0, blend_weight=0.5,
                             neighbour_candidates=10)
        found = retrieve.search(query, 10, None)
        ranked = retrieve.personal(Query(vector=query, played=np.zeros(0, np.int64),
                                         reached=Candidates.empty(), retrieval="vector"),
                                   10, None)
        return segment, [s.row for s in ranked], set(found.tolist())

    segment, ranked, found = top(items)
    assert not any(r >= segment.offset for r in found)  # pruned: none could compete
    exact = np.argsort(-(np.asarray(catalog.item_factors) @ query), kind="stable")[:10]
    assert ranked == exact.tolist()
    strong = {**items, "star": LiveItem(replace(ITEM, item_id="star"), 999.0,
                                        model_version=catalog.model_version, vector=query * 2)}
    segment, ranked, found = top(strong)
    assert ranked[0] == segment.rows["star"]  # it could, so it was searched, and wins
