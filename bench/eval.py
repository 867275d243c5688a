"""Offline A/B test of real-time vs daily-batch updates, replayed through the real services.

`python -m bench.eval` (`make eval`). Protocol:
  1. MovieLens-100K is split at a time cutoff (the --quantile of its timestamps, or --cutoff).
     `python -m index build --until CUTOFF` trains ALS on the earlier interactions and
     bootstraps the user store; the item table is the full catalog.
  2. The built data dir is copied three times: `realtime` and `daily` each run an event
     service and a ranking service (1 worker); `static` runs a ranking service alone.
  3. Every test interaction (timestamp >= cutoff) is replayed in time order (stable sort).
     For each one, BEFORE it is sent anywhere, every variant answers Recommend(user, k=10)
     (watched items excluded; the realtime service is asked three times: with the default
     blended retrieval, vector only and neighbours only; daily and static with the
     default): a hit if the event's item is in the top 10, NDCG@10 =
     1/log2(rank + 2) (one relevant item). Then realtime sends the event over one
     long-lived IngestStream and waits for its ack (read-your-writes); daily buffers it and,
     when the UTC day of the event timestamps changes, sends the whole buffered day (batches
     of 500, every one acked) before scoring the first event of the new day; static sends
     nothing.
  4. The peers' real-time rules replay the same events in-process (`bench.replay`), on the
     served snapshot's item factors where they use any: Gorse's item-to-item over the last
     100 feedbacks, Qdrant's `average_vector` recommend over the last 20 plays and over the
     last 20 positives (rating >= 4), popularity; and ours computed by `bench.replay` as a
     check on the services (`(in-process)`: the blend with the served snapshot's
     neighbours and the ranking defaults, and the vector alone).
Rating -> event: a rating r becomes a PLAY_COMPLETE with watch_fraction = r/5 (its weight is
r/5, as in the batch build), occurred_at = its timestamp, event_id = "eval-<cutoff>-<n>".
Output: a Markdown table on stdout and `<out>/eval-<UTC time>.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from bench.replay import (
    AverageVector,
    Blended,
    DecayedFoldIn,
    ItemToItem,
    K,
    Neighbours,
    Popularity,
    Rule,
    Score,
    Split,
    replay,
)
from bench.report import save_figure
from bench.services import start_process, stop
from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.files import atomic_write
from index.model import AlsParams
from index.movielens import load_movielens_100k
from index.ranking import RankingConfig
from index.tables import Interactions
from recsys.v1 import events_pb2, events_pb2_grpc, ranking_pb2, ranking_pb2_grpc

BATCH, DAY_S, PROGRESS_EVERY = 500, 86_400, 2_000
SERVED = ("realtime", "daily", "static")
# Scored variants: (served copy, retrieval asked for).
VARIANTS = {"realtime": ("realtime", ranking_pb2.RETRIEVAL_BLEND),
            "realtime, vector only": ("realtime", ranking_pb2.RETRIEVAL_VECTOR),
            "realtime, neighbours only": ("realtime", ranking_pb2.RETRIEVAL_NEIGHBOURS),
            "daily": ("daily", ranking_pb2.RETRIEVAL_BLEND),
            "static": ("static", ranking_pb2.RETRIEVAL_BLEND)}
GROUPS = ("all", "known", "new")


class Stream:
    """One long-lived bidirectional IngestStream: `send` returns once every batch is acked."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._requests: queue.Queue[events_pb2.IngestStreamRequest | None] = queue.Queue()
        stub = events_pb2_grpc.EventServiceStub(self.channel)
        self._acks = stub.IngestStream(iter(self._requests.get, None))
        self.sequence = 0
        self.counts = {"accepted": 0, "duplicates": 0, "rejected": 0, "unknown_items": 0}

    def send(self, events: list[events_pb2.PlaybackEvent]) -> None:
        """Send `events` in batches of up to BATCH; wait for all the acks."""
        batches = [events[i:i + BATCH] for i in range(0, len(events), BATCH)]
        for batch in batches:
            self.sequence += 1
            self._requests.put(events_pb2.IngestStreamRequest(sequence=self.sequence,
                                                              events=batch))
        for _ in batches:
            ack = next(self._acks)
            for name in ("accepted", "duplicates", "unknown_items"):
                self.counts[name] += getattr(ack, name)
            self.counts["rejected"] += len(ack.rejections)

    def close(self) -> None:
        """Half-close the stream, wait for the server to end it, close the channel."""
        self._requests.put(None)
        for _ in self._acks:
            pass
        self.channel.close()


@dataclass
class Replay:
    """The variants under test and their running scores."""

    rankers: dict[str, ranking_pb2_grpc.RankingServiceStub]
    streams: dict[str, Stream]
    known: set[str]
    scores: dict[tuple[str, str], Score] = field(default_factory=dict)
    buffer: list[events_pb2.PlaybackEvent] = field(default_factory=list)
    day: int = -1

    def step(self, event: events_pb2.PlaybackEvent) -> None:
        """Score every variant on this event, then let each variant see it (or not)."""
        day = event.occurred_at.seconds // DAY_S
        if day != self.day and self.buffer:
            self.streams["daily"].send(self.buffer)
            self.buffer = []
        self.day = day
        calls = {name: self.rankers[served].Recommend.future(ranking_pb2.RecommendRequest(
            user_id=event.user_id, k=K, retrieval=retrieval), timeout=30)
            for name, (served, retrieval) in VARIANTS.items()}
        for name, call in calls.items():
            answer = call.result()
            self.score(name, event, [i.item_id for i in answer.items],
                       answer.source == ranking_pb2.POPULAR)
        self.streams["realtime"].send([event])
        self.buffer.append(event)

    def score(self, variant: str, event: events_pb2.PlaybackEvent, ranked: list[str],
              popular: bool) -> None:
        """Add one scored list to the variant's totals, overall and by user group."""
        group = "known" if event.user_id in self.known else "new"
        for key in ((variant, "all"), (variant, group)):
            self.scores.setdefault(key, Score()).add(ranked, event.item_id, popular)

    def hit_rates(self) -> str:
        """Running HR@10 per variant, for the progress line."""
        return "  ".join(f"{v}={self.scores[(v, 'all')].summary()['hr_at_10']:.4f}"
                         for v in VARIANTS if (v, "all") in self.scores)


def to_events(test: Interactions, cutoff: int) -> Iterator[events_pb2.PlaybackEvent]:
    """The test interactions (time-sorted) as PLAY_COMPLETE events, watch_fraction = rating/5."""
    rows = zip(test.user_ids.tolist(), test.item_ids.tolist(), test.weights.tolist(),
               test.timestamps.tolist(), strict=True)
    for n, (user, item, weight, at) in enumerate(rows):
        yield events_pb2.PlaybackEvent(
            event_id=f"eval-{cutoff}-{n}", user_id=str(user), item_id=str(item),
            type=events_pb2.PLAY_COMPLETE, occurred_at=Timestamp(seconds=int(at)),
            watch_fraction=min(1.0, round(weight, 4)))


def build_base(args: argparse.Namespace, cutoff: int, data_dir: Path) -> None:
    """Run the batch build on the interactions before the cutoff."""
    command = [sys.executable, "-m", "index", "build", "--dataset", "movielens-100k",
               "--cache-dir", str(args.cache_dir), "--until", str(cutoff),
               "--data-dir", str(data_dir), "--factors", str(args.factors),
               "--regularization", str(args.regularization), "--alpha", str(args.alpha),
               "--iterations", str(args.iterations), "--half-life-s", str(args.half_life_s)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def start_services(tmp: Path, port_base: int, procs: list[subprocess.Popen[Any]]
                   ) -> tuple[dict[str, ranking_pb2_grpc.RankingServiceStub], dict[str, Stream]]:
    """Copy the base dir per served variant and start its services; procs collects them."""
    rankers, streams = {}, {}
    for offset, name in enumerate(SERVED):
        data_dir = tmp / name
        shutil.copytree(tmp / "base", data_dir)
        procs.append(start_process("ranking_service", data_dir, port=port_base + offset)[0])
        channel = grpc.insecure_channel(f"127.0.0.1:{port_base + offset}")
        rankers[name] = ranking_pb2_grpc.RankingServiceStub(channel)
        if name != "static":
            proc, port = start_process("event_service", data_dir)
            procs.append(proc)
            streams[name] = Stream(port)
    return rankers, streams


def replay_served(run: Replay, events: list[events_pb2.PlaybackEvent]) -> None:
    """Run every event through the variants, with a progress line on stderr."""
    started = time.perf_counter()
    for n, event in enumerate(events, 1):
        run.step(event)
        if n % PROGRESS_EVERY == 0 or n == len(events):
            print(f"  {n:,}/{len(events):,} events, {time.perf_counter() - started:.0f} s: "
                  f"HR@10 {run.hit_rates()}", file=sys.stderr, flush=True)


def serve_and_replay(tmp: Path, port_base: int, train: Interactions,
                     events: list[events_pb2.PlaybackEvent]) -> tuple[Replay, dict[str, Any]]:
    """Start the services, replay, stop them (always); the replay and the ingest counts."""
    procs: list[subprocess.Popen[Any]] = []
    try:
        rankers, streams = start_services(tmp, port_base, procs)
        run = Replay(rankers, streams, set(train.user_ids.tolist()))
        replay_served(run, events)
        for stream in streams.values():
            stream.close()
        return run, {name: stream.counts for name, stream in streams.items()}
    finally:
        stop(procs)


def evaluate(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Split, build, serve and replay; the results as a JSON-ready dict."""
    log = load_movielens_100k(args.cache_dir).interactions
    cutoff = args.cutoff if args.cutoff is not None else \
        int(np.quantile(log.timestamps, args.quantile))
    train, test = log.until(cutoff), log.after(cutoff).sorted_by_time()
    events = list(islice(to_events(test, cutoff), args.limit))
    build_base(args, cutoff, tmp / "base")
    peers = peer_rules(log, cutoff, tmp / "base", args.limit)
    run, ingest = serve_and_replay(tmp, args.port_base, train, events)
    users = {e.user_id for e in events}
    served = {v: {g: run.scores.get((v, g), Score()).summary() for g in GROUPS}
              for v in VARIANTS}
    return {"cutoff": cutoff, "cutoff_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                           time.gmtime(cutoff)),
            "train_events": len(train), "test_events": len(test), "scored_events": len(events),
            "test_users": len(users), "new_users": len(users - run.known),
            "als": {k: getattr(args, k) for k in ("factors", "regularization", "alpha",
                                                  "iterations", "half_life_s")},
            "ingest": ingest, "variants": {**served, **peers}}


def peer_rules(log: Interactions, cutoff: int, data_dir: Path,
               limit: int | None) -> dict[str, Any]:
    """The peers' rules (and ours, as a check) replayed in-process on the same events."""
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir))
    split = Split.at(log, catalog.item_ids, cutoff)
    if limit is not None:
        split = split.first(limit)
    factors = np.asarray(catalog.item_factors, np.float64)
    als = AlsParams.of(catalog.manifest.als)
    vector = DecayedFoldIn(factors, als, catalog.half_life_s)
    assert catalog.neighbours is not None, "the build writes neighbours"
    ranking = RankingConfig()
    neighbours = Neighbours(catalog.neighbours, ranking.recent_plays,
                            ranking.recent_half_life_plays)
    rules: dict[str, Rule] = {
        "realtime (in-process)": Blended(vector, neighbours, ranking.blend_weight),
        "realtime, vector only (in-process)": vector,
        "item-to-item, last 100 (Gorse)": ItemToItem(split),
        "average vector, last 20 plays (Qdrant)": AverageVector(factors),
        "average vector, last 20 positives (Qdrant)": AverageVector(factors, min_weight=0.79),
        "popularity": Popularity(split)}
    return replay(split, rules)


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table with a short header."""
    lines = [f"Cutoff {result['cutoff_utc']}: {result['train_events']:,} training events, "
             f"{result['scored_events']:,} of {result['test_events']:,} test events scored; "
             f"{result['new_users']} of {result['test_users']} test users unknown at cutoff. "
             f"ALS {result['als']}.", "",
             "| variant | events | HR@10 | NDCG@10 | HR@10 known users | HR@10 new users "
             "| NDCG@10 known | NDCG@10 new | POPULAR answers |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, groups in result["variants"].items():
        a, k, n = (groups[g] for g in GROUPS)
        lines.append(f"| {name} | {a['events']:,} | {a['hr_at_10']:.4f} | {a['ndcg_at_10']:.4f} "
                     f"| {k['hr_at_10']:.4f} | {n['hr_at_10']:.4f} | {k['ndcg_at_10']:.4f} "
                     f"| {n['ndcg_at_10']:.4f} | {a['popular_share']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of HR@10 and NDCG@10 per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for shift, metric in ((-0.2, "hr_at_10"), (0.2, "ndcg_at_10")):
        ax.bar(x + shift, [result["variants"][v]["all"][metric] for v in names], 0.4,
               label={"hr_at_10": "HR@10", "ndcg_at_10": "NDCG@10"}[metric])
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"MovieLens-100K replay, {result['scored_events']:,} events")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write(result: dict[str, Any], table: str, out: Path) -> Path:
    """Write the JSON, Markdown and PNG files; returns the path stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"eval-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    atomic_write(stem.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    atomic_write(stem.with_suffix(".md"), table.encode())
    plot(result, stem.with_suffix(".png"))
    return stem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantile", type=float, default=0.8, help="cutoff quantile of timestamps")
    p.add_argument("--cutoff", type=int, help="cutoff unix time (overrides --quantile)")
    als = AlsParams()
    p.add_argument("--factors", type=int, default=als.factors)
    p.add_argument("--regularization", type=float, default=als.regularization)
    p.add_argument("--alpha", type=float, default=als.alpha)
    p.add_argument("--iterations", type=int, default=als.iterations)
    p.add_argument("--half-life-s", type=float, default=als.half_life_s,
                   help="decay of a play's weight in the fold-in (0 = none)")
    p.add_argument("--limit", type=int, help="score only the first N test events")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/datasets"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--port-base", type=int, default=50261,
                   help="ranking services listen on this port and the next two")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI: run the replay, print the table, write the result files."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-eval-"))
    try:
        result = evaluate(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["command"] = " ".join(["python -m bench.eval", *argv])
    table = markdown(result)
    print(table)
    print(f"wrote {write(result, table, args.out)}.{{json,md,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
