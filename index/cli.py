"""`python -m index`: build a catalog snapshot and user store from batch data, or inspect one."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from index import snapshots_dir, users_dir
from index.build import build
from index.catalog import CatalogSnapshot
from index.datasets import KNOWN_DATASETS, load, load_csv
from index.errors import FreshrecError
from index.model import AlsParams
from index.neighbours import NeighbourParams
from index.store import UserStore
from index.tables import DatasetError
from index.user_record import MAX_HISTORY


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="train ALS, write a snapshot, bootstrap users")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=KNOWN_DATASETS)
    source.add_argument("--interactions", type=Path, help="CSV user_id,item_id,weight,timestamp")
    b.add_argument("--items", type=Path, help="CSV item_id,title,genres,year (with --interactions)")
    b.add_argument("--until", type=int, help="keep only interactions before this unix time")
    b.add_argument("--data-dir", type=Path, required=True)
    b.add_argument("--cache-dir", type=Path, default=Path(".cache/datasets"),
                   help="where downloaded datasets are kept")
    b.add_argument("--n-items", type=int, default=10_000, help="synthetic: catalog size")
    b.add_argument("--n-users", type=int, help="synthetic: users (default n_items / 5)")
    b.add_argument("--per-user", type=int, default=40, help="synthetic: interactions per user")
    b.add_argument("--clusters", type=int, default=20, help="synthetic: planted taste clusters")
    b.add_argument("--seed", type=int, default=0)
    defaults = AlsParams()
    b.add_argument("--factors", type=int, default=defaults.factors)
    b.add_argument("--regularization", type=float, default=defaults.regularization)
    b.add_argument("--alpha", type=float, default=defaults.alpha,
                   help="confidence c = 1 + alpha * weight")
    b.add_argument("--iterations", type=int, default=defaults.iterations)
    b.add_argument("--half-life-s", type=float, default=defaults.half_life_s,
                   help="decay of a play's weight in the fold-in, by its age (0 = none)")
    b.add_argument("--index", default="flat",
                   help="flat | hnsw | ivfpq | any FAISS factory string (default flat)")
    nb = NeighbourParams()
    b.add_argument("--neighbours-k", type=int, default=nb.k,
                   help="co-visitation neighbours kept per item (0 = build none)")
    b.add_argument("--neighbour-window", type=int, default=nb.window,
                   help="count two plays of a user as co-visited only if at most this many "
                        "other plays lie between them (0 = anywhere in the history)")
    b.add_argument("--version", help="model version name (default <dataset>-<UTC time>)")
    b.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    b.add_argument("--max-history", type=int, default=MAX_HISTORY)
    i = commands.add_parser("info", help="validate and describe the current snapshot and store")
    i.add_argument("--data-dir", type=Path, required=True)
    return parser


def _build(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.interactions is not None:
        if args.items is None:
            raise DatasetError("--interactions needs --items (CSV item_id,title,genres,year)")
        dataset = load_csv(args.interactions, args.items, until=args.until)
    else:
        options = {"n_items": args.n_items, "n_users": args.n_users, "per_user": args.per_user,
                   "n_clusters": args.clusters, "seed": args.seed}
        dataset = load(args.dataset, args.cache_dir,
                       **(options if args.dataset == "synthetic" else {}))
        if args.until is not None:
            dataset = replace(dataset, interactions=dataset.interactions.until(args.until))
    load_seconds = time.perf_counter() - started
    print(f"loaded {dataset.name} in {load_seconds:.1f} s", file=sys.stderr)
    als = AlsParams(factors=args.factors, regularization=args.regularization,
                    alpha=args.alpha, iterations=args.iterations, seed=args.seed,
                    half_life_s=args.half_life_s)
    report = build(dataset, args.data_dir, als, index=args.index, version=args.version,
                   threads=args.threads, max_history=args.max_history,
                   log=lambda line: print(line, file=sys.stderr),
                   neighbours=NeighbourParams(k=args.neighbours_k, window=args.neighbour_window)
                   if args.neighbours_k else None)
    print(json.dumps({"model_version": report.model_version,
                      "snapshot": str(report.snapshot_path),
                      "snapshot_bytes": report.snapshot_bytes, "items": report.item_count,
                      "users_bootstrapped": report.users_bootstrapped,
                      "seconds": {"load": round(load_seconds, 2),
                                  **{k: round(v, 2) for k, v in report.timings.items()}},
                      "total_seconds": round(time.perf_counter() - started, 2)}, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    catalog = CatalogSnapshot.load(snapshots_dir(args.data_dir))
    manifest = catalog.manifest
    with UserStore(users_dir(args.data_dir), readonly=True) as store:
        print(json.dumps({"model_version": manifest.model_version, "dim": manifest.dim,
                          "items": manifest.item_count, "index_type": manifest.index_type,
                          "als": manifest.als, "neighbours": manifest.neighbours,
                          "users": store.count("users"),
                          "seen_events": store.count("seen")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m index` and the `freshrec-index` script."""
    args = _parser().parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _info(args)
    except (FreshrecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
