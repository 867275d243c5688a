"""The log mode under faults, on loopback: a 3-node JetStream cluster (streams with 3
replicas), P partitions, workers that join, leave and die, a front end, 2 ranking replicas.

`python -m bench.cluster` runs the long mode (100,000 events over ~60 s for 5,000
users) and the scaling stage (ingest with 1, 2 and 3 workers); `--quick` a short one.
The test suite runs a short plan (tests/integration/test_log_mode.py).

While events stream in through the front end (with 2% resent inside the log's duplicate
window and 2% after it), the faults are: kill -9 of a worker (three times, once by the
worker itself between publishing a commit to the changelog and committing it to LMDB),
a scale-up, a scale-down, kill -9 of the events stream's leader node, and a takeover
by a worker with an empty data dir. Afterwards, from the log and the shards themselves:
every acked event is applied exactly once in its final shard, every user is only in its
own shard, no partition ever had two owners committing, each shard's position is its
partition's last sequence, and sampled user vectors equal a single-process replay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from bench.services import start_process, stop
from event_service.server import to_event
from eventlog.cluster import Cluster
from eventlog.config import LogConfig
from eventlog.jetstream import EPOCH, KIND, OWNER, connect, last_sequence
from index import snapshots_dir
from index.apply import FoldInPolicy, apply_group
from index.catalog import CatalogSnapshot
from index.changelog import POSITION_KEY
from index.events import Event, EventWeights
from index.partitions import partition_of
from index.snapshot import current_version
from index.store import StoreWriter, UserStore
from index.user_stats import StatsCache
from recsys.v1 import events_pb2, events_pb2_grpc, ranking_pb2, ranking_pb2_grpc

BATCH = 50


@dataclass(frozen=True)
class Plan:
    """How much load, for how long, and the log's layout."""

    events: int = 100_000
    seconds: float = 60.0
    users: int = 5_000
    partitions: int = 16
    duplicate_window_s: float = 5.0
    resend_inside: float = 0.02
    resend_outside: float = 0.02
    seed: int = 0


QUICK = Plan(events=8_000, seconds=24.0, users=1_000)


@dataclass
class Ledger:
    """What the client sent and what the front end acked."""

    acked: set[str] = field(default_factory=set)
    sent: int = 0
    failed_calls: int = 0
    resent_inside: int = 0
    resent_outside: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Topology:
    """The processes of one run, each with its own data dir under `root`."""

    def __init__(self, root: Path, base: Path, plan: Plan, prefix: str = "freshrec") -> None:
        self.root, self.base, self.plan = root, base, plan
        self.cluster = Cluster(root / "nats", 3)
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.prefix = prefix
        self.events: list[tuple[float, str]] = []  # (time, what happened)

    @property
    def log(self) -> LogConfig:
        return LogConfig(urls=self.cluster.urls, partitions=self.plan.partitions, replicas=3,
                         duplicate_window_s=self.plan.duplicate_window_s, prefix=self.prefix)

    @property
    def log_args(self) -> list[str]:
        log = self.log
        return ["--log-urls", log.urls, "--log-partitions", str(log.partitions),
                "--log-replicas", "3", "--log-duplicate-window-s", str(log.duplicate_window_s),
                "--log-prefix", log.prefix]

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))

    def data_dir(self, name: str, fresh: bool = False) -> Path:
        """A host's data dir: the batch build's snapshots only (no shared disk)."""
        path = self.root / name
        if fresh and path.exists():
            shutil.rmtree(path)
        if not path.exists():
            shutil.copytree(snapshots_dir(self.base), snapshots_dir(path))
        return path

    def start_worker(self, name: str, *extra: str, fresh: bool = False) -> None:
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 (the child owns it)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "event_service.worker", "--data-dir",
             str(self.data_dir(name, fresh)), "--worker-id", name, "--snapshot-every-s", "10",
             *self.log_args, *extra],
            stderr=log, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.getcwd()})
        log.close()
        self.note(f"start {name}{' (empty data dir)' if fresh else ''} {' '.join(extra)}")

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(60)
        self.note(f"{signal.Signals(sig).name} {name}")

    def stop_all(self) -> None:
        stop(self.procs.values())
        self.cluster.stop()


# -- load ------------------------------------------------------------------------------


def _event(n: int, user: str, item: str) -> events_pb2.PlaybackEvent:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return events_pb2.PlaybackEvent(event_id=f"e{n}", user_id=user, item_id=item,
                                    type=events_pb2.PLAY_COMPLETE, occurred_at=stamp,
                                    watch_fraction=1.0)


def drive(port: int, plan: Plan, items: list[str], ledger: Ledger, stop_at: float) -> None:
    """Send the plan's events in batches through the front end at a steady rate; resend a
    batch whose call failed (safe: event ids dedupe) and resend some events on purpose."""
    rng = random.Random(plan.seed)
    stub = events_pb2_grpc.EventServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    users = [f"u{i}" for i in range(plan.users)]
    late: list[tuple[float, events_pb2.PlaybackEvent]] = []  # resends after the window
    interval = plan.seconds * BATCH / plan.events
    started, n = time.monotonic(), 0
    while n < plan.events or late:
        time.sleep(max(0.0, started + (n // BATCH) * interval - time.monotonic()))
        batch = [_event(n + i, rng.choice(users), rng.choice(items))
                 for i in range(min(BATCH, plan.events - n))]
        n += len(batch)
        soon = []  # resends inside the window: in the very next call
        for event in batch:
            r = rng.random()
            if r < plan.resend_inside:
                soon.append(event)
            elif r < plan.resend_inside + plan.resend_outside:
                late.append((time.monotonic() + plan.duplicate_window_s + 2, event))
        now = time.monotonic()
        ready = [e for t, e in late if t <= now]
        late = [(t, e) for t, e in late if t > now]
        if batch or ready:
            _send(stub, batch + ready, ledger, stop_at)
        if soon:
            _send(stub, soon, ledger, stop_at)
        with ledger.lock:
            ledger.resent_inside += len(soon)
            ledger.resent_outside += len(ready)
        if not batch:
            time.sleep(0.2)


def _send(stub: events_pb2_grpc.EventServiceStub, events: list[events_pb2.PlaybackEvent],
          ledger: Ledger, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        try:
            stub.Ingest(iter([events_pb2.IngestRequest(events=events)]), timeout=30)
        except grpc.RpcError:
            with ledger.lock:
                ledger.failed_calls += 1
            time.sleep(0.5)
            continue
        with ledger.lock:
            ledger.acked.update(e.event_id for e in events)
            ledger.sent += len(events)
        return


def probe(events_port: int, ranking_port: int, stop_flag: threading.Event,
          out: list[tuple[float, float]], failures: list[str]) -> None:
    """Event -> visible through the log: Track, then Recommend at that log sequence;
    (when, seconds) of each that succeeded."""
    events = events_pb2_grpc.EventServiceStub(grpc.insecure_channel(f"127.0.0.1:{events_port}"))
    ranking = ranking_pb2_grpc.RankingServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{ranking_port}"))
    n = 0
    while not stop_flag.wait(0.05):
        n += 1
        user = f"probe{n % 50}"
        started = time.perf_counter()
        try:
            ack = events.Track(events_pb2.TrackRequest(event=_event(10**9 + n, user, "i0")),
                               timeout=10)
            ranking.Recommend(ranking_pb2.RecommendRequest(
                user_id=user, k=5, min_log_sequence=ack.log_sequence), timeout=10)
            out.append((time.monotonic(), time.perf_counter() - started))
        except grpc.RpcError as exc:
            failures.append(f"{exc.code().name}: {exc.details()}")


# -- reading the log back --------------------------------------------------------------


async def _read_all(js: Any, stream: str, subject: str) -> list[Any]:
    info = await js.stream_info(stream)
    last = int(info.state.last_seq)
    if not info.state.messages:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True)
    out: list[Any] = []
    try:
        while not out or out[-1].metadata.sequence.stream < last:
            out.append(await sub.next_msg(timeout=10))
    finally:
        await sub.unsubscribe()
    return out


async def read_log(log: LogConfig) -> dict[str, Any]:
    """Every event message and changelog message, and each partition's last sequence."""
    client, js = await connect(log, "freshrec-bench")
    try:
        events = await _read_all(js, log.events_stream, f"{log.prefix}.events.*")
        changelog = await _read_all(js, log.shards_stream, f"{log.prefix}.shard.*")
        lasts = [await last_sequence(js, log.events_stream, log.events_subject(p))
                 for p in range(log.partitions)]
    finally:
        await client.close()
    return {"events": events, "changelog": changelog, "lasts": lasts,
            "owners": await all_owned(log)}


async def stream_leader(log: LogConfig) -> str:
    client, js = await connect(log, "freshrec-bench")
    try:
        cluster = (await js.stream_info(log.events_stream)).cluster
        assert cluster is not None and cluster.leader
        return cluster.leader
    finally:
        await client.close()


async def all_owned(log: LogConfig) -> dict[int, str]:
    """Each partition's lease holder ("" if none, or if the log is not there yet)."""
    client, js = await connect(log, "freshrec-bench")
    owners = dict.fromkeys(range(log.partitions), "")
    try:
        kv = await js.key_value(log.owners_bucket)
        for p in range(log.partitions):
            owners[p] = json.loads((await kv.get(f"p{p}")).value or b"{}").get("owner", "")
    except Exception:  # not there yet: the caller polls
        pass
    finally:
        await client.close()
    return owners


def wait_owned(log: LogConfig, workers: int, timeout: float = 120.0) -> None:
    """Wait until the partitions are shared out fairly among `workers`, then a little more
    for the last fences."""
    deadline = time.monotonic() + timeout
    fair = {log.partitions // workers, -(-log.partitions // workers)}
    while True:
        owners = list(asyncio.run(all_owned(log)).values())
        counts = {o: owners.count(o) for o in owners}
        if "" not in counts and len(counts) == workers and set(counts.values()) <= fair:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the partitions were not shared out: {counts}")
        time.sleep(0.5)
    time.sleep(2.0)


def _shard(root: Path, owner: str, p: int) -> UserStore:
    return UserStore(root / owner / "shards" / f"p{p:04d}", readonly=True)


def wait_caught_up(topology: Topology, timeout: float) -> float:
    """Wait until every partition's owner has committed its last sequence; seconds taken."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        state = asyncio.run(read_log_positions(topology.log))
        behind = 0
        for p, (owner, last) in state.items():
            try:
                with _shard(topology.root, owner, p) as shard:
                    behind += int(shard.get_meta(POSITION_KEY) or 0) < last
            except Exception:
                behind += 1
        if not behind:
            return time.monotonic() - started
        time.sleep(0.25)
    raise TimeoutError("the workers did not catch up with the log")


async def read_log_positions(log: LogConfig) -> dict[int, tuple[str, int]]:
    owners = await all_owned(log)
    client, js = await connect(log, "freshrec-bench")
    try:
        return {p: (owners[p], await last_sequence(js, log.events_stream,
                                                   log.events_subject(p)))
                for p in range(log.partitions)}
    finally:
        await client.close()


# -- checks ----------------------------------------------------------------------------


def audit_changelog(changelog: list[Any]) -> dict[str, int]:
    """Per partition: epochs never go back, one owner per epoch, and no commit of an
    epoch after a newer claim (two owners committing)."""
    by_partition: dict[str, list[Any]] = defaultdict(list)
    for msg in changelog:
        by_partition[msg.subject].append(msg)
    overlaps = claims = 0
    for msgs in by_partition.values():
        current, owner_of = 0, dict[int, str]()
        for msg in msgs:
            headers = msg.headers or {}
            epoch, owner = int(headers[EPOCH]), headers[OWNER]
            if owner_of.setdefault(epoch, owner) != owner or epoch < current:
                overlaps += 1
            if headers[KIND] == "claim":
                claims += 1
                current = max(current, epoch)
            elif epoch != current:
                overlaps += 1
    return {"two_owners_committing": overlaps, "claims": claims}


def verify(topology: Topology, ledger: Ledger, log_state: dict[str, Any],
           sample: int = 200) -> dict[str, Any]:
    """Exactly once, shard membership, positions, and vectors against a replay."""
    log, root = topology.log, topology.root
    logged: dict[str, events_pb2.PlaybackEvent] = {}
    for msg in log_state["events"]:
        event = events_pb2.PlaybackEvent.FromString(msg.data)
        logged.setdefault(event.event_id, event)
    per_user: dict[str, int] = defaultdict(int)
    ids_of: dict[int, list[str]] = defaultdict(list)  # partition -> logged event ids
    for event in logged.values():
        per_user[event.user_id] += 1
        ids_of[partition_of(event.user_id, log.partitions)].append(event.event_id)
    lost_acked = len(ledger.acked - logged.keys())
    lost = doubled = misplaced = not_seen = 0
    position_mismatch = 0
    vectors: dict[str, np.ndarray] = {}
    for p in range(log.partitions):
        with _shard(root, log_state["owners"][p], p) as shard:
            position_mismatch += int(shard.get_meta(POSITION_KEY) or 0) != log_state["lasts"][p]
            with shard.env.begin() as txn:
                for key, _ in txn.cursor(db=shard.dbs["users"]):
                    misplaced += partition_of(bytes(key).decode(), log.partitions) != p
            for user, count in per_user.items():
                if partition_of(user, log.partitions) != p:
                    continue
                record = shard.get_user(user)
                version = record.version if record is not None else 0
                lost += max(count - version, 0)
                doubled += max(version - count, 0)
                if record is not None:
                    vectors[user] = record.vector
            not_seen += sum(not shard.seen(e) for e in ids_of[p])
    sampled = random.Random(0).sample(sorted(u for u in vectors if not u.startswith("probe")),
                                      min(sample, len(vectors)))
    replayed = replay_single_process(topology.base, log_state["events"], set(sampled))
    diffs = [float(np.max(np.abs(vectors[u] - replayed[u]))) if len(vectors[u]) else 0.0
             for u in sampled]
    return {"logged_events": len(logged), "log_messages": len(log_state["events"]),
            "changelog_messages": len(log_state["changelog"]),
            "changelog_mb": round(sum(len(m.data) for m in log_state["changelog"]) / 1e6, 1),
            "acked_events": len(ledger.acked), "lost_acked": lost_acked,
            "lost": lost, "double_applied": doubled, "not_in_seen": not_seen,
            "users_in_wrong_shard": misplaced, "position_not_last": position_mismatch,
            "vectors_compared": len(sampled), "max_vector_diff": max(diffs, default=0.0),
            **audit_changelog(log_state["changelog"])}


def replay_single_process(base: Path, messages: list[Any], users: set[str]) -> dict[str, Any]:
    """The same logged events applied by one process (the embedded path), in log order."""
    root = snapshots_dir(base)
    catalog = CatalogSnapshot.load(root, current_version(root), with_index=False)
    store_dir = base.parent / f"replay-{os.getpid()}"
    shutil.rmtree(store_dir, ignore_errors=True)
    with UserStore(store_dir) as store:
        cache = StatsCache(1 << 30)
        events = [e for e in (to_event(events_pb2.PlaybackEvent.FromString(m.data))
                              for m in messages) if e.user_id in users]

        def apply(writer: StoreWriter, group: list[Event]) -> None:
            apply_group(writer, catalog, group, EventWeights(), FoldInPolicy(), cache,
                        time.time())

        for start in range(0, len(events), 500):
            store.transact(partial(apply, group=events[start:start + 500]))
        out = {u: (r.vector if (r := store.get_user(u)) else np.zeros(0)) for u in users}
    shutil.rmtree(store_dir, ignore_errors=True)
    return out


# -- the run ---------------------------------------------------------------------------


# When each fault happens, as a fraction of the load's duration (the first fifth is calm).
FAULTS = [(0.20, "kill w1"), (0.26, "restart w1"), (0.32, "kill w2"),
          (0.34, "restart w2 to crash in the commit window"), (0.44, "restart w2"),
          (0.50, "scale up w4"), (0.58, "kill the stream leader"),
          (0.68, "restart the node"), (0.72, "scale down w4"),
          (0.82, "kill w3, take over with an empty data dir")]


def _apply(topology: Topology, what: str, state: dict[str, Any]) -> None:
    if what == "kill w1":
        topology.signal("w1", signal.SIGKILL)
    elif what == "restart w1":
        topology.start_worker("w1")
    elif what == "kill w2":
        topology.signal("w2", signal.SIGKILL)
    elif what == "restart w2 to crash in the commit window":
        topology.start_worker("w2", "--crash-after-commits", "40")
    elif what == "restart w2":
        topology.procs["w2"].wait(30)  # it has killed itself in the window by now
        topology.note("w2 died in the commit window")
        topology.start_worker("w2")
    elif what == "scale up w4":
        topology.start_worker("w4")
    elif what == "kill the stream leader":
        leader = asyncio.run(stream_leader(topology.log))
        node = next(n for n in topology.cluster.nodes if n.name == leader)
        topology.cluster.kill(node)
        state["killed_node"] = node
        topology.note(f"kill -9 NATS node {leader} (the events stream's leader)")
    elif what == "restart the node":
        topology.cluster.start(state["killed_node"])
        topology.note(f"restart NATS node {state['killed_node'].name}")
    elif what == "scale down w4":
        topology.signal("w4", signal.SIGTERM)
    elif what == "kill w3, take over with an empty data dir":
        topology.signal("w3", signal.SIGKILL)
        topology.start_worker("w5", fresh=True)


def takeovers(topology: Topology, changelog: list[Any]) -> list[dict[str, Any]]:
    """Per kill -9 of a worker: the partitions it owned, and the seconds until each was
    claimed (and fenced) again, by another worker or by its own restart."""
    history: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
    for msg in changelog:
        headers = msg.headers or {}
        history[msg.subject].append((msg.metadata.timestamp.timestamp(), headers[KIND],
                                     headers[OWNER]))
    out = []
    for killed_at, what in topology.events:
        if not what.startswith("SIGKILL"):
            continue
        name = what.split()[-1]
        taken = {}
        for subject, entries in history.items():
            before = [owner for t, _, owner in entries if t <= killed_at]
            if before[-1:] == [name]:
                taken[subject.rsplit(".", 1)[1]] = round(next(
                    (t for t, kind, _ in entries if t > killed_at and kind == "claim"),
                    float("nan")) - killed_at, 2)
        out.append({"worker": name, "partitions": len(taken),
                    "max_s": max(taken.values(), default=None), "each_s": taken})
    return out


def run(root: Path, base: Path, plan: Plan) -> dict[str, Any]:
    """The faulted run: start, stream, inject faults, then verify."""
    root.mkdir(parents=True, exist_ok=True)
    topology = Topology(root, base, plan)
    topology.cluster.start()
    topology.cluster.wait_ready()
    catalog = CatalogSnapshot.load(snapshots_dir(base), current_version(snapshots_dir(base)),
                                   with_index=False)
    items = list(catalog.item_ids)
    try:
        for name in ("w1", "w2", "w3"):
            topology.start_worker(name)
        topology.procs["front"], front_port = start_process(
            "event_service", topology.data_dir("front"), *topology.log_args)
        ranking_ports = []
        for name in ("rk1", "rk2"):
            proc, port = start_process("ranking_service", topology.data_dir(name),
                                       *topology.log_args, workers=1)
            topology.procs[name] = proc
            ranking_ports.append(port)
        wait_owned(topology.log, 3)  # the load starts on a settled cluster
        ledger, latencies, failures = Ledger(), list[tuple[float, float]](), list[str]()
        stop_flag = threading.Event()
        prober = threading.Thread(target=probe, args=(front_port, ranking_ports[0], stop_flag,
                                                      latencies, failures), daemon=True)
        started = time.monotonic()
        driver = threading.Thread(target=drive, args=(front_port, plan, items, ledger,
                                                      started + plan.seconds * 3 + 60))
        driver.start()
        prober.start()
        state: dict[str, Any] = {}
        for at, what in FAULTS:
            time.sleep(max(0.0, started + at * plan.seconds - time.monotonic()))
            _apply(topology, what, state)
        driver.join()
        stop_flag.set()
        prober.join()
        load_s = time.monotonic() - started
        caught_up_s = wait_caught_up(topology, 120)
        log_state = asyncio.run(read_log(topology.log))
        result = verify(topology, ledger, log_state)
        result.update(replicas_behind(topology, ranking_ports, log_state))
    finally:
        topology.stop_all()
    first_fault = started + FAULTS[0][0] * plan.seconds
    steady = sorted(s for t, s in latencies if t < first_fault)
    whole = sorted(s for _, s in latencies)
    result.update({
        "plan": asdict(plan), "load_seconds": round(load_s, 1),
        "caught_up_after_load_s": round(caught_up_s, 2),
        "sent": ledger.sent, "failed_calls_resent": ledger.failed_calls,
        "resent_inside_window": ledger.resent_inside,
        "resent_outside_window": ledger.resent_outside,
        "takeovers": takeovers(topology, log_state["changelog"]),
        "event_to_visible_ms": {name: {"n": len(v), "p50": _ms(v, 0.5), "p99": _ms(v, 0.99),
                                       "max": _ms(v, 1.0)}
                                for name, v in (("before_faults", steady), ("whole_run", whole))},
        "probe_failures": len(failures), "probe_failure_examples": failures[:3],
        "timeline": [(round(t - topology.events[0][0], 1), w) for t, w in topology.events],
    })
    return result


def _caught_up(stub: ranking_pb2_grpc.RankingServiceStub, user: str, sequence: int,
               timeout: float = 60.0) -> None:
    """Wait until the replica has applied the user's partition up to `sequence`: the server
    waits at most its --max-log-wait-s per call and says UNAVAILABLE ("retry") past it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=1,
                                                        min_log_sequence=sequence), timeout=30)
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise


def replicas_behind(topology: Topology, ports: list[int],
                    log_state: dict[str, Any]) -> dict[str, float]:
    """After the replicas caught up with the changelog (a Recommend at each partition's
    last sequence): users whose record in a replica differs from their final shard's, and
    the largest relative difference of a replica's item count (trending) from the sum of
    the shards' counts."""
    log = topology.log
    for port in ports:
        stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        for p in range(log.partitions):  # read-your-writes at the last sequence of each
            user = next((f"u{i}" for i in range(topology.plan.users)
                         if partition_of(f"u{i}", log.partitions) == p), None)
            if user is not None:
                _caught_up(stub, user, log_state["lasts"][p])
    now, behind, drift = time.time(), 0, 0.0
    summed: dict[str, float] = defaultdict(float)
    shards = [_shard(topology.root, log_state["owners"][p], p) for p in range(log.partitions)]
    try:
        for shard in shards:
            for item, count in shard.item_counts(now).items():
                summed[item] += count
        for name in ("rk1", "rk2"):
            with UserStore(topology.root / name / "users.lmdb", readonly=True) as replica:
                for shard in shards:
                    with shard.env.begin() as txn:
                        for key, value in txn.cursor(db=shard.dbs["users"]):
                            mine = replica.get_user(bytes(key).decode())
                            behind += mine is None or mine.encode() != bytes(value)
                counts = replica.item_counts(now)
                drift = max([drift, *(abs(counts.get(i, 0.0) - c) / c
                                      for i, c in summed.items() if c > 0)])
    finally:
        for shard in shards:
            shard.close()
    return {"replica_users_differing": behind, "replica_trending_max_rel_diff": drift}


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(1000 * values[min(int(q * len(values)), len(values) - 1)], 1)


# -- scaling ---------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _preload(log: LogConfig, n: int, users: int, items: list[str]) -> None:
    client, js = await connect(log, "freshrec-bench")
    rng = random.Random(1)
    try:
        for start in range(0, n, 2000):
            acks = []
            for i in range(start, min(start + 2000, n)):
                user = f"u{rng.randrange(users)}"
                acks.append(await js.publish_async(
                    log.events_subject(log.partition(user)),
                    _event(i, user, rng.choice(items)).SerializeToString(),
                    headers={"Nats-Msg-Id": f"e{i}"}))
            await asyncio.gather(*acks)
    finally:
        await client.close()


def scaling(root: Path, base: Path, workers: int, events: int, users: int,
            partitions: int = 16) -> dict[str, Any]:
    """Ingest throughput and CPU cost with `workers` workers: the workers take their
    partitions, are paused (SIGSTOP) while the log is filled, then drain it."""
    catalog = CatalogSnapshot.load(snapshots_dir(base), current_version(snapshots_dir(base)),
                                   with_index=False)
    plan = Plan(events=events, users=users, partitions=partitions)
    topology = Topology(root / f"scale{workers}", base, plan, prefix=f"scale{workers}")
    topology.root.mkdir(parents=True, exist_ok=True)
    topology.cluster.start()
    topology.cluster.wait_ready()
    try:
        for i in range(workers):
            topology.start_worker(f"w{i + 1}")
        wait_owned(topology.log, workers)
        procs = [topology.procs[f"w{i + 1}"] for i in range(workers)]
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        asyncio.run(_preload(topology.log, events, users, list(catalog.item_ids)))
        cpu_before = [_cpu_seconds(p.pid) for p in procs]
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        seconds = wait_caught_up(topology, 600)
        cpu = [_cpu_seconds(p.pid) - b for p, b in zip(procs, cpu_before, strict=True)]
    finally:
        topology.stop_all()
    return {"workers": workers, "events": events, "users": users,
            "seconds": round(seconds, 2),
            "events_per_s": round(events / seconds),
            "cpu_s_per_10k_events": round(sum(cpu) / events * 10_000, 2),
            "cpu_s_per_worker": [round(c, 1) for c in cpu]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, default=Path("bench/data/movielens-100k"),
                        help="a built data dir (its snapshots are copied to every host)")
    parser.add_argument("--root", type=Path, default=Path("bench/results/cluster-run"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster.json"))
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    plan = QUICK if args.quick else Plan()
    result: dict[str, Any] = {"faulted": run(args.root / "faulted", args.base, plan)}
    print(json.dumps(result["faulted"], indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    if not args.skip_scaling:  # users with many events in a backlog, and with ~2 each
        events = 20_000 if args.quick else 200_000
        result["scaling"] = [scaling(args.root, args.base, k, events, users)
                             for users in (plan.users, events // 2) for k in (1, 2, 3)]
        print(json.dumps(result["scaling"], indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
