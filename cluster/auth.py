"""Front-door security for the gRPC server: API-key interceptor, TLS credentials, bind-address policy.

Policy (reliability.md section 3):

* ``authorization: Bearer <key>`` is checked in a server interceptor with :func:`hmac.compare_digest` on exact
  bytes. Health checks and server reflection need no key (health reveals nothing but a serving status).
* A server bound to a non-loopback address refuses to start without an API key, and logs a warning without TLS.
* TLS from a cert and key file; mTLS when a client CA is given (``require_client_auth=True``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from pathlib import Path

import grpc

log = logging.getLogger("accordion.grpc")

# Methods reachable without an API key: liveness/readiness probes and schema discovery.
UNAUTHENTICATED_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class InsecureBindError(ValueError):
    """Refusing to listen on a non-loopback address without an API key."""


def is_loopback_host(host: str) -> bool:
    """True when ``host`` only ever means this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:  # a host name: loopback only if every address it resolves to is
        infos = socket.getaddrinfo(h, None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_bind_policy(host: str, api_key: str | None, tls: bool) -> None:
    """Raise :class:`InsecureBindError` for a non-loopback bind without a key; warn without TLS."""
    if is_loopback_host(host):
        return
    if not api_key:
        raise InsecureBindError(
            f"refusing to serve on non-loopback address {host!r} without an API key: set api_key "
            "(clients send 'authorization: Bearer <key>'), or bind 127.0.0.1"
        )
    if not tls:
        log.warning(
            "serving on non-loopback address %r without TLS: the API key and all prompts travel in clear text; "
            "set tls_cert and tls_key",
            host,
        )


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca`` every client must present a certificate signed by it (mTLS)."""
    cert_chain = Path(cert).read_bytes()
    private_key = Path(key).read_bytes()
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials(
        [(private_key, cert_chain)], root_certificates=root, require_client_auth=root is not None
    )


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts."""

    async def unary(request, context):
        await context.abort(code, details)

    async def stream(request, context):
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, des, ser)
    return grpc.unary_unary_rpc_method_handler(unary, des, ser)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <api_key>`` with UNAUTHENTICATED (constant-time compare)."""

    def __init__(self, api_key: str, exempt_prefixes: tuple[str, ...] = UNAUTHENTICATED_PREFIXES):
        if not api_key:
            raise ValueError("api_key must be non-empty")
        self._expected = b"Bearer " + api_key.encode("utf-8")
        self._exempt = exempt_prefixes

    def _authorized(self, metadata) -> bool:
        ok = False
        for k, v in metadata or ():
            if k == "authorization":
                got = v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape")
                # Compare every authorization header; no early exit on the first mismatch.
                ok = hmac.compare_digest(got, self._expected) or ok
        return ok

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
