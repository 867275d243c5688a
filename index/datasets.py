"""Interaction logs and item tables: CSV files, MovieLens-100K and synthetic taste clusters."""

from __future__ import annotations

import csv
import inspect
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INTERACTIONS_HEADER = ("user_id", "item_id", "weight", "timestamp")
ITEMS_HEADER = ("item_id", "title", "genres", "year")
KNOWN_DATASETS = ("movielens-100k", "synthetic")

RECBOLE_REQUIREMENT = "recbole==1.2.1"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item")
ML100K_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
PIP_TIMEOUT_S = 300
# RecBole's placeholder class for movies without a genre; it is not a genre.
ML100K_NO_GENRE = "unknown"


_INT64 = np.iinfo(np.int64)
_MAX_YEAR = int(np.iinfo(np.int16).max)
_MAX_FLOAT32 = float(np.finfo(np.float32).max)


class DatasetError(Exception):
    """Bad or unavailable input data; the message names the file (and line) at fault."""


@dataclass(frozen=True, eq=False)
class Interactions:
    """Implicit-feedback log, one (user, item, weight, timestamp) event per row."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    weights: np.ndarray
    timestamps: np.ndarray

    def __post_init__(self) -> None:
        """Coerce column dtypes and reject columns of unequal length."""
        # Frozen dataclass: coercion has to go through object.__setattr__.
        object.__setattr__(self, "user_ids", np.asarray(self.user_ids, dtype=object))
        object.__setattr__(self, "item_ids", np.asarray(self.item_ids, dtype=object))
        object.__setattr__(self, "weights", np.asarray(self.weights, dtype=np.float32))
        object.__setattr__(self, "timestamps", np.asarray(self.timestamps, dtype=np.int64))
        lengths = {len(self.user_ids), len(self.item_ids), len(self.weights), len(self.timestamps)}
        if len(lengths) != 1:
            raise ValueError(f"Interactions columns differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.user_ids)

    def until(self, timestamp: int) -> Interactions:
        """Rows with timestamp < `timestamp` (the training part)."""
        return self._take(self.timestamps < timestamp)

    def after(self, timestamp: int) -> Interactions:
        """Rows with timestamp >= `timestamp` (the replay part)."""
        return self._take(self.timestamps >= timestamp)

    def sorted_by_time(self) -> Interactions:
        """Rows in timestamp order; ties keep their original order."""
        return self._take(np.argsort(self.timestamps, kind="stable"))

    def _take(self, index: np.ndarray) -> Interactions:
        """Rows selected by a boolean mask or an index array."""
        return Interactions(
            self.user_ids[index], self.item_ids[index], self.weights[index], self.timestamps[index]
        )


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Item catalog: ids, titles, genres and release years (0 when unknown), one per item."""

    item_ids: list[str]
    titles: list[str]
    genres: list[tuple[str, ...]]
    years: np.ndarray

    def __post_init__(self) -> None:
        """Coerce years to int16 and reject columns of unequal length."""
        object.__setattr__(self, "years", np.asarray(self.years, dtype=np.int16))
        lengths = {len(self.item_ids), len(self.titles), len(self.genres), len(self.years)}
        if len(lengths) != 1:
            raise ValueError(f"ItemTable columns differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        """Number of items."""
        return len(self.item_ids)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named interaction log with its item table (and, for synthetic data, the planted truth)."""

    name: str
    interactions: Interactions
    items: ItemTable
    item_clusters: np.ndarray | None = None
    user_clusters: dict[str, int] | None = None


# ---------------------------------------------------------------- reading delimited files


def _read_rows(path: Path, tsv: bool = False) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, fields) of each non-blank record, read errors as DatasetError."""
    line_num = 0
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = (csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
                      else csv.reader(handle))
            for row in reader:
                first, line_num = line_num + 1, reader.line_num
                if row:
                    yield first, row
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path} line {line_num + 1}: cannot read: {err}") from err


def _records(
    path: Path, rows: Iterator[tuple[int, list[str]]], width: int
) -> Iterator[tuple[str, list[str]]]:
    """Yield ("<path> line <n>", fields) of each record, which must have `width` fields."""
    for line, row in rows:
        where = f"{path} line {line}"
        if len(row) != width:
            raise DatasetError(f"{where}: expected {width} fields, got {len(row)}")
        yield where, row


def _csv_records(path: Path, header: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Records of a CSV file whose first line must be exactly `header`."""
    rows = _read_rows(path)
    expected = ",".join(header)
    first = next(rows, None)
    if first is None:
        raise DatasetError(f"{path}: empty file, expected header '{expected}'")
    if first[1] != list(header):
        raise DatasetError(
            f"{path} line {first[0]}: expected header '{expected}', got '{','.join(first[1])}'"
        )
    return _records(path, rows, len(header))


def _recbole_records(path: Path, wanted: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Records of a RecBole atomic file (TSV, header `name:type`), `wanted` columns by name."""
    rows = _read_rows(path, tsv=True)
    first = next(rows, None)
    if first is None:
        raise DatasetError(f"{path}: empty file")
    names = [field.split(":", 1)[0] for field in first[1]]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise DatasetError(f"{path} line {first[0]}: header lacks {missing}, got {first[1]}")
    picks = [names.index(name) for name in wanted]
    for where, row in _records(path, rows, len(names)):
        yield where, [row[i] for i in picks]


# ---------------------------------------------------------------- field parsers


def _parse_text(text: str, what: str, where: str) -> str:
    """A field with no line break: snapshots store ids and titles one per line."""
    if text and text.splitlines() != [text]:
        raise DatasetError(f"{where}: {what} {text!r} contains a line break")
    return text


def _parse_id(text: str, what: str, where: str) -> str:
    """A non-empty id on one line."""
    if not text:
        raise DatasetError(f"{where}: empty {what}")
    return _parse_text(text, what, where)


def _parse_weight(text: str, where: str, what: str = "weight") -> float:
    """A finite number >= 0 that fits a float32."""
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {what} {text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= _MAX_FLOAT32):
        raise DatasetError(f"{where}: {what} {text!r} must be finite and >= 0")
    return value


def _parse_timestamp(text: str, where: str) -> int:
    """Integer unix seconds that fit an int64."""
    try:
        value = int(text)
    except ValueError:
        raise DatasetError(f"{where}: timestamp {text!r} is not an integer") from None
    if not _INT64.min <= value <= _INT64.max:
        raise DatasetError(f"{where}: timestamp {text!r} is out of range")
    return value


def _parse_year(text: str, where: str) -> int:
    """A year in 0..32767, or 0 for an empty field."""
    if not text.strip():
        return 0
    try:
        value = int(text)
    except ValueError:
        raise DatasetError(f"{where}: year {text!r} is not an integer") from None
    if not 0 <= value <= _MAX_YEAR:
        raise DatasetError(f"{where}: year {text!r} is outside 0..{_MAX_YEAR}")
    return value


def _lenient_year(text: str) -> int:
    """A year, or 0 for RecBole's placeholders such as 'unkonwn' and 'V'."""
    text = text.strip()
    return int(text) if text.isdigit() and int(text) <= _MAX_YEAR else 0


# ---------------------------------------------------------------- building tables


def _collect_interactions(
    records: Iterator[tuple[str, list[str]]], weight_name: str = "weight", scale: float = 1.0
) -> Interactions:
    """Interactions from (where, [user, item, weight, timestamp]) records; weight times `scale`."""
    users: list[str] = []
    items: list[str] = []
    weights: list[float] = []
    times: list[int] = []
    for where, (user, item, weight, timestamp) in records:
        users.append(_parse_id(user, "user_id", where))
        items.append(_parse_id(item, "item_id", where))
        weights.append(_parse_weight(weight, where, weight_name) * scale)
        times.append(_parse_timestamp(timestamp, where))
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object),
                        np.array(weights, dtype=np.float32), np.array(times, dtype=np.int64))


class _ItemRows:
    """Accumulates item rows, rejecting duplicate ids."""

    def __init__(self) -> None:
        """Start empty."""
        self.ids: list[str] = []
        self.titles: list[str] = []
        self.genres: list[tuple[str, ...]] = []
        self.years: list[int] = []
        self.lines: dict[str, str] = {}

    def add(self, where: str, item: str, title: str, genres: tuple[str, ...], year: int) -> None:
        """Append one item; `where` locates it for the duplicate message."""
        if item in self.lines:
            raise DatasetError(f"{where}: duplicate item_id {item!r}, first at {self.lines[item]}")
        self.lines[item] = where
        self.ids.append(item)
        self.titles.append(title)
        self.genres.append(genres)
        self.years.append(year)

    def table(self) -> ItemTable:
        """The accumulated rows as an ItemTable."""
        return ItemTable(self.ids, self.titles, self.genres, np.array(self.years, dtype=np.int16))


def _check_items_known(
    log: Interactions, items: ItemTable, log_path: Path, items_path: Path
) -> None:
    """Every item of the log must be in the item table; list a few that are not."""
    unknown = sorted(set(log.item_ids.tolist()).difference(items.item_ids))
    if unknown:
        shown = ", ".join(repr(item) for item in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise DatasetError(
            f"{log_path}: {len(unknown)} item_id(s) not listed in {items_path}: {shown}{more}"
        )


# ---------------------------------------------------------------- CSV datasets


def load_interactions_csv(path: Path, until: int | None = None) -> Interactions:
    """Read a `user_id,item_id,weight,timestamp` CSV; keep rows before `until` if given."""
    path = Path(path)
    log = _collect_interactions(_csv_records(path, INTERACTIONS_HEADER))
    # Every row is validated even when `until` drops it: a bad file is bad as a whole.
    return log if until is None else log.until(until)


def load_items_csv(path: Path) -> ItemTable:
    """Read an `item_id,title,genres,year` CSV; genres are `|`-separated, empty year -> 0."""
    path = Path(path)
    rows = _ItemRows()
    for where, (item, title, genres, year) in _csv_records(path, ITEMS_HEADER):
        genre_list = _parse_text(genres, "genres", where).split("|")
        rows.add(where, _parse_id(item, "item_id", where), _parse_text(title, "title", where),
                 tuple(genre for genre in genre_list if genre), _parse_year(year, where))
    return rows.table()


def load_csv(interactions: Path, items: Path, until: int | None = None) -> Dataset:
    """Load an interactions CSV and its items CSV; every interacted item must be listed."""
    interactions, items = Path(interactions), Path(items)
    table = load_items_csv(items)
    log = load_interactions_csv(interactions, until)
    _check_items_known(log, table, interactions, items)
    return Dataset(interactions.stem, log, table)


# ---------------------------------------------------------------- MovieLens-100K


def load_movielens_100k(cache_dir: Path) -> Dataset:
    """MovieLens-100K from the recbole wheel, fetched at run time into `cache_dir`/ml-100k.

    Its licence forbids redistribution, so it is never committed. Mapping: each rating is
    taken as a completed play with watch fraction rating/5, so weight = rating / 5 (float32);
    timestamps as given; titles as given; genres from the space-separated `class` column
    (RecBole's placeholder 'unknown' becomes no genre); a missing or malformed year -> 0.
    """
    folder = Path(cache_dir) / "ml-100k"
    if not all((folder / name).is_file() for name in ML100K_FILES):
        _fetch_movielens_100k(folder)
    inter_path, item_path = folder / ML100K_FILES[0], folder / ML100K_FILES[1]
    items = _read_ml100k_items(item_path)
    wanted = ("user_id", "item_id", "rating", "timestamp")
    log = _collect_interactions(_recbole_records(inter_path, wanted), "rating", scale=0.2)
    _check_items_known(log, items, inter_path, item_path)
    return Dataset("movielens-100k", log, items)


def _read_ml100k_items(path: Path) -> ItemTable:
    """The RecBole `.item` file of MovieLens-100K as an ItemTable."""
    rows = _ItemRows()
    wanted = ("item_id", "movie_title", "release_year", "class")
    for where, (item, title, year, classes) in _recbole_records(path, wanted):
        genres = tuple(g for g in classes.split() if g != ML100K_NO_GENRE)
        rows.add(where, _parse_id(item, "item_id", where), _parse_text(title, "title", where),
                 genres, _lenient_year(year))
    return rows.table()


def _fetch_movielens_100k(folder: Path) -> None:
    """Download the recbole wheel to a temp dir and copy the two MovieLens files into `folder`."""
    with tempfile.TemporaryDirectory(prefix="freshrec-recbole-") as tmp:
        wheel = _download_recbole_wheel(Path(tmp))
        _extract_ml100k(wheel, folder)


def _run_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `python -m pip ARGS`; the only network access here, so tests replace it."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False,
    )


def _fetch_error(detail: str) -> DatasetError:
    """The error for a failed download, pointing at the offline alternative."""
    return DatasetError(
        "could not fetch MovieLens-100K (the recbole wheel) — are you offline? "
        f"pip said: {detail or '(nothing)'}; use --dataset synthetic instead"
    )


def _last_line(text: str | None) -> str:
    """The last non-blank line of `text`, or ''."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _download_recbole_wheel(dest: Path) -> Path:
    """Download the pinned recbole wheel into `dest` with pip and return its path."""
    args = ["download", "--no-deps", "--only-binary=:all:", "-d", str(dest), RECBOLE_REQUIREMENT]
    try:
        done = _run_pip(args)
    except subprocess.TimeoutExpired:
        raise _fetch_error(f"nothing within {PIP_TIMEOUT_S} s (timed out)") from None
    except OSError as err:
        raise _fetch_error(str(err)) from err
    if done.returncode != 0:
        raise _fetch_error(_last_line(done.stderr) or _last_line(done.stdout))
    wheels = sorted(dest.glob("recbole-*.whl"))
    if not wheels:
        raise _fetch_error(f"success, but no recbole wheel is in the download folder {dest}")
    return wheels[0]


def _extract_ml100k(wheel: Path, folder: Path) -> None:
    """Copy the MovieLens members of `wheel` into `folder`, each via a temp name and a rename."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for name in ML100K_FILES:
                _write_atomically(folder / name, archive.read(ML100K_WHEEL_DIR + name))
    except (zipfile.BadZipFile, KeyError) as err:
        raise DatasetError(f"{wheel.name}: does not hold MovieLens-100K: {err}") from err
    except OSError as err:
        raise DatasetError(f"{folder}: cannot write the MovieLens-100K cache: {err}") from err


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- by name


def load(name: str, cache_dir: Path, **kwargs: Any) -> Dataset:
    """Load a dataset by name: "movielens-100k" (options: none) or "synthetic" (its options)."""
    if name == "movielens-100k":
        if kwargs:
            raise DatasetError(f"movielens-100k takes no options, got {sorted(kwargs)}")
        return load_movielens_100k(cache_dir)
    if name == "synthetic":
        from index.synthetic import synthetic  # it builds on this module's types

        try:
            inspect.signature(synthetic).bind(**kwargs)
        except TypeError as err:
            raise DatasetError(f"synthetic: bad options {sorted(kwargs)}: {err}") from None
        return synthetic(**kwargs)
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
