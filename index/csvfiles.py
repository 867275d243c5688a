"""Reading delimited input files, every field checked, every error naming file and line.

The project's CSV formats (interactions `user_id,item_id,weight,timestamp`, items
`item_id,title,genres,year` with `|`-separated genres) and RecBole's atomic TSV files.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from index.tables import Dataset, DatasetError, Interactions, ItemTable

INTERACTIONS_HEADER = ("user_id", "item_id", "weight", "timestamp")
ITEMS_HEADER = ("item_id", "title", "genres", "year")
_INT64 = np.iinfo(np.int64)
MAX_YEAR = int(np.iinfo(np.int16).max)
_MAX_FLOAT32 = float(np.finfo(np.float32).max)


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


def recbole_records(path: Path, wanted: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
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


def parse_text(text: str, what: str, where: str) -> str:
    """A field with no line break: snapshots store ids and titles one per line."""
    if text and text.splitlines() != [text]:
        raise DatasetError(f"{where}: {what} {text!r} contains a line break")
    return text


def parse_id(text: str, what: str, where: str) -> str:
    """A non-empty id on one line."""
    if not text:
        raise DatasetError(f"{where}: empty {what}")
    return parse_text(text, what, where)


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
    if not 0 <= value <= MAX_YEAR:
        raise DatasetError(f"{where}: year {text!r} is outside 0..{MAX_YEAR}")
    return value


def collect_interactions(
    records: Iterator[tuple[str, list[str]]], weight_name: str = "weight", scale: float = 1.0
) -> Interactions:
    """Interactions from (where, [user, item, weight, timestamp]) records; weight times `scale`."""
    users: list[str] = []
    items: list[str] = []
    weights: list[float] = []
    times: list[int] = []
    for where, (user, item, weight, timestamp) in records:
        users.append(parse_id(user, "user_id", where))
        items.append(parse_id(item, "item_id", where))
        weights.append(_parse_weight(weight, where, weight_name) * scale)
        times.append(_parse_timestamp(timestamp, where))
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object),
                        np.array(weights, dtype=np.float32), np.array(times, dtype=np.int64))


class ItemRows:
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


def check_items_known(
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


def load_interactions_csv(path: Path, until: int | None = None) -> Interactions:
    """Read a `user_id,item_id,weight,timestamp` CSV; keep rows before `until` if given."""
    path = Path(path)
    log = collect_interactions(_csv_records(path, INTERACTIONS_HEADER))
    # Every row is validated even when `until` drops it: a bad file is bad as a whole.
    return log if until is None else log.until(until)


def load_items_csv(path: Path) -> ItemTable:
    """Read an `item_id,title,genres,year` CSV; genres are `|`-separated, empty year -> 0."""
    path = Path(path)
    rows = ItemRows()
    for where, (item, title, genres, year) in _csv_records(path, ITEMS_HEADER):
        genre_list = parse_text(genres, "genres", where).split("|")
        rows.add(where, parse_id(item, "item_id", where), parse_text(title, "title", where),
                 tuple(genre for genre in genre_list if genre), _parse_year(year, where))
    return rows.table()


def load_csv(interactions: Path, items: Path, until: int | None = None) -> Dataset:
    """Load an interactions CSV and its items CSV; every interacted item must be listed."""
    interactions, items = Path(interactions), Path(items)
    table = load_items_csv(items)
    log = load_interactions_csv(interactions, until)
    check_items_known(log, table, interactions, items)
    return Dataset(interactions.stem, log, table)
