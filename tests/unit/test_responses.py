"""Responses joined from cached bytes parse as the messages the message API builds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.catalog import CatalogSnapshot
from index.live import LiveSegment
from index.ranking import LiveCatalog, UserState
from index.retrieval import LIKE, POPULAR, TASTE, TRENDING, WATCHED, Scored
from ranking_service import responses
from ranking_service.responses import Encoder, encoder, to_reason
from recsys.v1 import ranking_pb2


@pytest.fixture(scope="module")
def live(catalog: CatalogSnapshot) -> LiveCatalog:
    return LiveCatalog.of(catalog, LiveSegment.empty(catalog), {}, 0.5)


def _message(live: LiveCatalog, s: Scored) -> ranking_pb2.ScoredItem:
    catalog = live.catalog
    return ranking_pb2.ScoredItem(item_id=catalog.item_ids[s.row], score=s.score,
                                  title=catalog.titles[s.row], genres=catalog.genres_of(s.row),
                                  year=int(catalog.years[s.row]), reason=to_reason(live, s))


scored_items = st.builds(
    lambda row, score, reason, anchor: Scored(row, score, reason,
                                              anchor if reason in (WATCHED, LIKE) else -1),
    st.integers(0, 1999), st.floats(-1e6, 1e6, width=32),
    st.sampled_from([TASTE, WATCHED, LIKE, POPULAR, TRENDING]), st.integers(0, 1999))


user_states = st.builds(UserState, st.integers(0, 2**64 - 1),
                        st.one_of(st.just(0.0), st.floats(1e-3, 4e9)))


def _without_time(message: Any, user: UserState) -> Any:
    """The message with its user_updated_at checked against `user` and cleared."""
    if user.updated_at > 0:
        at = message.user_updated_at.ToNanoseconds() / 1e9
        assert abs(at - user.updated_at) <= 1e-6 * max(1.0, user.updated_at / 1e3)
    else:
        assert not message.HasField("user_updated_at")
    message.ClearField("user_updated_at")
    return message


@settings(max_examples=200, deadline=None)
@given(items=st.lists(scored_items, max_size=12), source=st.sampled_from([1, 2]),
       user=user_states)
def test_encoded_recommend_similar_and_rank_items_equal_the_message_api(
    live: LiveCatalog, items: list[Scored], source: int, user: UserState
) -> None:
    catalog = live.catalog
    encode = encoder(catalog)
    version = user.version
    expected = ranking_pb2.RecommendResponse(
        items=[_message(live, s) for s in items], source=source,  # type: ignore[arg-type]
        user_version=version, model_version=catalog.model_version)
    assert _without_time(ranking_pb2.RecommendResponse.FromString(
        encode.recommend(live, items, source, user)), user) == expected
    assert ranking_pb2.SimilarItemsResponse.FromString(encode.similar(live, items)) == \
        ranking_pb2.SimilarItemsResponse(items=expected.items,
                                         model_version=catalog.model_version)
    unknown = [f"gone-{s.row}" for s in items[:3]]
    assert _without_time(ranking_pb2.RankItemsResponse.FromString(
        encode.ranked(live, items, unknown, source, user)), user) == ranking_pb2.RankItemsResponse(
            items=expected.items, unknown_item_ids=unknown, source=source,  # type: ignore[arg-type]
            user_version=version, model_version=catalog.model_version)


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40),
                               st.lists(scored_items, max_size=5), st.sampled_from([1, 2])),
                     max_size=4), user=user_states)
def test_encoded_home_page_equals_the_message_api(live: LiveCatalog,
                                                  rows: list, user: UserState) -> None:
    catalog = live.catalog
    expected = ranking_pb2.HomePageResponse(
        rows=[ranking_pb2.Row(id=i, title=t, items=[_message(live, s) for s in items],
                              source=source) for i, t, items, source in rows],
        user_version=user.version, model_version=catalog.model_version)
    assert _without_time(ranking_pb2.HomePageResponse.FromString(
        Encoder(catalog).home(live, rows, user)), user) == expected


def test_one_encoder_per_snapshot(live: LiveCatalog) -> None:
    catalog = live.catalog
    assert encoder(catalog) is encoder(catalog)
    reason = ranking_pb2.RecommendResponse.FromString(encoder(catalog).recommend(
        live, [Scored(3, 1.0, WATCHED, 5)], 1, UserState(1))).items[0].reason
    assert reason.item_id == catalog.item_ids[5]
    assert reason.text == f"Because you watched {catalog.titles[5]}"
    with pytest.raises(KeyError):
        encoder(catalog).recommend(live, [Scored(3, 1.0, "no-such-reason")], 1, UserState(1))


def test_the_cache_is_bounded_and_a_full_one_still_encodes(
    live: LiveCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(responses, "MAX_CACHED", 3)
    fresh = Encoder(live.catalog)
    items = [Scored(row, 0.5, TASTE) for row in range(6)]
    first = fresh.recommend(live, items, 1, UserState(1))
    assert fresh.recommend(live, items, 1, UserState(1)) == first  # 3 cached, 3 made again
    assert len(fresh._fixed) == 3 and len(fresh._reasons) == 1
    assert [i.item_id for i in ranking_pb2.RecommendResponse.FromString(first).items] == \
        [live.catalog.item_ids[row] for row in range(6)]
