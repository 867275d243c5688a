"""A first session with a running freshrec (`make serve`): watch recommendations change.

    .venv/bin/python examples/first_session.py [--user demo-user] [--items 50,172,181]

Asks for a new user's recommendations (popular items: nothing is known yet), sends a few
completed plays, and asks again: the list now follows what was just watched, and each
item says why it is there (similar to a named watched item, your taste, or popular).
Then the home page rows, with the same reasons.
"""

from __future__ import annotations

import argparse
import time
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from recsys.v1 import events_pb2, events_pb2_grpc, ranking_pb2, ranking_pb2_grpc


def show(title: str, response: ranking_pb2.RecommendResponse) -> None:
    """Print a recommendation list."""
    source = ranking_pb2.Source.Name(response.source)
    print(f"\n{title}  [{source}, user version {response.user_version}]")
    for item in response.items:
        print(f"  {item.score:7.3f}  {item.title} ({item.year}) {', '.join(item.genres)}"
              f"  <- {item.reason.text}")


def main() -> None:
    """Run the session."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", default="127.0.0.1:50051")
    parser.add_argument("--ranking", default="127.0.0.1:50052")
    parser.add_argument("--user", default=f"demo-{uuid.uuid4().hex[:6]}")
    parser.add_argument("--items", help="comma-separated item ids to watch "
                                        "(default: the top popular item and 4 similar ones)")
    args = parser.parse_args()
    ranking = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(args.ranking))
    events = events_pb2_grpc.EventServiceStub(grpc.insecure_channel(args.events))

    before = ranking.Recommend(ranking_pb2.RecommendRequest(user_id=args.user, k=5))
    show(f"Recommendations for {args.user} before watching anything:", before)
    if args.items:
        watched = args.items.split(",")
    else:
        seed = before.items[0].item_id
        similar = ranking.SimilarItems(ranking_pb2.SimilarItemsRequest(item_id=seed, k=4))
        watched = [seed, *(i.item_id for i in similar.items)]

    now = Timestamp()
    now.GetCurrentTime()
    batch = [events_pb2.PlaybackEvent(event_id=str(uuid.uuid4()), user_id=args.user,
                                      item_id=item, type=events_pb2.PLAY_COMPLETE,
                                      occurred_at=now, watch_fraction=1.0) for item in watched]
    started = time.perf_counter()
    ack = events.Ingest(iter([events_pb2.IngestRequest(events=batch)]))
    after = ranking.Recommend(ranking_pb2.RecommendRequest(user_id=args.user, k=5))
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"\nWatched {len(watched)} items {watched}: {ack.accepted} accepted, "
          f"{ack.rejected} rejected")
    show(f"Recommendations right after ({elapsed_ms:.1f} ms from send to new list):", after)
    page = ranking.HomePage(ranking_pb2.HomePageRequest(user_id=args.user, k_per_row=3))
    for row in page.rows:
        print(f"\n{row.title}")
        for item in row.items:
            print(f"  {item.title} ({item.year})  <- {item.reason.text}")


if __name__ == "__main__":
    main()
