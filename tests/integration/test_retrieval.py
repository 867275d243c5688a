"""Blended retrieval and reasons through the ranking service's gRPC API (real port, LMDB, FAISS)."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.services import start_process, stop
from index.catalog import CatalogSnapshot
from index.tables import Dataset
from recsys.v1 import events_pb2, events_pb2_grpc, ranking_pb2
from tests.integration.conftest import RunningRanking, allows, playback, ranking_settings
from tests.integration.test_ranking_service import FILTERS, _qualifying, _watched

Reason = ranking_pb2.Reason
RETRIEVALS = [ranking_pb2.RETRIEVAL_BLEND, ranking_pb2.RETRIEVAL_VECTOR,
              ranking_pb2.RETRIEVAL_NEIGHBOURS]
PERSONAL_KINDS = {ranking_pb2.RETRIEVAL_BLEND: {Reason.TASTE, Reason.SIMILAR_TO_WATCHED},
                  ranking_pb2.RETRIEVAL_VECTOR: {Reason.TASTE},
                  # neighbours only: popular items fill what the neighbours cannot
                  ranking_pb2.RETRIEVAL_NEIGHBOURS: {Reason.SIMILAR_TO_WATCHED, Reason.POPULAR}}


def _recommend(ranking: RunningRanking, user: str, retrieval: int = 0, k: int = 10,
               **fields: object) -> ranking_pb2.RecommendResponse:
    return ranking.stub.Recommend(ranking_pb2.RecommendRequest(
        user_id=user, k=k, retrieval=retrieval, **fields))  # type: ignore[arg-type]


def _check_reasons(catalog: CatalogSnapshot, items: list[ranking_pb2.ScoredItem],
                   history: set[str]) -> None:
    """Every item has a reason; a similarity reason names a watched item by id and title."""
    for item in items:
        reason = item.reason
        assert reason.kind != Reason.KIND_UNSPECIFIED and reason.text, item
        if reason.kind == Reason.SIMILAR_TO_WATCHED:
            assert reason.item_id in history, (reason, sorted(history))
            assert reason.item_title == catalog.titles[catalog.item_index[reason.item_id]]
            assert reason.text == f"Because you watched {reason.item_title}"
        else:
            assert not reason.item_id and not reason.item_title


@pytest.mark.parametrize("retrieval", RETRIEVALS, ids=ranking_pb2.Retrieval.Name)
@pytest.mark.parametrize("spec", FILTERS, ids=str)
def test_every_source_honours_filters_and_exclusions_and_returns_k_when_k_qualify(
    ranking: RunningRanking, catalog: CatalogSnapshot, spec: ranking_pb2.Filter, retrieval: int
) -> None:
    watched = _watched(ranking, "u4")
    response = _recommend(ranking, "u4", retrieval, k=50, filter=spec)
    assert all(allows(i, spec) for i in response.items)
    assert not {i.item_id for i in response.items} & watched
    assert len(response.items) == min(50, _qualifying(catalog, spec, watched))
    assert len({i.item_id for i in response.items}) == len(response.items)
    assert {i.reason.kind for i in response.items} <= PERSONAL_KINDS[retrieval]
    _check_reasons(catalog, list(response.items), watched)


@pytest.mark.parametrize("retrieval", RETRIEVALS, ids=ranking_pb2.Retrieval.Name)
def test_reasons_name_items_the_user_actually_watched(ranking: RunningRanking,
                                                      catalog: CatalogSnapshot,
                                                      retrieval: int) -> None:
    kinds: set[int] = set()
    for user in ("u1", "u2", "u3", "u30", "u77"):
        response = _recommend(ranking, user, retrieval, k=30)
        assert response.source == ranking_pb2.PERSONALIZED
        _check_reasons(catalog, list(response.items), _watched(ranking, user))
        kinds |= {i.reason.kind for i in response.items}
        scores = [i.score for i in response.items]
        assert scores == sorted(scores, reverse=True)
    # Each source shows up in what it is asked for (both, for the blend).
    assert kinds & PERSONAL_KINDS[retrieval] - {Reason.POPULAR} == \
        PERSONAL_KINDS[retrieval] - {Reason.POPULAR}


def test_with_watched_items_allowed_a_neighbour_may_be_another_watched_item(
    ranking: RunningRanking, catalog: CatalogSnapshot
) -> None:
    watched = _watched(ranking, "u8")
    response = _recommend(ranking, "u8", ranking_pb2.RETRIEVAL_NEIGHBOURS, k=100,
                          include_watched=True)
    assert {i.item_id for i in response.items} & watched
    _check_reasons(catalog, list(response.items), watched)


def test_unknown_users_get_popular_items_with_popular_reasons(ranking: RunningRanking) -> None:
    for retrieval in RETRIEVALS:
        response = _recommend(ranking, "stranger", retrieval)
        assert response.source == ranking_pb2.POPULAR and len(response.items) == 10
        assert {i.reason.kind for i in response.items} == {Reason.POPULAR}
    page = ranking.stub.HomePage(ranking_pb2.HomePageRequest(user_id="stranger", k_per_row=5))
    for row in page.rows:
        assert row.source == ranking_pb2.POPULAR
        assert {i.reason.kind for i in row.items} <= {Reason.POPULAR, Reason.TRENDING}


def test_home_page_reasons_match_their_rows(ranking: RunningRanking,
                                            catalog: CatalogSnapshot) -> None:
    watched = _watched(ranking, "u30")
    page = ranking.stub.HomePage(ranking_pb2.HomePageRequest(user_id="u30", k_per_row=8))
    rows = {r.id: r for r in page.rows}
    anchor = {i.reason.item_id for i in rows["because_you_watched"].items}
    assert len(anchor) == 1 and anchor <= watched
    (anchor_id,) = anchor
    assert rows["because_you_watched"].title == \
        f"Because you watched {catalog.titles[catalog.item_index[anchor_id]]}"
    assert {i.reason.kind for i in rows["because_you_watched"].items} == \
        {Reason.SIMILAR_TO_WATCHED}
    for row_id in ("top_picks", "new_releases"):
        _check_reasons(catalog, list(rows[row_id].items), watched)
        assert {i.reason.kind for i in rows[row_id].items} <= PERSONAL_KINDS[
            ranking_pb2.RETRIEVAL_BLEND]
    assert {i.reason.kind for i in rows["trending"].items} <= {Reason.POPULAR, Reason.TRENDING}


@pytest.mark.parametrize("retrieval", RETRIEVALS, ids=ranking_pb2.Retrieval.Name)
def test_similar_items_are_like_the_requested_item(ranking: RunningRanking,
                                                   small_dataset: Dataset,
                                                   retrieval: int) -> None:
    response = ranking.stub.SimilarItems(ranking_pb2.SimilarItemsRequest(
        item_id="i10", k=10, retrieval=retrieval))
    assert len(response.items) == 10 and "i10" not in {i.item_id for i in response.items}
    assert {(i.reason.kind, i.reason.item_id) for i in response.items} == \
        {(Reason.SIMILAR_TO_ITEM, "i10")}
    assert small_dataset.item_clusters is not None
    clusters = small_dataset.item_clusters
    assert sum(clusters[int(i.item_id[1:])] == clusters[10] for i in response.items) >= 8


def test_a_play_is_a_reason_on_the_very_next_recommend(fresh_data_dir: Path,
                                                       catalog: CatalogSnapshot) -> None:
    table = catalog.neighbours
    assert table is not None
    user, item = "fresh-viewer", catalog.item_ids[int(np.argmax(catalog.popularity))]
    events_proc, events_port = start_process("event_service", fresh_data_dir)
    ranking = RunningRanking(ranking_settings(fresh_data_dir))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{events_port}") as channel:
            ack = events_pb2_grpc.EventServiceStub(channel).Track(
                events_pb2.TrackRequest(event=playback("reason-1", user, item)))
        assert ack.user_version == 1 and ack.item_known
        response = _recommend(ranking, user, ranking_pb2.RETRIEVAL_NEIGHBOURS, k=5)
    finally:
        ranking.close()
        stop([events_proc], signal.SIGKILL)
    row = catalog.item_index[item]
    assert [i.item_id for i in response.items] == \
        [catalog.item_ids[r] for r in table.rows[row][:5]]
    assert {(i.reason.kind, i.reason.item_id) for i in response.items} == \
        {(Reason.SIMILAR_TO_WATCHED, item)}


def test_an_unknown_retrieval_is_invalid_argument(ranking: RunningRanking) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _recommend(ranking, "u1", retrieval=9)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown retrieval 9" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        ranking.stub.HomePage(ranking_pb2.HomePageRequest(user_id="u1", k_per_row=3,
                                                          retrieval=-1))  # type: ignore[arg-type]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

