"""Ingest throughput and ack latency of the event service, driven over gRPC from another process.

`python -m bench.ingest --data-dir D` copies D, starts the event service on the copy, and
measures (durable commits throughout):
  * sustained events/s through IngestStream with 500-event batches, and with 1-event messages;
  * ack latency (send -> durable ack) p50/p99 at a fixed event rate, in 50-, 10- and
    1-event messages.
Events go to bootstrapped users and catalog items at random, so every one folds in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from bench.crash import start_event_service
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from recsys.v1 import events_pb2, events_pb2_grpc


class EventFactory:
    """Unique events for random known users and items."""

    def __init__(self, items: list[str], users: int, seed: int, prefix: str) -> None:
        self.items, self.users, self.prefix = items, users, prefix
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def make(self, n: int) -> list[events_pb2.PlaybackEvent]:
        stamp = Timestamp()
        stamp.GetCurrentTime()
        users = self.rng.integers(1, self.users + 1, n)
        items = self.rng.integers(0, len(self.items), n)
        start, self.count = self.count, self.count + n
        return [events_pb2.PlaybackEvent(
            event_id=f"{self.prefix}-{start + i}", user_id=str(users[i]),
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


def ack_latency(stub: events_pb2_grpc.EventServiceStub, factory: EventFactory, rate: float,
                batch: int, seconds: float) -> dict[str, float]:
    """Send `batch`-event messages at a fixed event rate; latency from send to durable ack."""
    sent: dict[int, float] = {}
    messages = int(rate * seconds / batch)

    def requests() -> Iterator[events_pb2.IngestStreamRequest]:
        start = time.perf_counter()
        for sequence in range(messages):
            delay = start + sequence * batch / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[sequence] = time.perf_counter()
            yield events_pb2.IngestStreamRequest(sequence=sequence, events=factory.make(batch))

    latencies = [time.perf_counter() - sent[r.sequence] for r in stub.IngestStream(requests())]
    ms = np.array(latencies) * 1000
    return {"events_per_s": rate, "batch": batch, "acks": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


def run(data_dir: Path, quick: bool, rate: float, single_rate: float) -> dict[str, object]:
    """Run every measurement against a fresh copy of `data_dir`."""
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir), with_index=False)
    scale = 0.1 if quick else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "data"
        shutil.copytree(data_dir, copy)
        proc, port, _ = start_event_service(copy)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = events_pb2_grpc.EventServiceStub(channel)
                factory = EventFactory(catalog.item_ids, users=900, seed=0, prefix="bench")
                throughput(stub, factory, 500, 20_000)  # warm-up
                return {
                    "throughput": [throughput(stub, factory, 500, int(300_000 * scale)),
                                   throughput(stub, factory, 1, int(30_000 * scale))],
                    "ack_latency": [ack_latency(stub, factory, rate, batch, 10 * scale)
                                    for batch in (50, 10)]
                    + [ack_latency(stub, factory, single_rate, 1, 10 * scale)],
                }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def main() -> None:
    """CLI: print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="a built data dir")
    parser.add_argument("--rate", type=float, default=5_000.0,
                        help="events/s for ack latency with 50- and 10-event messages")
    parser.add_argument("--single-rate", type=float, default=2_000.0,
                        help="events/s for ack latency with 1-event messages")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.data_dir, args.quick, args.rate, args.single_rate), indent=2))


if __name__ == "__main__":
    main()
