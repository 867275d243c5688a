"""MovieLens-100K, read from the copy inside the `recbole` wheel, fetched at run time.

Its licence forbids redistribution, so it is never committed: the wheel is downloaded
with pip into a temporary dir and the two files are copied into a local cache.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from index.csvfiles import (
    MAX_YEAR,
    ItemRows,
    check_items_known,
    collect_interactions,
    parse_id,
    parse_text,
    recbole_records,
)
from index.files import atomic_write
from index.tables import Dataset, DatasetError, ItemTable

RECBOLE_REQUIREMENT = "recbole==1.2.1"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item")
ML100K_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
PIP_TIMEOUT_S = 300
# RecBole's placeholder class for movies without a genre; it is not a genre.
ML100K_NO_GENRE = "unknown"


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
    log = collect_interactions(recbole_records(inter_path, wanted), "rating", scale=0.2)
    check_items_known(log, items, inter_path, item_path)
    return Dataset("movielens-100k", log, items)


def _read_ml100k_items(path: Path) -> ItemTable:
    """The RecBole `.item` file of MovieLens-100K as an ItemTable."""
    rows = ItemRows()
    wanted = ("item_id", "movie_title", "release_year", "class")
    for where, (item, title, year, classes) in recbole_records(path, wanted):
        genres = tuple(g for g in classes.split() if g != ML100K_NO_GENRE)
        rows.add(where, parse_id(item, "item_id", where), parse_text(title, "title", where),
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
                atomic_write(folder / name, archive.read(ML100K_WHEEL_DIR + name))
    except (zipfile.BadZipFile, KeyError) as err:
        raise DatasetError(f"{wheel.name}: does not hold MovieLens-100K: {err}") from err
    except OSError as err:
        raise DatasetError(f"{folder}: cannot write the MovieLens-100K cache: {err}") from err


def _lenient_year(text: str) -> int:
    """A year, or 0 for RecBole's placeholders such as 'unkonwn' and 'V'."""
    text = text.strip()
    return int(text) if text.isdigit() and int(text) <= MAX_YEAR else 0
