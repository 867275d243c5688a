"""NATS JetStream plumbing: the client's event loop in a thread, and the log's streams.

nats-py is asyncio-only and the services are sync gRPC threads, so each process runs one
event loop in its own thread (`Loop`) and calls into it with `Loop.run`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from eventlog.config import LogConfig

log = logging.getLogger("freshrec.log")
T = TypeVar("T")
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's error codes for a failed compare-and-set
MAX_PAYLOAD = 8 << 20  # the cluster's max_payload (eventlog.cluster); a commit stays under it
KIND, EPOCH, POSITION, OWNER = ("Freshrec-Kind", "Freshrec-Epoch", "Freshrec-Position",
                                "Freshrec-Owner")


class LogLayoutError(ValueError):
    """The log exists with another layout (partition count): never retried."""


class Loop:
    """An asyncio event loop in a daemon thread."""

    def __init__(self, name: str = "freshrec-nats") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop (its tasks are abandoned) and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


async def connect(config: LogConfig, name: str) -> tuple[Client, JetStreamContext]:
    """Connect to the cluster, reconnecting for ever when a node goes away."""
    async def error(exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    client = await nats.connect(servers=config.servers, name=name, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.25, connect_timeout=2,
                                error_cb=error)
    return client, client.jetstream(timeout=5)


async def close(client: Client, timeout: float = 5.0) -> None:
    """Drain the connection (flush what is pending), or just close it if the log is not
    reachable to drain to: stopping never waits on a cluster that is gone."""
    try:
        await asyncio.wait_for(client.drain(), timeout)
    except Exception as exc:
        log.warning("closing the NATS connection without draining it: %s", exc or "timeout")
        await client.close()


def commit_stand(msg: Msg) -> tuple[int, int]:
    """(epoch, position) a changelog message commits: its owner's fencing epoch and the
    last events-stream sequence it includes."""
    headers = msg.headers or {}
    return int(headers.get(EPOCH, 0)), int(headers.get(POSITION, 0))


def is_wrong_last_sequence(exc: BaseException) -> bool:
    """True for a publish refused by its expected-last-sequence check (a fence)."""
    return isinstance(exc, APIError) and exc.err_code in WRONG_LAST_SEQUENCE


async def ensure_log(js: JetStreamContext, config: LogConfig, timeout: float = 60.0) -> None:
    """Create the streams and buckets if missing (waiting for the cluster to elect a
    leader), and refuse a log laid out with another partition count."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await _ensure(js, config)
            return
        except (APIError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            # e.g. "no suitable peers for placement" while the cluster is still forming
            if time.monotonic() > deadline:
                raise
            log.info("waiting for JetStream (%s)", exc)
            await asyncio.sleep(0.5)


async def _ensure(js: JetStreamContext, config: LogConfig) -> None:
    layout = f"freshrec log; partitions={config.partitions}"
    streams = {
        config.events_stream: api.StreamConfig(
            name=config.events_stream, subjects=[f"{config.prefix}.events.*"],
            description=layout, num_replicas=config.replicas, storage=api.StorageType.FILE,
            duplicate_window=config.duplicate_window_s, max_age=config.retention_s),
        config.shards_stream: api.StreamConfig(
            name=config.shards_stream, subjects=[f"{config.prefix}.shard.*"],
            description=layout, num_replicas=config.replicas, storage=api.StorageType.FILE,
            max_msg_size=MAX_PAYLOAD, max_age=config.retention_s),
        config.catalog_stream: api.StreamConfig(
            name=config.catalog_stream, subjects=[config.catalog_subject],
            description=layout, num_replicas=config.replicas, storage=api.StorageType.FILE,
            max_msg_size=MAX_PAYLOAD),  # kept for good: hosts replay it from the start
    }
    for name, stream in streams.items():
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(stream)
            continue
        if info.config.description != layout:
            raise LogLayoutError(f"stream {name} was created as "
                                 f"{info.config.description!r}, not {layout!r}")
    for bucket in (config.owners_bucket, config.members_bucket):
        try:
            await js.key_value(bucket)
        except (NotFoundError, nats.js.errors.BucketNotFoundError):
            await js.create_key_value(bucket=bucket, history=1, replicas=config.replicas)
    try:
        await js.object_store(config.snapshots_bucket)
    except (NotFoundError, nats.js.errors.BucketNotFoundError):
        await js.create_object_store(config.snapshots_bucket, config=api.ObjectStoreConfig(
            replicas=config.replicas, storage=api.StorageType.FILE))


async def last_sequence(js: JetStreamContext, stream: str, subject: str) -> int:
    """The stream sequence of the subject's last message (0 if it has none)."""
    try:
        return int((await js.get_last_msg(stream, subject)).seq or 0)
    except NotFoundError:
        return 0
