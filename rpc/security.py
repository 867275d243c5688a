"""Transport security and caller authorisation: TLS/mTLS credentials, bearer-token roles.

With a tokens file, every call needs `authorization: Bearer <token>` metadata whose role
the RPC's policy allows; an RPC missing from the policy is denied (deny by default).
Health checks stay open so orchestrators can probe. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import grpc

from rpc.errors import like, on_asyncio

# A role may call what it names and what the roles after it may call.
ROLES = {"admin": {"admin", "ingest", "viewer"}, "ingest": {"ingest", "viewer"},
         "viewer": {"viewer"}}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_METHODS = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")


def load_tokens(path: Path) -> list[tuple[bytes, str]]:
    """Parse '<role> <token>' lines (# comments); ValueError naming the line if bad."""
    tokens = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES or len(parts[1]) < 16:
            raise ValueError(f"{path} line {number}: expected '<role> <token>' with a role in "
                             f"{sorted(ROLES)} and a token of 16+ characters")
        tokens.append((parts[1].encode(), parts[0]))
    return tokens


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
          message: str) -> grpc.RpcMethodHandler:
    if on_asyncio(handler):
        async def abort_async(_: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        return like(handler, abort_async)

    def abort(_: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    return like(handler, abort)


class TokenAuth(grpc.ServerInterceptor):
    """Checks each call's bearer token against a per-RPC role policy."""

    def __init__(self, tokens: list[tuple[bytes, str]], policy: dict[str, str]) -> None:
        self.tokens, self.policy = tokens, policy

    def _role(self, metadata: Any) -> str | None:
        presented = b""
        for key, value in metadata or ():
            if key == "authorization" and value.startswith("Bearer "):
                presented = value[len("Bearer "):].encode()
        role = None
        for token, token_role in self.tokens:  # no early exit: time does not leak a match
            if hmac.compare_digest(token, presented):
                role = token_role
        return role

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        role = self._role(details.invocation_metadata)
        if role is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token")
        needed = self.policy.get(details.method)
        if needed is None or needed not in ROLES[role]:
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                         f"role {role!r} may not call {details.method}")
        return handler


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, clients must present a certificate it signed."""
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)
