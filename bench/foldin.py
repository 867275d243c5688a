"""Fold-in benchmark: the writer's cost per user-event, re-solving vs stored statistics.

Run as ``python -m bench.foldin [--dim 64] [--histories 8,16,32,64,128,500] [--users 256]
[--json PATH]``.

Item factors are real ALS factors, not iid Gaussian: `index.model.train_als` is fitted (not
timed) on ``index.synthetic.synthetic(--items, seed=--seed)``. For each history length L,
``--users`` users get a record of L distinct items (decay on, half-life 60 s), then one new
play each (a repeat of a history item one time in three, as in a session), and the two
paths of `index.apply` are timed end to end on that group, from the stored bytes to the
bytes to store:

* re-solve: decode the record, merge the play, `FoldIn.exact` over the whole history
  (batched over the group), encode;
* statistics: decode the record, merge, update the user's statistics (held in memory,
  `index.user_stats.StatsCache`) by rank-1 terms, `FoldIn.from_stats` (batched), encode.

Figures are microseconds per user-event (group time / users), median and p90 over
``--repeats`` groups, with BLAS pinned to one thread as in the services; also the bytes
stored per user (the record) and held in memory on the statistics path.
`index.apply.FoldInPolicy.stats_min_history` is the shortest history where statistics win.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from index.files import atomic_write
from index.model import AlsParams, FoldIn, History, confidence_matrix, train_als
from index.synthetic import synthetic
from index.user_record import UserRecord
from index.user_stats import UserStats

HALF_LIFE_S = 60.0
Result = dict[str, Any]
Group = list[tuple[bytes, UserStats, tuple[str, float, float]]]  # record, stats, next play


def als_item_factors(n_items: int, dim: int, seed: int) -> tuple[np.ndarray, AlsParams]:
    """Item factors of an ALS model fitted on a synthetic taste-cluster log."""
    data = synthetic(n_items, seed=seed)
    inter, row_of = data.interactions, {i: r for r, i in enumerate(data.items.item_ids)}
    users, user_rows = np.unique(inter.user_ids.astype(str), return_inverse=True)
    item_rows = np.fromiter((row_of[i] for i in inter.item_ids), np.int64, len(inter))
    params = AlsParams(factors=dim, seed=seed)
    matrix = confidence_matrix(user_rows, item_rows, inter.weights, (len(users), n_items),
                               params.alpha)
    return train_als(matrix, params)[1], params


def make_group(rng: np.random.Generator, factors: np.ndarray, row_of: dict[str, int],
               users: int, length: int) -> Group:
    """Stored users with `length` items each, and the play each receives next."""
    group = []
    for u in range(users):
        items = [f"i{r}" for r in rng.choice(len(factors), length + 1, replace=False)]
        plays = [(item, float(rng.uniform(0.1, 1.0)), float(t))
                 for t, item in enumerate(items[:-1])]
        record = UserRecord.new(f"u{u}").under("bench", row_of, HALF_LIFE_S)
        record, _ = record.with_plays(plays, row_of)
        nxt = items[:-1][int(rng.integers(length))] if rng.random() < 1 / 3 else items[-1]
        group.append((record.encode(), UserStats.build(record, factors),
                      (nxt, 1.0, float(length + 1))))
    return group


def resolve_path(fold: FoldIn, row_of: dict[str, int], group: Group) -> int:
    """Decode, merge, re-solve over the history, encode: bytes written."""
    records = [UserRecord.decode("u", raw).with_plays([play], row_of)[0]
               for raw, _, play in group]
    fold.exact([History(*r.known()) for r in records])
    return sum(len(r.encode()) for r in records)


def stats_path(fold: FoldIn, factors: np.ndarray, row_of: dict[str, int], group: Group) -> int:
    """Decode, merge, rank-1 update, solve from the statistics, encode: bytes written."""
    merged = []
    for raw, stats, play in group:
        record, change = UserRecord.decode("u", raw).with_plays([play], row_of)
        merged.append((record, stats.updated(record, change, factors)))
    fold.from_stats([s for _, s in merged])
    return sum(len(r.encode()) for r, _ in merged)


def _timed(work: Callable[[], int], users: int, repeats: int) -> tuple[list[float], int]:
    work()  # warm-up
    samples, written = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        written = work()
        samples.append((time.perf_counter() - started) / users * 1e6)
    return samples, written // users


def measure(fold: FoldIn, factors: np.ndarray, row_of: dict[str, int], group: Group,
            repeats: int) -> Result:
    """Both paths on one group, interleaved so that drift hits them alike."""
    runs = {"resolve": lambda: resolve_path(fold, row_of, group),
            "stats": lambda: stats_path(fold, factors, row_of, group)}
    result: Result = {"history": UserRecord.decode("u", group[0][0]).rows.size,
                      "stats_bytes_in_memory": group[0][1].nbytes}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, work in runs.items():
            values, result[f"{name}_bytes_per_user"] = _timed(work, len(group), 1)
            samples[name] += values
    for name, values in samples.items():
        result[name] = {"median_us": float(np.median(values)),
                        "p90_us": float(np.percentile(values, 90))}
    return result


def table(results: list[Result]) -> str:
    """Markdown: microseconds per user-event and bytes per user, on both paths."""
    lines = ["| history | re-solve (us, median / p90) | statistics (us) | record bytes "
             "(stored) | statistics bytes (memory) |", "|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['history']} | {r['resolve']['median_us']:.1f} / "
                     f"{r['resolve']['p90_us']:.1f} | {r['stats']['median_us']:.1f} / "
                     f"{r['stats']['p90_us']:.1f} | {r['resolve_bytes_per_user']:,} "
                     f"| {r['stats_bytes_in_memory']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Fit the factors, time both paths per history length, print (and save) the table."""
    p = argparse.ArgumentParser(prog="python -m bench.foldin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--histories", default="8,16,32,64,128,500")
    p.add_argument("--users", type=int, default=256, help="users per group")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.histories.split(",")]
    if args.users < 1 or args.repeats < 1 or not all(0 < n < args.items for n in lengths):
        print("error: need --users, --repeats >= 1 and 0 < history < --items", file=sys.stderr)
        return 2
    factors, als = als_item_factors(args.items, args.dim, args.seed)
    fold = FoldIn(factors, als.regularization, als.alpha)
    row_of = {f"i{r}": r for r in range(len(factors))}
    rng = np.random.default_rng(args.seed)
    with threadpool_limits(1, "blas"):
        results = [measure(fold, factors, row_of,
                           make_group(rng, factors, row_of, args.users, n), args.repeats)
                   for n in lengths]
    print(f"writer cost per user-event, d={args.dim}, ALS item factors on "
          f"synthetic({args.items}), groups of {args.users} users, {args.repeats} repeats, "
          f"BLAS 1 thread\n\n" + table(results))
    if args.json is not None:
        report = {"config": vars(args) | {"json": str(args.json)}, "als": als.as_dict(),
                  "results": results}
        atomic_write(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
