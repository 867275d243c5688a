"""One place that turns domain exceptions into gRPC status codes (never UNKNOWN)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger("freshrec.rpc")


class BadRequest(ValueError):
    """The request as a whole is invalid (INVALID_ARGUMENT)."""


# Exceptions shared by both services; a servicer adds its own in `error_codes`.
COMMON: dict[type[BaseException], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(exc: BaseException, table: dict[type[BaseException], grpc.StatusCode]
               ) -> grpc.StatusCode | None:
    """The status of the nearest class of `exc` in the table, or None."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return None


def _abort(servicer: Any, context: grpc.ServicerContext, exc: Exception) -> None:
    code = status_for(exc, {**COMMON, **getattr(servicer, "error_codes", {})})
    if code is None:
        log.exception("unexpected error")
        code = grpc.StatusCode.UNAVAILABLE  # retryable, and nothing was acknowledged
    context.abort(code, str(exc) or type(exc).__name__)


def mapped_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary or response-streaming handler so domain errors become status codes."""
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from handler(self, request, context)
            except Exception as exc:
                _abort(self, context, exc)
        return stream

    @functools.wraps(handler)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except Exception as exc:
            _abort(self, context, exc)
    return unary


def remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when it has none (grpc says ~forever)."""
    left = context.time_remaining()
    return None if left is None or left > 86_400 else max(left, 0.0)
