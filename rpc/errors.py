"""The one error boundary of both servers: domain errors to status codes, never UNKNOWN.

`STATUS` maps the categories of `index.errors` (and the few built-ins the handlers rely
on) to codes. `ErrorBoundary` wraps every handler of a server: a mapped error aborts
with its code and its message, scrubbed of the server's paths; anything else is a bug,
logged with its traceback and answered INTERNAL with a generic message (not UNAVAILABLE,
which tells clients to retry a deterministic failure forever).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from index.errors import Exhausted, FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = logging.getLogger("freshrec.rpc")

STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,  # a wait ran into the call's deadline
}
INTERNAL_MESSAGE = "internal error (the server logged it)"
REDACTED = "<data-dir>"


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status of the nearest class of `exc` in the table, or None (a bug)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


class ErrorBoundary(grpc.ServerInterceptor):
    """Wraps each handler once (cached per method) so its errors become status codes."""

    def __init__(self, private_paths: Sequence[Path] = ()) -> None:
        # Longest first, so a resolved path is replaced before a prefix of it.
        roots = {str(p) for path in private_paths for p in (path, path.resolve())}
        self._roots = sorted(roots, key=len, reverse=True)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def scrub(self, message: str) -> str:
        """The message without the server's paths."""
        for root in self._roots:
            message = message.replace(root, REDACTED)
        return message

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler))
            self._wrapped[details.method] = cached
        return cached[1]

    def _status(self, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """The status a handler's error is answered with (a bug: INTERNAL, logged)."""
        code = status_for(exc)
        if code is None:
            log.exception("unexpected error")
            return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
        return code, self.scrub(str(exc)) or type(exc).__name__

    def _abort(self, context: grpc.ServicerContext, exc: Exception) -> None:
        if context.code() is not None:  # the handler aborted itself: its status stands
            raise exc
        context.abort(*self._status(exc))

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviour = behaviour_of(handler)
        if on_asyncio(handler):
            if handler.response_streaming:
                return handler  # the asyncio server's own streams (health, reflection)
            return like(handler, self._async_unary(behaviour))
        wrap = self._streaming if handler.response_streaming else self._unary
        return like(handler, wrap(behaviour))

    def _unary(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(request, context)
            except Exception as exc:
                self._abort(context, exc)
        return call

    def _async_unary(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise  # the handler aborted itself: its status stands
            except Exception as exc:
                await context.abort(*self._status(exc))
        return call

    def _streaming(self, behaviour: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behaviour(request, context)
            except Exception as exc:
                self._abort(context, exc)
        return call


_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Aio(grpc.aio.ServerInterceptor):
    """A (sync) interceptor of this package on the asyncio server: it transforms the
    handler the same way, and wraps coroutine handlers with coroutines."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        return self.inner.intercept_service(lambda _: handler, details)


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function a handler runs."""
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def on_asyncio(handler: grpc.RpcMethodHandler) -> bool:
    """Whether a handler is the asyncio server's (a coroutine or async generator)."""
    behaviour = behaviour_of(handler)
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def like(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler` that runs `behaviour`."""
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behaviour, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when it has none (grpc says ~forever)."""
    left = context.time_remaining()
    return None if left is None or left > 86_400 else max(left, 0.0)
