"""Ingest throughput and ack latency of the event service, driven over gRPC from another process.

Measured by `make bench` (bench/run.py), with durable commits throughout:
  * sustained events/s through IngestStream with 500-event batches, and with 1-event messages;
  * ack latency (send -> durable ack) p50/p99 at a fixed event rate, in 50-, 10- and
    1-event messages.
Events go to bootstrapped users and catalog items at random, so every one folds in.
`full_history` measures the same for users at the history cap (`bench.prefill`), taken in
turn so that a message's events are for distinct users: every event merges into a full
history and evicts an item, the writer's steady state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from recsys.v1 import events_pb2, events_pb2_grpc


class EventFactory:
    """Unique events for random items and random known users, or (`in_turn`) users taken
    in turn from a shuffled list: distinct within a message, each as often as the next."""

    def __init__(self, items: list[str], users: list[str], seed: int, prefix: str,
                 in_turn: bool = False) -> None:
        self.items, self.users, self.prefix, self.in_turn = items, users, prefix, in_turn
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(users))
        self.count = 0

    def make(self, n: int) -> list[events_pb2.PlaybackEvent]:
        stamp = Timestamp()
        stamp.GetCurrentTime()
        users = self.order[(self.count + np.arange(n)) % len(self.users)] if self.in_turn \
            else self.rng.integers(0, len(self.users), n)
        items = self.rng.integers(0, len(self.items), n)
        start, self.count = self.count, self.count + n
        return [events_pb2.PlaybackEvent(
            event_id=f"{self.prefix}-{start + i}", user_id=self.users[users[i]],
            item_id=self.items[items[i]], type=events_pb2.PLAY_COMPLETE, occurred_at=stamp,
            watch_fraction=0.8) for i in range(n)]


def throughput(stub: events_pb2_grpc.EventServiceStub, factory: EventFactory, batch: int,
               total: int) -> dict[str, float]:
    """Stream `total` events in `batch`-sized messages as fast as acks allow."""
    def requests() -> Iterator[events_pb2.IngestStreamRequest]:
        for sequence in range(total // batch):
            yield events_pb2.IngestStreamRequest(sequence=sequence, events=factory.make(batch))

    started = time.perf_counter()
    accepted = sum(r.accepted for r in stub.IngestStream(requests()))
    seconds = time.perf_counter() - started
    return {"batch": batch, "events": accepted, "seconds": round(seconds, 2),
            "events_per_s": round(accepted / seconds)}


def paced(factory: EventFactory, rate: float, batch: int, keep_going: Callable[[int], bool],
          on_send: Callable[[int], None] | None = None
          ) -> Iterator[events_pb2.IngestStreamRequest]:
    """`batch`-event IngestStream requests at a fixed event rate while keep_going(sequence)."""
    start, sequence = time.perf_counter(), 0
    while keep_going(sequence):
        time.sleep(max(0.0, start + sequence * batch / rate - time.perf_counter()))
        if on_send is not None:
            on_send(sequence)
        yield events_pb2.IngestStreamRequest(sequence=sequence, events=factory.make(batch))
        sequence += 1


def ack_latency(stub: events_pb2_grpc.EventServiceStub, factory: EventFactory, rate: float,
                batch: int, seconds: float) -> dict[str, float]:
    """Send `batch`-event messages at a fixed event rate; latency from send to durable ack."""
    sent: dict[int, float] = {}
    messages = int(rate * seconds / batch)
    requests = paced(factory, rate, batch, lambda sequence: sequence < messages,
                     lambda sequence: sent.__setitem__(sequence, time.perf_counter()))
    latencies = [time.perf_counter() - sent[r.sequence] for r in stub.IngestStream(requests)]
    ms = np.array(latencies) * 1000
    return {"events_per_s": rate, "batch": batch, "acks": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


def suite(stub: events_pb2_grpc.EventServiceStub, items: list[str], users: list[str],
          scale: float, rate: float, single_rate: float) -> dict[str, Any]:
    """Throughput (500-event and 1-event messages) and ack latency at fixed rates."""
    factory = EventFactory(items, users=users, seed=0, prefix=f"bench-{time.time_ns()}")
    throughput(stub, factory, 500, 5_000)  # warm-up
    return {
        "throughput": [throughput(stub, factory, 500, int(300_000 * scale)),
                       throughput(stub, factory, 1, int(30_000 * scale))],
        "ack_latency": [ack_latency(stub, factory, rate, batch, 10 * scale)
                        for batch in (50, 10)]
        + [ack_latency(stub, factory, single_rate, 1, 10 * scale)],
    }


def full_history(stub: events_pb2_grpc.EventServiceStub, items: list[str], users: list[str],
                 scale: float, rate: float) -> dict[str, Any]:
    """Throughput (50- and 1-event messages) and ack latency for users at the history cap."""
    factory = EventFactory(items, users, seed=2, prefix=f"full-{time.time_ns()}", in_turn=True)
    # Warm-up: one event for every user, so that each has its statistics in the writer's
    # memory (built from the history on a user's first event): the steady state.
    throughput(stub, factory, 50, len(users))
    return {"users": len(users),
            "throughput": [throughput(stub, factory, 50, int(150_000 * scale)),
                           throughput(stub, factory, 1, int(30_000 * scale))],
            "ack_latency": [ack_latency(stub, factory, rate, 50, 10 * scale)]}
