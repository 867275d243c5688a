"""One lifecycle for both servers: build (limits, security, errors, health), run, stop.

`assemble` builds and starts a `Service` (the gRPC server, its health, and the background
parts it runs on, in one start and stop order); `run` is the whole life of a server
process, from opening its dependencies to a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol, TypeVar

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from index.errors import FailedPrecondition
from rpc.errors import Aio, ErrorBoundary
from rpc.security import REFLECTION_METHODS, TokenAuth, load_tokens, server_credentials
from rpc.settings import ServerSettings

S = TypeVar("S", bound=ServerSettings)
T = TypeVar("T")
D = TypeVar("D", bound="Deps")


class Part(Protocol):
    """Something a service runs beside its gRPC server (the writer, a maintenance thread)."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


class Deps(Protocol):
    """What `run` needs of a service's dependencies."""

    @property
    def model_version(self) -> str: ...

    @property
    def metrics(self) -> Any: ...  # has serve(port, host)


class Service:
    """A gRPC server with health and its parts; `stop` drains calls, then the parts."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 services: Sequence[str], mode: str, parts: Sequence[Part],
                 close: Callable[[], None]) -> None:
        self.server, self.health, self.services = server, health_servicer, services
        self.mode = mode  # e.g. "insecure, auth off", for the start-up log
        self.parts, self._close = parts, close

    def start(self) -> None:
        """Start the parts, then the server; report SERVING."""
        for part in self.parts:
            part.start()
        self.server.start()
        for name in ("", *self.services):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """NOT_SERVING, refuse new calls, let calls in flight finish, stop parts, close."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for part in reversed(self.parts):
            part.stop(grace + 30)
        self._close()


class AioService:
    """A `Service` on the asyncio server: a grpc.aio server on an event loop in a thread of
    its own, whose handlers are coroutines run on that thread one after another. A call
    then never waits for a pool thread to be woken or for the GIL another handler of the
    process holds (the sync server hands every call from its polling thread to a pool
    thread and back); a handler that would block hands its work to a thread itself.
    `start` and `stop` are called from any other thread, as `Service`'s are."""

    def __init__(self, settings: ServerSettings, policy: dict[str, str],
                 services: Sequence[str], add_servicers: Callable[[grpc.aio.Server], None],
                 parts: Sequence[Part], close: Callable[[], None], reuse_port: bool) -> None:
        self.services, self.parts, self._close = services, parts, close
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop_thread, daemon=True,
                                        name="freshrec-rpc")
        self._thread.start()
        self.port, self.mode = self._on_loop(self._build(settings, policy, add_servicers,
                                                         reuse_port))

    def _loop_thread(self) -> None:
        faiss.omp_set_num_threads(1)  # a per-thread setting, as for the sync server's pool
        self._loop.run_forever()

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    async def _build(self, settings: ServerSettings, policy: dict[str, str],
                     add_servicers: Callable[[grpc.aio.Server], None],
                     reuse_port: bool) -> tuple[int, str]:
        self.server = grpc.aio.server(
            interceptors=[Aio(i) for i in _interceptors(settings, policy)],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=_options(settings, reuse_port))
        add_servicers(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if settings.reflection:
            reflection.enable_server_reflection(
                (*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        return _bind(self.server, settings)

    def start(self) -> None:
        """Start the parts, then the server; report SERVING."""
        for part in self.parts:
            part.start()
        self._on_loop(self._start())

    async def _start(self) -> None:
        await self.server.start()
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """NOT_SERVING, refuse new calls, let calls in flight finish, stop parts, close."""
        self._on_loop(self._stop(grace))
        for part in reversed(self.parts):
            part.stop(grace + 30)
        self._close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def assemble_aio(settings: ServerSettings, policy: dict[str, str], services: Sequence[str],
                 add_servicers: Callable[[grpc.aio.Server], None], parts: Sequence[Part] = (),
                 close: Callable[[], None] = lambda: None,
                 reuse_port: bool = False) -> tuple[AioService, int]:
    """`assemble` on the asyncio server (the servicers' handlers are coroutines)."""
    service = AioService(settings, policy, services, add_servicers, parts, close, reuse_port)
    service.start()
    return service, service.port


def assemble(settings: ServerSettings, policy: dict[str, str], services: Sequence[str],
             add_servicers: Callable[[grpc.Server], None], parts: Sequence[Part] = (),
             close: Callable[[], None] = lambda: None,
             reuse_port: bool = False) -> tuple[Service, int]:
    """Build, bind and start a service; returns it and the bound port."""
    server = _new_server(settings, policy, reuse_port)
    add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port, mode = _bind(server, settings)
    service = Service(server, health_servicer, services, mode, parts, close)
    service.start()
    return service, port


def _interceptors(settings: ServerSettings,
                  policy: dict[str, str]) -> list[grpc.ServerInterceptor]:
    """Auth (if configured), then the error boundary: the innermost interceptor, so denied
    calls never reach it. `policy` maps full method names to roles."""
    settings.check_security()
    interceptors: list[grpc.ServerInterceptor] = []
    if settings.tokens_file:
        policy = {**policy, **dict.fromkeys(REFLECTION_METHODS, "viewer")}
        interceptors.append(TokenAuth(load_tokens(Path(settings.tokens_file)), policy))
    interceptors.append(ErrorBoundary([settings.data_dir]))
    return interceptors


def _options(settings: ServerSettings, reuse_port: bool) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0)]


def _new_server(settings: ServerSettings, policy: dict[str, str],
                reuse_port: bool) -> grpc.Server:
    """A sync server with explicit message limits, a bound on concurrent RPCs, and auth.

    Past `max_concurrent_rpcs` new calls get RESOURCE_EXHAUSTED at once instead of
    queueing behind a full thread pool.
    """
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                   thread_name_prefix="freshrec-rpc",
                                   initializer=faiss.omp_set_num_threads, initargs=(1,)),
        interceptors=_interceptors(settings, policy),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=_options(settings, reuse_port))


def _bind(server: Any, settings: ServerSettings) -> tuple[int, str]:
    """Listen on settings.host:port (TLS if configured); returns the port and the mode."""
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert:
        port = server.add_secure_port(address, server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca))
        mode = "mutual TLS" if settings.tls_client_ca else "TLS"
    else:
        port = server.add_insecure_port(address)
        mode = "insecure"
    return port, f"{mode}, auth {'on' if settings.tokens_file else 'off'}"


def pin_native_threads() -> None:
    """One BLAS and one OpenMP thread per process (process-wide).

    Parallelism comes from concurrent requests (FAISS releases the GIL) and from batching
    users in the writer; native threads inside one call only spin against the gRPC
    threads on a 2-core machine. (OpenMP's setting is per thread: the gRPC pool threads
    set their own as they start.)
    """
    faiss.omp_set_num_threads(1)
    threadpool_limits(1, "blas")


def configure_logging() -> None:
    """The services' log format: time, logger, message, on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def stop_requested() -> threading.Event:
    """An event set by SIGTERM or SIGINT (the process's cue to drain and exit)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def run(name: str, log: logging.Logger, settings: S, open_deps: Callable[[S], D],
        create_server: Callable[[S, D], tuple[Service | AioService, int]],
        worker: int | None = None) -> int:
    """The life of one server process: 0 after a clean stop, 2 if it cannot start."""
    configure_logging()
    pin_native_threads()
    try:
        deps = open_deps(settings)
    except FailedPrecondition as exc:
        log.error("cannot start: %s", exc)
        return 2
    service, port = create_server(settings, deps)
    if settings.metrics_port:
        deps.metrics.serve(settings.metrics_port + (worker or 0), settings.host)
    worker_of = "" if worker is None else f"worker {worker}, "
    log.info("%s on %s:%d (%s%s; model %s)", name, settings.host, port, worker_of,
             service.mode, deps.model_version)
    stop = stop_requested()
    while not stop.wait(0.5):  # (a bare wait misses a signal another thread received)
        pass
    who = name if worker is None else f"{name} worker {worker}"
    log.info("%s: shutting down, draining calls in flight", who)
    service.stop(settings.grace_s)
    log.info("%s: stopped cleanly", who)
    return 0
