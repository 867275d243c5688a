"""Building a gRPC server the same way for both services: limits, security, health."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rpc.security import REFLECTION_METHODS, TokenAuth, load_tokens, server_credentials
from rpc.settings import ServerSettings


def new_server(settings: ServerSettings, policy: dict[str, str],
               reuse_port: bool = False) -> grpc.Server:
    """A sync server with explicit message limits, a bound on concurrent RPCs, and auth.

    Past `max_concurrent_rpcs` new calls get RESOURCE_EXHAUSTED at once instead of
    queueing behind a full thread pool. `policy` maps full method names to roles.
    """
    settings.check_security()
    interceptors = []
    if settings.tokens_file:
        policy = {**policy, **dict.fromkeys(REFLECTION_METHODS, "viewer")}
        interceptors.append(TokenAuth(load_tokens(Path(settings.tokens_file)), policy))
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                   thread_name_prefix="freshrec-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", settings.max_message_bytes),
                 ("grpc.max_send_message_length", settings.max_message_bytes),
                 ("grpc.so_reuseport", 1 if reuse_port else 0)])


def bind(server: grpc.Server, settings: ServerSettings) -> tuple[int, str]:
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


def add_health_and_reflection(server: grpc.Server, services: Sequence[str],
                              with_reflection: bool) -> health.HealthServicer:
    """Register health (NOT_SERVING until `set_serving`) and, if asked, server reflection."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if with_reflection:
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return servicer


def configure_logging() -> None:
    """The services' log format: time, logger, message, on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (the process's cue to drain and exit)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def set_serving(servicer: health.HealthServicer, services: Sequence[str]) -> None:
    """Report SERVING for the server and each service."""
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
