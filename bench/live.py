"""Recommend with and without a live segment: the same server, the same users, alternating.

N items are put through ItemService (genres drawn from the catalog's, this year), every
worker is waited for until it serves them, and 1-client Recommend is driven; then they are
taken down (the segment is empty again) and it is driven again; `rounds` times, so each
pair of runs is adjacent in time on this shared machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import grpc
import numpy as np

from bench import load
from recsys.v1 import catalog_pb2, catalog_pb2_grpc, ranking_pb2, ranking_pb2_grpc

BATCH = 1000  # the most one PutItems takes


def _put(items: catalog_pb2_grpc.ItemServiceStub, batch: list[catalog_pb2.CatalogItem]) -> None:
    for start in range(0, len(batch), BATCH):
        items.PutItems(catalog_pb2.PutItemsRequest(items=batch[start:start + BATCH]), timeout=60)


def _take_down(items: catalog_pb2_grpc.ItemServiceStub, ids: list[str]) -> None:
    for start in range(0, len(ids), BATCH):
        items.TakeDownItems(catalog_pb2.TakeDownItemsRequest(item_ids=ids[start:start + BATCH]),
                            timeout=60)


def _served(target: str, newest: str, present: bool, timeout: float = 30) -> float:
    """Seconds until 8 fresh connections (so, every worker) show the newest item first in
    an unknown user's new-releases row (or, not `present`, no longer show it)."""
    started = time.monotonic()
    for _ in range(8):
        channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        while True:
            page = stub.HomePage(ranking_pb2.HomePageRequest(user_id="bench-nobody", k_per_row=1))
            shown = any(i.item_id == newest for r in page.rows for i in r.items)
            if shown == present:
                break
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"live items not {'served' if present else 'gone'} in time")
            time.sleep(0.02)
        channel.close()
    return time.monotonic() - started


def suite(events_target: str, ranking_target: str, users: list[str], genres: list[str],
          n_items: int, seconds: float, rounds: int) -> dict[str, Any]:
    """p50s of 1-client Recommend with and without `n_items` live items, per round."""
    rng = np.random.default_rng(0)
    year = time.gmtime().tm_year
    batch = [catalog_pb2.CatalogItem(
        item_id=f"live-{n}", title=f"Live title {n}", year=year,
        genres=list(rng.choice(genres, size=min(2, len(genres)), replace=False)))
        for n in range(n_items)]
    ids = [i.item_id for i in batch]
    with grpc.insecure_channel(events_target) as channel:
        items = catalog_pb2_grpc.ItemServiceStub(channel)
        without, with_live, visible = [], [], []
        for _ in range(rounds):
            without.append(load.drive(ranking_target, "Recommend", users, 1, seconds))
            started = time.monotonic()
            _put(items, batch)
            put_s = time.monotonic() - started
            visible.append(put_s + _served(ranking_target, ids[-1], True))
            with_live.append(load.drive(ranking_target, "Recommend", users, 1, seconds))
            _take_down(items, ids)
            _served(ranking_target, ids[-1], False)
    base = statistics.median(r["p50_ms"] for r in without)
    live = statistics.median(r["p50_ms"] for r in with_live)
    return {"live_items": n_items, "rounds": rounds, "without": without, "with": with_live,
            "p50_without_ms": base, "p50_with_ms": live, "p50_ratio": round(live / base, 3),
            "put_to_served_s": visible}
