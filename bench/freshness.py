"""Event -> visible freshness: how soon a user's Recommend reflects an event just sent.

While background ingest runs at a fixed rate, a probe sends one event for a user and
polls Recommend until the answer's user_version includes it; the time from send to that
answer is the freshness (it includes the durable commit and one ranking call).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bench.ingest import EventFactory, paced
from bench.load import percentiles
from recsys.v1 import events_pb2, events_pb2_grpc, ranking_pb2, ranking_pb2_grpc


def _background(stub: events_pb2_grpc.EventServiceStub, factory: EventFactory, rate: float,
                batch: int, stop: threading.Event) -> None:
    for _ in stub.IngestStream(paced(factory, rate, batch, lambda _: not stop.is_set())):
        pass


def probe(events_target: str, ranking_target: str, items: list[str], users: list[str],
          probes: int, background_rate: float) -> dict[str, Any]:
    """Freshness p50/p99 over `probes` events, with ingest running at `background_rate`/s."""
    events = events_pb2_grpc.EventServiceStub(grpc.insecure_channel(events_target))
    ranking = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(ranking_target))
    stop = threading.Event()
    # Probe users get no background events, so only the probe moves their version.
    probe_users, users = users[:50], users[50:]
    factory = EventFactory(items, users, seed=1, prefix=f"background-{time.time_ns()}")
    background = threading.Thread(target=_background, daemon=True,
                                  args=(events, factory, background_rate, 50, stop))
    background.start()
    latencies = []
    try:
        for n in range(probes):
            user = probe_users[n % len(probe_users)]
            stamp = Timestamp()
            stamp.GetCurrentTime()
            event = events_pb2.PlaybackEvent(
                event_id=f"probe-{time.time_ns()}-{n}", user_id=user, item_id=items[n % 97],
                type=events_pb2.PLAY_COMPLETE, occurred_at=stamp, watch_fraction=1.0)
            before = ranking.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10))
            started = time.perf_counter()
            ack = events.Track.future(events_pb2.TrackRequest(event=event))
            while ranking.Recommend(ranking_pb2.RecommendRequest(
                    user_id=user, k=10)).user_version <= before.user_version:
                time.sleep(0.0002)  # leave the GIL to the call in flight
            latencies.append(time.perf_counter() - started)
            ack.result()
    finally:
        stop.set()
        background.join(10)
    return {"probes": probes, "background_events_per_s": background_rate,
            **percentiles(latencies), "_latencies": latencies}
