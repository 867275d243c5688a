"""The live catalog: titles put and taken down between batch builds, and what they learn.

A put item is searchable at once with a content-based vector (the mean factor of the
snapshot items sharing its genres), then learns from its plays by the item-side fold-in,
the user-side formula with the roles swapped. Over all users that is
``y = (X^T X + lambda I + alpha sum w_u x_u x_u^T)^-1 sum (1 + alpha w_u) x_u``, where
``X^T X`` counts every user who did not play the item as a "no". For an item put minutes
ago that is wrong: they have not been shown it yet. So a live item's users are its
viewers so far (the users exposed to it, as far as we know), with confidences
``c_u = 1 + alpha w_u``:

    y = (lambda I + sum c_u x_u x_u^T)^-1 sum c_u x_u,

and the next batch build, with the whole log, gives it the full model. The sums are
updated per play, in the write txn of the play (they are sums, so shards could keep their
own and add them up), and recomputed from the viewers' current vectors when the model
changes. The user's vector moves with snapshot items only.

Kept in the user store, so it is durable and every process reads the same state:
``live_items`` (item id -> `LiveItem`), ``item_stats`` (item id -> `ItemStats`),
``item_plays`` (item id, NUL, user id -> the viewer's summed weight and latest play) and
``item_changes`` (catalog version, 8 bytes big-endian -> item id: the feed ranking
workers follow; the latest version in meta ``catalog_version``). Only the event
service's writer writes. The next batch build takes the live items and their plays in
(`index.build`); the items of a snapshot are served from it, not from the live segment.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from index.errors import InvalidArgument
from index.history import Play
from index.kernels import readonly
from index.model import solve_stats
from index.neighbours import Candidates
from index.store import StoreWriter, UserStore
from index.user_record import UserRecord

if TYPE_CHECKING:
    from index.catalog import CatalogSnapshot
    from index.filters import ItemFilter

MAX_ITEMS_PER_CALL = 1000
MAX_TITLE_CHARS = 500
MAX_GENRES = 32
MAX_GENRE_BYTES = 64
YEARS = (1800, 2200)  # a known year is in this range (0: unknown)
KEEP_CHANGES = 100_000  # feed entries kept; a worker further behind reads everything
VERSION_KEY = "catalog_version"
_ITEM_FORMAT = 1
_HEADER = struct.Struct("<BI")  # format, JSON length; then the JSON, then float32 vector
_STATS = struct.Struct("<HI")  # model version length, viewers; then the version, arrays
_VERSION = struct.Struct(">Q")
_PLAYS = struct.Struct("<dd")  # a viewer's summed weight and latest play


@dataclass(frozen=True)
class CatalogItem:
    """What an admin puts: an item and when it may be served (0: no bound)."""

    item_id: str
    title: str
    genres: tuple[str, ...] = ()
    year: int = 0
    available_from: float = 0.0
    available_until: float = 0.0

    def open_at(self, now: float) -> bool:
        """Whether its availability window holds `now`."""
        return (not self.available_from or self.available_from <= now) and \
            (not self.available_until or now < self.available_until)


def _problem_with_id(name: str, value: str, max_bytes: int) -> str | None:
    if not value:
        return f"{name} is empty"
    if len(value.encode("utf-8")) > max_bytes:
        return f"{name} is longer than {max_bytes} bytes"
    if not value.isprintable():
        return f"{name} {value!r} contains control characters"
    return None


def _problem_with(item: CatalogItem, max_id_bytes: int) -> str | None:
    problem = _problem_with_id("item_id", item.item_id, max_id_bytes)
    if problem:
        return problem
    if not item.title or len(item.title) > MAX_TITLE_CHARS or not item.title.isprintable():
        return f"title must be 1 to {MAX_TITLE_CHARS} printable characters"
    if len(item.genres) > MAX_GENRES:
        return f"{len(item.genres)} genres; at most {MAX_GENRES}"
    for genre in item.genres:
        if not genre or len(genre.encode("utf-8")) > MAX_GENRE_BYTES or \
                not genre.isprintable() or "|" in genre:
            return f"genre {genre!r} must be 1 to {MAX_GENRE_BYTES} printable bytes without '|'"
    if len(set(item.genres)) != len(item.genres):
        return "a genre is given twice"
    if item.year and not YEARS[0] <= item.year <= YEARS[1]:
        return f"year {item.year} is not 0 (unknown) or in [{YEARS[0]}, {YEARS[1]}]"
    for name in ("available_from", "available_until"):
        value = getattr(item, name)
        if not math.isfinite(value) or value < 0:
            return f"{name} {value} is not a valid time"
    if item.available_from and item.available_until and \
            item.available_until <= item.available_from:
        return "available_until must be after available_from"
    return None


def check_items(items: Sequence[CatalogItem], max_id_bytes: int) -> None:
    """Refuse the whole request (InvalidArgument naming the item) unless every item is valid
    and given once, and there are 1 to MAX_ITEMS_PER_CALL of them."""
    _check_count(len(items), "items")
    seen: set[str] = set()
    for index, item in enumerate(items):
        problem = _problem_with(item, max_id_bytes)
        if problem is None and item.item_id in seen:
            problem = f"item {item.item_id!r} is given twice"
        if problem:
            raise InvalidArgument(f"items[{index}]: {problem}")
        seen.add(item.item_id)


def check_ids(item_ids: Sequence[str], max_id_bytes: int) -> None:
    """The same for a list of item ids."""
    _check_count(len(item_ids), "item_ids")
    if len(set(item_ids)) != len(item_ids):
        raise InvalidArgument("an item id is given twice")
    for index, item_id in enumerate(item_ids):
        problem = _problem_with_id("item_id", item_id, max_id_bytes)
        if problem:
            raise InvalidArgument(f"item_ids[{index}]: {problem}")


def _check_count(n: int, name: str) -> None:
    if not 1 <= n <= MAX_ITEMS_PER_CALL:
        raise InvalidArgument(f"{name} must hold 1 to {MAX_ITEMS_PER_CALL}, got {n}")


@dataclass(frozen=True)
class LiveItem:
    """An item as put, its state, and its vector (with the model it is in)."""

    item: CatalogItem
    put_at: float
    taken_down: bool = False
    model_version: str = ""  # of `vector` and `co_rows` ("" : none)
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    learned_plays: int = 0  # plays the vector has learned from (0: the content start)
    viewers: int = 0  # distinct users who played it (of `co_rows`' model)
    # Co-visitation: the snapshot rows its viewers played near it (as the batch build's
    # neighbours count them: within the neighbours' window), and by how many viewers.
    co_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    co_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def servable(self, now: float) -> bool:
        """Not taken down and inside its window."""
        return not self.taken_down and self.item.open_at(now)

    def encode(self) -> bytes:
        """Binary form: a header, the fields as JSON, the vector as float32."""
        item = self.item
        meta = json.dumps({"title": item.title, "genres": list(item.genres), "year": item.year,
                           "from": item.available_from, "until": item.available_until,
                           "put_at": self.put_at, "taken_down": self.taken_down,
                           "model": self.model_version, "plays": self.learned_plays,
                           "viewers": self.viewers, "dim": len(self.vector),
                           "co": len(self.co_rows)}, separators=(",", ":")).encode("utf-8")
        return _HEADER.pack(_ITEM_FORMAT, len(meta)) + meta + b"".join(
            np.ascontiguousarray(a, t).tobytes() for a, t in (
                (self.vector, np.float32), (self.co_rows, np.int32),
                (self.co_counts, np.float32)))

    @staticmethod
    def decode(item_id: str, raw: bytes) -> LiveItem:
        """The item of `encode`'s bytes (ValueError if they are not)."""
        form, length = _HEADER.unpack_from(raw)
        if form != _ITEM_FORMAT:
            raise ValueError(f"live item {item_id!r}: unknown format {form}")
        meta = json.loads(raw[_HEADER.size:_HEADER.size + length])
        at, dim, co = _HEADER.size + length, meta["dim"], meta["co"]
        vector = np.frombuffer(raw, np.float32, dim, at)
        co_rows = np.frombuffer(raw, np.int32, co, at + 4 * dim)
        co_counts = np.frombuffer(raw, np.float32, co, at + 4 * (dim + co))
        item = CatalogItem(item_id, meta["title"], tuple(meta["genres"]), meta["year"],
                           meta["from"], meta["until"])
        return LiveItem(item, meta["put_at"], meta["taken_down"], meta["model"], vector,
                        meta["plays"], meta["viewers"], co_rows, co_counts)

    def under(self, catalog: CatalogSnapshot) -> LiveItem:
        """Itself if its vector and co-visits are of this model; else a fresh start in it
        (the re-fold after a model change recomputes them from the viewers)."""
        if self.model_version == catalog.model_version:
            return self
        return replace(self, model_version=catalog.model_version,
                       vector=start_vector(catalog, self.item.genres), learned_plays=0,
                       viewers=0, co_rows=np.zeros(0, np.int32),
                       co_counts=np.zeros(0, np.float32))

    def co_visited(self, rows: np.ndarray) -> LiveItem:
        """With one more viewer, who played `rows` (snapshot rows) near it."""
        every = np.concatenate([self.co_rows, np.asarray(rows, np.int32)])
        weight = np.concatenate([self.co_counts, np.ones(len(rows), np.float32)])
        unique, at = np.unique(every, return_inverse=True)
        return replace(self, viewers=self.viewers + 1, co_rows=unique.astype(np.int32),
                       co_counts=np.bincount(at, weight, len(unique)).astype(np.float32))


@dataclass(frozen=True)
class ItemStats:
    """The item-side fold-in's sums over an item's viewers, in one model's space:
    ``V = sum x x^T``, ``P = sum w x x^T`` (both full, symmetric), ``s = sum x``,
    ``m = sum w x``."""

    model_version: str
    viewers: int
    outer: np.ndarray  # float64 d x d: V
    upper: np.ndarray  # float64 d x d: P
    linear: np.ndarray  # float64 d
    weighted: np.ndarray  # float64 d

    @staticmethod
    def empty(model_version: str, dim: int) -> ItemStats:
        """No viewers yet."""
        return ItemStats(model_version, 0, np.zeros((dim, dim)), np.zeros((dim, dim)),
                         np.zeros(dim), np.zeros(dim))

    def played(self, vector: np.ndarray, weight: float, new_viewer: bool) -> ItemStats:
        """With one more play of `weight` by a viewer whose vector is `vector`."""
        x = np.asarray(vector, np.float64)
        xx = np.outer(x, x)
        return ItemStats(self.model_version, self.viewers + new_viewer,
                         self.outer + xx if new_viewer else self.outer, self.upper + weight * xx,
                         self.linear + x if new_viewer else self.linear,
                         self.weighted + weight * x)

    def encode(self) -> bytes:
        """Binary form: model version, viewers, then V, P, s and m as float64."""
        version = self.model_version.encode("utf-8")
        return _STATS.pack(len(version), self.viewers) + version + self.outer.tobytes() + \
            self.upper.tobytes() + self.linear.tobytes() + self.weighted.tobytes()

    @staticmethod
    def decode(raw: bytes, dim: int) -> ItemStats:
        """The statistics of `encode`'s bytes."""
        length, viewers = _STATS.unpack_from(raw)
        at = _STATS.size + length
        arrays = np.frombuffer(raw, np.float64, offset=at)
        square = dim * dim
        if len(arrays) != 2 * square + 2 * dim:
            raise ValueError(f"item statistics of {len(arrays)} floats, not for d={dim}")
        return ItemStats(raw[_STATS.size:at].decode("utf-8"), viewers,
                         arrays[:square].reshape(dim, dim).copy(),
                         arrays[square:2 * square].reshape(dim, dim).copy(),
                         arrays[2 * square:2 * square + dim].copy(),
                         arrays[2 * square + dim:].copy())


def start_vector(catalog: CatalogSnapshot, genres: Sequence[str]) -> np.ndarray:
    """The content-based start: the mean of the genre means of the item's genres that the
    snapshot has, else the mean of every item's factor."""
    means = catalog.genre_means
    known = [means[g] for g in genres if g in means]
    vector = np.mean(known, axis=0) if known else catalog.mean_factor
    return np.asarray(vector, np.float32)


def learned_vector(catalog: CatalogSnapshot, stats: ItemStats) -> np.ndarray | None:
    """The item-side fold-in over the viewers (None: no viewer yet)."""
    if not stats.viewers:
        return None
    als = catalog.manifest.als
    gram = float(als["regularization"]) * np.eye(catalog.dim) + stats.outer
    return solve_stats(gram, float(als["alpha"]), stats.upper, stats.linear, stats.weighted)


# -- writes, inside the writer's txn -------------------------------------------------------

@dataclass(frozen=True)
class Written:
    """What a catalog write did."""

    added: int = 0
    updated: int = 0
    taken_down: int = 0
    unknown: tuple[str, ...] = ()
    catalog_version: int = 0
    log_sequence: int = 0  # log mode: the write's place in the catalog stream


def write_message(items: Sequence[CatalogItem] = (), take_down_ids: Sequence[str] = (),
                  ) -> bytes:
    """A catalog write as the log mode's catalog stream carries it (JSON): a put of
    checked `items`, or a take-down of checked ids."""
    if items:
        return json.dumps({"op": "put", "items": [
            {"id": i.item_id, "title": i.title, "genres": list(i.genres), "year": i.year,
             "from": i.available_from, "until": i.available_until} for i in items]}).encode()
    return json.dumps({"op": "take_down", "ids": list(take_down_ids)}).encode()


def parse_message(payload: bytes, max_id_bytes: int
                  ) -> tuple[list[CatalogItem], list[str]]:
    """The checked items to put, or ids to take down, of a catalog stream message
    (`write_message`); ValueError (InvalidArgument is one) for anything else."""
    try:
        message = json.loads(payload)
        if message["op"] == "put":
            items = [CatalogItem(str(i["id"]), str(i["title"]),
                                 tuple(str(g) for g in i["genres"]), int(i["year"]),
                                 float(i["from"]), float(i["until"])) for i in message["items"]]
            check_items(items, max_id_bytes)
            return items, []
        if message["op"] == "take_down":
            ids = [str(i) for i in message["ids"]]
            check_ids(ids, max_id_bytes)
            return [], ids
    except ValueError:
        raise
    except Exception as exc:  # any shape of garbage is a message this cannot apply
        raise ValueError(f"malformed catalog write: {exc!r}") from exc
    raise ValueError(f"unknown catalog write {message['op']!r}")


def apply_message(writer: StoreWriter, catalog: CatalogSnapshot,
                  parsed: tuple[list[CatalogItem], list[str]], now: float) -> Written:
    """Apply a parsed catalog stream message (`parse_message`)."""
    items, ids = parsed
    return put_items(writer, catalog, items, now) if items else \
        take_down(writer, catalog, ids, now)


def _get(writer: StoreWriter, item_id: str) -> LiveItem | None:
    raw = writer.get_raw("live_items", item_id.encode("utf-8"))
    return None if raw is None else LiveItem.decode(item_id, raw)


def _put(writer: StoreWriter, live: LiveItem) -> None:
    writer.put_raw("live_items", live.item.item_id.encode("utf-8"), live.encode())


def _bump(writer: StoreWriter, item_ids: Sequence[str]) -> int:
    """Record that these items changed; the catalog version after."""
    version = _version_in(writer)
    for item_id in dict.fromkeys(item_ids):
        version += 1
        writer.put_raw("item_changes", _VERSION.pack(version), item_id.encode("utf-8"))
    writer.put_meta(VERSION_KEY, str(version))
    return version


def _version_in(writer: StoreWriter) -> int:
    raw = writer.get_raw("meta", VERSION_KEY.encode())
    return 0 if raw is None else int(raw)


def put_items(writer: StoreWriter, catalog: CatalogSnapshot, items: Sequence[CatalogItem],
              now: float) -> Written:
    """Add or update checked items (`check_items`); a take-down is lifted."""
    added = 0
    for item in items:
        stored = _get(writer, item.item_id)
        if stored is None and item.item_id not in catalog.item_index:
            added += 1
            _put(writer, LiveItem(item, now, model_version=catalog.model_version,
                                  vector=start_vector(catalog, item.genres)))
            continue
        if stored is None:  # a snapshot item: its window (and a lifted take-down) only
            _put(writer, LiveItem(item, now))
            continue
        live = replace(stored, item=item, taken_down=False)
        if not stored.learned_plays and item.item_id not in catalog.item_index:
            live = replace(live, model_version=catalog.model_version,
                           vector=start_vector(catalog, item.genres))
        _put(writer, live)
    version = _bump(writer, [i.item_id for i in items])
    return Written(added=added, updated=len(items) - added, catalog_version=version)


def take_down(writer: StoreWriter, catalog: CatalogSnapshot, item_ids: Sequence[str],
              now: float) -> Written:
    """Take the items down (checked ids, `check_ids`); ids never known are reported."""
    done, unknown = [], []
    for item_id in item_ids:
        stored = _get(writer, item_id)
        row = catalog.item_index.get(item_id)
        if stored is None and row is None:
            unknown.append(item_id)
            continue
        if stored is None:
            assert row is not None
            stored = LiveItem(snapshot_item(catalog, row), now)
        _put(writer, replace(stored, taken_down=True))
        done.append(item_id)
    version = _bump(writer, done) if done else _version_in(writer)
    return Written(taken_down=len(done), unknown=tuple(unknown), catalog_version=version)


def snapshot_item(catalog: CatalogSnapshot, row: int) -> CatalogItem:
    """The catalog fields of a snapshot item."""
    return CatalogItem(catalog.item_ids[row], catalog.titles[row], tuple(catalog.genres_of(row)),
                       int(catalog.years[row]))


def _plays_key(item_id: str, user_id: str) -> bytes:
    return item_id.encode("utf-8") + b"\0" + user_id.encode("utf-8")


def _stats(writer: StoreWriter, catalog: CatalogSnapshot, item_id: str) -> ItemStats:
    raw = writer.get_raw("item_stats", item_id.encode("utf-8"))
    stats = None if raw is None else ItemStats.decode(raw, catalog.dim)
    if stats is None or stats.model_version != catalog.model_version:
        # None yet, or of another model: the re-fold after a model change rebuilds them
        # from every viewer; until then they grow from here.
        return ItemStats.empty(catalog.model_version, catalog.dim)
    return stats


def plays_between(before: UserRecord | None, after: UserRecord,
                  live_ids: Collection[str]) -> list[Play]:
    """The plays of live items that turned the user's record `before` into `after` (as a
    log-mode host sees them: records, not events): the weight each one's history entry
    gained, at its latest play."""
    old = {} if before is None else dict(zip(before.item_ids, before.weights.tolist(),
                                              strict=True))
    return [(item_id, weight - old.get(item_id, 0.0), float(at))
            for item_id, weight, at in zip(after.item_ids, after.weights.tolist(),
                                           after.last_at.tolist(), strict=True)
            if item_id in live_ids and weight > old.get(item_id, 0.0)]


def near_plays(catalog: CatalogSnapshot, record: UserRecord) -> np.ndarray:
    """The snapshot rows a play made now pairs with in the co-visitation count: the user's
    latest distinct plays, as many as the neighbours' window lets through (0: all)."""
    window = int(catalog.manifest.neighbours.get("window", 0))
    fitted = catalog.fit(record)
    known = np.flatnonzero(fitted.rows >= 0)
    latest = known[np.argsort(-fitted.last_at[known], kind="stable")]
    return fitted.rows[latest[:window + 1] if window else latest].astype(np.int32)


def learn(writer: StoreWriter, catalog: CatalogSnapshot, plays: Mapping[str, list[Play]],
          records: Mapping[str, UserRecord]) -> list[str]:
    """Keep the plays of live items (for the re-fold and the next build), count their
    co-visits, and fold them into the items' vectors with each viewer's vector as just
    written (a viewer without one of this model teaches the vector nothing yet); the items
    changed."""
    changed: dict[str, LiveItem] = {}
    for user_id, user_plays in plays.items():
        record = records.get(user_id)
        teaches = record is not None and len(record.vector) == catalog.dim and \
            record.model_version == catalog.model_version
        for item_id, weight, at in user_plays:
            if item_id in catalog.item_index:
                continue
            live = changed.get(item_id) or _get(writer, item_id)
            if live is None:
                continue
            live = live.under(catalog)
            key = _plays_key(item_id, user_id)
            before = writer.get_raw("item_plays", key)
            total, last = (0.0, at) if before is None else _PLAYS.unpack(before)
            writer.put_raw("item_plays", key, _PLAYS.pack(total + weight, max(at, last)))
            if before is None and record is not None:
                live = live.co_visited(near_plays(catalog, record))
            if teaches:
                assert record is not None
                stats = _stats(writer, catalog, item_id).played(record.vector, weight,
                                                                before is None)
                writer.put_raw("item_stats", item_id.encode("utf-8"), stats.encode())
                vector = learned_vector(catalog, stats)
                assert vector is not None  # it has a viewer now
                live = replace(live, vector=vector, learned_plays=live.learned_plays + 1)
            changed[item_id] = live
    for live in changed.values():
        _put(writer, live)
    if changed:
        _bump(writer, list(changed))
    return list(changed)


def refold_items(writer: StoreWriter, catalog: CatalogSnapshot,
                 waiting: set[str] | None = None) -> int:
    """Recompute the live items of another model under this one (after a model change):
    its vector from its viewers' current vectors (none: the content start), its co-visits
    from their histories, once every viewer is re-folded (until then it is served with
    its content start, and its id goes into `waiting`). Items the snapshot now has drop
    their statistics and plays. How many items were recomputed."""
    redone = []
    for key, raw in list(writer.scan("live_items")):
        item_id = key.decode("utf-8")
        live = LiveItem.decode(item_id, raw)
        viewers = list(writer.scan("item_plays", key + b"\0"))
        if item_id in catalog.item_index:
            writer.delete_raw("item_stats", key)
            for plays_key, _ in viewers:
                writer.delete_raw("item_plays", plays_key)
            continue
        if live.model_version == catalog.model_version:
            continue
        records = [(writer.get_user(plays_key[len(key) + 1:].decode("utf-8")), raw_plays)
                   for plays_key, raw_plays in viewers]
        if any(r is not None and r.model_version != catalog.model_version
               for r, _ in records):
            if waiting is not None:
                waiting.add(item_id)
            continue  # a viewer is not re-folded yet: again later
        live = live.under(catalog)
        stats = ItemStats.empty(catalog.model_version, catalog.dim)
        for record, raw_plays in records:
            if record is None:
                continue
            live = live.co_visited(near_plays(catalog, record))
            if record.model_version == catalog.model_version and \
                    len(record.vector) == catalog.dim:
                stats = stats.played(record.vector, _PLAYS.unpack(raw_plays)[0], True)
        writer.put_raw("item_stats", key, stats.encode())
        vector = learned_vector(catalog, stats)
        if vector is not None:
            live = replace(live, vector=vector, learned_plays=stats.viewers)
        _put(writer, live)
        redone.append(item_id)
    if redone:
        _bump(writer, redone)
    return len(redone)


def prune_changes(writer: StoreWriter, keep: int = KEEP_CHANGES) -> int:
    """Drop the feed's entries older than the latest `keep`; how many."""
    first = _version_in(writer) - keep
    removed = 0
    for key, _ in writer.scan("item_changes"):
        if _VERSION.unpack(key)[0] > first:
            break
        writer.delete_raw("item_changes", key)
        removed += 1
    return removed


# -- reads -----------------------------------------------------------------------------------

def taken_in(store: UserStore, known: Collection[str]
             ) -> tuple[list[CatalogItem], list[tuple[str, str, float, float]]]:
    """What a batch build takes in: the live items it does not have (`known`: its item
    ids), and every recorded play of them as (user, item, summed weight, latest time)."""
    items = [live.item for item_id, live in read_items(store).items() if item_id not in known]
    plays = []
    for item in items:
        prefix = item.item_id.encode("utf-8") + b"\0"
        for key, raw in store.scan("item_plays", prefix=prefix):
            weight, at = _PLAYS.unpack(raw)
            plays.append((key[len(prefix):].decode("utf-8"), item.item_id, weight, at))
    return items, plays


def catalog_version(store: UserStore) -> int:
    """The live catalog's version (0: nothing was ever put)."""
    value = store.get_meta(VERSION_KEY)
    return 0 if value is None else int(value)


def read_items(store: UserStore, item_ids: Sequence[str] | None = None) -> dict[str, LiveItem]:
    """The stored live items (`item_ids`: those of them; None: all)."""
    if item_ids is None:
        pairs: list[tuple[bytes, bytes | None]] = list(store.scan("live_items"))
    else:
        keys = [i.encode("utf-8") for i in item_ids]
        pairs = list(zip(keys, store.get_many("live_items", keys), strict=True))
    return {key.decode("utf-8"): LiveItem.decode(key.decode("utf-8"), raw)
            for key, raw in pairs if raw is not None}


def changed_since(store: UserStore, version: int) -> tuple[int, list[str]] | None:
    """The catalog version and the ids changed after `version`; None when the feed no
    longer reaches back that far (read everything instead)."""
    entries = store.scan("item_changes", _VERSION.pack(version + 1))
    latest = catalog_version(store)
    if entries and _VERSION.unpack(entries[0][0])[0] != version + 1 or \
            not entries and latest > version:
        return None
    if not entries:
        return version, []
    return _VERSION.unpack(entries[-1][0])[0], list(dict.fromkeys(
        value.decode("utf-8") for _, value in entries))


# -- serving -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LiveSegment:
    """The live items a ranking worker searches beside the snapshot's index, and the
    snapshot rows it must not serve. Live item i is row `offset + i` of the catalog's rows
    (the snapshot's item count rounded up to a byte, so one bitmap covers both parts), in
    the order put (oldest first). The search scans 8-bit codes of the vectors (a quarter
    of the bytes: the scan is bound by memory) and re-scores the best exactly."""

    version: int
    offset: int
    item_ids: tuple[str, ...]
    items: tuple[CatalogItem, ...]
    years: np.ndarray  # int64 (m,)
    vectors: np.ndarray  # float32 (m, d), read-only
    codes: np.ndarray  # int8 (m, d), read-only: vectors / scale, rounded (the scan reads these)
    scale: np.ndarray  # float32 (d,), read-only: per dimension, max |vector| / 127
    high: np.ndarray  # float32 (d,): per dimension, the largest of the vectors (`bound`)
    low: np.ndarray  # float32 (d,): and the smallest
    put_at: np.ndarray  # float64 (m,)
    genre_rows: dict[str, np.ndarray]  # genre -> bool (m,)
    rows: dict[str, int]  # live item id -> its row
    blocked: np.ndarray  # int64 snapshot rows not servable now (taken down, window shut)
    next_change: float  # when an availability window opens or closes next
    # The live items as co-visitation neighbours of snapshot rows, sorted by the snapshot
    # row: (snapshot row, live row, cosine), the batch build's score over the viewers so far.
    co_from: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    co_to: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    co_score: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.item_ids)

    @staticmethod
    def of(items: Mapping[str, LiveItem], catalog: CatalogSnapshot, now: float,
           version: int) -> LiveSegment:
        """The segment of the stored live items for this snapshot, at `now`."""
        next_change = math.inf
        blocked, live = [], []
        for item_id, item in items.items():
            for bound in (item.item.available_from, item.item.available_until):
                if bound > now:
                    next_change = min(next_change, bound)
            row = catalog.item_index.get(item_id)
            if row is not None:
                if not item.servable(now):
                    blocked.append(row)
            elif item.servable(now):
                live.append(item)
        live.sort(key=lambda i: (i.put_at, i.item.item_id))
        offset = -(-len(catalog) // 8) * 8
        vectors = np.zeros((len(live), catalog.dim), np.float32)
        for i, item in enumerate(live):
            fits = item.model_version == catalog.model_version and len(item.vector) == catalog.dim
            vectors[i] = item.vector if fits else start_vector(catalog, item.item.genres)
        genres: dict[str, np.ndarray] = {}
        for i, item in enumerate(live):
            for genre in item.item.genres:
                genres.setdefault(genre, np.zeros(len(live), bool))[i] = True
        ids = tuple(i.item.item_id for i in live)
        co = _co_visits(live, catalog, offset)
        scale = np.maximum(np.abs(vectors).max(axis=0, initial=0.0), 1e-30) / 127
        codes = np.clip(np.rint(vectors / scale), -127, 127).astype(np.int8)
        return LiveSegment(version, offset, ids, tuple(i.item for i in live),
                           np.array([i.item.year for i in live], np.int64), readonly(vectors),
                           readonly(codes), readonly(scale.astype(np.float32)),
                           vectors.max(axis=0, initial=-np.inf),
                           vectors.min(axis=0, initial=np.inf),
                           np.array([i.put_at for i in live], np.float64), genres,
                           {item_id: offset + i for i, item_id in enumerate(ids)},
                           np.array(sorted(blocked), np.int64), next_change, *co)

    def bound(self, vector: np.ndarray) -> float:
        """An upper bound of every live item's inner product with `vector` (per dimension
        the larger of its extremes' products): below a k-th best score of the snapshot's,
        no live item can enter that top k, and the scan is skipped. Unplayed titles (their
        content starts are means) fall below every benchmark user's 10th best."""
        return float(np.maximum(vector * self.high, vector * self.low).sum()) \
            if len(self) else -np.inf

    def reach(self, played: np.ndarray, weights: np.ndarray) -> Candidates:
        """The live items the played snapshot rows reach as co-visitation neighbours, as
        `index.neighbours.candidates` scores the snapshot's: the weighted sum of their
        similarities, the play that contributed most (ties: the earlier) as the anchor."""
        if not len(self.co_from) or not len(played):
            return Candidates.empty()
        low = np.searchsorted(self.co_from, played, "left")
        high = np.searchsorted(self.co_from, played, "right")
        sums: dict[int, float] = {}
        best: dict[int, tuple[float, int]] = {}
        for i in np.flatnonzero(high > low).tolist():
            for at in range(low[i], high[i]):
                row, part = int(self.co_to[at]), float(weights[i] * self.co_score[at])
                sums[row] = sums.get(row, 0.0) + part
                if row not in best or part > best[row][0]:
                    best[row] = part, int(played[i])
        rows = list(sums)
        return Candidates(np.array(rows, np.int64), np.array([sums[r] for r in rows]),
                          np.array([best[r][1] for r in rows], np.int64))

    @staticmethod
    def empty(catalog: CatalogSnapshot) -> LiveSegment:
        """No live items, nothing blocked."""
        return LiveSegment.of({}, catalog, 0.0, 0)

    def allows(self, spec: ItemFilter) -> np.ndarray:
        """Which live items the filter allows (bool, one per item)."""
        allowed = np.ones(len(self), bool)
        if spec.genres_any:
            allowed &= np.logical_or.reduce(
                [self.genre_rows.get(g, np.zeros(len(self), bool)) for g in spec.genres_any])
        for genre in spec.genres_none:
            if genre in self.genre_rows:
                allowed &= ~self.genre_rows[genre]
        if spec.min_year or spec.max_year:
            allowed &= self.years > 0
        if spec.min_year:
            allowed &= self.years >= spec.min_year
        if spec.max_year:
            allowed &= self.years <= spec.max_year
        return allowed


def _co_visits(live: Sequence[LiveItem], catalog: CatalogSnapshot,
               offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segment's reverse co-visitation index: for each live item of this model, its
    `k` best snapshot rows (the snapshot neighbours' k) by ``c / sqrt(n_row * viewers)``
    (n_row: the row's batch plays)."""
    k = int(catalog.manifest.neighbours.get("k", 0))
    parts = []
    for i, item in enumerate(live):
        if not k or item.model_version != catalog.model_version or not item.viewers:
            continue
        seen = np.maximum(catalog.popularity[item.co_rows].astype(np.float64), item.co_counts)
        score = np.minimum(item.co_counts / np.sqrt(seen * item.viewers), 1.0)
        top = np.argsort(-score, kind="stable")[:k]
        parts.append((item.co_rows[top].astype(np.int64), np.full(len(top), offset + i),
                      score[top]))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    sources, targets, scores = (np.concatenate(p) for p in zip(*parts, strict=True))
    order = np.argsort(sources, kind="stable")
    return sources[order], targets[order], scores[order]
