"""Catalog snapshots: item factors, a FAISS index, item metadata and popularity on disk.

Layout: ``snapshots/<model_version>/`` holds ``manifest.json`` (sizes and sha256 of every
other file) and the data files; ``snapshots/CURRENT`` names the live version. A snapshot
is written into a temporary directory and renamed into place, then ``CURRENT`` is
replaced atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.errors import FailedPrecondition
from index.files import atomic_write, fsync_dir, fsync_file
from index.model import AlsParams
from index.neighbours import Neighbours
from index.tables import ItemTable

FORMAT = 1
METRIC = "inner_product"
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
FACTORS_FILE = "item_factors.npy"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.npz"
IDS_FILE = "item_ids.txt"
TITLES_FILE = "titles.txt"
NEIGHBOUR_FILES = ("neighbour_rows.npy", "neighbour_scores.npy")  # int32, float32 (n, k)
DATA_FILES = (FACTORS_FILE, INDEX_FILE, ITEMS_FILE, IDS_FILE, TITLES_FILE)
OPTIONAL_FILES = NEIGHBOUR_FILES  # older snapshots have no neighbours
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_ITEMS = 50_000_000
MAX_DIM = 1024


class SnapshotError(FailedPrecondition):
    """A snapshot is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS factory string plus the search-time parameters it is served with."""

    factory: str
    search: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def preset(name: str, n_items: int, dim: int) -> IndexSpec:
        """`flat`, `hnsw`, `ivfpq`, or any FAISS factory string used as given."""
        if name == "flat":
            return IndexSpec("Flat")
        if name == "hnsw":
            # 8-bit codes (the exact factors are in the snapshot anyway, and retrieval
            # re-scores its candidates with them), efSearch 48. On the benchmark catalogs'
            # user vectors, recall@10 0.954 at 100k and 0.968 at 1M items, search 68 and
            # 137 us with the caches cold, against 0.954 / 0.973 and 102 / 206 us for
            # HNSW32 with float vectors at efSearch 64; and a quarter of the vectors' memory.
            return IndexSpec("HNSW32,SQ8", {"efSearch": 48})
        if name == "ivfpq":
            # ~4 sqrt(n) lists, but at least 39 training points per list.
            nlist = int(max(1, min(4 * np.sqrt(n_items), n_items // 39)))
            subq = dim // 2 if dim % 2 == 0 else dim
            return IndexSpec(f"IVF{nlist},PQ{subq}x4fs,RFlat", {"nprobe": 32, "k_factor": 8})
        return IndexSpec(name)


def build_index(item_factors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """Build (train and fill) the FAISS index for inner-product search; ids are row numbers."""
    try:
        index = faiss.index_factory(item_factors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad FAISS factory string {spec.factory!r}: {exc}") from exc
    if not index.is_trained:
        index.train(item_factors)
    index.add(item_factors)
    return index


def search_parameters(
    spec: dict[str, int], k: int
) -> tuple[faiss.SearchParameters, faiss.SearchParameters]:
    """SearchParameters for an index of this spec (HNSW, IVF, refine, flat), and the part
    of them that takes a selector (the same object, or the base index's under a refine)."""
    base: Any  # faiss's bundled stubs omit the HNSW parameter class
    if "efSearch" in spec:
        base = getattr(faiss, "SearchParametersHNSW")()  # noqa: B009
        base.efSearch = max(spec["efSearch"], k)  # HNSW cannot return more than efSearch
    elif "nprobe" in spec:
        base = faiss.SearchParametersIVF()
        base.nprobe = spec["nprobe"]
    else:
        base = faiss.SearchParameters()
    if "k_factor" not in spec:
        return base, base
    refine = faiss.IndexRefineSearchParameters()
    refine.k_factor = spec["k_factor"]
    refine.base_index_params = base
    return refine, base


@dataclass(frozen=True)
class Manifest:
    """What a snapshot claims to be; checked against its files on load."""

    model_version: str
    dim: int
    item_count: int
    index_type: str
    search: dict[str, int]
    als: dict[str, Any]
    genres: list[str]
    created_at: float
    files: dict[str, dict[str, Any]]
    neighbours: dict[str, Any] = field(default_factory=dict)  # their build parameters
    metric: str = METRIC
    format: int = FORMAT

    @staticmethod
    def parse(raw: dict[str, Any], path: Path) -> Manifest:
        """Validate a decoded manifest; a SnapshotError names `path` and the bad field."""
        try:
            manifest = Manifest(**raw)
        except TypeError as exc:
            raise SnapshotError(f"{path}: bad manifest fields: {exc}") from exc
        for ok, message in _manifest_checks(manifest):
            if not ok:
                raise SnapshotError(f"{path}: {message}")
        return manifest


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _manifest_checks(m: Manifest) -> list[tuple[bool, str]]:
    """Every field's type and range: a manifest is input like any other."""
    files_ok = isinstance(m.files, dict) and \
        set(DATA_FILES) <= set(m.files) <= {*DATA_FILES, *OPTIONAL_FILES} and all(
        isinstance(f, dict) and _is(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
        for f in m.files.values())
    neighbours_ok = isinstance(m.neighbours, dict) and all(
        isinstance(k, str) and _is(v, int) and 0 <= v < 1e6 for k, v in m.neighbours.items()) \
        and (not files_ok or {n in m.files for n in NEIGHBOUR_FILES} == {bool(m.neighbours)})
    als_ok = isinstance(m.als, dict) and all(
        _is(m.als.get(key), (int, float)) and 0 <= m.als[key] < 1e6
        for key in ("factors", "regularization", "alpha", "iterations")) and (
        "half_life_s" not in m.als  # written before the fold-in had a decay
        or _is(m.als["half_life_s"], (int, float)) and 0 <= m.als["half_life_s"] < 1e12)
    return [
        (m.format == FORMAT, f"format {m.format!r} is not {FORMAT}"),
        (m.metric == METRIC, f"metric {m.metric!r} is not {METRIC}"),
        (isinstance(m.model_version, str), "model_version must be a string"),
        (_is(m.dim, int) and 0 < m.dim <= MAX_DIM, f"dim must be in [1, {MAX_DIM}]"),
        (_is(m.item_count, int) and 0 < m.item_count <= MAX_ITEMS,
         f"item_count must be in [1, {MAX_ITEMS}]"),
        (isinstance(m.index_type, str), "index_type must be a string"),
        (isinstance(m.search, dict) and all(isinstance(k, str) and _is(v, int) and 0 < v < 1e6
                                            for k, v in m.search.items()),
         "search must map parameter names to positive integers"),
        (als_ok, "als must give numeric factors, regularization, alpha and iterations "
                 "(and a half_life_s >= 0, if any)"),
        (isinstance(m.genres, list) and len(m.genres) <= 64
         and all(isinstance(g, str) for g in m.genres), "genres must be up to 64 strings"),
        (_is(m.created_at, (int, float)), "created_at must be a number"),
        (files_ok, f"files must give bytes and sha256 of each of {sorted(DATA_FILES)} "
                   f"(and optionally of {sorted(OPTIONAL_FILES)})"),
        (neighbours_ok, f"neighbours must map build parameters to integers, and be given "
                        f"exactly when both of {list(NEIGHBOUR_FILES)} are"),
    ]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_lines(path: Path, values: Sequence[str]) -> None:
    path.write_text("\n".join(values), encoding="utf-8")


def write_snapshot(
    root: Path,
    version: str,
    item_factors: np.ndarray,
    items: ItemTable,
    popularity: np.ndarray,
    spec: IndexSpec,
    als: AlsParams,
    make_current: bool = True,
    neighbours: Neighbours | None = None,
) -> Path:
    """Write a complete snapshot under `root`/<version>, then (optionally) point CURRENT at it."""
    if not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"bad model version {version!r}: letters, digits, '.', '_', '-'")
    if item_factors.shape[0] != len(items) or popularity.shape != (len(items),):
        raise ValueError("item factors, items and popularity must have one row per item")
    if neighbours is not None and (problem := neighbours.check(len(items))):
        raise ValueError(f"bad neighbour {problem[0]}: {problem[1]}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise ValueError(f"snapshot {final} already exists")
    tmp = root / f".tmp-{version}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, version, item_factors, items, popularity, spec, als, neighbours)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(final)
    fsync_dir(root)
    if make_current:
        set_current(root, version)
    return final


def _write_files(tmp: Path, version: str, item_factors: np.ndarray, items: ItemTable,
                 popularity: np.ndarray, spec: IndexSpec, als: AlsParams,
                 neighbours: Neighbours | None) -> None:
    """Write every file of a snapshot and its manifest into `tmp`, each fsynced."""
    factors = np.ascontiguousarray(item_factors, dtype=np.float32)
    np.save(tmp / FACTORS_FILE, factors)
    faiss.write_index(build_index(factors, spec), str(tmp / INDEX_FILE))
    genres = sorted({g for gs in items.genres for g in gs})
    np.savez(tmp / ITEMS_FILE, years=items.years.astype(np.int16),
             popularity=popularity.astype(np.float32), genre_mask=_genre_masks(items, genres))
    _write_lines(tmp / IDS_FILE, items.item_ids)
    _write_lines(tmp / TITLES_FILE, items.titles)
    names: tuple[str, ...] = DATA_FILES
    if neighbours is not None:
        np.save(tmp / NEIGHBOUR_FILES[0], neighbours.rows)
        np.save(tmp / NEIGHBOUR_FILES[1], neighbours.scores)
        names = (*DATA_FILES, *NEIGHBOUR_FILES)
    manifest = Manifest(
        model_version=version, dim=int(factors.shape[1]), item_count=len(items),
        index_type=spec.factory, search=dict(spec.search), als=als.as_dict(), genres=genres,
        created_at=time.time(),
        files={name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
               for name in names},
        neighbours={"k": neighbours.rows.shape[1], **neighbours.params}
        if neighbours is not None else {},
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest.__dict__, indent=2), encoding="utf-8")
    for name in (*names, MANIFEST):
        fsync_file(tmp / name)
    fsync_dir(tmp)


def _genre_masks(items: ItemTable, genres: list[str]) -> np.ndarray:
    """One bit per genre (up to 64 genres, as in real catalogs' top-level genres)."""
    if len(genres) > 64:
        raise ValueError(f"at most 64 distinct genres are supported, got {len(genres)}")
    bit = {g: 1 << i for i, g in enumerate(genres)}
    return np.array([sum(bit[g] for g in set(gs)) for gs in items.genres], dtype=np.uint64)


def set_current(root: Path, version: str) -> None:
    """Point snapshots/CURRENT at `version` with an atomic rename."""
    if not (root / version / MANIFEST).is_file():
        raise SnapshotError(f"{root / version / MANIFEST}: no such snapshot")
    atomic_write(root / CURRENT, (version + "\n").encode("utf-8"))


def current_version(root: Path) -> str:
    """The version named by snapshots/CURRENT."""
    path = root / CURRENT
    try:
        version = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path}: missing; build a snapshot with `python -m index build`") \
            from exc
    if not VERSION_PATTERN.fullmatch(version):
        raise SnapshotError(f"{path}: names an invalid version {version!r}")
    return version
