"""A loaded, validated catalog snapshot: what both services search and fold in against."""

from __future__ import annotations

import json
import threading
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.kernels import readonly
from index.model import FoldIn, History
from index.neighbours import Neighbours
from index.snapshot import (
    FACTORS_FILE,
    IDS_FILE,
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST,
    NEIGHBOUR_FILES,
    TITLES_FILE,
    VERSION_PATTERN,
    Manifest,
    SnapshotError,
    current_version,
    search_parameters,
    sha256_file,
)
from index.tables import ItemTable
from index.user_record import UserRecord

# The item columns of items.npz and their types.
COLUMNS = {"years": np.dtype(np.int16), "popularity": np.dtype(np.float32),
           "genre_mask": np.dtype(np.uint64)}


class CatalogSnapshot:
    """Item factors, FAISS index and item metadata of one model version, checked on load."""

    def __init__(self, path: Path, manifest: Manifest, factors: np.ndarray,
                 index: faiss.Index | None,
                 item_ids: list[str], titles: list[str], columns: dict[str, np.ndarray],
                 neighbours: Neighbours | None = None) -> None:
        self.path = path
        self.manifest = manifest
        # A plain read-only view (of the mapped pages, if mapped): row gathers skip
        # np.memmap's overhead, and the retrieval kernels see one array type.
        self.item_factors: np.ndarray = readonly(np.asarray(factors))
        self.index = index
        self.item_ids = item_ids
        self.titles = titles
        self.years: np.ndarray = columns["years"]
        self.popularity: np.ndarray = columns["popularity"]
        self.genre_mask: np.ndarray = columns["genre_mask"]
        self.neighbours = neighbours  # None for a snapshot built without them
        self.item_index = {item_id: row for row, item_id in enumerate(item_ids)}
        self.loaded_at = time.time()
        self._search_spec = dict(manifest.search)
        self._params = threading.local()  # .by_k: k -> search_parameters(...), per thread

    @property
    def model_version(self) -> str:
        """The snapshot's model version (its directory name)."""
        return self.manifest.model_version

    @property
    def dim(self) -> int:
        """Dimension of the item (and user) vectors."""
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.item_count

    @cached_property
    def fold_in(self) -> FoldIn:
        """The fold-in solver for this model (YtY computed once, on first use)."""
        als = self.manifest.als
        return FoldIn(self.item_factors, float(als["regularization"]), float(als["alpha"]))

    @cached_property
    def genre_means(self) -> dict[str, np.ndarray]:
        """The mean factor of the items of each genre (a new item's content-based start)."""
        means = {}
        for bit, genre in enumerate(self.manifest.genres):
            rows = np.flatnonzero((self.genre_mask >> np.uint64(bit)) & np.uint64(1))
            if len(rows):
                means[genre] = np.asarray(self.item_factors[rows], np.float64).mean(axis=0)
        return means

    @cached_property
    def mean_factor(self) -> np.ndarray:
        """The mean factor of every item (the start of a new item of no known genre)."""
        return np.asarray(self.item_factors, np.float64).mean(axis=0)

    @property
    def half_life_s(self) -> float:
        """Half-life of a play's weight in the fold-in (0: no decay; older snapshots)."""
        return float(self.manifest.als.get("half_life_s", 0.0))

    def fit(self, record: UserRecord) -> UserRecord:
        """The record with rows and decayed weights for this model (itself if they are)."""
        return record.under(self.model_version, self.item_index, self.half_life_s)

    def history(self, record: UserRecord) -> History:
        """The fold-in input of a user: the known history items and their decayed weights."""
        rows, decayed = self.fit(record).known()
        return History(rows, decayed)

    def item_table(self) -> ItemTable:
        """The catalog's items as a table (e.g. to write another snapshot of them)."""
        return ItemTable(self.item_ids, self.titles,
                         [tuple(self.genres_of(r)) for r in range(len(self))], self.years)

    def genres_of(self, row: int) -> list[str]:
        """Genre names of the item at `row`."""
        mask = int(self.genre_mask[row])
        return [g for bit, g in enumerate(self.manifest.genres) if mask >> bit & 1]

    def search(self, queries: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and inner-product scores per query among the rows the bitmap `allowed`
        permits (None: every row); missing hits are id -1.

        The search parameters are made once per thread and k: on the request path they
        cost ~20 us of a ~100 us search with the caches cold (measured on the 100k-item
        benchmark catalog).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if self.index is None:
            raise RuntimeError(f"{self.path}: loaded without its index (with_index=False)")
        by_k: dict[int, tuple[Any, Any]] | None = getattr(self._params, "by_k", None)
        if by_k is None:
            by_k = self._params.by_k = {}
        if k not in by_k:
            by_k[k] = search_parameters(self._search_spec, k)
        params, takes_selector = by_k[k]
        selector = None if allowed is None else faiss.IDSelectorBitmap(
            len(self), faiss.swig_ptr(allowed))
        n = len(queries)
        scores, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        takes_selector.sel = selector
        try:
            index: Any = self.index  # search_c: the SWIG call under faiss's search wrapper
            index.search_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(scores),
                           faiss.swig_ptr(ids), params)
        finally:
            takes_selector.sel = None  # keep no pointer to the caller's bitmap
        return ids, scores

    @classmethod
    def load(cls, root: Path, version: str | None = None, *, mmap: bool = False,
             verify: bool = True, with_index: bool = True) -> CatalogSnapshot:
        """Load `version` (default: CURRENT) from snapshots dir `root`; SnapshotError if bad.

        `verify` checks every file's sha256 before FAISS parses it, since `read_index` on a
        corrupt file can crash the interpreter. `mmap` shares index (and neighbour) pages
        across processes; `with_index=False` skips the FAISS index and the neighbours (the
        event service only folds in).
        """
        version = current_version(root) if version is None else version
        if not VERSION_PATTERN.fullmatch(version):
            raise SnapshotError(f"{root}: invalid snapshot version {version!r}")
        path = root / version
        if not path.resolve().is_relative_to(root.resolve()):
            raise SnapshotError(f"{path}: resolves outside {root}")
        manifest = _read_manifest(path)
        if manifest.model_version != version:
            raise SnapshotError(f"{path / MANIFEST}: model_version {manifest.model_version!r} "
                                f"does not match directory {version!r}")
        for name in manifest.files:
            _check_file(path / name, manifest.files[name], verify and
                        (with_index or name not in (INDEX_FILE, *NEIGHBOUR_FILES)), root)
        factors = _load_factors(path / FACTORS_FILE, manifest, mmap)
        index = _load_index(path / INDEX_FILE, manifest, mmap) if with_index else None
        columns = _load_columns(path / ITEMS_FILE, manifest)
        item_ids = _load_lines(path / IDS_FILE, manifest)
        if len(set(item_ids)) != len(item_ids):
            raise SnapshotError(f"{path / IDS_FILE}: item ids are not unique")
        neighbours = _load_neighbours(path, manifest, mmap) \
            if with_index and NEIGHBOUR_FILES[0] in manifest.files else None
        return cls(path, manifest, factors, index, item_ids,
                   _load_lines(path / TITLES_FILE, manifest), columns, neighbours)


def _read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST
    if not file.exists() and not file.is_symlink():
        raise SnapshotError(f"{file}: missing")
    _check_inside(file, path.parent)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except Exception as exc:  # any parse failure (deep nesting, huge ints, bad bytes) refuses
        raise SnapshotError(f"{file}: unreadable manifest: {exc!r}"[:500]) from exc
    if not isinstance(raw, dict):
        raise SnapshotError(f"{file}: manifest is not a JSON object")
    return Manifest.parse(raw, file)


def _check_inside(file: Path, root: Path) -> None:
    """Refuse a file that is not a regular file under the snapshots dir (symlinks out)."""
    try:
        real = file.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # dangling link, loop
        raise SnapshotError(f"{file}: missing or unresolvable: {exc}") from exc
    if not real.is_relative_to(root.resolve()):
        raise SnapshotError(f"{file}: resolves outside {root}")
    if not real.is_file():
        raise SnapshotError(f"{file}: not a regular file")


def _check_file(file: Path, expected: dict[str, object], verify: bool, root: Path) -> None:
    if not file.exists() and not file.is_symlink():
        raise SnapshotError(f"{file}: missing")
    _check_inside(file, root)
    size = file.stat().st_size
    if size != expected.get("bytes"):
        raise SnapshotError(f"{file}: {size} bytes, manifest says {expected.get('bytes')}")
    if verify and sha256_file(file) != expected.get("sha256"):
        raise SnapshotError(f"{file}: sha256 does not match the manifest (corrupt file)")


def _load_factors(file: Path, manifest: Manifest, mmap: bool) -> np.ndarray:
    try:  # mapped first, so a header claiming absurd sizes cannot allocate them
        factors = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise SnapshotError(f"{file}: unreadable: {exc!r}") from exc
    if factors.dtype != np.float32 or factors.shape != (manifest.item_count, manifest.dim):
        raise SnapshotError(f"{file}: {factors.dtype} {factors.shape}, manifest says float32 "
                            f"{(manifest.item_count, manifest.dim)}")
    # Garbage that passes the checksums (a bad build) must not reach the solvers.
    if not np.isfinite(factors).all() or float(np.abs(factors).max(initial=0.0)) > 1e6:
        raise SnapshotError(f"{file}: factors are not finite or absurdly large")
    return factors if mmap else np.array(factors)


def _load_index(file: Path, manifest: Manifest, mmap: bool) -> faiss.Index:
    try:
        index = faiss.read_index(str(file), faiss.IO_FLAG_MMAP if mmap else 0)
    except Exception as exc:  # RuntimeError, or MemoryError for absurd sizes inside
        raise SnapshotError(f"{file}: unreadable FAISS index: {exc!r}") from exc
    if index.d != manifest.dim or index.ntotal != manifest.item_count:
        raise SnapshotError(f"{file}: index has d={index.d}, ntotal={index.ntotal}; manifest "
                            f"says dim={manifest.dim}, item_count={manifest.item_count}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise SnapshotError(f"{file}: index metric is not inner product")
    return index


def _load_columns(file: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            columns = {name: npz[name] for name in COLUMNS}
    except Exception as exc:  # bad zip, truncated member, missing column...
        raise SnapshotError(f"{file}: unreadable item columns: {exc!r}") from exc
    for name, values in columns.items():
        if values.shape != (manifest.item_count,) or values.dtype != COLUMNS[name]:
            raise SnapshotError(f"{file}: column {name} is {values.dtype} {values.shape}, "
                                f"expected {COLUMNS[name]} ({manifest.item_count},)")
    return columns


def _load_neighbours(path: Path, manifest: Manifest, mmap: bool) -> Neighbours:
    files = dict(zip(("rows", "scores"), (path / name for name in NEIGHBOUR_FILES),
                     strict=True))
    arrays = {}
    for which, file in files.items():
        try:  # mapped (as the factors), so the serving processes share the pages
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise SnapshotError(f"{file}: unreadable neighbours: {exc!r}") from exc
        arrays[which] = np.asarray(array) if mmap else np.array(array)
    neighbours = Neighbours(arrays["rows"], arrays["scores"], dict(manifest.neighbours))
    problem = neighbours.check(manifest.item_count)
    if problem is None and neighbours.rows.shape[1] != manifest.neighbours.get("k"):
        problem = "rows", f"{neighbours.rows.shape[1]} neighbours per item, manifest says " \
                          f"{manifest.neighbours.get('k')}"
    if problem is not None:
        raise SnapshotError(f"{files[problem[0]]}: {problem[1]}")
    return neighbours


def _load_lines(file: Path, manifest: Manifest) -> list[str]:
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except Exception as exc:
        raise SnapshotError(f"{file}: unreadable: {exc!r}") from exc
    if len(lines) != manifest.item_count:
        raise SnapshotError(f"{file}: {len(lines)} lines, manifest says {manifest.item_count}")
    return lines
