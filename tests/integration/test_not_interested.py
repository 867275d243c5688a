"""Not interested: a dismissed title leaves every row of that user at once (real servers)."""

from __future__ import annotations

import numpy as np

from index.catalog import CatalogSnapshot
from recsys.v1 import events_pb2, ranking_pb2
from tests.integration.conftest import EventProcess, RunningRanking, playback

NOT_INTERESTED = events_pb2.NOT_INTERESTED


def _all_rows(ranking: RunningRanking, user: str, version: int) -> set[str]:
    """Every item the user could be shown: Recommend (also with watched items) and the
    home page's rows, read at `version` or later."""
    shown = set()
    for include_watched in (False, True):
        shown |= {i.item_id for i in ranking.stub.Recommend(ranking_pb2.RecommendRequest(
            user_id=user, k=50, include_watched=include_watched, min_user_version=version),
            timeout=5).items}
    page = ranking.stub.HomePage(ranking_pb2.HomePageRequest(
        user_id=user, k_per_row=20, min_user_version=version), timeout=5)
    return shown | {i.item_id for row in page.rows for i in row.items}


def test_a_dismissed_title_leaves_every_row_at_once_and_the_vector_stays(
        events_process: EventProcess, ranking: RunningRanking, catalog: CatalogSnapshot) -> None:
    events = events_process.stub
    before = events.GetUser(events_pb2.GetUserRequest(user_id="u4"))
    top = ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u4", k=3)).items
    trending = ranking.stub.HomePage(ranking_pb2.HomePageRequest(
        user_id="u4", k_per_row=5)).rows[-1].items[0].item_id
    dismissed = [top[0].item_id, trending, before.recent_item_ids[0]]  # incl. a watched one
    acks = [events.Track(events_pb2.TrackRequest(event=playback(
        f"no-{n}", "u4", item, type=NOT_INTERESTED))) for n, item in enumerate(dismissed)]
    version = acks[-1].user_version
    assert version == before.version + 3 and all(a.item_known for a in acks)
    assert not _all_rows(ranking, "u4", version) & set(dismissed)
    ranked = ranking.stub.RankItems(ranking_pb2.RankItemsRequest(
        user_id="u4", item_ids=[*dismissed, top[1].item_id], min_user_version=version))
    assert [i.item_id for i in ranked.items] == [top[1].item_id]
    after = events.GetUser(events_pb2.GetUserRequest(user_id="u4"))
    assert list(after.dismissed_item_ids) == dismissed[::-1]  # most recent first
    np.testing.assert_array_equal(after.vector, before.vector)  # not a play: no move
    assert after.history_size == before.history_size
    # A dismissal is an event like any other: resent, it is a duplicate.
    again = events.Track(events_pb2.TrackRequest(event=playback(
        "no-0", "u4", dismissed[0], type=NOT_INTERESTED)))
    assert again.duplicate and again.user_version == version
