"""gRPC shell of the ranking service: protos to domain calls, domain errors to status codes.

It runs on the asyncio server (`rpc.server.AioService`): each handler is a coroutine that
does its (CPU-bound, sub-millisecond) work inline on the server's loop, and awaits only
while it waits for a version to be reached; a catalog reload runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.errors import InvalidArgument, Unavailable
from index.filters import ItemFilter
from index.ranking import PERSONALIZED, Ranker, UserState
from index.retrieval import BLEND, NEIGHBOURS, VECTOR
from index.snapshot import VERSION_PATTERN, SnapshotError
from index.store import UserStore, reached_within
from ranking_service.config import Settings
from ranking_service.metrics import RankingMetrics
from ranking_service.responses import add_ranking_service, encoder
from recsys.v1 import catalog_pb2, catalog_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from rpc.errors import remaining
from rpc.server import AioService, assemble_aio

log = logging.getLogger("freshrec.ranking")
SERVICES = [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name,
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name]
SOURCES = {PERSONALIZED: ranking_pb2.PERSONALIZED}
RETRIEVALS: dict[int, str | None] = {
    ranking_pb2.RETRIEVAL_UNSPECIFIED: None, ranking_pb2.RETRIEVAL_BLEND: BLEND,
    ranking_pb2.RETRIEVAL_VECTOR: VECTOR, ranking_pb2.RETRIEVAL_NEIGHBOURS: NEIGHBOURS}
T = TypeVar("T")
# Who may call what when auth is on (rpc.security): only admins reload the catalog.
POLICY = {f"/{service}/{method}": role for service, method, role in (
    (SERVICES[0], "Recommend", "viewer"), (SERVICES[0], "SimilarItems", "viewer"),
    (SERVICES[0], "HomePage", "viewer"), (SERVICES[0], "RankItems", "viewer"),
    (SERVICES[1], "GetCatalogInfo", "viewer"),
    (SERVICES[1], "ReloadCatalog", "admin"))}


def to_filter(message: ranking_pb2.Filter) -> ItemFilter:
    """The domain filter of a Filter message."""
    return ItemFilter(tuple(message.genres_any), tuple(message.genres_none),
                      message.min_year, message.max_year)


def to_retrieval(value: int) -> str | None:
    """The domain retrieval of a Retrieval value (None: the server's default)."""
    if value not in RETRIEVALS:
        raise InvalidArgument(f"unknown retrieval {value}; one of "
                              f"{sorted(ranking_pb2.Retrieval.keys())}")
    return RETRIEVALS[value]


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Recommend, SimilarItems and HomePage over the ranker."""

    def __init__(self, settings: Settings, ranker: Ranker, metrics: RankingMetrics) -> None:
        self.settings, self.ranker, self.metrics = settings, ranker, metrics

    def _check_id(self, name: str, value: str) -> None:
        if not value:
            raise InvalidArgument(f"{name} is empty")
        if len(value.encode("utf-8")) > self.settings.max_id_length:
            raise InvalidArgument(f"{name} is longer than {self.settings.max_id_length} bytes")

    def _check(self, name: str, value: str, k: int) -> None:
        self._check_id(name, value)
        if not 1 <= k <= self.settings.max_k:
            raise InvalidArgument(f"k must be in [1, {self.settings.max_k}], got {k}")

    def _timed(self, rpc: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.metrics.latency.labels(rpc).observe(time.perf_counter() - started)

    def _wait_budget(self, context: grpc.aio.ServicerContext,
                     longest: float) -> tuple[float, bool]:
        """How long a call may wait: within its deadline (less a margin to answer) and
        `longest`; and whether the deadline (not `longest`) is what bounds it."""
        left = remaining(context)
        if left is None or left - 0.05 > longest:
            return longest, False
        return max(left - 0.05, 0.0), True

    async def _read_your_write(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Wait, if asked, until the user is at `min_user_version` (any mode) and (log mode)
        this replica has applied the user's partition up to `min_log_sequence`."""
        user_id, sequence = request.user_id, request.min_log_sequence
        if request.min_user_version:
            timeout, by_deadline = self._wait_budget(context, self.settings.max_version_wait_s)
            reached = await reached_within(
                lambda: UserState.of(self.ranker.store.get_user(user_id)).version,
                request.min_user_version, timeout)
            if reached < request.min_user_version:
                said = (f"user {user_id!r} is at version {reached}, not "
                        f"{request.min_user_version}, after {timeout:.3f} s")
                if by_deadline:
                    raise TimeoutError(said)
                raise Unavailable(f"{said} (the server's longest wait); retry")
        if not sequence or not self.settings.log_urls:
            return  # embedded: an acked event is already visible
        from ranking_service.replica import wait_for

        timeout, _ = self._wait_budget(context, self.settings.max_log_wait_s)
        reached = await wait_for(self.ranker.store, self.settings.log, user_id, sequence,
                                 timeout)
        if reached < sequence:
            raise Unavailable(f"this replica has applied the user's partition up to log "
                              f"sequence {reached}, not {sequence}, after {timeout:.3f} s; "
                              "retry")

    def _served(self, user: UserState) -> UserState:
        if user.version:
            self.metrics.user_age.observe(max(time.time() - user.updated_at, 0.0))
        return user

    async def Recommend(self, request: ranking_pb2.RecommendRequest,
                        context: grpc.aio.ServicerContext) -> bytes:  # encoded
        self._check("user_id", request.user_id, request.k)
        await self._read_your_write(request, context)
        retrieval = to_retrieval(request.retrieval)
        ranking = self._timed("Recommend", lambda: self.ranker.recommend(
            request.user_id, request.k, to_filter(request.filter), request.include_watched,
            retrieval))
        self.metrics.responses.labels(ranking.source).inc()
        return encoder(ranking.live.catalog).recommend(
            ranking.live, ranking.items, SOURCES.get(ranking.source, ranking_pb2.POPULAR),
            self._served(ranking.user))

    async def SimilarItems(self, request: ranking_pb2.SimilarItemsRequest,
                           context: grpc.aio.ServicerContext) -> bytes:
        self._check("item_id", request.item_id, request.k)
        retrieval = to_retrieval(request.retrieval)
        items, live = self._timed("SimilarItems", lambda: self.ranker.similar(
            request.item_id, request.k, to_filter(request.filter), retrieval))
        return encoder(live.catalog).similar(live, items)

    async def RankItems(self, request: ranking_pb2.RankItemsRequest,
                        context: grpc.aio.ServicerContext) -> bytes:
        self._check_id("user_id", request.user_id)
        item_ids = list(request.item_ids)
        if not 1 <= len(item_ids) <= self.settings.max_rank_items:
            raise InvalidArgument(f"item_ids must hold 1 to {self.settings.max_rank_items} "
                                  f"ids, got {len(item_ids)}")
        seen: set[str] = set()
        for index, item_id in enumerate(item_ids):
            self._check_id(f"item_ids[{index}]", item_id)
            if item_id in seen:
                raise InvalidArgument(f"item_ids[{index}] {item_id!r} is given twice")
            seen.add(item_id)
        await self._read_your_write(request, context)
        retrieval = to_retrieval(request.retrieval)
        ranking = self._timed("RankItems", lambda: self.ranker.rank(
            request.user_id, item_ids, to_filter(request.filter), retrieval))
        return encoder(ranking.live.catalog).ranked(
            ranking.live, ranking.items, ranking.unknown,
            SOURCES.get(ranking.source, ranking_pb2.POPULAR), self._served(ranking.user))

    async def HomePage(self, request: ranking_pb2.HomePageRequest,
                       context: grpc.aio.ServicerContext) -> bytes:
        self._check("user_id", request.user_id, request.k_per_row)
        await self._read_your_write(request, context)
        retrieval = to_retrieval(request.retrieval)
        page = self._timed("HomePage", lambda: self.ranker.home(
            request.user_id, request.k_per_row, to_filter(request.filter), retrieval))
        return encoder(page.live.catalog).home(
            page.live, [(r.id, r.title, r.items, SOURCES.get(r.source, ranking_pb2.POPULAR))
             for r in page.rows], self._served(page.user))


def catalog_info(catalog: CatalogSnapshot) -> catalog_pb2.CatalogInfo:
    """The CatalogInfo message of a snapshot, as served by this process."""
    loaded = Timestamp()
    loaded.FromNanoseconds(int(catalog.loaded_at * 1e9))
    return catalog_pb2.CatalogInfo(model_version=catalog.model_version, dimension=catalog.dim,
                                   item_count=len(catalog), index_type=catalog.manifest.index_type,
                                   loaded_at=loaded,
                                   server_id=f"{socket.gethostname()}:{os.getpid()}")


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """GetCatalogInfo and ReloadCatalog (admin)."""

    def __init__(self, ranker: Ranker, metrics: RankingMetrics) -> None:
        self.ranker, self.metrics = ranker, metrics

    async def GetCatalogInfo(self, request: catalog_pb2.GetCatalogInfoRequest,
                             context: grpc.aio.ServicerContext) -> catalog_pb2.CatalogInfo:
        return catalog_info(self.ranker.live.catalog)

    async def ReloadCatalog(self, request: catalog_pb2.ReloadCatalogRequest,
                            context: grpc.aio.ServicerContext) -> catalog_pb2.CatalogInfo:
        version = request.model_version or None
        if version is not None and not VERSION_PATTERN.fullmatch(version):
            raise InvalidArgument(f"model_version {version!r} is not a snapshot name under "
                                  "snapshots/ (letters, digits, '.', '_', '-')")
        # Loading a snapshot takes seconds: off the loop, which keeps serving.
        return await asyncio.to_thread(self._reload, version)

    def _reload(self, version: str | None) -> catalog_pb2.CatalogInfo:
        before = self.ranker.catalogs.version
        try:
            live = self.ranker.catalogs.switch(version)  # also points CURRENT at it
        except SnapshotError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.warning("reload refused: %s", exc)
            raise
        self.metrics.switched(before, live.catalog.model_version, "loaded")
        log.info("catalog reloaded: %s", live.catalog.model_version)
        return catalog_info(live.catalog)


class Maintenance:
    """Follows snapshots/CURRENT and the live catalog, and refreshes trending counts, off
    the request path."""

    def __init__(self, settings: Settings, ranker: Ranker, store: UserStore,
                 metrics: RankingMetrics) -> None:
        self.settings, self.ranker, self.store, self.metrics = settings, ranker, store, metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the maintenance thread."""
        self.metrics.switched("", self.ranker.catalogs.version, None)
        self._thread = threading.Thread(target=self._run, daemon=True, name="freshrec-catalog")
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop the thread (after the server has stopped taking calls)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(min(timeout, 5))

    def _run(self) -> None:
        settings = self.settings
        next_follow = next_trending = 0.0
        while not self._stop.wait(min(settings.live_poll_s, settings.catalog_poll_s)):
            try:
                now = time.monotonic()
                if now >= next_follow:
                    self._follow()
                    next_follow = now + settings.catalog_poll_s
                if self.ranker.refresh_live():
                    segment = self.ranker.live.segment
                    self.metrics.live_items.set(len(segment))
                    self.metrics.live_version.set(segment.version)
                self.metrics.live_followed.set(time.time())
                if now >= next_trending:
                    self.ranker.refresh_trending()
                    self.store.reap_stale_readers()
                    next_trending = now + settings.trending_refresh_s
            except Exception as exc:  # never stop maintaining; keep serving the old catalog
                log.error("catalog maintenance: %s", exc)

    def _follow(self) -> None:
        before = self.ranker.catalogs.version
        try:
            live = self.ranker.catalogs.follow()
        except SnapshotError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.error("refusing new snapshot, keeping %s: %s", before, exc)
            return
        if live is not None:
            self.metrics.switched(before, live.catalog.model_version, "followed")
            log.info("followed CURRENT to %s", live.catalog.model_version)


@dataclass
class Deps:
    """What the server runs on; built by `open_deps` or by tests."""

    ranker: Ranker
    store: UserStore
    metrics: RankingMetrics

    @property
    def model_version(self) -> str:
        """The live model version."""
        return self.ranker.catalogs.version


def open_deps(settings: Settings) -> Deps:
    """Open the store read-only and load the live snapshot (SnapshotError if there is none)."""
    store = UserStore(users_dir(settings.data_dir), readonly=True)
    ranker = Ranker(snapshots_dir(settings.data_dir), store, settings.ranking)
    return Deps(ranker, store, RankingMetrics())


def create_server(settings: Settings, deps: Deps) -> tuple[AioService, int]:
    """Build and start the server on settings.host:port; returns it and the bound port."""
    def add(server: grpc.aio.Server) -> None:
        add_ranking_service(RankingServicer(settings, deps.ranker, deps.metrics), server)
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(
            CatalogServicer(deps.ranker, deps.metrics), server)

    maintenance = Maintenance(settings, deps.ranker, deps.store, deps.metrics)
    return assemble_aio(settings, POLICY, SERVICES, add, parts=[maintenance],
                        close=deps.store.close, reuse_port=settings.workers > 1)
