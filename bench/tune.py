"""Choosing the model's defaults honestly: a grid search on a validation window.

`python -m bench.tune`: MovieLens-100K, ALS trained on the interactions before the 0.6
time quantile, our rule (`bench.replay.DecayedFoldIn`) replayed on those in [0.6, 0.8);
the test window (after 0.8, `make eval`) is never looked at. Stage 1 searches factors,
alpha and regularization with every decay half-life; stage 2 the iterations at the best
of stage 1. Prints the best configurations and writes `<out>/tune-<UTC time>.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from bench.replay import DecayedFoldIn, Split, replay, train_factors
from index.files import atomic_write
from index.model import AlsParams
from index.movielens import load_movielens_100k

FACTORS = (32, 64, 128)
ALPHAS = (5.0, 10.0, 20.0, 40.0, 80.0)
REGULARIZATIONS = (0.1, 1.0, 10.0, 30.0, 100.0)
HALF_LIVES_S = (0.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
ITERATIONS = (5, 10, 15, 30)


def validation_split(cache_dir: Path, start_q: float, end_q: float) -> Split:
    """Rules built before the `start_q` time quantile, replayed up to `end_q`."""
    dataset = load_movielens_100k(cache_dir)
    log = dataset.interactions
    start, end = (int(np.quantile(log.timestamps, q)) for q in (start_q, end_q))
    return Split.at(log, dataset.items.item_ids, start, end)


def evaluate(split: Split, als: AlsParams, half_lives: tuple[float, ...]) -> list[dict[str, Any]]:
    """HR@10 and NDCG@10 of our rule for one trained model and each half-life."""
    factors = train_factors(split, als)
    rules = {str(h): DecayedFoldIn(factors, als, h) for h in half_lives}
    results = replay(split, rules)  # type: ignore[arg-type]
    return [{"als": als.as_dict(), "half_life_s": h, **results[str(h)]["all"]}
            for h in half_lives]


def search(split: Split, log: Any) -> list[dict[str, Any]]:
    """Stage 1 (factors x alpha x regularization x half-life), then stage 2 (iterations)."""
    rows: list[dict[str, Any]] = []
    for factors, alpha, reg in itertools.product(FACTORS, ALPHAS, REGULARIZATIONS):
        rows += evaluate(split, AlsParams(factors=factors, alpha=alpha, regularization=reg),
                         HALF_LIVES_S)
        log(rows[-len(HALF_LIVES_S):])
    best = max(rows, key=lambda r: r["hr_at_10"])
    for iterations in ITERATIONS:
        als = AlsParams.of({**best["als"], "iterations": iterations})
        rows += evaluate(split, als, (best["half_life_s"],))
        log(rows[-1:])
    return rows


def main(argv: list[str] | None = None) -> None:
    """CLI: run the search, print the top 10, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=float, default=0.6, help="train before this quantile")
    parser.add_argument("--end", type=float, default=0.8, help="validate up to this quantile")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/datasets"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    split = validation_split(args.cache_dir, args.start, args.end)

    def progress(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            print(f"  {r['als']} half-life {r['half_life_s']:g} s: HR@10 {r['hr_at_10']:.4f}",
                  file=sys.stderr, flush=True)

    with threadpool_limits(1, "blas"):
        rows = search(split, progress)
    rows.sort(key=lambda r: -r["hr_at_10"])
    for r in rows[:10]:
        print(f"HR@10 {r['hr_at_10']:.4f}  NDCG@10 {r['ndcg_at_10']:.4f}  {r['als']}  "
              f"half-life {r['half_life_s']:g} s")
    result = {"window": {"train_before_quantile": args.start, "validate_to_quantile": args.end,
                         "events": rows[0]["events"]},
              "seconds": round(time.perf_counter() - started), "ranked": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
