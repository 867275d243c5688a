"""Fold-in benchmark: exact solve vs warm-started CG, batched and single-user.

Run as ``python -m bench.foldin [--dim 64] [--histories 50,500] [--users 256] [--json PATH]``.

Item factors are real ALS factors, not iid Gaussian: `index.model.train_als` is fitted (not
timed) on ``index.synthetic.synthetic(--items, seed=--seed)``, a log with planted taste
clusters and Zipf-skewed plays, with ``AlsParams(factors=--dim)``. The fold-in uses that
model's regularization and alpha, so its Gram matrix looks like the one served.

For each history length L, ``--users`` histories of L distinct uniformly drawn items with
weights uniform in [0.1, 1] are built, then timed with `time.perf_counter` after one
warm-up call of each kind:

* exact batch: `FoldIn.exact` on the whole batch;
* CG batch: `FoldIn.cg` on the batch, warm-started from the exact vector of each history
  without its last item (one new event: the services' hot path), ``--cg-iterations`` steps;
* exact single / CG single: the same for a batch of one user; each repeat times
  ``SINGLE_CALLS`` different users, one call each.

Figures are microseconds per user (call time / users in the call), median and p90 over all
timed calls. ``cg err`` is max |CG - exact| over the batch; ``start err`` is the same for the
warm start (how far one event moves the vector), so CG helped if cg err << start err.
Everything runs with BLAS pinned to one thread (threadpoolctl), then again with the BLAS
default; that second table is printed only if some median differs by more than 15%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from index.files import atomic_write
from index.model import AlsParams, FoldIn, History, confidence_matrix, train_als
from index.synthetic import synthetic

SINGLE_CALLS = 32  # single-user calls timed per repeat
DIFFERS = 0.15  # relative change of a median that counts as meaningful
MODES = ("exact_batch", "cg_batch", "exact_single", "cg_single")
Result = dict[str, Any]


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


def make_histories(rng: np.random.Generator, n_items: int, users: int, length: int
                   ) -> list[History]:
    """`users` histories of `length` distinct items with weights in [0.1, 1]."""
    return [History(rng.choice(n_items, length, replace=False).astype(np.int64),
                    rng.uniform(0.1, 1.0, length).astype(np.float32)) for _ in range(users)]


def _per_user_seconds(call: Callable[[], object], users: int) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) / users


def measure(fold: FoldIn, batch: list[History], repeats: int, iterations: int) -> Result:
    """Time the four fold-in kinds on `batch`; errors of CG and of its warm start."""
    exact = fold.exact(batch)
    starts = fold.exact([History(h.items[:-1], h.weights[:-1]) for h in batch])
    cg_err = float(np.abs(fold.cg(batch, starts, iterations) - exact).max())
    one = range(min(SINGLE_CALLS, len(batch)))
    plan: dict[str, list[tuple[Callable[[], object], int]]] = {
        "exact_batch": [(partial(fold.exact, batch), len(batch))],
        "cg_batch": [(partial(fold.cg, batch, starts, iterations), len(batch))],
        "exact_single": [(partial(fold.exact, batch[i:i + 1]), 1) for i in one],
        "cg_single": [(partial(fold.cg, batch[i:i + 1], starts[i:i + 1], iterations), 1)
                      for i in one],
    }
    for calls in plan.values():
        calls[0][0]()  # warm-up
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):  # kinds interleaved, so drift hits them alike
        for mode, calls in plan.items():
            samples[mode].extend(_per_user_seconds(call, n) for call, n in calls)
    result: Result = {"history": len(batch[0].items), "cg_max_abs_diff": cg_err,
                      "start_max_abs_diff": float(np.abs(starts - exact).max())}
    for mode, values in samples.items():
        us = np.array(values) * 1e6
        result[mode] = {"median_us": float(np.median(us)), "p90_us": float(np.percentile(us, 90)),
                        "calls": len(us)}
    return result


def table(results: list[Result]) -> str:
    """Markdown table of per-user times (median / p90, microseconds) and CG errors."""
    lines = ["| history | exact batch | CG batch | exact single | CG single | cg err | start err |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        cells = [f"{r[m]['median_us']:.1f} / {r[m]['p90_us']:.1f}" for m in MODES]
        lines.append(f"| {r['history']} | {' | '.join(cells)} | {r['cg_max_abs_diff']:.2e} "
                     f"| {r['start_max_abs_diff']:.2e} |")
    return "\n".join(lines)


def largest_change(pinned: list[Result], free: list[Result]) -> tuple[float, str]:
    """The signed relative change of the median that moved most without the pin, and where."""
    changes = [(f[m]["median_us"] / p[m]["median_us"] - 1, f"{m}, history {p['history']}")
               for p, f in zip(pinned, free, strict=True) for m in MODES]
    return max(changes, key=lambda c: abs(c[0]))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.foldin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--histories", default="50,500", help="comma-separated history lengths")
    p.add_argument("--users", type=int, default=256, help="batch size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cg-iterations", type=int, default=8)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Fit the factors, run the benchmark pinned and unpinned, print (and save) the results."""
    args = _parser().parse_args(argv)
    lengths = [int(x) for x in args.histories.split(",")]
    if args.users < 1 or args.repeats < 1 or not all(1 < n <= args.items for n in lengths):
        print("error: need --users, --repeats >= 1 and 1 < history <= --items", file=sys.stderr)
        return 2
    factors, als = als_item_factors(args.items, args.dim, args.seed)
    fold = FoldIn(factors, als.regularization, als.alpha)
    rng = np.random.default_rng(args.seed)
    batches = [make_histories(rng, args.items, args.users, n) for n in lengths]
    default_threads = max((i["num_threads"] for i in threadpool_info()
                           if i["user_api"] == "blas"), default=1)
    runs: dict[str, list[Result]] = {}
    for threads in sorted({1, default_threads}):
        # threadpool_limits applies its limit when constructed, so build it inside the loop.
        with threadpool_limits(1, "blas") if threads == 1 else contextlib.nullcontext():
            runs[str(threads)] = [measure(fold, b, args.repeats, args.cg_iterations)
                                  for b in batches]
    pinned, free = runs["1"], runs[str(default_threads)]
    change, where = largest_change(pinned, free)
    print(f"fold-in, d={args.dim}, ALS item factors on synthetic({args.items}), "
          f"batch {args.users} users, {args.repeats} repeats, CG {args.cg_iterations} steps; "
          "microseconds per user, median / p90\n\nBLAS threads: 1\n\n" + table(pinned))
    if default_threads == 1:
        print("\nBLAS default is 1 thread: no second run needed.")
    elif abs(change) > DIFFERS:
        print(f"\nBLAS threads: {default_threads} (the default; largest change of a median: "
              f"{change:+.0%}, {where})\n\n" + table(free))
    else:
        print(f"\nBLAS default ({default_threads} threads): no median moved by more than "
              f"{DIFFERS:.0%} (largest {change:+.0%}, {where}).")
    if args.json is not None:
        report = {"config": vars(args) | {"json": str(args.json)}, "factors": "als-on-synthetic",
                  "als": als.as_dict(), "by_blas_threads": runs,
                  "largest_median_change": {"change": change, "where": where}}
        atomic_write(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
