"""kill -9 mid-stream or mid-build, again and again; then prove nothing was lost or half-loaded.

`python -m bench.crash --data-dir D --cycles 50 [--target ingest|build]` (the test suite
runs short versions).

Target `build`: `python -m index build` is SIGKILLed at random moments while writing a
new snapshot into D; afterwards CURRENT must load, and every snapshot directory that
exists must be complete (they appear only by an atomic rename).

Target `ingest` (default):
A client streams batches with IngestStream and records the acked sequences; the server
is SIGKILLed at a random moment and restarted; the client resends what was not acked
(at-least-once). Afterwards, straight from the LMDB store: every acked event_id is in the
seen DB, every applied event shows in its user's history exactly once (weight and
version), and the env opens clean.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bench.services import start_process
from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.snapshot import SnapshotError, current_version
from index.store import UserStore
from recsys.v1 import events_pb2, events_pb2_grpc

USERS = 5_000
BATCH = 50
# Each user's k-th event is on its k-th item, so an item is never played twice by a user
# and never evicted from the (500-item) history: its weight then shows each application.
MAX_EVENTS = USERS * 400
FRACTION = 0.5  # a PLAY_COMPLETE at half watched weighs 0.5


@dataclass
class Ledger:
    """What the client sent and what the server acknowledged."""

    items: list[str]
    sent: int = 0
    acked: set[int] = field(default_factory=set)  # batch numbers
    pending: list[int] = field(default_factory=list)  # sent, not acked: resend

    def batch(self, number: int) -> list[events_pb2.PlaybackEvent]:
        stamp = Timestamp()
        stamp.GetCurrentTime()
        return [events_pb2.PlaybackEvent(
            event_id=f"crash-{i}", user_id=f"crash-u{i % USERS}",
            item_id=self.items[i // USERS], type=events_pb2.PLAY_COMPLETE,
            occurred_at=stamp, watch_fraction=FRACTION)
            for i in range(number * BATCH, (number + 1) * BATCH)]


def _stream_until_killed(port: int, ledger: Ledger) -> None:
    def requests():  # type: ignore[no-untyped-def]
        for number in list(ledger.pending):
            yield events_pb2.IngestStreamRequest(sequence=number, events=ledger.batch(number))
        while (ledger.sent + 1) * BATCH <= MAX_EVENTS:
            number = ledger.sent
            ledger.sent += 1
            ledger.pending.append(number)
            yield events_pb2.IngestStreamRequest(sequence=number, events=ledger.batch(number))

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        try:
            for response in stub.IngestStream(requests()):
                ledger.acked.add(response.sequence)
                ledger.pending.remove(response.sequence)
        except grpc.RpcError:
            pass  # the server was killed


def run(data_dir: Path, cycles: int, seed: int = 0, max_uptime_s: float = 1.5) -> dict[str, object]:
    """Kill/restart `cycles` times while streaming; verify the store; return the figures."""
    rng = random.Random(seed)
    catalog = CatalogSnapshot.load(snapshots_dir(data_dir), with_index=False)
    if len(catalog) < MAX_EVENTS // USERS:
        raise ValueError(f"the catalog needs at least {MAX_EVENTS // USERS} items")
    ledger = Ledger(items=catalog.item_ids)
    restart_s = []
    for _ in range(cycles):
        started = time.perf_counter()
        proc, port = start_process("event_service", data_dir)
        restart_s.append(time.perf_counter() - started)
        client = threading.Thread(target=_stream_until_killed, args=(port, ledger), daemon=True)
        client.start()
        time.sleep(rng.uniform(0.05, max_uptime_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        client.join(30)
    return {"cycles": cycles, "batches_sent": ledger.sent, "events_sent": ledger.sent * BATCH,
            "restart_to_listening_s_max": round(max(restart_s), 2),
            "restart_to_listening_s_median": round(sorted(restart_s)[len(restart_s) // 2], 2),
            **verify(data_dir, ledger)}


def verify(data_dir: Path, ledger: Ledger) -> dict[str, int]:
    """Count acked events found/lost and events applied more than once, from the store."""
    with UserStore(users_dir(data_dir)) as store:
        applied = [i for i in range(ledger.sent * BATCH) if store.seen(f"crash-{i}")]
        acked = [i for b in ledger.acked for i in range(b * BATCH, (b + 1) * BATCH)]
        applied_set = set(applied)
        lost = sum(i not in applied_set for i in acked)
        twice = missing = 0
        for user in range(USERS):
            mine = [i for i in applied if i % USERS == user]
            record = store.get_user(f"crash-u{user}")
            version = record.version if record is not None else 0
            weights = dict(zip(record.item_ids, record.weights.tolist(), strict=True)) \
                if record is not None else {}
            expected: dict[str, float] = {}
            for i in mine:
                expected[ledger.items[i // USERS]] = FRACTION
            twice += max(0, version - len(mine))
            twice += sum(abs(w - expected.get(k, 0.0)) > 1e-4 for k, w in weights.items())
            missing += len(expected.keys() - weights.keys())  # applied, yet not in the history
        stale_readers = store.env.reader_check()
    return {"events_acked": len(acked), "acked_found": len(acked) - lost, "acked_lost": lost,
            "events_applied": len(applied), "applied_twice": twice,
            "applied_missing_from_history": missing,
            "stale_reader_slots_reaped": stale_readers}


def build_kills(data_dir: Path, cycles: int, seed: int = 0,
                max_delay_s: float = 1.5) -> dict[str, object]:
    """SIGKILL snapshot builds into `data_dir` while they write; what is left must load.

    Each kill lands a random 0..max_delay_s after the build's temporary snapshot directory
    appears, i.e. while files are being written, fsynced and renamed.
    """
    rng = random.Random(seed)
    root = snapshots_dir(data_dir)
    before = current_version(root)
    completed = incomplete = 0
    for cycle in range(cycles):
        proc = subprocess.Popen(
            [sys.executable, "-m", "index", "build", "--dataset", "synthetic", "--n-items",
             "50000", "--n-users", "5000", "--factors", "32", "--index", "hnsw", "--seed",
             str(cycle), "--version", f"killed-{seed}-{cycle}", "--data-dir", str(data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.getcwd()})
        while proc.poll() is None and not any(p.name.startswith(".tmp-")
                                               for p in root.iterdir()):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, max_delay_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for version_dir in root.iterdir():
            if version_dir.is_dir() and not version_dir.name.startswith("."):
                try:
                    CatalogSnapshot.load(root, version_dir.name, with_index=False)
                except SnapshotError:
                    incomplete += 1
        completed += (root / f"killed-{seed}-{cycle}").is_dir()
    return {"cycles": cycles, "builds_completed_before_kill": completed,
            "builds_killed_mid_write": cycles - completed,
            "incomplete_snapshot_dirs": incomplete, "current_before": before,
            "current_after": CatalogSnapshot.load(root).model_version}


def main() -> None:
    """CLI for the long modes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="a built data dir")
    parser.add_argument("--target", choices=["ingest", "build"], default="ingest")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = run if args.target == "ingest" else build_kills
    print(json.dumps(work(args.data_dir, args.cycles, args.seed), indent=2))


if __name__ == "__main__":
    main()
