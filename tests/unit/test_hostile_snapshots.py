"""Malformed and hostile snapshots: refused with a SnapshotError naming the file, never a crash.

Every case damages a private copy of the session's snapshots dir and loads it the ways the
services do: the ranking service (mmap, with the FAISS index), tools and tests (no mmap),
and the event service (item factors only, no index). Each load must either raise a
SnapshotError whose message names the damaged file, or give a snapshot both services can
actually use (filters, popularity, fold-in, search) -- never another exception.

Damage to the FAISS index that gets past the checksums (they are rewritten to match) is
loaded in a subprocess, since `faiss.read_index` on garbage may take the interpreter down.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.live import LiveSegment
from index.neighbours import candidates
from index.ranking import LiveCatalog, UserState
from index.retrieval import Scored
from index.snapshot import (
    CURRENT,
    DATA_FILES,
    FACTORS_FILE,
    IDS_FILE,
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST,
    NEIGHBOUR_FILES,
    TITLES_FILE,
    SnapshotError,
)
from ranking_service.responses import Encoder
from ranking_service.server import catalog_info
from tests.conftest import record_of

VERSION = "small-v1"
REPO = Path(__file__).resolve().parents[2]
# How each service loads a snapshot: (name, keyword arguments of CatalogSnapshot.load).
MODES = (("ranking", {"mmap": True}), ("tools", {}), ("events", {"with_index": False}))
HYPOTHESIS_EXAMPLES = {"data files": 80, "manifest": 80}
FILES = (*DATA_FILES, *NEIGHBOUR_FILES)  # the session's snapshot has neighbours
ROWS, SCORES = NEIGHBOUR_FILES

Damage = Callable[[Path], None]  # damages the version dir of a snapshots copy


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A private copy of the session's snapshots dir; cases copy it again before damaging."""
    root = tmp_path_factory.mktemp("hostile-pristine") / "snapshots"
    shutil.copytree(snapshots_dir(data_dir), root)
    return root


@pytest.fixture()
def root(tmp_path: Path, pristine: Path) -> Path:
    """A snapshots dir free to damage."""
    target = tmp_path / "snapshots"
    shutil.copytree(pristine, target, symlinks=True)
    return target


@contextmanager
def _scratch_copy(pristine: Path) -> Iterator[Path]:
    """Like `root`, for hypothesis examples (a function-scoped fixture is shared by them)."""
    with tempfile.TemporaryDirectory(dir=pristine.parent) as tmp:
        target = Path(tmp) / "snapshots"
        shutil.copytree(pristine, target, symlinks=True)
        yield target


def _manifest(version: Path) -> dict[str, Any]:
    return json.loads((version / MANIFEST).read_text(encoding="utf-8"))


def _write_manifest(version: Path, manifest: Any) -> None:
    (version / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def _rewrite_checksums(version: Path, *names: str) -> None:
    """Make the manifest agree with damaged files, so only the loader's parsing can object."""
    manifest = _manifest(version)
    for name in names:
        data = (version / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_manifest(version, manifest)


def _flip(file: Path, offset: int, bit: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    file.write_bytes(bytes(data))


def _truncate(file: Path, size: int) -> None:
    file.write_bytes(file.read_bytes()[:size])


def _servable(catalog: CatalogSnapshot) -> None:
    """Use a loaded snapshot as the services do; any exception here is a finding."""
    # filters, popularity order, fold-in Gram matrix
    live = LiveCatalog.of(catalog, LiveSegment.empty(catalog),
                          dict.fromkeys(catalog.item_ids, 1.0), 0.5)
    assert len(catalog.item_ids) == len(catalog.titles) == len(catalog) == len(live.popular_order)
    history = catalog.history(record_of(catalog, [(i, 1.0, 0.0) for i in catalog.item_ids[:5]]))
    vector = catalog.fold_in.exact([history])[0]
    assert vector.shape == (catalog.dim,)
    # The ranking service puts these into CatalogInfo and ScoredItem messages.
    catalog_info(catalog)
    Encoder(catalog).recommend(live, [Scored(row, 1.0, "similar_to_watched", 0)
                                      for row in (0, len(catalog) - 1)], 1, UserState(1))
    if catalog.index is not None:
        catalog.search(np.asarray(catalog.item_factors[0], np.float32), 5)
    if catalog.neighbours is not None:
        found = candidates(catalog.neighbours, np.array([0, len(catalog) - 1]), np.ones(2))
        assert ((found.rows >= 0) & (found.rows < len(catalog))).all()


def _outcomes(root: Path, version: str | None = None) -> dict[str, BaseException | None]:
    """Per load mode: None if the snapshot loaded and was servable, else what was raised."""
    out: dict[str, BaseException | None] = {}
    for mode, kwargs in MODES:
        try:
            _servable(CatalogSnapshot.load(root, version, **kwargs))
            out[mode] = None
        except Exception as exc:  # classified by the callers
            out[mode] = exc
    return out


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _check(root: Path, named: list[Path], must_refuse: tuple[str, ...] = ("ranking", "tools",
                                                                         "events"),
           version: str | None = None) -> None:
    """Each mode either refuses with a SnapshotError naming one of `named`, or loads fine
    and the snapshot is servable; the modes in `must_refuse` must refuse."""
    problems = []
    for mode, outcome in _outcomes(root, version).items():
        if outcome is None:
            if mode in must_refuse:
                problems.append(f"{mode}: loaded a snapshot it must refuse")
        elif not isinstance(outcome, SnapshotError):
            problems.append(f"{mode}: {_describe(outcome)} (not a SnapshotError)")
        elif not any(str(path) in str(outcome) for path in named):
            problems.append(f"{mode}: SnapshotError does not name {[p.name for p in named]}: "
                            f"{outcome}")
    assert not problems, "\n".join(problems)


# -- data files: truncation, bit flips, wrong shapes (in process; the index stays intact) ----


@dataclass(frozen=True)
class Case:
    """One hostile snapshot: how to damage it, which file it is about, what must happen."""

    id: str
    damage: Damage
    file: str  # the file the SnapshotError must name
    must_refuse: tuple[str, ...] = ("ranking", "tools", "events")


ALL = ("ranking", "tools", "events")
WITH_INDEX = ("ranking", "tools")


def _cut_points(size: int) -> dict[str, int]:
    return {"empty": 0, "1 byte": 1, "half": size // 2, "all but 1 byte": size - 1}


# Where bits are flipped in each data file: in its header (npy/zip/FAISS headers are in the
# first ~130 bytes), in the middle of its data, and in its last byte.
FLIP_OFFSETS = (0, 1, 8, 64, 130, 0.5, -1)  # ints: byte offsets; 0.5: middle; -1: last byte


def _flip_at(name: str, where: float, bit: int, rewrite: bool) -> Damage:
    def damage(version: Path) -> None:
        file = version / name
        size = file.stat().st_size
        offset = int(size * where) if isinstance(where, float) else where % size
        _flip(file, offset, bit)
        if rewrite:
            _rewrite_checksums(version, name)
    return damage


def _cut_to(name: str, point: str, rewrite: bool) -> Damage:
    def damage(version: Path) -> None:
        file = version / name
        _truncate(file, _cut_points(file.stat().st_size)[point])
        if rewrite:
            _rewrite_checksums(version, name)
    return damage


def _data_file_cases() -> list[Case]:
    cases = []
    for name in FILES:
        binary = name in (FACTORS_FILE, ITEMS_FILE, INDEX_FILE, *NEIGHBOUR_FILES)
        # Only the ranking side reads the index and the neighbours (the event service
        # checks their sizes, not their contents).
        readers = WITH_INDEX if name in (INDEX_FILE, *NEIGHBOUR_FILES) else ALL
        for point in ("empty", "1 byte", "half", "all but 1 byte"):
            cases.append(Case(f"{name} truncated to {point}, manifest as it was",
                              _cut_to(name, point, rewrite=False), name))
            if name == INDEX_FILE:
                continue  # rewritten checksums: see the subprocess cases
            strict = binary or point != "all but 1 byte"  # a text file may lose 1 char safely
            cases.append(Case(f"{name} truncated to {point}, checksums rewritten",
                              _cut_to(name, point, rewrite=True), name,
                              readers if strict else ()))
        for i, where in enumerate(FLIP_OFFSETS):
            bit = (3 * i + 1) % 8
            label = f"{name} bit {bit} flipped at {where}"
            cases.append(Case(f"{label}, manifest as it was", _flip_at(name, where, bit, False),
                              name, readers))
            if name != INDEX_FILE:
                cases.append(Case(f"{label}, checksums rewritten",
                                  _flip_at(name, where, bit, True), name, ()))
    return cases


def _replace_factors(make: Callable[[np.ndarray], np.ndarray],
                     manifest_dim: int | None = None) -> Damage:
    def damage(version: Path) -> None:
        factors = np.load(version / FACTORS_FILE)
        np.save(version / FACTORS_FILE, make(factors))
        _rewrite_checksums(version, FACTORS_FILE)
        if manifest_dim is not None:
            manifest = _manifest(version)
            manifest["dim"] = manifest_dim
            _write_manifest(version, manifest)
    return damage


def _huge_npy_header(version: Path) -> None:
    """An .npy whose header claims 10**10 rows: only the header says so, the data is small."""
    file = version / FACTORS_FILE
    data = np.load(file)
    with file.open("wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (10**10, data.shape[1])})
        handle.write(data.tobytes())
    _rewrite_checksums(version, FACTORS_FILE)


def _replace_index(make: Callable[[np.ndarray], faiss.Index]) -> Damage:
    def damage(version: Path) -> None:
        faiss.write_index(make(np.load(version / FACTORS_FILE)), str(version / INDEX_FILE))
        _rewrite_checksums(version, INDEX_FILE)
    return damage


def _flat(dim: int, metric: int = faiss.METRIC_INNER_PRODUCT) -> Callable[[np.ndarray],
                                                                          faiss.Index]:
    def make(factors: np.ndarray) -> faiss.Index:
        index = faiss.IndexFlat(dim, metric)
        index.add(np.ascontiguousarray(factors[:, :dim]))
        return index
    return make


def _replace_columns(**changes: Callable[[np.ndarray], np.ndarray] | None) -> Damage:
    """Rewrite items.npz with some columns changed (None: dropped)."""
    def damage(version: Path) -> None:
        with np.load(version / ITEMS_FILE) as npz:
            columns = {name: npz[name] for name in npz.files}
        for name, change in changes.items():
            if change is None:
                del columns[name]
            else:
                columns[name] = change(columns[name])
        np.savez(version / ITEMS_FILE, **columns)
        _rewrite_checksums(version, ITEMS_FILE)
    return damage


def _edit_lines(name: str, edit: Callable[[list[str]], list[str]]) -> Damage:
    def damage(version: Path) -> None:
        lines = (version / name).read_text(encoding="utf-8").split("\n")
        (version / name).write_text("\n".join(edit(lines)), encoding="utf-8")
        _rewrite_checksums(version, name)
    return damage


def _invalid_utf8(name: str) -> Damage:
    def damage(version: Path) -> None:
        data = bytearray((version / name).read_bytes())
        data[5] = 0xFF
        (version / name).write_bytes(bytes(data))
        _rewrite_checksums(version, name)
    return damage


def _manifest_dim(dim: int) -> Damage:
    def damage(version: Path) -> None:
        manifest = _manifest(version)
        manifest["dim"] = dim
        _write_manifest(version, manifest)
    return damage


SHAPE_CASES = [
    Case("manifest says dim 48", _manifest_dim(48), FACTORS_FILE),
    Case("factors of dimension 16", _replace_factors(lambda f: f[:, :16]), FACTORS_FILE),
    Case("factors of dimension 16 and manifest 16, index still 32",
         _replace_factors(lambda f: np.ascontiguousarray(f[:, :16]), manifest_dim=16),
         INDEX_FILE, WITH_INDEX),
    Case("factors as float64", _replace_factors(lambda f: f.astype(np.float64)), FACTORS_FILE),
    Case("factors as int32", _replace_factors(lambda f: f.view(np.int32)), FACTORS_FILE),
    Case("factors with 1,999 rows", _replace_factors(lambda f: f[:-1]), FACTORS_FILE),
    Case("factors 3-d", _replace_factors(lambda f: f[:, :, None]), FACTORS_FILE),
    Case("factors 1-d", _replace_factors(lambda f: f.ravel()), FACTORS_FILE),
    Case("factors as an object array", _replace_factors(lambda f: f.astype(object)),
         FACTORS_FILE),
    Case("factors header claims 10**10 rows", _huge_npy_header, FACTORS_FILE),
    Case("index of dimension 16", _replace_index(_flat(16)), INDEX_FILE, WITH_INDEX),
    Case("index with L2 metric", _replace_index(_flat(32, faiss.METRIC_L2)), INDEX_FILE,
         WITH_INDEX),
    Case("index with 1,999 vectors", _replace_index(lambda f: _flat(32)(f[:-1])), INDEX_FILE,
         WITH_INDEX),
    Case("years column with 1,999 rows", _replace_columns(years=lambda c: c[:-1]), ITEMS_FILE),
    Case("popularity column 2-d", _replace_columns(popularity=lambda c: c[:, None]),
         ITEMS_FILE),
    Case("genre_mask column empty", _replace_columns(genre_mask=lambda c: c[:0]), ITEMS_FILE),
    Case("genre_mask column missing", _replace_columns(genre_mask=None), ITEMS_FILE),
    Case("popularity column as text", _replace_columns(popularity=lambda c: c.astype(str)),
         ITEMS_FILE),
    Case("item_ids with 1,999 lines", _edit_lines(IDS_FILE, lambda ls: ls[:-1]), IDS_FILE),
    Case("item_ids with 2,001 lines", _edit_lines(IDS_FILE, lambda ls: [*ls, "extra"]), IDS_FILE),
    Case("item_ids with a duplicate", _edit_lines(IDS_FILE, lambda ls: [ls[1], *ls[1:]]),
         IDS_FILE),
    Case("item_ids not UTF-8", _invalid_utf8(IDS_FILE), IDS_FILE),
    Case("titles with 1,999 lines", _edit_lines(TITLES_FILE, lambda ls: ls[:-1]), TITLES_FILE),
    Case("titles not UTF-8", _invalid_utf8(TITLES_FILE), TITLES_FILE),
]


def _replace_neighbours(change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                        manifest_k: int | None = None) -> Damage:
    """Rewrite the neighbour files with (rows, scores) changed, checksums to match."""
    def damage(version: Path) -> None:
        arrays = change(*(np.load(version / name) for name in NEIGHBOUR_FILES))
        for name, array in zip(NEIGHBOUR_FILES, arrays, strict=True):
            np.save(version / name, array)
        _rewrite_checksums(version, *NEIGHBOUR_FILES)
        if manifest_k is not None:
            _set(("neighbours", "k"), manifest_k)(version)
    return damage


def _at(array: np.ndarray, where: tuple[int, int], value: Any) -> np.ndarray:
    array[where] = value
    return array


NEIGHBOUR_CASES = [Case(f"neighbours: {label}", _replace_neighbours(change, k), file,
                        WITH_INDEX)
                   for label, change, k, file in [
    ("a row past the catalog", lambda r, s: (_at(r, (3, 0), 2_000), s), None, ROWS),
    ("a row below -1", lambda r, s: (_at(r, (3, 0), -7), s), None, ROWS),
    ("an item its own neighbour", lambda r, s: (_at(r, (3, 0), 3), s), None, ROWS),
    ("the same neighbour twice", lambda r, s: (_at(r, (3, 1), r[3, 0]), s), None, ROWS),
    ("padding in the middle", lambda r, s: (_at(r, (3, 1), -1), s), None, ROWS),
    ("a NaN score", lambda r, s: (r, _at(s, (3, 0), np.nan)), None, SCORES),
    ("a negative score", lambda r, s: (r, _at(s, (3, 0), -0.5)), None, SCORES),
    ("a score above 1", lambda r, s: (r, _at(s, (3, 0), 7.0)), None, SCORES),
    ("scores not best first", lambda r, s: (r, _at(s, (3, 1), s[3, 0] + 0.5)), None, SCORES),
    ("rows as int64", lambda r, s: (r.astype(np.int64), s), None, ROWS),
    ("scores as float64", lambda r, s: (r, s.astype(np.float64)), None, SCORES),
    ("rows as floats", lambda r, s: (r.astype(np.float32), s), None, ROWS),
    ("1,999 rows", lambda r, s: (r[:-1], s[:-1]), None, ROWS),
    ("rows 1-d", lambda r, s: (r.ravel(), s.ravel()), None, ROWS),
    ("scores of another shape", lambda r, s: (r, s[:, :-1]), None, SCORES),
    ("scores as an object array", lambda r, s: (r, s.astype(object)), None, SCORES),
    ("no neighbours per item", lambda r, s: (r[:, :0], s[:, :0]), 0, ROWS),
    ("k unlike the manifest's", lambda r, s: (r[:, :-1], s[:, :-1]), None, ROWS),
]]
DATA_CASES = _data_file_cases() + SHAPE_CASES + NEIGHBOUR_CASES


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_damaged_data_file_is_refused_naming_it(root: Path, case: Case) -> None:
    case.damage(root / VERSION)
    _check(root, [root / VERSION / case.file], case.must_refuse)


# -- the manifest ----------------------------------------------------------------------------


def _set(path: str | tuple[str, ...], value: Any) -> Damage:
    """Set (or with value=KeyError, delete) a key of the manifest; a tuple is a nested key."""
    def damage(version: Path) -> None:
        manifest = _manifest(version)
        *parents, last = (path,) if isinstance(path, str) else path
        node = manifest
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
        _write_manifest(version, manifest)
    return damage


def _raw_manifest(text: str | bytes) -> Damage:
    def damage(version: Path) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        (version / MANIFEST).write_bytes(data)
    return damage


def _manifest_text(edit: Callable[[str], str]) -> Damage:
    def damage(version: Path) -> None:
        text = (version / MANIFEST).read_text(encoding="utf-8")
        (version / MANIFEST).write_text(edit(text), encoding="utf-8")
    return damage


NAN_DIM = _manifest_text(lambda t: t.replace('"dim": 32', '"dim": NaN'))
MANIFEST_CASES: list[tuple[str, Damage, bool]] = [  # (id, damage, refusal required)
    ("item_count 10**12", _set("item_count", 10**12), True),
    ("item_count 50,000,000 (within the limit)", _set("item_count", 50_000_000), True),
    ("item_count 0", _set("item_count", 0), True),
    ("item_count -2000", _set("item_count", -2000), True),
    ("item_count as a string", _set("item_count", "2000"), True),
    ("item_count as a float", _set("item_count", 2000.0), False),
    ("item_count null", _set("item_count", None), True),
    ("dim 10**6", _set("dim", 10**6), True),
    ("dim -32", _set("dim", -32), True),
    ("dim as a string", _set("dim", "32"), True),
    ("dim true", _set("dim", True), True),
    ("dim NaN", NAN_DIM, True),
    ("dim with 5,000 digits", _manifest_text(lambda t: t.replace('"dim": 32',
                                                                 '"dim": ' + "3" * 5000)), True),
    ("format 2", _set("format", 2), True),
    ("format as a string", _set("format", "1"), True),
    ("metric l2", _set("metric", "l2"), True),
    ("model_version of another directory", _set("model_version", "other"), True),
    ("model_version as a number", _set("model_version", 1), True),
    ("missing model_version", _set("model_version", KeyError), True),
    ("missing dim", _set("dim", KeyError), True),
    ("missing files", _set("files", KeyError), True),
    ("missing one file entry", _set(("files", TITLES_FILE), KeyError), True),
    ("missing a file's sha256", _set(("files", ITEMS_FILE, "sha256"), KeyError), True),
    ("a file's bytes 10**12", _set(("files", FACTORS_FILE, "bytes"), 10**12), True),
    ("a file's bytes -1", _set(("files", FACTORS_FILE, "bytes"), -1), True),
    ("a file's bytes as a string", _set(("files", IDS_FILE, "bytes"), "10889"), True),
    ("a file's sha256 as a number", _set(("files", IDS_FILE, "sha256"), 0), True),
    ("an extra file entry", _set(("files", "extra.bin"), {"bytes": 1, "sha256": "0" * 64}), True),
    ("files as a list of the names", _set("files", list(DATA_FILES)), True),
    ("file entries as strings", _set("files", dict.fromkeys(DATA_FILES, "x")), True),
    ("file entries null", _set("files", dict.fromkeys(DATA_FILES)), True),
    ("files as a string", _set("files", "".join(DATA_FILES)), True),
    ("search as a string", _set("search", "efSearch"), True),
    ("search as a number", _set("search", 5), True),
    ("genres as a number", _set("genres", 5), True),
    ("genres of numbers", _set("genres", list(range(8))), True),
    ("als without alpha", _set(("als", "alpha"), KeyError), True),
    ("als regularization as a string", _set(("als", "regularization"), "a lot"), True),
    ("als as a list", _set("als", [0.1, 10.0]), True),
    ("an extra top-level key", _set("extra", {"x": 1}), False),
    ("a manifest that is a JSON list", _raw_manifest(json.dumps([1, 2, 3])), True),
    ("a manifest that is JSON null", _raw_manifest("null"), True),
    ("a manifest that is a JSON string", _raw_manifest('"small-v1"'), True),
    ("an empty manifest", _raw_manifest(""), True),
    ("a manifest that is not JSON", _raw_manifest("{not json"), True),
    ("a manifest that is not UTF-8", _raw_manifest(b'{"dim": "\xff\xfe"}'), True),
    ("a manifest of 100,000 nested arrays", _raw_manifest("[" * 100_000 + "]" * 100_000), True),
    ("a manifest with a NUL byte", _raw_manifest(b"{\x00}"), True),
]


@pytest.mark.parametrize(("damage", "required"), [(d, r) for _, d, r in MANIFEST_CASES],
                         ids=[i for i, _, _ in MANIFEST_CASES])
def test_hostile_manifest_is_refused_naming_it(root: Path, damage: Damage,
                                               required: bool) -> None:
    version = root / VERSION
    damage(version)
    # A bad size or checksum field is reported against the data file it describes.
    named = [version / MANIFEST, *(version / name for name in FILES)]
    _check(root, named, ALL if required else ())


# -- CURRENT, version names and symlinks -----------------------------------------------------


def _outside_copy(root: Path, version_name: str = VERSION) -> Path:
    """A complete copy of the snapshot outside the snapshots dir (named `version_name`)."""
    outside = root.parent / "outside" / version_name
    shutil.copytree(root / VERSION, outside)
    manifest = _manifest(outside)
    manifest["model_version"] = version_name
    _write_manifest(outside, manifest)
    return outside


CURRENT_NAMES = ["..", "../outside", ".", "small-v1/..", "small-v1/../small-v1", "", "CURRENT",
                 "/", "ABSOLUTE", "small-v1\x00", " ", "~"]
BAD_VERSIONS = ["../outside/small-v1", "/", "..", "a/b", "x" * 65]
SYMLINKED_FILES = [MANIFEST, INDEX_FILE, FACTORS_FILE, ITEMS_FILE]
LOOPED_FILES = [MANIFEST, INDEX_FILE, TITLES_FILE]
DIRECTORY_FILES = [FACTORS_FILE, ITEMS_FILE, IDS_FILE]


@pytest.mark.parametrize("named", CURRENT_NAMES)
def test_current_naming_a_bad_version_is_refused(root: Path, named: str) -> None:
    if named == "ABSOLUTE":
        named = str(_outside_copy(root))
    (root / CURRENT).write_text(named + "\n", encoding="utf-8")
    _check(root, [root / CURRENT])


def test_current_naming_a_symlink_to_a_directory_outside_is_refused(root: Path) -> None:
    (root / "evil").symlink_to(_outside_copy(root, "evil"), target_is_directory=True)
    (root / CURRENT).write_text("evil\n", encoding="utf-8")
    _check(root, [root / "evil"])


def test_a_version_directory_symlinked_outside_is_refused(root: Path) -> None:
    (root / "evil").symlink_to(_outside_copy(root, "evil"), target_is_directory=True)
    _check(root, [root / "evil"], version="evil")


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_bad_version_name_is_refused(root: Path, version: str) -> None:
    _outside_copy(root)
    _check(root, [root], version=version)


def test_current_as_a_symlink_to_a_file_outside_never_loads_from_outside(root: Path) -> None:
    outside = root.parent / "outside-current"
    outside.write_text(VERSION + "\n", encoding="utf-8")
    (root / CURRENT).unlink()
    (root / CURRENT).symlink_to(outside)
    for mode, kwargs in MODES:
        try:
            catalog = CatalogSnapshot.load(root, **kwargs)
        except SnapshotError as exc:
            assert str(root / CURRENT) in str(exc), mode
        else:  # the name came from outside, but the snapshot must still be one of ours
            assert catalog.path.resolve().is_relative_to(root.resolve()), mode


@pytest.mark.parametrize("name", SYMLINKED_FILES)
def test_a_file_symlinked_outside_the_snapshots_dir_is_refused(root: Path, name: str) -> None:
    # The loader refuses a version directory that resolves outside snapshots/; a file of
    # the snapshot that resolves outside (same bytes, so the checksums match) is the same
    # escape one level down.
    outside = _outside_copy(root)
    (root / VERSION / name).unlink()
    (root / VERSION / name).symlink_to(outside / name)
    _check(root, [root / VERSION / name])


@pytest.mark.parametrize("name", LOOPED_FILES)
def test_a_symlink_loop_or_a_dangling_symlink_is_refused(root: Path, name: str) -> None:
    file = root / VERSION / name
    file.unlink()
    file.symlink_to(file.name)  # a loop: the link points at itself
    _check(root, [file])
    file.unlink()
    file.symlink_to(root / "nowhere")
    _check(root, [file])


@pytest.mark.parametrize("name", DIRECTORY_FILES)
def test_a_directory_in_place_of_a_data_file_is_refused(root: Path, name: str) -> None:
    file = root / VERSION / name
    file.unlink()
    file.mkdir()
    manifest = _manifest(root / VERSION)
    manifest["files"][name]["bytes"] = file.stat().st_size  # get past the size check
    _write_manifest(root / VERSION, manifest)
    _check(root, [file])


# -- the FAISS index, with checksums rewritten: in a subprocess ------------------------------

_LOADER = """\
import sys
from pathlib import Path

import numpy as np

from index.catalog import CatalogSnapshot
from index.snapshot import SnapshotError

for mmap in (False, True):
    try:
        catalog = CatalogSnapshot.load(Path(sys.argv[1]), mmap=mmap)
    except SnapshotError as exc:
        print(f"refused mmap={mmap}: {exc}", flush=True)
    else:
        catalog.search(np.asarray(catalog.item_factors[0], np.float32), 5)
        print(f"loaded mmap={mmap}", flush=True)
"""


def _garbage_index(flat_header: bool) -> Damage:
    def damage(version: Path) -> None:
        size = 50 * (1 << 20)
        data = bytearray(np.random.default_rng(3).bytes(size))
        if flat_header:  # a plausible IndexFlatIP header in front of the garbage
            header = (version / INDEX_FILE).read_bytes()[:37]
            data[:37] = header
            data[37:45] = (size - 45).to_bytes(8, "little")
        (version / INDEX_FILE).write_bytes(bytes(data))
        _rewrite_checksums(version, INDEX_FILE)
    return damage


# The Flat index file: fourcc "IxFI" at 0, d at 4, ntotal at 8, two dummies at 16 and 24,
# is_trained at 32, metric at 33, then the code vector: its byte size at 37, the data at 45.
# Bit 5 of byte 41 makes that size ~137 GB: under FAISS's own limit, over any CI machine's RAM.
INDEX_CASES: list[tuple[str, Damage]] = [
    *((f"truncated to {point}", _cut_to(INDEX_FILE, point, rewrite=True))
      for point in ("empty", "1 byte", "half", "all but 1 byte")),
    ("truncated to its header", lambda v: (_truncate(v / INDEX_FILE, 45),
                                           _rewrite_checksums(v, INDEX_FILE))),
    *((f"bit {bit} flipped at {offset}", _flip_at(INDEX_FILE, offset, bit, rewrite=True))
      for offset, bit in ((0, 0), (4, 5), (7, 7), (8, 0), (12, 6), (16, 3), (32, 0), (33, 0),
                          (36, 7), (38, 2), (41, 5), (41, 7), (44, 7), (100, 3), (-1, 0))),
    ("50 MB of garbage", _garbage_index(flat_header=False)),
    ("50 MB of garbage behind a Flat header", _garbage_index(flat_header=True)),
]
# Cases that kill the loading process by a signal are marked here, strict, with the reason
# (none has so far: every damaged index above exits normally).
SIGNAL_DEATHS: dict[str, str] = {}


@pytest.mark.parametrize(
    "damage",
    [pytest.param(d, id=i, marks=[pytest.mark.xfail(strict=True, reason=SIGNAL_DEATHS[i])]
                  if i in SIGNAL_DEATHS else []) for i, d in INDEX_CASES])
def test_damaged_index_past_the_checksums_is_refused_without_a_crash(root: Path,
                                                                     damage: Damage) -> None:
    damage(root / VERSION)
    done = subprocess.run([sys.executable, "-c", _LOADER, str(root)], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode < 0:
        pytest.fail(f"the loader died by {signal.Signals(-done.returncode).name}: "
                    f"{done.stderr[-2000:]}")
    assert done.returncode == 0, f"the loader raised something else than SnapshotError:\n" \
                                 f"{done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert line.startswith("loaded") or str(root / VERSION / INDEX_FILE) in line, line


# -- random damage (hypothesis) --------------------------------------------------------------

HYPOTHESIS = settings(deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])


@dataclass(frozen=True)
class Edit:
    """Flip a bit, cut the file, overwrite a few bytes, or append some."""

    kind: str
    where: float  # fraction of the file size
    bit: int = 0
    data: bytes = b""

    def apply(self, file: Path) -> None:
        raw = bytearray(file.read_bytes())
        at = min(int(len(raw) * self.where), max(len(raw) - 1, 0))
        if self.kind == "flip" and raw:
            raw[at] ^= 1 << self.bit
        elif self.kind == "cut":
            del raw[at:]
        elif self.kind == "overwrite":
            raw[at:at + len(self.data)] = self.data
        else:
            raw += self.data
        file.write_bytes(bytes(raw))


fractions = st.one_of(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from([0.0, 0.001, 0.01]))
edits = st.one_of(
    st.builds(Edit, st.just("flip"), fractions, st.integers(0, 7)),
    st.builds(Edit, st.just("cut"), fractions),
    st.builds(Edit, st.just("overwrite"), fractions, st.just(0),
              st.binary(min_size=1, max_size=16)),
    st.builds(Edit, st.just("append"), fractions, st.just(0),
              st.binary(min_size=1, max_size=64)),
)


@settings(HYPOTHESIS, max_examples=HYPOTHESIS_EXAMPLES["data files"])
@given(name=st.sampled_from([FACTORS_FILE, ITEMS_FILE, IDS_FILE, TITLES_FILE]),
       damage=st.lists(edits, min_size=1, max_size=3))
def test_random_damage_past_the_checksums_is_refused_or_harmless(
    pristine: Path, name: str, damage: list[Edit],
) -> None:
    with _scratch_copy(pristine) as root:
        for edit in damage:
            edit.apply(root / VERSION / name)
        _rewrite_checksums(root / VERSION, name)
        _check(root, [root / VERSION / name], must_refuse=())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
MANIFEST_KEYS: list[str | tuple[str, ...]] = [
    "model_version", "dim", "item_count", "index_type", "search", "als", "genres", "created_at",
    "files", "metric", "format", "neighbours", ("neighbours", "k"),
    *(("files", n) for n in FILES), *(("files", n, "bytes") for n in FILES),
    ("als", "alpha"), ("als", "regularization")]


@settings(HYPOTHESIS, max_examples=HYPOTHESIS_EXAMPLES["manifest"])
@given(change=st.one_of(
    st.tuples(st.just("bytes"), st.lists(edits, min_size=1, max_size=3)),
    st.tuples(st.just("value"), st.tuples(st.sampled_from(MANIFEST_KEYS), json_values)),
))
def test_random_damage_to_the_manifest_is_refused_or_harmless(
    pristine: Path, change: tuple[str, Any],
) -> None:
    kind, what = change
    with _scratch_copy(pristine) as root:
        version = root / VERSION
        if kind == "bytes":
            for edit in what:
                edit.apply(version / MANIFEST)
        else:
            _set(*what)(version)
        _check(root, [version / MANIFEST, *(version / n for n in FILES)], must_refuse=())


# -- neighbours: the manifest's account of them ---------------------------------------------


def _drop(name: str) -> Damage:
    def damage(version: Path) -> None:
        (version / name).unlink()
    return damage


@pytest.mark.parametrize("name", NEIGHBOUR_FILES)
def test_neighbour_files_named_in_the_manifest_must_be_there(root: Path, name: str) -> None:
    _drop(name)(root / VERSION)
    _check(root, [root / VERSION / name])


@pytest.mark.parametrize(("label", "damage"), [
    ("files listed, parameters removed", _set("neighbours", {})),
    ("parameters given, rows file not listed", _set(("files", ROWS), KeyError)),
    ("parameters given, scores file not listed", _set(("files", SCORES), KeyError)),
    ("parameters not integers", _set(("neighbours", "k"), "fifty")),
    ("an unknown extra file listed", _set(("files", "extra.npy"), {"bytes": 1, "sha256": "0"})),
])
def test_a_manifest_inconsistent_about_neighbours_is_refused(root: Path, label: str,
                                                             damage: Damage) -> None:
    damage(root / VERSION)
    _check(root, [root / VERSION / MANIFEST])


def test_a_snapshot_without_neighbours_still_serves(root: Path) -> None:
    version = root / VERSION
    manifest = _manifest(version)
    for name in NEIGHBOUR_FILES:
        _drop(name)(version)
        del manifest["files"][name]
    manifest["neighbours"] = {}
    _write_manifest(version, manifest)
    for _, kwargs in MODES:
        catalog = CatalogSnapshot.load(root, **kwargs)
        assert catalog.neighbours is None
        _servable(catalog)
