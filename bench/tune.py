"""Choosing the model's defaults honestly: a grid search on a validation window.

`python -m bench.tune`: MovieLens-100K, ALS trained on the interactions before the 0.6
time quantile, our rule (`bench.replay.DecayedFoldIn`) replayed on those in [0.6, 0.8);
the test window (after 0.8, `make eval`) is never looked at. Stage 1 searches factors,
alpha and regularization with every decay half-life; stage 2 the iterations at the best
of stage 1. Prints the best configurations and writes `<out>/tune-<UTC time>.json`.

`python -m bench.tune --blend`, on the same window with the model defaults: stage A
searches the co-visitation neighbours alone (window and k of the build, the number of
recent plays and their recency half-life of the query); stage B the blend weight of the
best neighbours with the real-time fold-in (0 = vector only, 1 = neighbours only).
Writes `<out>/tune-blend-<UTC time>.json`.
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

from bench.replay import (
    Blended,
    DecayedFoldIn,
    Neighbours,
    Rule,
    Split,
    build_neighbours,
    replay,
    train_factors,
)
from index.files import atomic_write
from index.model import AlsParams
from index.movielens import load_movielens_100k
from index.neighbours import NeighbourParams

FACTORS = (32, 64, 128)
ALPHAS = (5.0, 10.0, 20.0, 40.0, 80.0)
REGULARIZATIONS = (0.1, 1.0, 10.0, 30.0, 100.0)
HALF_LIVES_S = (0.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
ITERATIONS = (5, 10, 15, 30)
WINDOWS = (0, 2, 5, 10, 20)  # co-visitation window, in plays
NEIGHBOUR_KS = (20, 50, 100)
RECENT = (20, 50)  # recent plays queried
HALF_LIFE_PLAYS = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0)
BLEND_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


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


def search_blend(split: Split, log: Any) -> list[dict[str, Any]]:
    """Stage A (neighbours alone), then stage B (blend weight) at the model defaults."""
    rows: list[dict[str, Any]] = []
    for window, k in itertools.product(WINDOWS, NEIGHBOUR_KS):
        params = NeighbourParams(k=k, window=window)
        table = build_neighbours(split, params)
        rules: dict[str, Rule] = {f"{recent} {h}": Neighbours(table, recent, h)
                                  for recent, h in itertools.product(RECENT, HALF_LIFE_PLAYS)}
        for name, result in replay(split, rules).items():
            recent, h = name.split()
            rows.append({"stage": "neighbours", "neighbours": params.as_dict(),
                         "recent": int(recent), "half_life_plays": float(h), **result["all"]})
        log(rows[-len(rules):])
    best = max(rows, key=lambda r: r["hr_at_10"])
    als = AlsParams()
    vector = DecayedFoldIn(train_factors(split, als), als, als.half_life_s)
    table = build_neighbours(split, NeighbourParams(**best["neighbours"]))
    neighbours = Neighbours(table, best["recent"], best["half_life_plays"])
    blends: dict[str, Rule] = {str(w): Blended(vector, neighbours, w) for w in BLEND_WEIGHTS}
    for weight, result in replay(split, blends).items():
        rows.append({"stage": "blend", **{k: best[k] for k in (
            "neighbours", "recent", "half_life_plays")}, "weight": float(weight),
            "als": als.as_dict(), **result["all"]})
    log(rows[-len(blends):])
    return rows


def main(argv: list[str] | None = None) -> None:
    """CLI: run the search, print the top 10, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=float, default=0.6, help="train before this quantile")
    parser.add_argument("--end", type=float, default=0.8, help="validate up to this quantile")
    parser.add_argument("--blend", action="store_true",
                        help="tune the neighbours and the blend weight instead")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/datasets"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    split = validation_split(args.cache_dir, args.start, args.end)

    def describe(r: dict[str, Any]) -> str:
        if "stage" not in r:
            return f"{r['als']} half-life {r['half_life_s']:g} s"
        return (f"{r['stage']}: {r['neighbours']} recent {r['recent']} half-life "
                f"{r['half_life_plays']:g} plays" + (f" weight {r['weight']:g}"
                                                     if "weight" in r else ""))

    def progress(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            print(f"  {describe(r)}: HR@10 {r['hr_at_10']:.4f}", file=sys.stderr, flush=True)

    with threadpool_limits(1, "blas"):
        rows = (search_blend if args.blend else search)(split, progress)
    rows.sort(key=lambda r: -r["hr_at_10"])
    for r in [r for r in rows if r.get("stage") == "blend"][:11] + rows[:10]:
        print(f"HR@10 {r['hr_at_10']:.4f}  NDCG@10 {r['ndcg_at_10']:.4f}  {describe(r)}")
    result = {"window": {"train_before_quantile": args.start, "validate_to_quantile": args.end,
                         "events": rows[0]["events"]},
              "seconds": round(time.perf_counter() - started), "ranked": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = args.out / f"tune-{'blend-' if args.blend else ''}{stamp}.json"
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
