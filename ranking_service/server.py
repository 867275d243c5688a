"""gRPC shell of the ranking service: protos to domain calls, domain errors to status codes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import faiss
import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health
from threadpoolctl import threadpool_limits

from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.filters import FilterError, ItemFilter
from index.ranking import PERSONALIZED, NotFoundError, Ranker, Scored
from index.snapshot import VERSION_PATTERN, SnapshotError, set_current
from index.store import UserStore
from ranking_service.config import Settings
from ranking_service.metrics import RankingMetrics
from recsys.v1 import catalog_pb2, catalog_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from rpc.errors import BadRequest, mapped_errors
from rpc.server import add_health_and_reflection, bind, new_server, set_serving

log = logging.getLogger("freshrec.ranking")
SERVICES = [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name,
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name]
SOURCES = {PERSONALIZED: ranking_pb2.PERSONALIZED}
T = TypeVar("T")
# Who may call what when auth is on (rpc.security): only admins reload the catalog.
POLICY = {f"/{service}/{method}": role for service, method, role in (
    (SERVICES[0], "Recommend", "viewer"), (SERVICES[0], "SimilarItems", "viewer"),
    (SERVICES[0], "HomePage", "viewer"), (SERVICES[1], "GetCatalogInfo", "viewer"),
    (SERVICES[1], "ReloadCatalog", "admin"))}
ERROR_CODES = {
    FilterError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    SnapshotError: grpc.StatusCode.FAILED_PRECONDITION,
}


def to_filter(message: ranking_pb2.Filter) -> ItemFilter:
    """The domain filter of a Filter message."""
    return ItemFilter(tuple(message.genres_any), tuple(message.genres_none),
                      message.min_year, message.max_year)


def to_items(catalog: CatalogSnapshot, scored: Sequence[Scored]) -> list[ranking_pb2.ScoredItem]:
    """ScoredItem messages with the catalog's metadata."""
    return [ranking_pb2.ScoredItem(item_id=catalog.item_ids[s.row], score=s.score,
                                   title=catalog.titles[s.row], genres=catalog.genres_of(s.row),
                                   year=int(catalog.years[s.row])) for s in scored]


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Recommend, SimilarItems and HomePage over the ranker."""

    error_codes = ERROR_CODES

    def __init__(self, settings: Settings, ranker: Ranker, metrics: RankingMetrics) -> None:
        self.settings, self.ranker, self.metrics = settings, ranker, metrics

    def _check(self, name: str, value: str, k: int) -> None:
        if not value:
            raise BadRequest(f"{name} is empty")
        if len(value.encode("utf-8")) > self.settings.max_id_length:
            raise BadRequest(f"{name} is longer than {self.settings.max_id_length} bytes")
        if not 1 <= k <= self.settings.max_k:
            raise BadRequest(f"k must be in [1, {self.settings.max_k}], got {k}")

    def _timed(self, rpc: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.metrics.latency.labels(rpc).observe(time.perf_counter() - started)

    @mapped_errors
    def Recommend(self, request: ranking_pb2.RecommendRequest, context: grpc.ServicerContext
                  ) -> ranking_pb2.RecommendResponse:
        self._check("user_id", request.user_id, request.k)
        ranking = self._timed("Recommend", lambda: self.ranker.recommend(
            request.user_id, request.k, to_filter(request.filter), request.include_watched))
        self.metrics.responses.labels(ranking.source).inc()
        return ranking_pb2.RecommendResponse(
            items=to_items(ranking.catalog, ranking.items),
            source=SOURCES.get(ranking.source, ranking_pb2.POPULAR),
            user_version=ranking.user_version, model_version=ranking.catalog.model_version)

    @mapped_errors
    def SimilarItems(self, request: ranking_pb2.SimilarItemsRequest,
                     context: grpc.ServicerContext) -> ranking_pb2.SimilarItemsResponse:
        self._check("item_id", request.item_id, request.k)
        items, catalog = self._timed("SimilarItems", lambda: self.ranker.similar(
            request.item_id, request.k, to_filter(request.filter)))
        return ranking_pb2.SimilarItemsResponse(items=to_items(catalog, items),
                                                model_version=catalog.model_version)

    @mapped_errors
    def HomePage(self, request: ranking_pb2.HomePageRequest, context: grpc.ServicerContext
                 ) -> ranking_pb2.HomePageResponse:
        self._check("user_id", request.user_id, request.k_per_row)
        rows, version, catalog = self._timed("HomePage", lambda: self.ranker.home(
            request.user_id, request.k_per_row, to_filter(request.filter)))
        return ranking_pb2.HomePageResponse(
            rows=[ranking_pb2.Row(id=r.id, title=r.title, items=to_items(catalog, r.items),
                                  source=SOURCES.get(r.source, ranking_pb2.POPULAR))
                  for r in rows],
            user_version=version, model_version=catalog.model_version)


def catalog_info(catalog: CatalogSnapshot) -> catalog_pb2.CatalogInfo:
    """The CatalogInfo message of a snapshot."""
    loaded = Timestamp()
    loaded.FromNanoseconds(int(catalog.loaded_at * 1e9))
    return catalog_pb2.CatalogInfo(model_version=catalog.model_version, dimension=catalog.dim,
                                   item_count=len(catalog), index_type=catalog.manifest.index_type,
                                   loaded_at=loaded)


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """GetCatalogInfo and ReloadCatalog (admin)."""

    error_codes = ERROR_CODES

    def __init__(self, settings: Settings, ranker: Ranker, metrics: RankingMetrics) -> None:
        self.settings, self.ranker, self.metrics = settings, ranker, metrics

    @mapped_errors
    def GetCatalogInfo(self, request: catalog_pb2.GetCatalogInfoRequest,
                       context: grpc.ServicerContext) -> catalog_pb2.CatalogInfo:
        return catalog_info(self.ranker.live.catalog)

    @mapped_errors
    def ReloadCatalog(self, request: catalog_pb2.ReloadCatalogRequest,
                      context: grpc.ServicerContext) -> catalog_pb2.CatalogInfo:
        version = request.model_version or None
        if version is not None and not VERSION_PATTERN.match(version):
            raise BadRequest(f"model_version {version!r} is not a snapshot name under "
                             "snapshots/ (letters, digits, '.', '_', '-')")
        try:
            catalog = self.ranker.reload(version)
        except SnapshotError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.warning("reload refused: %s", exc)  # the full path stays in the log
            raise SnapshotError(str(exc).replace(str(self.settings.data_dir), "<data-dir>")) \
                from exc
        if version is not None:  # CURRENT is the truth every process follows
            set_current(self.ranker.snapshots, version)
        self.metrics.reloads.labels("loaded").inc()
        log.info("catalog reloaded: %s", catalog.model_version)
        return catalog_info(catalog)


@dataclass
class Deps:
    """What the server runs on; built by `open_deps` or by tests."""

    ranker: Ranker
    store: UserStore
    metrics: RankingMetrics


def open_deps(settings: Settings) -> Deps:
    """Open the store read-only and load the live snapshot (SnapshotError if there is none)."""
    store = UserStore(users_dir(settings.data_dir), readonly=True)
    root = snapshots_dir(settings.data_dir)
    catalog = CatalogSnapshot.load(root, mmap=True)
    return Deps(Ranker(root, store, settings.ranking, catalog), store, RankingMetrics())


class RankingServer:
    """The running server with its maintenance thread."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 deps: Deps, settings: Settings, mode: str) -> None:
        self.server, self.health, self.deps = server, health_servicer, deps
        self.mode = mode  # e.g. "insecure, auth off", for the start-up log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._maintain, args=(settings,), daemon=True,
                                        name="freshrec-catalog")
        self._thread.start()

    def _maintain(self, settings: Settings) -> None:
        """Follow snapshots/CURRENT and refresh trending counts, off the request path."""
        next_trending = 0.0
        metrics, ranker = self.deps.metrics, self.deps.ranker
        while not self._stop.wait(settings.catalog_poll_s):
            try:
                before = ranker.live.catalog.model_version
                if ranker.follow_current():
                    metrics.catalog.labels(before).set(0)
                    metrics.reloads.labels("followed").inc()
                if time.monotonic() >= next_trending:
                    ranker.refresh_trending()
                    self.deps.store.reap_stale_readers()
                    next_trending = time.monotonic() + settings.trending_refresh_s
            except Exception as exc:  # never stop maintaining; keep serving the old catalog
                log.error("catalog maintenance: %s", exc)
            metrics.catalog.labels(ranker.live.catalog.model_version).set(1)

    def stop(self, grace: float) -> None:
        """Refuse new calls, let calls in flight finish, close the store."""
        self.health.enter_graceful_shutdown()
        self._stop.set()
        self.server.stop(grace).wait()
        self._thread.join(5)
        self.deps.store.close()


def create_server(settings: Settings, deps: Deps) -> tuple[RankingServer, int]:
    """Build and start the server on settings.host:port; returns it and the bound port."""
    # Requests run in parallel across threads (FAISS releases the GIL); OpenMP or BLAS
    # threads inside one search would only spin against them.
    faiss.omp_set_num_threads(1)
    threadpool_limits(1, "blas")
    server = new_server(settings, POLICY, reuse_port=settings.workers > 1)
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(
        RankingServicer(settings, deps.ranker, deps.metrics), server)
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(
        CatalogServicer(settings, deps.ranker, deps.metrics), server)
    health_servicer = add_health_and_reflection(server, SERVICES, settings.reflection)
    port, mode = bind(server, settings)
    server.start()
    deps.metrics.catalog.labels(deps.ranker.live.catalog.model_version).set(1)
    set_serving(health_servicer, SERVICES)
    return RankingServer(server, health_servicer, deps, settings, mode), port

