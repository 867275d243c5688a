"""`python -m eventlog.seed --data-dir D --log-urls URLS`: the batch users into the log mode.

The batch build writes every trained user's record (vector and history) into the data
dir's user store. In log mode the shards live in the workers, rebuilt from the changelog,
so seeding publishes those records to each partition's changelog as ``seed`` messages,
before any worker has claimed it (each publish expects the subject's previous message,
the first one none, so a partition that already has a changelog is left alone). Workers
then restore them like any commit, and ranking replicas follow them in.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from eventlog.config import LogConfig
from eventlog.jetstream import (
    EPOCH,
    KIND,
    MAX_PAYLOAD,
    OWNER,
    POSITION,
    connect,
    ensure_log,
    is_wrong_last_sequence,
    last_sequence,
)
from index import users_dir
from index.changelog import Op, encode
from index.store import UserStore
from rpc.settings import ServerSettings

log = logging.getLogger("freshrec.seed")
_CHUNK = MAX_PAYLOAD // 2


def chunks(store: UserStore, config: LogConfig) -> dict[int, tuple[list[bytes], int]]:
    """Per partition: changelog payloads (each under half the max payload) of its users,
    and how many users they hold."""
    ops: dict[int, list[list[Op]]] = {p: [[]] for p in range(config.partitions)}
    sizes = dict.fromkeys(range(config.partitions), 0)
    with store.env.begin() as txn:
        for key, value in txn.cursor(db=store.dbs["users"]):
            user = bytes(key).decode("utf-8")
            p = config.partition(user)
            if sizes[p] + len(value) > _CHUNK and ops[p][-1]:
                ops[p].append([])
                sizes[p] = 0
            ops[p][-1].append((b"U", (user, bytes(value))))
            sizes[p] += len(value) + len(key) + 9
    return {p: ([encode(c) for c in groups if c], sum(map(len, groups)))
            for p, groups in ops.items()}


async def seed(store: UserStore, config: LogConfig) -> dict[str, int]:
    """Publish the store's users to every partition whose changelog is still empty."""
    client, js = await connect(config, "freshrec-seed")
    result = dict.fromkeys(("partitions_seeded", "partitions_skipped", "users"), 0)
    try:
        await ensure_log(js, config)
        for p, (payloads, users) in chunks(store, config).items():
            subject = config.shard_subject(p)
            last = await last_sequence(js, config.shards_stream, subject)
            if last:
                result["partitions_skipped"] += 1  # claimed (or seeded) before
                continue
            for n, payload in enumerate(payloads):
                try:
                    ack = await js.publish(subject, payload, headers={
                        "Nats-Expected-Last-Subject-Sequence": str(last), KIND: "seed",
                        EPOCH: "0", POSITION: "0", OWNER: "seed"})
                except Exception as exc:
                    if n == 0 and is_wrong_last_sequence(exc):
                        break  # a worker claimed it meanwhile: it starts without them
                    raise RuntimeError(f"partition {p} is seeded with {n} of its "
                                       f"{len(payloads)} chunks: {exc}") from exc
                last = int(ack.seq)
            else:
                result["partitions_seeded"] += 1
                result["users"] += users
                continue
            result["partitions_skipped"] += 1
    finally:
        await client.close()
    return result


def main(argv: list[str] | None = None) -> int:
    """Seed the log from --data-dir's user store; the --log-* flags as the services'."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = ServerSettings.from_args(argv)
    with UserStore(users_dir(settings.data_dir), readonly=True) as store:
        result = asyncio.run(seed(store, settings.log))
    log.info("seeded %(users)d users into %(partitions_seeded)d partitions "
             "(%(partitions_skipped)d already had a changelog)", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
