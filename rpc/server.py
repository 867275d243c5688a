"""Building a gRPC server the same way for both services: limits, health, reflection."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def new_server(max_workers: int, max_concurrent_rpcs: int, max_message_bytes: int,
               reuse_port: bool = False) -> grpc.Server:
    """A sync server with explicit message limits and a bound on concurrent RPCs.

    Past `max_concurrent_rpcs` new calls get RESOURCE_EXHAUSTED at once instead of
    queueing behind a full thread pool.
    """
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="freshrec-rpc"),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.so_reuseport", 1 if reuse_port else 0)])


def add_health_and_reflection(server: grpc.Server, services: Sequence[str],
                              with_reflection: bool = True) -> health.HealthServicer:
    """Register health (NOT_SERVING until `set_serving`) and server reflection."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if with_reflection:
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return servicer


def set_serving(servicer: health.HealthServicer, services: Sequence[str]) -> None:
    """Report SERVING for the server and each service."""
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
