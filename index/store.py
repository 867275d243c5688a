"""The LMDB user store shared by both services: user records, seen events, item counts.

One env, named DBs: ``users`` (user_id -> binary record, see `index.user_record`),
``seen`` (event_id -> time applied), ``seen_by_time`` (time + event_id, for pruning),
``item_counts`` (item_id -> decayed count and its time), ``rejected`` (time + seq ->
JSON), ``meta`` (including the half-life the item counts decay with, so that the writer
and every reader decay them alike), and the live catalog's ``live_items``, ``item_stats``,
``item_plays`` and ``item_changes`` (see `index.live`). Only one thread of one process
writes (LMDB allows one write txn at a time); readers use short read txns.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from index.errors import Exhausted, Unavailable
from index.user_record import UserRecord

T = TypeVar("T")
_TIME_KEY = struct.Struct(">d")
_COUNT = struct.Struct("<dd")
DB_NAMES = ("users", "seen", "seen_by_time", "item_counts", "rejected", "meta",
            "live_items", "item_stats", "item_plays", "item_changes")
DEFAULT_MAP_SIZE = 4 << 30
MAX_MAP_SIZE = 1 << 40
DEFAULT_ITEM_HALF_LIFE_S = 86_400.0
HALF_LIFE_KEY = b"item_half_life_s"
USERS_MODEL_KEY = "users_model_version"  # meta: every stored user is folded in under it


class StoreFullError(Exhausted):
    """The LMDB map cannot grow any further, or the disk is full: retry later."""


class StoreWriteError(Unavailable):
    """A write failed (an I/O error at commit); nothing of it was committed."""


def _decay_count(count: float, then: float, now: float, half_life: float) -> float:
    return float(count * 0.5 ** (max(now - then, 0.0) / half_life))


def _half_life(txn: lmdb.Transaction, meta: Any) -> float:
    raw = txn.get(HALF_LIFE_KEY, db=meta)
    return DEFAULT_ITEM_HALF_LIFE_S if raw is None else float(bytes(raw))


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
        self._half_life: float | None = None

    def get_user(self, user_id: str) -> UserRecord | None:
        """The user's record as of this txn."""
        raw = self.txn.get(user_id.encode("utf-8"), db=self.dbs["users"])
        return None if raw is None else UserRecord.decode(user_id, raw)

    def put_user(self, record: UserRecord) -> None:
        """Write a user's record."""
        self.txn.put(record.user_id.encode("utf-8"), record.encode(), db=self.dbs["users"])

    def user_ids_after(self, after: str, limit: int) -> list[str]:
        """Up to `limit` user ids following `after` in key order ("" = from the first)."""
        cursor = self.txn.cursor(db=self.dbs["users"])
        start = after.encode("utf-8")
        keys: list[bytes] = []
        ok = cursor.set_range(start)
        while ok and len(keys) <= limit:
            keys.append(bytes(cursor.key()))
            ok = cursor.next()
        keys = keys[1:] if keys and keys[0] == start else keys
        return [k.decode("utf-8") for k in keys[:limit]]

    def seen(self, event_id: str) -> bool:
        """True if this event_id was applied (and not yet pruned)."""
        return self.txn.get(event_id.encode("utf-8"), db=self.dbs["seen"]) is not None

    def mark_seen(self, event_id: str, at: float) -> None:
        """Record an applied event_id (for dedupe until pruned)."""
        key = event_id.encode("utf-8")
        self.txn.put(key, _TIME_KEY.pack(at), db=self.dbs["seen"])
        self.txn.put(_TIME_KEY.pack(at) + key, b"", db=self.dbs["seen_by_time"])

    def add_item_count(self, item_id: str, weight: float, at: float) -> None:
        """Add to an item's exponentially decayed play count (for trending and popularity)."""
        if self._half_life is None:
            self._half_life = _half_life(self.txn, self.dbs["meta"])
        key = item_id.encode("utf-8")
        raw = self.txn.get(key, db=self.dbs["item_counts"])
        count, then = _COUNT.unpack(raw) if raw else (0.0, at)
        count = _decay_count(count, then, at, self._half_life)
        self.txn.put(key, _COUNT.pack(count + weight, max(at, then)), db=self.dbs["item_counts"])

    def get_raw(self, db: str, key: bytes) -> bytes | None:
        """The value under `key` in a named DB (a copy), or None."""
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else bytes(raw)

    def put_raw(self, db: str, key: bytes, value: bytes) -> None:
        """Set `key` in a named DB."""
        self.txn.put(key, value, db=self.dbs[db])

    def delete_raw(self, db: str, key: bytes) -> None:
        """Remove `key` from a named DB (if there)."""
        self.txn.delete(key, db=self.dbs[db])

    def scan(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """The entries of a named DB whose keys start with `prefix`, in key order (copies:
        the caller may write while iterating)."""
        yield from _entries(self.txn, self.dbs[db], prefix, prefix)

    def put_rejected(self, at: float, seq: int, info: dict[str, Any]) -> None:
        """Keep a rejected event with its reason."""
        key = _TIME_KEY.pack(at) + seq.to_bytes(8, "big")
        self.txn.put(key, json.dumps(info).encode("utf-8"), db=self.dbs["rejected"])

    def put_meta(self, key: str, value: str) -> None:
        """Set a meta entry."""
        self.txn.put(key.encode("utf-8"), value.encode("utf-8"), db=self.dbs["meta"])
        if key.encode("utf-8") == HALF_LIFE_KEY:
            self._half_life = None  # read again on the next count

    def set_item_half_life(self, seconds: float) -> None:
        """Decay item counts with this half-life from now on (writer and readers alike)."""
        if not seconds > 0:
            raise ValueError(f"the item half-life must be > 0 s, got {seconds}")
        self.put_meta(HALF_LIFE_KEY.decode(), repr(float(seconds)))

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
        self.dbs = {name: self._open_db(name, readonly) for name in DB_NAMES}
        self._lock = _ResizeLock()

    def _open_db(self, name: str, readonly: bool) -> Any:
        try:
            return self.env.open_db(name.encode(), create=not readonly)
        except lmdb.NotFoundError:
            # Read-only over a store written before this DB existed (its writer creates it
            # when it next opens the store): read as empty until then (`_db`).
            return None

    def _db(self, name: str) -> Any:
        """A named DB's handle; one this read-only store lacked is looked for again."""
        if self.dbs[name] is None:
            self.dbs[name] = self._open_db(name, readonly=True)
        return self.dbs[name]

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

    def item_counts(self, now: float) -> dict[str, float]:
        """Every item's play count, decayed to `now` with the store's half-life."""
        half_life = self.item_half_life()
        return {item: _decay_count(count, then, now, half_life)
                for item, (count, then) in self.item_count_entries().items()}

    def item_count_entries(self) -> dict[str, tuple[float, float]]:
        """Every item's stored count and the time it is as of (not decayed)."""
        with self._read() as txn:
            return {bytes(key).decode("utf-8"): _COUNT.unpack(value)
                    for key, value in txn.cursor(db=self.dbs["item_counts"])}

    def item_half_life(self) -> float:
        """Seconds it takes an item's play count to halve."""
        with self._read() as txn:
            return _half_life(txn, self.dbs["meta"])

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

    def scan(self, db: str, start: bytes = b"", prefix: bytes = b""
             ) -> list[tuple[bytes, bytes]]:
        """The entries of a named DB from key `start` on whose keys start with `prefix`, in
        key order (copies); none from a DB this read-only store does not have yet."""
        handle = self._db(db)
        if handle is None:
            return []
        with self._read() as txn:
            return list(_entries(txn, handle, start, prefix))

    def get_many(self, db: str, keys: list[bytes]) -> list[bytes | None]:
        """The values under `keys` in a named DB, in one read txn (None where absent)."""
        handle = self._db(db)
        if handle is None:
            return [None] * len(keys)
        with self._read() as txn:
            return [None if (raw := txn.get(key, db=handle)) is None else bytes(raw)
                    for key in keys]

    def get_meta(self, key: str) -> str | None:
        """A meta entry, or None."""
        with self._read() as txn:
            raw = txn.get(key.encode("utf-8"), db=self.dbs["meta"])
            return None if raw is None else bytes(raw).decode("utf-8")

    def count(self, db: str) -> int:
        """Number of entries in a named DB."""
        with self._read() as txn:
            return int(txn.stat(self.dbs[db])["entries"])

    def copy_to(self, target: str) -> None:
        """A compacted, consistent copy of the env into the directory `target` (a read
        txn: writes go on; never beside a map resize)."""
        with self._lock.shared():
            self.env.copy(target, compact=True)

    def transact(self, work: Callable[[StoreWriter], T]) -> T:
        """Run `work` in one write txn and commit it; on map full, grow the map and rerun.

        `work` must only touch the txn (it may run more than once). Raises StoreFullError
        when the map cannot grow or the disk is full, StoreWriteError on other I/O errors;
        nothing is committed then.
        """
        while True:
            txn, result = self.prepare(work)
            try:
                self.commit(txn)
                return result
            except StoreWriteError as exc:
                if not isinstance(exc.__cause__, lmdb.MapFullError):
                    raise
                self._grow()  # the commit itself needed pages: grow and run it again

    def prepare(self, work: Callable[[StoreWriter], T]) -> tuple[lmdb.Transaction, T]:
        """Run `work` in a write txn left open (rerun after growing a full map): the caller
        then `commit`s it or aborts it (the log mode publishes the changelog in between)."""
        while True:
            txn = self.env.begin(write=True)
            try:
                return txn, work(StoreWriter(txn, self.dbs))
            except lmdb.MapFullError:
                txn.abort()
                self._grow()
            except BaseException as exc:
                txn.abort()
                if isinstance(exc, lmdb.Error):
                    raise self._failure(exc) from exc
                raise

    def commit(self, txn: lmdb.Transaction) -> None:
        """Commit a prepared txn (StoreFullError, StoreWriteError: nothing is committed)."""
        try:
            txn.commit()
        except lmdb.Error as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: lmdb.Error) -> Exception:
        if isinstance(exc, lmdb.DiskError):
            return StoreFullError(f"{self.path}: disk full: {exc}")
        return StoreWriteError(f"{self.path}: write failed: {exc}")  # e.g. EIO at commit

    def _grow(self) -> None:
        size = int(self.env.info()["map_size"]) * 2
        if size > self.max_map_size:
            raise StoreFullError(f"{self.path}: the store is full (LMDB map would exceed "
                                 f"{self.max_map_size} bytes)")
        with self._lock.exclusive():
            self.env.set_mapsize(size)


def _entries(txn: lmdb.Transaction, db: Any, start: bytes,
             prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A named DB's entries from key `start` on whose keys start with `prefix` (copies)."""
    cursor = txn.cursor(db=db)
    ok = cursor.set_range(max(start, prefix))
    while ok and bytes(cursor.key()).startswith(prefix):
        yield bytes(cursor.key()), bytes(cursor.value())
        ok = cursor.next()


async def reached_within(read: Callable[[], int], target: int, timeout: float,
                         every_s: float = 0.001) -> int:
    """Poll `read()` (e.g. a user's version: a read txn, ~10 us) until it reaches `target` or
    `timeout` passes, sleeping on the event loop between reads; the value reached (the
    caller decides what falling short means)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value >= target or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(every_s)
