"""Shard snapshots in a JetStream object store: what bounds a takeover's restore.

A shard is a function of its changelog, but replaying a changelog from its start takes
longer every day. So each owner periodically copies its shard (a compacted LMDB copy,
made in a read txn: consistent, and the copy's meta says which changelog message it
includes) into the object store as ``p<partition>``, with that changelog sequence in the
object's description. A new owner (or a ranking replica starting empty) downloads the
snapshot when it is ahead of what it has, then replays only the changelog after it.

Any owner's shard only ever holds commits that are in the changelog (the LMDB commit
follows the changelog's ack), so every snapshot is the state at some changelog prefix
(less the dedupe entries its owner has pruned, past the retention, locally): even a
fenced owner's late upload is a correct, if older, starting point.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from eventlog.config import LogConfig
from index.files import fsync_dir

log = logging.getLogger("freshrec.snapshots")
TRANSFER_TIMEOUT_S = 30.0  # a snapshot transfer that takes longer has stalled: retry it


async def bucket(js: JetStreamContext, config: LogConfig) -> ObjectStore:
    """The log's snapshot bucket (`eventlog.jetstream.ensure_log` creates it)."""
    return await js.object_store(config.snapshots_bucket)


async def latest(store: ObjectStore, partition: int) -> int:
    """The changelog sequence the partition's snapshot includes (0: there is none)."""
    try:
        info = await store.get_info(f"p{partition}")
    except (ObjectNotFoundError, NotFoundError):
        return 0
    return int(json.loads(info.description or "{}").get("changelog_seq", 0))


async def upload(store: ObjectStore, partition: int, env_path: Path, changelog_seq: int,
                 copy: Callable[[str], None]) -> int:
    """Copy the shard (`copy(target_dir)`, in a thread) and store it unless the bucket
    already has one as new; its size in bytes (0 if skipped)."""
    if await latest(store, partition) >= changelog_seq:
        return 0
    with tempfile.TemporaryDirectory(dir=env_path.parent) as tmp:
        await asyncio.to_thread(copy, tmp)
        data = await asyncio.to_thread((Path(tmp) / "data.mdb").read_bytes)
    meta = api.ObjectMeta(name=f"p{partition}",
                          description=json.dumps({"changelog_seq": changelog_seq}))
    await asyncio.wait_for(store.put(f"p{partition}", data, meta=meta), TRANSFER_TIMEOUT_S)
    return len(data)


def _replace(incoming: Path, env_path: Path) -> None:
    shutil.rmtree(env_path, ignore_errors=True)
    incoming.rename(env_path)
    fsync_dir(env_path.parent)


async def download(store: ObjectStore, partition: int, env_path: Path,
                   timeout: float = TRANSFER_TIMEOUT_S) -> int:
    """Replace the LMDB env at `env_path` by the partition's snapshot (the env must be
    closed); the changelog sequence it includes. TimeoutError (nothing replaced) if the
    transfer stalls, e.g. across a leader change: the caller tries again."""
    incoming = env_path.with_name(env_path.name + ".incoming")
    await asyncio.to_thread(shutil.rmtree, incoming, True)
    incoming.mkdir(parents=True)
    with open(incoming / "data.mdb", "wb") as out:  # written in the loop's executor
        result = await asyncio.wait_for(  # the object store checks the sha256
            store.get(f"p{partition}", writeinto=out), timeout)
        out.flush()
        await asyncio.to_thread(os.fsync, out.fileno())
    assert result.info is not None
    seq = int(json.loads(result.info.description or "{}").get("changelog_seq", 0))
    await asyncio.to_thread(_replace, incoming, env_path)
    log.info("partition %d: restored the snapshot at changelog %d", partition, seq)
    return seq
