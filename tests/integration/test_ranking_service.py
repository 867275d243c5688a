"""The ranking service through its gRPC API, on a real port, over real LMDB and FAISS."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from bench.services import start_process, stop
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.snapshot import INDEX_FILE, IndexSpec, current_version, set_current, write_snapshot
from index.tables import Dataset
from recsys.v1 import catalog_pb2, events_pb2, events_pb2_grpc, ranking_pb2
from tests.conftest import SMALL_ALS
from tests.integration.conftest import (
    RunningRanking,
    allows,
    playback,
    ranking_settings,
    second_snapshot,
)

FILTERS = [
    ranking_pb2.Filter(genres_any=["genre-01"]),
    ranking_pb2.Filter(genres_any=["genre-02", "genre-05"], genres_none=["genre-05"]),
    ranking_pb2.Filter(genres_none=["genre-00", "genre-01", "genre-02"]),
    ranking_pb2.Filter(min_year=2000),
    ranking_pb2.Filter(max_year=1960),
    ranking_pb2.Filter(genres_any=["genre-03"], min_year=1990, max_year=1992),
]


def _qualifying(catalog: CatalogSnapshot, spec: ranking_pb2.Filter, exclude: set[str]) -> int:
    return sum(allows(ranking_pb2.ScoredItem(genres=catalog.genres_of(r),
                                              year=int(catalog.years[r])), spec)
               and catalog.item_ids[r] not in exclude for r in range(len(catalog)))


def _watched(ranking: RunningRanking, user: str) -> set[str]:
    record = ranking.deps.store.get_user(user)
    assert record is not None
    return set(record.item_ids)


@pytest.mark.parametrize("spec", FILTERS, ids=str)
def test_filters_are_honoured_and_k_items_come_back_when_k_qualify(
    ranking: RunningRanking, catalog: CatalogSnapshot, spec: ranking_pb2.Filter
) -> None:
    watched = _watched(ranking, "u4")
    for user, exclude in (("u4", watched), ("no-such-user", set())):
        response = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=50,
                                                                       filter=spec))
        assert all(allows(i, spec) for i in response.items)
        assert not {i.item_id for i in response.items} & exclude
        assert len(response.items) == min(50, _qualifying(catalog, spec, exclude))
        assert len({i.item_id for i in response.items}) == len(response.items)


def test_watched_items_come_back_only_when_asked(ranking: RunningRanking) -> None:
    watched = _watched(ranking, "u8")
    without = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u8", k=100))
    with_watched = ranking.stub.Recommend(ranking_pb2.RecommendRequest(
        user_id="u8", k=100, include_watched=True))
    assert not {i.item_id for i in without.items} & watched
    assert {i.item_id for i in with_watched.items} & watched
    assert without.source == ranking_pb2.PERSONALIZED
    scores = [i.score for i in without.items]
    assert scores == sorted(scores, reverse=True)


def test_unknown_user_gets_popular_items(ranking: RunningRanking,
                                         catalog: CatalogSnapshot) -> None:
    response = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="stranger", k=5))
    assert response.source == ranking_pb2.POPULAR and response.user_version == 0
    most_popular = np.argsort(-catalog.popularity, kind="stable")[:5]
    assert [i.item_id for i in response.items] == [catalog.item_ids[r] for r in most_popular]
    assert response.model_version == catalog.model_version


@pytest.mark.parametrize("request_, detail", [
    (ranking_pb2.RecommendRequest(user_id="u1", k=0), "k must be in"),
    (ranking_pb2.RecommendRequest(user_id="u1", k=501), "k must be in"),
    (ranking_pb2.RecommendRequest(user_id="", k=5), "user_id is empty"),
    (ranking_pb2.RecommendRequest(user_id="u1", k=5,
                                  filter=ranking_pb2.Filter(genres_any=["opera"])),
     "unknown genre"),
    (ranking_pb2.RecommendRequest(user_id="u1", k=5,
                                  filter=ranking_pb2.Filter(min_year=2000, max_year=1990)),
     "bad year range"),
])
def test_bad_requests_are_invalid_argument(ranking: RunningRanking,
                                           request_: ranking_pb2.RecommendRequest,
                                           detail: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        ranking.stub.Recommend(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in error.value.details()


def test_similar_items(ranking: RunningRanking, catalog: CatalogSnapshot,
                       small_dataset: Dataset) -> None:
    spec = ranking_pb2.Filter(genres_any=["genre-01"])
    response = ranking.stub.SimilarItems(ranking_pb2.SimilarItemsRequest(item_id="i10", k=10,
                                                                         filter=spec))
    assert len(response.items) == 10 and "i10" not in {i.item_id for i in response.items}
    assert all(allows(i, spec) for i in response.items)
    plain = ranking.stub.SimilarItems(ranking_pb2.SimilarItemsRequest(item_id="i10", k=10))
    assert small_dataset.item_clusters is not None
    clusters = small_dataset.item_clusters
    same = [clusters[catalog.item_index[i.item_id]] == clusters[10] for i in plain.items]
    assert sum(same) >= 8
    with pytest.raises(grpc.RpcError) as error:
        ranking.stub.SimilarItems(ranking_pb2.SimilarItemsRequest(item_id="nope", k=3))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_home_page_rows_never_repeat_an_item(ranking: RunningRanking) -> None:
    watched = _watched(ranking, "u30")
    page = ranking.stub.HomePage(ranking_pb2.HomePageRequest(user_id="u30", k_per_row=8))
    ids = [r.id for r in page.rows]
    assert ids == ["because_you_watched", "top_picks", "new_releases", "trending"]
    shown = [i.item_id for r in page.rows for i in r.items]
    assert len(shown) == len(set(shown)) == 32
    assert not set(shown) & watched
    assert all(i.year >= 2023 for i in page.rows[2].items)
    stranger = ranking.stub.HomePage(ranking_pb2.HomePageRequest(user_id="x", k_per_row=4))
    assert [r.id for r in stranger.rows] == ["top_picks", "new_releases", "trending"]
    assert all(r.source == ranking_pb2.POPULAR for r in stranger.rows)
    shown = [i.item_id for r in stranger.rows for i in r.items]
    assert len(shown) == len(set(shown)) == 12


def _call_by_reflection(channel: grpc.Channel, service: str, method: str,
                        request: dict) -> object:
    """Call an RPC knowing only its name, as grpcurl does: everything from reflection."""
    from google.protobuf import json_format, message_factory
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    descriptor = pool.FindServiceByName(service).FindMethodByName(method)
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    call = channel.unary_unary(f"/{service}/{method}",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_class.FromString)
    return call(json_format.ParseDict(request, request_class()))


def test_health_and_reflection_list_and_call_both_services(ranking: RunningRanking,
                                                           fresh_data_dir: Path) -> None:
    health = health_pb2_grpc.HealthStub(ranking.channel)
    for service in ("", "recsys.v1.RankingService", "recsys.v1.CatalogService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(ranking.channel).get_services())
    assert {"recsys.v1.RankingService", "recsys.v1.CatalogService"} <= services
    response = _call_by_reflection(ranking.channel, "recsys.v1.RankingService", "Recommend",
                                   {"user_id": "u1", "k": 3})
    assert len(response.items) == 3  # type: ignore[attr-defined]
    proc, port = start_process("event_service", fresh_data_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert "recsys.v1.EventService" in \
                ProtoReflectionDescriptorDatabase(channel).get_services()
            user = _call_by_reflection(channel, "recsys.v1.EventService", "GetUser",
                                       {"user_id": "u1"})
            assert user.history_size > 0  # type: ignore[attr-defined]
    finally:
        stop([proc], signal.SIGKILL)


def test_reload_switches_models_and_refuses_bad_ones(ranking: RunningRanking,
                                                     catalog: CatalogSnapshot) -> None:
    data_dir = ranking.settings.data_dir
    second_snapshot(data_dir, catalog, "small-v2")
    info = ranking.admin.ReloadCatalog(catalog_pb2.ReloadCatalogRequest(model_version="small-v2"))
    assert info.model_version == "small-v2" and info.item_count == len(catalog)
    assert current_version(snapshots_dir(data_dir)) == "small-v2"
    # A vector from the old model is recomputed in the new space from the user's history.
    response = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u3", k=5))
    v2 = CatalogSnapshot.load(snapshots_dir(data_dir), "small-v2")
    record = ranking.deps.store.get_user("u3")
    assert record is not None and record.model_version == catalog.model_version
    vector = v2.fold_in.exact([v2.history(record)])[0]
    scores = np.asarray(v2.item_factors) @ vector
    scores[[v2.item_index[i] for i in record.item_ids]] = -np.inf
    assert [i.item_id for i in response.items] == [v2.item_ids[r] for r in
                                                   np.argsort(-scores)[:5]]
    shutil.copytree(snapshots_dir(data_dir) / "small-v1", snapshots_dir(data_dir) / "broken")
    (snapshots_dir(data_dir) / "broken" / INDEX_FILE).write_bytes(b"\0" * 64)
    for version, code in (("broken", grpc.StatusCode.FAILED_PRECONDITION),
                          ("missing", grpc.StatusCode.FAILED_PRECONDITION),
                          ("../small-v1", grpc.StatusCode.INVALID_ARGUMENT),
                          ("/etc", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as error:
            ranking.admin.ReloadCatalog(catalog_pb2.ReloadCatalogRequest(model_version=version))
        assert error.value.code() == code, version
    info = ranking.admin.GetCatalogInfo(catalog_pb2.GetCatalogInfoRequest())
    assert info.model_version == "small-v2"
    assert current_version(snapshots_dir(data_dir)) == "small-v2"


def test_reload_under_load_fails_no_call(ranking: RunningRanking,
                                         catalog: CatalogSnapshot) -> None:
    second_snapshot(ranking.settings.data_dir, catalog, "small-v2")
    versions, failures = set(), []
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            try:
                response = ranking.stub.Recommend(ranking_pb2.RecommendRequest(
                    user_id=f"u{n}", k=10, filter=ranking_pb2.Filter(genres_none=["genre-02"])))
                versions.add(response.model_version)
                assert len(response.items) == 10
            except Exception as exc:  # any failure fails the test
                failures.append(exc)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    for i in range(10):
        version = "small-v2" if i % 2 == 0 else "small-v1"
        ranking.admin.ReloadCatalog(catalog_pb2.ReloadCatalogRequest(model_version=version))
        time.sleep(0.05)
    stop.set()
    for thread in clients:
        thread.join()
    assert failures == []
    assert versions == {"small-v1", "small-v2"}


def test_ranking_follows_current_set_elsewhere(ranking: RunningRanking,
                                               catalog: CatalogSnapshot) -> None:
    second_snapshot(ranking.settings.data_dir, catalog, "small-v3")
    set_current(snapshots_dir(ranking.settings.data_dir), "small-v3")
    deadline = time.monotonic() + 10
    while ranking.admin.GetCatalogInfo(catalog_pb2.GetCatalogInfoRequest()).model_version \
            != "small-v3":
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("user, burst_size", [("cold-start-user", 5), ("u50", 40)])
def test_events_in_a_cluster_dominate_the_very_next_recommend(
    fresh_data_dir: Path, catalog: CatalogSnapshot, small_dataset: Dataset, user: str,
    burst_size: int
) -> None:
    assert small_dataset.item_clusters is not None and small_dataset.user_clusters is not None
    clusters = small_dataset.item_clusters
    target = (small_dataset.user_clusters.get(user, 0) + 5) % 10  # not the user's own taste
    burst = [catalog.item_ids[r] for r in np.flatnonzero(clusters == target)[:burst_size]]
    events_proc, events_port = start_process("event_service", fresh_data_dir)
    ranking = RunningRanking(ranking_settings(fresh_data_dir))
    try:
        before = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10))
        with grpc.insecure_channel(f"127.0.0.1:{events_port}") as channel:
            ack = events_pb2_grpc.EventServiceStub(channel).Ingest(iter([
                events_pb2.IngestRequest(events=[playback(f"burst-{i}", user, item)
                                                 for i, item in enumerate(burst)])]))
        assert ack.accepted == len(burst)
        after = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10))
    finally:
        ranking.close()
        stop([events_proc], signal.SIGKILL)
    share = [int(clusters[catalog.item_index[i.item_id]] == target) for i in after.items]
    assert after.user_version == before.user_version + len(burst)
    assert after.source == ranking_pb2.PERSONALIZED
    assert sum(share) >= 8, (sum(share), [int(clusters[catalog.item_index[i.item_id]] == target)
                                          for i in before.items])
    assert not {i.item_id for i in after.items} & set(burst)


def test_hnsw_catalog_still_honours_narrow_filters(fresh_data_dir: Path,
                                                   catalog: CatalogSnapshot) -> None:
    write_snapshot(snapshots_dir(fresh_data_dir), "small-hnsw", np.asarray(catalog.item_factors),
                   catalog.item_table(), catalog.popularity,
                   IndexSpec.preset("hnsw", len(catalog), catalog.dim), SMALL_ALS)
    running = RunningRanking(ranking_settings(fresh_data_dir, brute_force_below=0))
    try:
        for spec in FILTERS:
            response = running.stub.Recommend(ranking_pb2.RecommendRequest(user_id="stranger2",
                                                                           k=20, filter=spec))
            assert all(allows(i, spec) for i in response.items)
            assert len(response.items) == min(20, _qualifying(catalog, spec, set()))
            similar = running.stub.SimilarItems(ranking_pb2.SimilarItemsRequest(
                item_id="i3", k=20, filter=spec))
            assert all(allows(i, spec) for i in similar.items)
            assert len(similar.items) == min(20, _qualifying(catalog, spec, {"i3"}))
    finally:
        running.close()


def test_trending_decays_with_the_half_life_the_event_service_keeps(
    fresh_data_dir: Path, catalog: CatalogSnapshot
) -> None:
    events, port = start_process("event_service", fresh_data_dir, "--item-half-life-s", "0.25")
    ranking = RunningRanking(ranking_settings(fresh_data_dir))
    try:
        item = catalog.item_ids[11]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            events_pb2_grpc.EventServiceStub(channel).Track(
                events_pb2.TrackRequest(event=playback("half-life-1", "u1", item)))
        time.sleep(1.0)  # four half-lives
        ranking.deps.ranker.refresh_trending()
        count = ranking.deps.ranker.live.trending[catalog.item_index[item]]
        assert ranking.deps.store.item_half_life() == 0.25
        assert 0 < count <= 0.5 ** 4  # a ranker decaying by its own day-long default: ~1.0
    finally:
        ranking.close()
        stop([events], signal.SIGKILL)
