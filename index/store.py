"""The LMDB user store shared by both services: user records, seen events, item counts.

One env, named DBs: ``users`` (user_id -> binary record), ``seen`` (event_id -> time
applied), ``seen_by_time`` (time + event_id, for pruning), ``item_counts`` (item_id ->
decayed count), ``rejected`` (time + seq -> JSON), ``meta``. Only one thread of one
process writes (LMDB allows one write txn at a time); readers use short read txns.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

T = TypeVar("T")
RECORD_FORMAT = 1
# format, flags, dim, history length, model-version length, ids-blob length, version, updated_at
_HEADER = struct.Struct("<BBHHHIQd")
_TIME_KEY = struct.Struct(">d")
_COUNT = struct.Struct("<dd")
DB_NAMES = ("users", "seen", "seen_by_time", "item_counts", "rejected", "meta")
DEFAULT_MAP_SIZE = 4 << 30
MAX_MAP_SIZE = 1 << 40


class StoreFullError(Exception):
    """The LMDB map cannot grow any further, or the disk is full: retry later."""


class StoreWriteError(Exception):
    """A write failed (an I/O error at commit); nothing of it was committed."""


@dataclass(frozen=True)
class UserRecord:
    """A user's vector, the model it belongs to, a version counter and a bounded history."""

    user_id: str
    vector: np.ndarray  # float32; empty when the user has no usable vector
    model_version: str
    version: int
    updated_at: float
    item_ids: tuple[str, ...]
    weights: np.ndarray  # float32, summed weight per item
    last_at: np.ndarray  # float64, unix time of the item's latest event

    def encode(self) -> bytes:
        """Compact binary form (never pickle)."""
        ids = "\0".join(self.item_ids).encode("utf-8")
        model = self.model_version.encode("utf-8")
        header = _HEADER.pack(RECORD_FORMAT, 0, len(self.vector), len(self.item_ids),
                              len(model), len(ids), self.version, self.updated_at)
        return b"".join((header, model, self.vector.astype("<f4").tobytes(),
                         self.weights.astype("<f4").tobytes(),
                         self.last_at.astype("<f8").tobytes(), ids))

    @staticmethod
    def decode(user_id: str, raw: bytes | memoryview) -> UserRecord:
        """Parse a record written by `encode`; ValueError if it is not one."""
        fmt, _, dim, n, model_len, ids_len, version, updated_at = _HEADER.unpack_from(raw)
        if fmt != RECORD_FORMAT:
            raise ValueError(f"user {user_id!r}: unknown record format {fmt}")
        at = _HEADER.size
        model = bytes(raw[at:at + model_len]).decode("utf-8")
        at += model_len
        vector = np.frombuffer(raw, "<f4", dim, at).astype(np.float32)
        weights = np.frombuffer(raw, "<f4", n, at + 4 * dim).astype(np.float32)
        last_at = np.frombuffer(raw, "<f8", n, at + 4 * dim + 4 * n).astype(np.float64)
        at += 4 * dim + 12 * n
        ids = bytes(raw[at:at + ids_len]).decode("utf-8").split("\0") if n else []
        if len(ids) != n or at + ids_len != len(raw):
            raise ValueError(f"user {user_id!r}: record length does not match its header")
        return UserRecord(user_id, vector, model, version, updated_at, tuple(ids), weights,
                          last_at)

    @staticmethod
    def new(user_id: str) -> UserRecord:
        """An empty record for a user seen for the first time."""
        return UserRecord(user_id, np.zeros(0, np.float32), "", 0, 0.0, (),
                          np.zeros(0, np.float32), np.zeros(0, np.float64))

    def with_plays(
        self, plays: list[tuple[str, float, float]], max_history: int
    ) -> UserRecord:
        """Add (item_id, weight, at) plays: weights of an item accumulate, newest kept.

        On the write path a user gets a play or two: a C scan of the ids (`list.index`)
        beats building a dict of the whole history. A long batch (bootstrap) uses the dict.
        """
        ids = list(self.item_ids)
        known = len(ids)
        weights, last_at = self.weights.astype(np.float64), self.last_at.copy()
        added_weights: list[float] = []
        added_last: list[float] = []
        position = dict(zip(ids, range(known), strict=True)) if len(plays) > 16 else None
        for item_id, weight, at in plays:
            k = position.get(item_id, -1) if position is not None else \
                (ids.index(item_id) if item_id in ids else -1)
            if k < 0:
                if position is not None:
                    position[item_id] = len(ids)
                ids.append(item_id)
                added_weights.append(weight)
                added_last.append(at)
            elif k < known:
                weights[k] += weight
                last_at[k] = max(last_at[k], at)
            else:
                added_weights[k - known] += weight
                added_last[k - known] = max(added_last[k - known], at)
        if added_weights:
            weights = np.concatenate([weights, added_weights])
            last_at = np.concatenate([last_at, added_last])
        if len(ids) > max_history:
            kept = np.sort(np.argsort(-last_at, kind="stable")[:max_history])
            ids = list(map(ids.__getitem__, kept.tolist()))
            weights, last_at = weights[kept], last_at[kept]
        return replace(self, version=self.version + len(plays), item_ids=tuple(ids),
                       weights=weights.astype(np.float32), last_at=last_at)

    def recent_item_ids(self, n: int | None = None) -> list[str]:
        """History item ids, most recent first."""
        order = np.argsort(-self.last_at, kind="stable")[:n]
        return [self.item_ids[i] for i in order]


class _ResizeLock:
    """Many readers or one resizer: LMDB may only grow its map with no txn open in-process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._readers == 0)
            yield


class StoreWriter:
    """Operations inside one write txn (see `UserStore.transact`)."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self.dbs = dbs

    def get_user(self, user_id: str) -> UserRecord | None:
        """The user's record as of this txn."""
        raw = self.txn.get(user_id.encode("utf-8"), db=self.dbs["users"])
        return None if raw is None else UserRecord.decode(user_id, raw)

    def put_user(self, record: UserRecord) -> None:
        """Write a user's record."""
        self.txn.put(record.user_id.encode("utf-8"), record.encode(), db=self.dbs["users"])

    def seen(self, event_id: str) -> bool:
        """True if this event_id was applied (and not yet pruned)."""
        return self.txn.get(event_id.encode("utf-8"), db=self.dbs["seen"]) is not None

    def mark_seen(self, event_id: str, at: float) -> None:
        """Record an applied event_id (for dedupe until pruned)."""
        key = event_id.encode("utf-8")
        self.txn.put(key, _TIME_KEY.pack(at), db=self.dbs["seen"])
        self.txn.put(_TIME_KEY.pack(at) + key, b"", db=self.dbs["seen_by_time"])

    def add_item_count(self, item_id: str, weight: float, at: float, half_life: float) -> None:
        """Add to an item's exponentially decayed play count (for trending and popularity)."""
        key = item_id.encode("utf-8")
        raw = self.txn.get(key, db=self.dbs["item_counts"])
        count, then = _COUNT.unpack(raw) if raw else (0.0, at)
        decayed = count * 0.5 ** (max(at - then, 0.0) / half_life)
        self.txn.put(key, _COUNT.pack(decayed + weight, max(at, then)), db=self.dbs["item_counts"])

    def put_rejected(self, at: float, seq: int, info: dict[str, Any]) -> None:
        """Keep a rejected event with its reason."""
        key = _TIME_KEY.pack(at) + seq.to_bytes(8, "big")
        self.txn.put(key, json.dumps(info).encode("utf-8"), db=self.dbs["rejected"])

    def put_meta(self, key: str, value: str) -> None:
        """Set a meta entry."""
        self.txn.put(key.encode("utf-8"), value.encode("utf-8"), db=self.dbs["meta"])

    def prune_seen(self, before: float, limit: int) -> int:
        """Forget up to `limit` event ids applied before `before`; returns how many."""
        cursor = self.txn.cursor(db=self.dbs["seen_by_time"])
        removed = 0
        while removed < limit and cursor.first():
            key = cursor.key()
            if _TIME_KEY.unpack_from(key)[0] >= before:
                break
            self.txn.delete(key[_TIME_KEY.size:], db=self.dbs["seen"])
            cursor.delete()
            removed += 1
        return removed


class UserStore:
    """The LMDB env with its named DBs; thread-safe reads, one writer thread."""

    def __init__(self, path: Path, *, readonly: bool = False, map_size: int = DEFAULT_MAP_SIZE,
                 max_map_size: int = MAX_MAP_SIZE, max_readers: int = 1024,
                 sync: bool = True) -> None:
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_map_size = max_map_size
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DB_NAMES),
                             max_readers=max_readers, readonly=readonly, sync=sync,
                             metasync=sync, readahead=False)
        self.reap_stale_readers()
        self.dbs = {name: self.env.open_db(name.encode(), create=not readonly)
                    for name in DB_NAMES}
        self._lock = _ResizeLock()

    def reap_stale_readers(self) -> int:
        """Free reader slots left by killed processes (else they pin old pages forever)."""
        return int(self.env.reader_check())

    def close(self) -> None:
        """Close the env (after the writer has stopped)."""
        self.env.close()

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        while True:
            with self._lock.shared():
                try:
                    txn = self.env.begin(buffers=True)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    with txn:
                        yield txn
                    return
            # Another process grew the map: adopt its size, with no txn open in this process.
            with self._lock.exclusive():
                self.env.set_mapsize(0)

    def get_user(self, user_id: str) -> UserRecord | None:
        """A user's latest committed record, or None."""
        with self._read() as txn:
            raw = txn.get(user_id.encode("utf-8"), db=self.dbs["users"])
            return None if raw is None else UserRecord.decode(user_id, raw)

    def seen(self, event_id: str) -> bool:
        """True if this event_id was applied (and not yet pruned)."""
        with self._read() as txn:
            return txn.get(event_id.encode("utf-8"), db=self.dbs["seen"]) is not None

    def item_counts(self, now: float, half_life: float) -> dict[str, float]:
        """Every item's play count, decayed to `now`."""
        counts = {}
        with self._read() as txn:
            for key, value in txn.cursor(db=self.dbs["item_counts"]):
                count, then = _COUNT.unpack(value)
                counts[bytes(key).decode("utf-8")] = count * 0.5 ** (max(now - then, 0) / half_life)
        return counts

    def rejected(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent rejected events, newest first."""
        with self._read() as txn:
            cursor = txn.cursor(db=self.dbs["rejected"])
            out: list[dict[str, Any]] = []
            ok = cursor.last()
            while ok and len(out) < limit:
                out.append(json.loads(bytes(cursor.value())))
                ok = cursor.prev()
            return out

    def get_meta(self, key: str) -> str | None:
        """A meta entry, or None."""
        with self._read() as txn:
            raw = txn.get(key.encode("utf-8"), db=self.dbs["meta"])
            return None if raw is None else bytes(raw).decode("utf-8")

    def count(self, db: str) -> int:
        """Number of entries in a named DB."""
        with self._read() as txn:
            return int(txn.stat(self.dbs[db])["entries"])

    def transact(self, work: Callable[[StoreWriter], T]) -> T:
        """Run `work` in one write txn and commit it; on map full, grow the map and rerun.

        `work` must only touch the txn (it may run more than once). Raises StoreFullError
        when the map cannot grow or the disk is full, StoreWriteError on other I/O errors;
        nothing is committed then.
        """
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return work(StoreWriter(txn, self.dbs))
            except lmdb.MapFullError:
                self._grow()
            except lmdb.DiskError as exc:
                raise StoreFullError(f"{self.path}: disk full: {exc}") from exc
            except lmdb.Error as exc:  # e.g. EIO when a full disk cuts a commit short
                raise StoreWriteError(f"{self.path}: write failed: {exc}") from exc

    def _grow(self) -> None:
        size = int(self.env.info()["map_size"]) * 2
        if size > self.max_map_size:
            raise StoreFullError(f"{self.path}: the store is full (LMDB map would exceed "
                                 f"{self.max_map_size} bytes)")
        with self._lock.exclusive():
            self.env.set_mapsize(size)
