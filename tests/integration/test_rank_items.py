"""RankItems: a given list re-ranked for a user, through the real gRPC API."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from index.catalog import CatalogSnapshot
from recsys.v1 import ranking_pb2
from tests.integration.conftest import RunningRanking, allows, status_of
from tests.integration.test_ranking_service import FILTERS, _watched
from tests.integration.test_retrieval import RETRIEVALS, _check_reasons

Reason = ranking_pb2.Reason


def _rank(ranking: RunningRanking, user: str, item_ids: list[str],
          **fields: object) -> ranking_pb2.RankItemsResponse:
    return ranking.stub.RankItems(ranking_pb2.RankItemsRequest(
        user_id=user, item_ids=item_ids, **fields), timeout=10)  # type: ignore[arg-type]


def _given(catalog: CatalogSnapshot, n: int, seed: int = 0) -> list[str]:
    rows = np.random.default_rng(seed).choice(len(catalog), n, replace=False)
    return [catalog.item_ids[r] for r in rows]


@pytest.mark.parametrize("retrieval", RETRIEVALS, ids=ranking_pb2.Retrieval.Name)
def test_the_known_items_come_back_best_first_and_unknown_ids_are_reported(
        ranking: RunningRanking, catalog: CatalogSnapshot, retrieval: int) -> None:
    watched = _watched(ranking, "u4")
    given = list(dict.fromkeys(_given(catalog, 60) + sorted(watched)[:5]))
    request = [*given[:30], "no-such-item", *given[30:], "nor-this"]
    response = _rank(ranking, "u4", request, retrieval=retrieval)
    assert response.source == ranking_pb2.PERSONALIZED
    assert sorted(i.item_id for i in response.items) == sorted(given)  # watched ones too
    assert list(response.unknown_item_ids) == ["no-such-item", "nor-this"]
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)
    assert response.user_version == ranking.deps.store.get_user("u4").version
    _check_reasons(catalog, list(response.items), watched)


def test_with_the_vector_alone_the_order_is_the_users_inner_products(
        ranking: RunningRanking, catalog: CatalogSnapshot) -> None:
    given = _given(catalog, 40, seed=1)
    vector = ranking.deps.store.get_user("u7").vector
    by_hand = sorted(given, key=lambda i: -float(catalog.item_factors[catalog.item_index[i]]
                                                  @ vector))
    response = _rank(ranking, "u7", given, retrieval=ranking_pb2.RETRIEVAL_VECTOR)
    assert [i.item_id for i in response.items] == by_hand
    assert {i.reason.kind for i in response.items} == {Reason.TASTE}


@pytest.mark.parametrize("spec", FILTERS, ids=str)
def test_items_the_filter_does_not_allow_are_left_out(
        ranking: RunningRanking, catalog: CatalogSnapshot, spec: ranking_pb2.Filter) -> None:
    given = _given(catalog, 200, seed=2)
    response = _rank(ranking, "u4", given, filter=spec)
    allowed = [i for i in given if allows(ranking_pb2.ScoredItem(
        genres=catalog.genres_of(catalog.item_index[i]),
        year=int(catalog.years[catalog.item_index[i]])), spec)]
    assert sorted(i.item_id for i in response.items) == sorted(allowed)
    assert all(allows(i, spec) for i in response.items)


def test_an_unknown_user_gets_the_items_in_popularity_order(
        ranking: RunningRanking, catalog: CatalogSnapshot) -> None:
    popular = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="nobody", k=100))
    order = [i.item_id for i in popular.items]
    given = list(np.random.default_rng(3).permutation(order[:50]))
    response = _rank(ranking, "nobody", given)
    assert response.source == ranking_pb2.POPULAR and response.user_version == 0
    assert [i.item_id for i in response.items] == order[:50]
    assert {i.reason.kind for i in response.items} == {Reason.POPULAR}


def test_only_unknown_ids_is_an_empty_answer_not_an_error(ranking: RunningRanking) -> None:
    response = _rank(ranking, "u4", ["x1", "x2"])
    assert not response.items and list(response.unknown_item_ids) == ["x1", "x2"]


@pytest.mark.parametrize("item_ids, user, message", [
    ([], "u4", "1 to 500"),
    ([f"i{n}" for n in range(501)], "u4", "got 501"),
    (["i1", "i2", "i1"], "u4", "item_ids[2] 'i1' is given twice"),
    (["i1", ""], "u4", "item_ids[1] is empty"),
    (["i1", "x" * 200], "u4", "item_ids[1] is longer"),
    (["i1"], "", "user_id is empty"),
])
def test_bad_requests_are_invalid_argument(ranking: RunningRanking, item_ids: list[str],
                                           user: str, message: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _rank(ranking, user, item_ids)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert status_of(ranking.stub.RankItems, ranking_pb2.RankItemsRequest(
        user_id="u4", item_ids=["i1"]), timeout=10) == grpc.StatusCode.OK
