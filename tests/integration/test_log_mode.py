"""The log mode against a real NATS JetStream: fencing, read-your-writes, bad producers,
resends, and (3 nodes) the whole fault plan of `bench.cluster` in a short run."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client

from bench.cluster import Plan, run
from bench.services import start_process, stop
from event_service.config import WorkerSettings
from event_service.metrics import WorkerMetrics
from event_service.partition import Fenced, Owned, PartitionServer
from event_service.shard import LogMessage, Shard
from eventlog import snapshots
from eventlog.cluster import Cluster, free_port
from eventlog.config import LogConfig
from eventlog.jetstream import LogLayoutError, connect, ensure_log
from eventlog.seed import seed
from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.changelog import POSITION_KEY
from index.follower import SnapshotFollower
from index.store import UserStore
from index.tables import Dataset
from ranking_service.replica import FOLLOWED_KEY, Replica, position_key
from recsys.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
)
from tests.integration.conftest import playback, status_of, within


@pytest.fixture(scope="module")
def nats_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One JetStream node (streams with 1 replica): enough for everything but failover."""
    cluster = Cluster(tmp_path_factory.mktemp("nats"), 1)
    cluster.start()
    cluster.wait_ready()
    yield cluster
    cluster.stop()


def _host(root: Path, data_dir: Path, name: str) -> Path:
    """A host's data dir: the built snapshots only."""
    path = root / name
    shutil.copytree(snapshots_dir(data_dir), snapshots_dir(path))
    return path


def _log_args(log: LogConfig) -> list[str]:
    return ["--log-urls", log.urls, "--log-partitions", str(log.partitions), "--log-replicas",
            "1", "--log-duplicate-window-s", str(log.duplicate_window_s), "--log-prefix",
            log.prefix]


def _server(tmp_path: Path, data_dir: Path, log: LogConfig, name: str) -> PartitionServer:
    """What a worker named `name` serves its partitions with (its own data dir)."""
    settings = WorkerSettings(data_dir=_host(tmp_path, data_dir, name), worker_id=name,
                              log_urls=log.urls, log_partitions=log.partitions,
                              log_replicas=1, log_prefix=log.prefix)
    root = snapshots_dir(settings.data_dir)
    catalogs = SnapshotFollower(root, lambda v: CatalogSnapshot.load(root, v, with_index=False),
                                lambda c: c.model_version)
    return PartitionServer(settings, catalogs, WorkerMetrics())


async def _attach(server: PartitionServer, log: LogConfig) -> Client:
    """Connect a partition server to the log; the connection, to close."""
    client, js = await connect(log, server.id)
    await ensure_log(js, log)
    server.attach(js, await snapshots.bucket(js, log))
    return client


def _users(store: UserStore) -> dict[str, bytes]:
    """Every user's stored record, as bytes."""
    with store.env.begin() as txn:
        return {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=store.dbs["users"])}


def _messages(log: LogConfig, first: int, n: int, partition: int = 0) -> list[LogMessage]:
    users = [u for u in (f"u{i}" for i in range(1000)) if log.partition(u) == partition]
    return [LogMessage(first + i, playback(f"e{first + i}", users[i % 5], "i1")
                       .SerializeToString()) for i in range(n)]


def test_a_log_created_with_another_partition_count_is_refused(nats_node: Cluster) -> None:
    async def create(partitions: int) -> None:
        log = LogConfig(urls=nats_node.urls, partitions=partitions, replicas=1,
                        prefix="layout")
        client, js = await connect(log, "layout")
        try:
            await ensure_log(js, log, timeout=5)
        finally:
            await client.close()

    asyncio.run(create(4))
    asyncio.run(create(4))  # the same layout again: fine
    with pytest.raises(LogLayoutError, match="partitions=4"):
        asyncio.run(create(8))


def test_an_old_owner_cannot_commit_after_a_new_owner_has_fenced_the_partition(
        tmp_path: Path, data_dir: Path, nats_node: Cluster) -> None:
    log = LogConfig(urls=nats_node.urls, partitions=4, replicas=1, prefix="fence")

    async def scenario() -> tuple[int, int, int]:
        old, new = (_server(tmp_path, data_dir, log, n) for n in ("old", "new"))
        clients = [await _attach(server, log) for server in (old, new)]
        mine = Owned(0, epoch=1, revision=0)
        mine.shard = Shard(0, tmp_path / "old" / "p0", 1 << 24, 1 << 30)
        await old.fence(mine)
        await old.commit(mine, _messages(log, 1, 10))
        theirs = Owned(0, epoch=2, revision=0)
        theirs.shard = Shard(0, tmp_path / "new" / "p0", 1 << 24, 1 << 30)
        await new.fence(theirs)  # restores the old owner's commit from the changelog first
        with pytest.raises(Fenced):
            await old.commit(mine, _messages(log, 11, 10))
        for client in clients:
            await client.close()
        return mine.shard.position, theirs.shard.position, theirs.shard.store.count("seen")

    old_position, new_position, new_seen = asyncio.run(scenario())
    assert old_position == 10  # the refused commit changed nothing in the old shard
    assert (new_position, new_seen) == (10, 10)  # the new owner has all the old one committed


def test_a_new_owner_and_a_new_replica_start_from_the_snapshot_then_replay_the_rest(
        tmp_path: Path, data_dir: Path, nats_node: Cluster) -> None:
    log = LogConfig(urls=nats_node.urls, partitions=4, replicas=1, prefix="snap")

    async def scenario() -> tuple[int, int, Shard]:
        old, new = (_server(tmp_path, data_dir, log, n) for n in ("old", "new"))
        clients = [await _attach(server, log) for server in (old, new)]
        mine = Owned(0, epoch=1, revision=0)
        mine.shard = await old.open(mine, tmp_path / "old" / "p0")
        await old.fence(mine)
        await old.commit(mine, _messages(log, 1, 10))
        await old.snapshot(mine)
        snapped = mine.snapshot_seq
        await old.commit(mine, _messages(log, 11, 10))
        theirs = Owned(0, epoch=2, revision=0)
        theirs.shard = await new.open(theirs, tmp_path / "new" / "p0")  # an empty data dir
        from_snapshot = theirs.shard.changelog_seq
        await new.fence(theirs)
        for client in clients:
            await client.close()
        return snapped, from_snapshot, theirs.shard

    snapped, from_snapshot, shard = asyncio.run(scenario())
    assert snapped > 0 and from_snapshot == snapped  # started at the snapshot ...
    assert shard.position == 20 and shard.store.count("seen") == 20  # ... and replayed the rest
    with UserStore(tmp_path / "replica") as store:
        for restart in (False, True):
            if restart:  # as if killed in its bootstrap: it must not add the counts twice
                store.transact(lambda w: w.txn.delete(FOLLOWED_KEY.encode(),
                                                      db=w.dbs["meta"]))
            replica = Replica(log, store, snapshots_dir(data_dir))
            replica.start()
            deadline = time.monotonic() + 10
            while int(store.get_meta(position_key(0)) or 0) < 20 and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            replica.stop(5)
            users = _users(shard.store)
            assert users and all(store.get_user(u).encode() == raw for u, raw in users.items())
            now = time.time()
            theirs, mine = shard.store.item_counts(now), store.item_counts(now)
            assert theirs.keys() == mine.keys()
            assert all(abs(mine[i] - c) <= 1e-9 * c for i, c in theirs.items()), restart


def test_seeded_batch_users_are_restored_into_the_shard_of_their_partition(
        tmp_path: Path, data_dir: Path, nats_node: Cluster) -> None:
    log = LogConfig(urls=nats_node.urls, partitions=4, replicas=1, prefix="seeded")
    with UserStore(users_dir(data_dir), readonly=True) as batch:
        assert asyncio.run(seed(batch, log))["partitions_seeded"] == 4
        again = asyncio.run(seed(batch, log))  # a log that has a changelog is left alone
        assert (again["partitions_seeded"], again["partitions_skipped"]) == (0, 4)
        server = _server(tmp_path, data_dir, log, "w")

        async def restore() -> Shard:
            client = await _attach(server, log)
            owned = Owned(2, epoch=1, revision=0)
            owned.shard = Shard(2, tmp_path / "w" / "p2", 1 << 24, 1 << 30)
            await server.fence(owned)
            await client.close()
            return owned.shard

        shard = asyncio.run(restore())
        mine = {u: raw for u, raw in _users(batch).items() if log.partition(u) == 2}
        assert mine and shard.store.count("users") == len(mine)
        assert all(shard.store.get_user(u).encode() == raw for u, raw in mine.items())


Services = tuple[LogConfig, Path, int, int, int]  # log, worker's dir, ports: front,
# ranking, worker metrics


@pytest.fixture(scope="module")
def log_services(tmp_path_factory: pytest.TempPathFactory, data_dir: Path,
                 nats_node: Cluster) -> Iterator[Services]:
    """A worker, a front end and a ranking replica, each with its own data dir, over one
    log of 4 partitions."""
    root = tmp_path_factory.mktemp("hosts")
    log = LogConfig(urls=nats_node.urls, partitions=4, replicas=1, duplicate_window_s=2.0,
                    prefix="svc")
    procs = []
    try:
        proc, front = start_process("event_service", _host(root, data_dir, "front"),
                                    *_log_args(log))
        procs.append(proc)
        proc, ranking = start_process("ranking_service", _host(root, data_dir, "ranking"),
                                      *_log_args(log), workers=1)
        procs.append(proc)
        worker_dir, metrics = _host(root, data_dir, "w1"), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "event_service.worker", "--data-dir", str(worker_dir),
             "--worker-id", "w1", "--metrics-port", str(metrics), *_log_args(log)],
            stderr=subprocess.DEVNULL))
        yield log, worker_dir, front, ranking, metrics
    finally:
        stop(procs)


def test_workers_export_lag_owner_epoch_and_hand_overs_per_partition(
        log_services: Services) -> None:
    log, _, front, _, metrics = log_services
    events, _ = _stubs(front, 0)
    events.Track(events_pb2.TrackRequest(event=playback("m1", "metered", "i1")), timeout=10)
    deadline, text = time.monotonic() + 10, ""
    while time.monotonic() < deadline and 'freshrec_partition_lag{partition="3"}' not in text:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics") as page:
                text = page.read().decode()
        except urllib.error.URLError:
            pass  # the worker is still starting
        time.sleep(0.2)
    for name in ("lag", "owned", "epoch", "position", "handovers_total"):
        for p in range(log.partitions):
            assert f'freshrec_partition_{name}{{partition="{p}"}}' in text, (name, p)
    assert "freshrec_partition_takeover_seconds_count" in text


def _stubs(front: int, ranking: int) -> tuple[events_pb2_grpc.EventServiceStub,
                                              ranking_pb2_grpc.RankingServiceStub]:
    return (events_pb2_grpc.EventServiceStub(grpc.insecure_channel(f"127.0.0.1:{front}")),
            ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(f"127.0.0.1:{ranking}")))


def test_recommend_at_a_tracked_log_sequence_reads_that_write(
        log_services: Services, catalog: CatalogSnapshot) -> None:
    _, _, front, ranking, _ = log_services
    events, rank = _stubs(front, ranking)
    for n in range(5):
        ack = events.Track(events_pb2.TrackRequest(
            event=playback(f"ryw{n}", "reader", catalog.item_ids[n])), timeout=30)
        assert ack.log_sequence > 0 and not ack.duplicate
        seen = rank.Recommend(ranking_pb2.RecommendRequest(
            user_id="reader", k=5, min_log_sequence=ack.log_sequence), timeout=10)
        assert seen.user_version == n + 1  # every write so far, at once
        assert seen.source == ranking_pb2.PERSONALIZED
    again = events.Track(events_pb2.TrackRequest(
        event=playback("ryw0", "reader", catalog.item_ids[0])), timeout=10)
    assert again.duplicate  # inside the log's duplicate window


def test_the_live_catalog_in_log_mode_reaches_the_ranking_hosts_and_learns_from_plays(
        log_services: Services, small_dataset: Dataset, catalog: CatalogSnapshot) -> None:
    _, _, front, ranking, _ = log_services
    events, rank = _stubs(front, ranking)
    with grpc.insecure_channel(f"127.0.0.1:{front}") as channel:
        items = catalog_pb2_grpc.ItemServiceStub(channel)
        put = items.PutItems(catalog_pb2.PutItemsRequest(items=[catalog_pb2.CatalogItem(
            item_id="log-new", title="Premiere", genres=["genre-00"], year=2026)]), timeout=10)
        assert put.log_sequence > 0
        assert status_of(items.GetItem, catalog_pb2.GetItemRequest(item_id="log-new")) == \
            grpc.StatusCode.FAILED_PRECONDITION

        def new_releases(user: str) -> list[str]:
            page = rank.HomePage(ranking_pb2.HomePageRequest(user_id=user, k_per_row=5))
            return [i.item_id for r in page.rows if r.id == "new_releases" for i in r.items]

        within(5, lambda: "log-new" in new_releases("log-nobody"))
        # Viewers of cluster 0 (items i % 10 == 0), made from events alone, play it.
        cluster = [f"i{n}" for n in range(0, 400, 10)]
        ack = None
        for u in range(6):
            for n, item in enumerate([*cluster[u:u + 12], "log-new"][:13 if u < 5 else 12]):
                ack = events.Track(events_pb2.TrackRequest(event=playback(
                    f"live-{u}-{n}", f"log-fan-{u}", item, at=time.time() - 60 + n)),
                    timeout=30)
        assert ack is not None
        vector = ranking_pb2.RETRIEVAL_VECTOR

        def recommended(user: str) -> list[str]:
            try:
                return [i.item_id for i in rank.Recommend(ranking_pb2.RecommendRequest(
                    user_id=user, k=10, retrieval=vector, min_log_sequence=ack.log_sequence),
                    timeout=10).items]
            except grpc.RpcError as error:  # the replica has not applied them all yet
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                return []

        within(10, lambda: "log-new" in recommended("log-fan-5"))  # the sixth fan, who did not
        assert "log-new" not in recommended("log-fan-0")  # watched: never offered back
        items.TakeDownItems(catalog_pb2.TakeDownItemsRequest(item_ids=["log-new", "i0"]),
                            timeout=10)
        within(5, lambda: not {"log-new", "i0"} & {*recommended("log-fan-5"),
                                                   *new_releases("log-nobody")})
        assert status_of(rank.SimilarItems, ranking_pb2.SimilarItemsRequest(
            item_id="log-new", k=3)) == grpc.StatusCode.NOT_FOUND


def test_a_log_sequence_never_reached_is_unavailable_at_the_deadline_not_a_hang(
        log_services: Services) -> None:
    _, _, front, ranking, _ = log_services
    _, rank = _stubs(front, ranking)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        rank.HomePage(ranking_pb2.HomePageRequest(user_id="reader", k_per_row=3,
                                                  min_log_sequence=10**12), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "log sequence" in error.value.details()
    assert time.monotonic() - started < 1.0


def test_bad_messages_from_another_producer_are_kept_as_rejections_and_the_rest_applies(
        log_services: Services) -> None:
    log, worker_dir, front, ranking, _ = log_services
    user = next(u for u in (f"x{i}" for i in range(100)) if log.partition(u) == 1)
    stray = next(u for u in (f"y{i}" for i in range(100)) if log.partition(u) == 2)
    no_time = playback("p-no-time", user, "i1")
    no_time.ClearField("occurred_at")

    async def produce() -> int:
        client, js = await connect(log, "producer")
        subject = log.events_subject(1)
        for payload in (b"\xff\x00 not a protobuf", no_time.SerializeToString(),
                        playback("p-stray", stray, "i1").SerializeToString(),
                        playback("p-good", user, "i1").SerializeToString()):
            ack = await js.publish(subject, payload)
        await client.close()
        return int(ack.seq)

    last = asyncio.run(produce())
    _, rank = _stubs(front, ranking)
    seen = rank.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=3,
                                                       min_log_sequence=last), timeout=10)
    assert seen.user_version == 1  # the good event applied
    assert status_of(rank.Recommend, ranking_pb2.RecommendRequest(user_id=stray, k=3)) == \
        grpc.StatusCode.OK
    with UserStore(worker_dir / "shards" / "p0001", readonly=True) as shard:
        reasons = {r["reason"] for r in shard.rejected()}
        assert {"malformed", "missing_occurred_at", "wrong_partition"} <= reasons
        assert int(shard.get_meta(POSITION_KEY) or 0) == last
        assert shard.get_user(stray) is None  # never in another partition's shard


def test_a_resend_after_the_duplicate_window_is_applied_once(
        log_services: Services, catalog: CatalogSnapshot) -> None:
    log, _, front, ranking, _ = log_services
    events, rank = _stubs(front, ranking)
    event = playback("late-resend", "resender", catalog.item_ids[3])
    first = events.Track(events_pb2.TrackRequest(event=event), timeout=10)
    time.sleep(log.duplicate_window_s + 1.0)
    second = events.Track(events_pb2.TrackRequest(event=event), timeout=10)
    assert not second.duplicate and second.log_sequence > first.log_sequence  # logged twice
    seen = rank.Recommend(ranking_pb2.RecommendRequest(
        user_id="resender", k=3, min_log_sequence=second.log_sequence), timeout=10)
    assert seen.user_version == 1  # applied once: the worker dedupes by event_id


def test_the_log_mode_keeps_every_invariant_through_the_fault_plan(
        tmp_path: Path, data_dir: Path) -> None:
    """3 nodes, R3, P=16: kill -9 of workers (once in the commit window), scale up and
    down, kill -9 of the stream leader, a takeover with an empty data dir (bench.cluster)."""
    result = run(tmp_path, data_dir, Plan(events=4_000, seconds=20.0, users=500))
    assert result["lost_acked"] == result["lost"] == result["double_applied"] == 0, result
    assert result["not_in_seen"] == result["users_in_wrong_shard"] == 0, result
    assert result["two_owners_committing"] == 0 and result["position_not_last"] == 0, result
    assert result["replica_users_differing"] == 0, result
    assert result["replica_trending_max_rel_diff"] < 1e-6, result  # the shards' sums
    assert result["vectors_compared"] > 100 and result["max_vector_diff"] <= 1e-6, result
    assert result["acked_events"] == 4_000, result  # the client got every event through
    assert result["resent_outside_window"] > 0 and result["claims"] >= 16, result
