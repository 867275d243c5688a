"""A shard's changelog: the store writes of one commit, as bytes that replay exactly.

In log mode every commit of a partition's shard is also one message on the partition's
changelog subject (`eventlog`): the writes `apply_group` made in that txn, recorded by a
`RecordingWriter`. Replaying the messages in order through a `StoreWriter` rebuilds the
shard (a new owner with an empty data dir) or a ranking replica's copy of it. Each write
is absolute or applied once (a replayer records the changelog position it reached in the
same txn), so replay gives the same bytes as the original commits (the owner's pruning
of old dedupe entries is its own, never in the changelog).

Encoding (little-endian): per op a tag byte, then its fields; strings and byte strings as
a u32 length and the bytes, floats as f64, ints as u64.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from index.store import StoreWriter
from index.user_record import UserRecord

# A shard's meta says where it stands, in the txn of the state it describes: the last
# events-stream sequence applied, its owner's fencing epoch, its last changelog message.
POSITION_KEY, EPOCH_KEY, CHANGELOG_KEY = "log.position", "log.epoch", "log.changelog_seq"
_LEN = struct.Struct("<I")
_F8 = struct.Struct("<d")
_U8 = struct.Struct("<Q")
# tag -> field kinds: s str, b bytes, f float, i int
_OPS = {b"U": "sb", b"S": "sf", b"C": "sff", b"R": "fis", b"M": "ss"}
Op = tuple[bytes, tuple[Any, ...]]


class ChangelogError(ValueError):
    """A changelog message that does not decode: never replayed, never skipped quietly."""


class RecordingWriter(StoreWriter):
    """A StoreWriter that also records every write it makes, for the changelog."""

    def __init__(self, writer: StoreWriter) -> None:
        super().__init__(writer.txn, writer.dbs)
        self.ops: list[Op] = []

    def put_user(self, record: UserRecord) -> None:
        encoded = record.encode()
        self.txn.put(record.user_id.encode("utf-8"), encoded, db=self.dbs["users"])
        self.ops.append((b"U", (record.user_id, encoded)))

    def mark_seen(self, event_id: str, at: float) -> None:
        super().mark_seen(event_id, at)
        self.ops.append((b"S", (event_id, at)))

    def add_item_count(self, item_id: str, weight: float, at: float) -> None:
        super().add_item_count(item_id, weight, at)
        self.ops.append((b"C", (item_id, weight, at)))

    def put_rejected(self, at: float, seq: int, info: dict[str, Any]) -> None:
        super().put_rejected(at, seq, info)
        self.ops.append((b"R", (at, seq, json.dumps(info))))

    def put_meta(self, key: str, value: str) -> None:
        super().put_meta(key, value)
        self.ops.append((b"M", (key, value)))


def encode(ops: list[Op]) -> bytes:
    """The ops as one changelog payload."""
    out = bytearray()
    for tag, values in ops:
        out += tag
        for kind, value in zip(_OPS[tag], values, strict=True):
            if kind in "sb":
                raw = value.encode("utf-8") if kind == "s" else value
                out += _LEN.pack(len(raw)) + raw
            elif kind == "f":
                out += _F8.pack(value)
            else:
                out += _U8.pack(value)
    return bytes(out)


def decode(payload: bytes) -> Iterator[Op]:
    """The ops of a payload, in order (ChangelogError if it is not one)."""
    view, at = memoryview(payload), 0
    try:
        while at < len(view):
            tag = bytes(view[at:at + 1])
            kinds = _OPS.get(tag)
            if kinds is None:
                raise ChangelogError(f"unknown op {tag!r} at byte {at}")
            at += 1
            values: list[Any] = []
            for kind in kinds:
                if kind in "sb":
                    (n,) = _LEN.unpack_from(view, at)
                    raw = bytes(view[at + 4:at + 4 + n])
                    if len(raw) != n:
                        raise ChangelogError("truncated changelog message")
                    values.append(raw.decode("utf-8") if kind == "s" else raw)
                    at += 4 + n
                else:
                    values.append((_F8 if kind == "f" else _U8).unpack_from(view, at)[0])
                    at += 8
            yield tag, tuple(values)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ChangelogError(f"malformed changelog message: {exc}") from exc


def replay(writer: StoreWriter, payload: bytes, users_only: bool = False,
           changes: dict[str, tuple[UserRecord | None, UserRecord]] | None = None) -> int:
    """Apply a payload's ops in this txn; how many user records it wrote.

    `users_only` (a ranking replica) keeps records, item counts and meta, not the
    dedupe and rejection state that only the owner of a shard needs. `changes`, if given,
    gets each written user's record before the payload and after it.
    """
    users = 0
    for tag, values in list(decode(payload)):  # decode all first: a bad message writes nothing
        if tag == b"U":
            user_id, raw = values
            record = UserRecord.decode(user_id, raw)  # refuse a record that does not decode
            if changes is not None:
                before = changes[user_id][0] if user_id in changes else \
                    writer.get_user(user_id)
                changes[user_id] = (before, record)
            writer.txn.put(user_id.encode("utf-8"), raw, db=writer.dbs["users"])
            users += 1
        elif tag == b"C":
            writer.add_item_count(*values)
        elif tag == b"M":
            writer.put_meta(*values)
        elif users_only:
            continue
        elif tag == b"S":
            writer.mark_seen(*values)
        else:
            at, seq, info = values
            writer.put_rejected(at, seq, json.loads(info))
    return users
