"""The live catalog end to end: puts, plays and take-downs reach every RPC of every ranking
worker within a second, bad writes change nothing, and a batch build takes the items in.

The event service runs as its own process (the store's one writer) and the ranking
service as two worker processes sharing a port; each worker is reached on its own
connection (`worker_channels`).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bench.services import start_process, stop
from eventlog.cluster import free_port
from freshrec.client import Client
from index.build import build
from index.catalog import CatalogSnapshot
from index.snapshot import current_version
from index.tables import Dataset
from recsys.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
)
from tests.conftest import SMALL_ALS
from tests.integration.conftest import playback, status_of, within, worker_channels

Reason = ranking_pb2.Reason
VISIBLE_S = 1.0  # the bound: a write is honoured on every worker within this


@dataclass
class Live:
    """The services over one data dir, and stubs to every part of them."""

    data_dir: Path
    items: catalog_pb2_grpc.ItemServiceStub
    events: events_pb2_grpc.EventServiceStub
    workers: dict[str, ranking_pb2_grpc.RankingServiceStub]  # by server id
    procs: list
    targets: tuple[str, str]  # the event service's and the ranking service's


def _start_events(data_dir: Path, port: int = 0) -> tuple[object, int]:
    return start_process("event_service", data_dir, "--snapshot-poll-s", "0.2", port=port)


@pytest.fixture()
def live(fresh_data_dir: Path) -> Iterator[Live]:
    events_proc, events_port = _start_events(fresh_data_dir)
    port = free_port()
    ranking_proc, _ = start_process("ranking_service", fresh_data_dir, "--catalog-poll-s", "0.2",
                                    port=port, workers=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{events_port}")
    channels = worker_channels(port, per_worker=1)
    running = Live(fresh_data_dir, catalog_pb2_grpc.ItemServiceStub(channel),
                   events_pb2_grpc.EventServiceStub(channel),
                   {w: ranking_pb2_grpc.RankingServiceStub(c[0]) for w, c in channels.items()},
                   [ranking_proc, events_proc], (f"127.0.0.1:{events_port}", f"127.0.0.1:{port}"))
    try:
        yield running
    finally:
        channel.close()
        for worker_channel in channels.values():
            worker_channel[0].close()
        assert stop(running.procs) == [0] * len(running.procs)


def _item(item_id: str, genres: tuple[str, ...] = ("genre-00",), year: int = 2026,
          title: str | None = None, **window: float) -> catalog_pb2.CatalogItem:
    stamps = {}
    for name, at in window.items():
        stamps[name] = Timestamp()
        stamps[name].FromNanoseconds(int(at * 1e9))
    return catalog_pb2.CatalogItem(item_id=item_id,
                                   title=f"Title of {item_id}" if title is None else title,
                                   genres=genres, year=year, **stamps)


def _home_ids(stub: ranking_pb2_grpc.RankingServiceStub, user: str, row: str | None = None,
              k: int = 10) -> list[str]:
    page = stub.HomePage(ranking_pb2.HomePageRequest(user_id=user, k_per_row=k))
    return [i.item_id for r in page.rows if row is None or r.id == row for i in r.items]


def _recommended(stub: ranking_pb2_grpc.RankingServiceStub, user: str, k: int = 10,
                 **request: object) -> list[str]:
    response = stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=k, **request))
    return [i.item_id for i in response.items]


def _cluster_users(dataset: Dataset, cluster: int) -> list[str]:
    return sorted(u for u, c in dataset.user_clusters.items() if c == cluster)


def test_a_put_item_is_a_new_release_on_every_worker_within_a_second(live: Live) -> None:
    put = live.items.PutItems(catalog_pb2.PutItemsRequest(items=[_item("premiere")]))
    acked = time.monotonic()
    assert (put.added, put.updated) == (1, 0) and put.catalog_version >= 1
    for stub in live.workers.values():
        for user in ("u1", "someone-new"):  # a known user (by taste) and an unknown one
            within(VISIBLE_S - (time.monotonic() - acked),
                    lambda s=stub, u=user: "premiere" in _home_ids(s, u, "new_releases"))
        page = stub.HomePage(ranking_pb2.HomePageRequest(user_id="u1", k_per_row=10))
        row = next(r for r in page.rows if r.id == "new_releases")
        item = next(i for i in row.items if i.item_id == "premiere")
        assert item.title == "Title of premiere" and list(item.genres) == ["genre-00"]
        assert item.reason.kind == Reason.NEW_RELEASE and item.year == 2026
    state = live.items.GetItem(catalog_pb2.GetItemRequest(item_id="premiere"))
    assert state.live and not state.in_snapshot and state.available and not state.taken_down
    assert state.learned_plays == 0 and state.model_version == "small-v1"


def test_five_plays_by_one_cluster_reach_its_other_users_and_no_other_cluster(
        live: Live, small_dataset: Dataset) -> None:
    live.items.PutItems(catalog_pb2.PutItemsRequest(items=[_item("new-c0")]))
    fans = _cluster_users(small_dataset, 0)
    players, others = fans[:5], fans[5:25]
    strangers = _cluster_users(small_dataset, 5)[:20]
    for n, user in enumerate(players):
        response = live.events.Track(events_pb2.TrackRequest(
            event=playback(f"play-{n}", user, "new-c0")))
        assert response.item_known
    acked = time.monotonic()
    state = live.items.GetItem(catalog_pb2.GetItemRequest(item_id="new-c0"))
    assert state.learned_plays == 5
    vector = {"retrieval": ranking_pb2.RETRIEVAL_VECTOR}
    for stub in live.workers.values():
        # In the top 10 of the default blend (its vector and its co-visits with the
        # users' plays) and of the vector alone.
        def reached(s: ranking_pb2_grpc.RankingServiceStub = stub) -> bool:
            return all(sum("new-c0" in _recommended(s, u, **how) for u in others) >=
                       0.8 * len(others) for how in ({}, vector))
        within(VISIBLE_S - (time.monotonic() - acked), reached)
        assert not any("new-c0" in _recommended(stub, u, k=20) + _recommended(stub, u, **vector)
                       for u in strangers)
        # The players watched it: never offered to them again.
        assert not any("new-c0" in _recommended(stub, u, k=50) for u in players)


def test_a_take_down_is_honoured_by_every_rpc_of_every_worker(
        live: Live, small_dataset: Dataset, catalog: CatalogSnapshot) -> None:
    user = _cluster_users(small_dataset, 0)[0]
    first = next(iter(live.workers.values()))
    taste = _recommended(first, user)[0]  # the user's best, and the most popular item
    popular = _recommended(first, "nobody")[0]
    genres = list(catalog.genres_of(catalog.item_index[taste]))
    gone = {taste, popular}
    response = live.items.TakeDownItems(catalog_pb2.TakeDownItemsRequest(
        item_ids=[taste, popular, "never-was"]))
    acked = time.monotonic()
    assert response.taken_down == 2 and list(response.unknown_item_ids) == ["never-was"]

    def honoured(stub: ranking_pb2_grpc.RankingServiceStub) -> bool:
        shown = set(_home_ids(stub, user)) | set(_home_ids(stub, "nobody"))
        for retrieval in (ranking_pb2.RETRIEVAL_BLEND, ranking_pb2.RETRIEVAL_VECTOR,
                          ranking_pb2.RETRIEVAL_NEIGHBOURS):
            shown |= set(_recommended(stub, user, k=50, retrieval=retrieval))
        shown |= set(_recommended(stub, user, k=50, include_watched=True,
                                  filter=ranking_pb2.Filter(genres_any=genres)))
        shown |= set(_recommended(stub, "nobody", k=50))
        ranked = stub.RankItems(ranking_pb2.RankItemsRequest(user_id=user,
                                                             item_ids=[taste, popular, "i1"]))
        similar = status_of(stub.SimilarItems,
                            ranking_pb2.SimilarItemsRequest(item_id=taste, k=5))
        return not shown & gone and set(ranked.unknown_item_ids) == gone and \
            similar == grpc.StatusCode.NOT_FOUND

    for stub in live.workers.values():
        within(VISIBLE_S - (time.monotonic() - acked), lambda s=stub: honoured(s))
    state = live.items.GetItem(catalog_pb2.GetItemRequest(item_id=taste))
    assert state.in_snapshot and state.taken_down and not state.available
    # Put again: served again, as before.
    row = catalog.item_index[taste]
    live.items.PutItems(catalog_pb2.PutItemsRequest(items=[catalog_pb2.CatalogItem(
        item_id=taste, title=catalog.titles[row], genres=genres, year=int(catalog.years[row]))]))
    for stub in live.workers.values():
        within(VISIBLE_S, lambda s=stub: _recommended(s, user)[0] == taste)


def test_an_item_is_served_only_inside_its_window(live: Live) -> None:
    now = time.time()
    with Client(*live.targets) as client:  # the package's client, as an admin tool uses it
        put = client.put_items([
            _item("tonight", available_from=now + 1.5), _item("gone", available_until=now - 60),
            _item("now", available_from=now - 60, available_until=now + 3600)])
        assert put.added == 3
        assert not client.get_item("gone").available and client.get_item("now").available
    stub = next(iter(live.workers.values()))
    within(VISIBLE_S, lambda: "now" in _home_ids(stub, "u2", "new_releases"))
    assert not {"tonight", "gone"} & set(_home_ids(stub, "u2", "new_releases"))
    assert status_of(stub.SimilarItems, ranking_pb2.SimilarItemsRequest(
        item_id="tonight", k=3)) == grpc.StatusCode.NOT_FOUND
    # The window opens without any other write.
    within(1.5 + VISIBLE_S, lambda: "tonight" in _home_ids(stub, "u2", "new_releases"))
    assert stub.SimilarItems(ranking_pb2.SimilarItemsRequest(item_id="tonight", k=3)).items


def _bad_puts() -> list[tuple[str, list[catalog_pb2.CatalogItem]]]:
    bad_stamp = Timestamp(seconds=10, nanos=2_000_000_000)
    return [
        ("no items", []),
        ("1,001 items", [_item(f"x{n}") for n in range(1001)]),
        ("an empty id", [_item("")]),
        ("an id of 129 bytes", [_item("x" * 129)]),
        ("a control character in the id", [_item("x\n1")]),
        ("the same id twice", [_item("dup"), _item("dup")]),
        ("an empty title", [_item("x1", title="")]),
        ("a newline in the title", [_item("x1", title="two\nlines")]),
        ("a year below 1800", [_item("x1", year=1200)]),
        ("a negative year", [_item("x1", year=-5)]),
        ("a year of 99,999", [_item("x1", year=99_999)]),
        ("an empty genre", [_item("x1", genres=("",))]),
        ("a genre with '|'", [_item("x1", genres=("a|b",))]),
        ("a genre twice", [_item("x1", genres=("g", "g"))]),
        ("33 genres", [_item("x1", genres=tuple(f"g{n}" for n in range(33)))]),
        ("a window that closes before it opens",
         [_item("x1", available_from=2e9, available_until=1e9)]),
        ("bad nanos", [catalog_pb2.CatalogItem(item_id="x1", title="t",
                                               available_from=bad_stamp)]),
        ("one bad item among good ones", [_item("good-1"), _item(""), _item("good-2")]),
    ]


def test_bad_writes_get_invalid_argument_and_change_nothing(live: Live) -> None:
    before = live.items.GetItem(catalog_pb2.GetItemRequest(item_id="i1")).catalog_version
    for label, items in _bad_puts():
        with pytest.raises(grpc.RpcError) as error:
            live.items.PutItems(catalog_pb2.PutItemsRequest(items=items))
            pytest.fail(f"{label}: accepted")
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert error.value.details(), label
    for ids in ([], ["i1", "i1"], [""], ["x" * 129], [f"x{n}" for n in range(1001)]):
        assert status_of(live.items.TakeDownItems, catalog_pb2.TakeDownItemsRequest(
            item_ids=ids)) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(live.items.GetItem, catalog_pb2.GetItemRequest(item_id="")) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(live.items.GetItem, catalog_pb2.GetItemRequest(item_id="good-1")) == \
        grpc.StatusCode.NOT_FOUND
    after = live.items.GetItem(catalog_pb2.GetItemRequest(item_id="i1"))
    assert after.catalog_version == before and not after.taken_down
    # A message past the server's size limit: RESOURCE_EXHAUSTED, and still nothing.
    huge = [_item(f"h{n}", title="t" * 500) for n in range(1000)] * 40
    assert status_of(live.items.PutItems, catalog_pb2.PutItemsRequest(items=huge)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert live.items.GetItem(catalog_pb2.GetItemRequest(item_id="i1")).catalog_version == before


def test_the_live_catalog_survives_kill_9_of_the_event_service(live: Live) -> None:
    live.items.PutItems(catalog_pb2.PutItemsRequest(items=[_item("durable")]))
    events_proc = live.procs[1]
    events_proc.send_signal(signal.SIGKILL)  # right after the ack
    events_proc.wait(10)
    restarted, port = _start_events(live.data_dir)
    live.procs[1] = restarted
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        state = catalog_pb2_grpc.ItemServiceStub(channel).GetItem(
            catalog_pb2.GetItemRequest(item_id="durable"))
    assert state.live and state.available
    for stub in live.workers.values():
        within(VISIBLE_S, lambda s=stub: "durable" in _home_ids(s, "u3", "new_releases"))


def test_a_build_takes_the_live_items_in_and_serving_switches_without_a_failed_call(
        live: Live, small_dataset: Dataset) -> None:
    live.items.PutItems(catalog_pb2.PutItemsRequest(items=[_item("new-c0")]))
    fans = _cluster_users(small_dataset, 0)
    for n, user in enumerate(fans[:5]):
        live.events.Track(events_pb2.TrackRequest(event=playback(f"play-{n}", user, "new-c0")))
    failures: list[str] = []
    versions: dict[str, str] = {}
    done = threading.Event()

    def client(worker: str, stub: ranking_pb2_grpc.RankingServiceStub) -> None:
        while not done.is_set():
            try:
                response = stub.Recommend(ranking_pb2.RecommendRequest(user_id=fans[6], k=10),
                                          timeout=10)
                versions[worker] = response.model_version
            except grpc.RpcError as error:
                failures.append(f"{worker}: {error.code()} {error.details()}")

    clients = [threading.Thread(target=client, args=item) for item in live.workers.items()]
    for thread in clients:
        thread.start()
    try:
        build(small_dataset, live.data_dir, SMALL_ALS, index="flat", version="small-v2",
              log=lambda _: None)
        assert current_version(live.data_dir / "snapshots") == "small-v2"
        within(10, lambda: set(versions.values()) == {"small-v2"} and len(versions) == 2)
    finally:
        done.set()
        for thread in clients:
            thread.join()
    assert not failures
    built = CatalogSnapshot.load(live.data_dir / "snapshots", "small-v2")
    row = built.item_index["new-c0"]
    assert built.titles[row] == "Title of new-c0" and built.genres_of(row) == ["genre-00"]
    assert float(abs(built.item_factors[row]).sum()) > 0  # trained, from its five plays
    def state() -> catalog_pb2.ItemState:
        return live.items.GetItem(catalog_pb2.GetItemRequest(item_id="new-c0"))

    within(10, lambda: state().in_snapshot)
    assert not state().live and state().model_version == "small-v2"
    # Its trained factor has the taste of the cluster that played it.
    def model_of(user: str) -> str:
        return live.events.GetUser(events_pb2.GetUserRequest(user_id=user)).model_version

    everyone = [*fans[5:25], *_cluster_users(small_dataset, 5)[:20]]
    within(10, lambda: {model_of(u) for u in everyone} == {"small-v2"})  # re-folded

    def affinity(user: str) -> float:
        vector = live.events.GetUser(events_pb2.GetUserRequest(user_id=user)).vector
        return float(built.item_factors[row] @ np.array(vector, np.float32))

    assert min(map(affinity, fans[5:25])) > \
        max(map(affinity, _cluster_users(small_dataset, 5)[:20]))
