"""How both clients reach the server: TLS and channel options (:class:`TLSConfig`, keepalive), the API key's
metadata, per-call deadlines and the retry policy (UNAVAILABLE only, exponential backoff with full jitter), in
:class:`_Base`."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["KEEPALIVE_OPTIONS", "TLSConfig"]

# Paired with the server's settings: it accepts pings every 10 s or slower; we ping every 30 s while calls are open.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class TLSConfig:
    """TLS settings; all paths are PEM files. ``ca_cert`` None means the system roots."""

    ca_cert: str | Path | None = None
    client_cert: str | Path | None = None
    """With ``client_key``: present this certificate (mTLS)."""
    client_key: str | Path | None = None
    server_name: str | None = None
    """Override the name checked against the server certificate (tests, IP targets)."""

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert), private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


def _channel_args(tls, max_receive_bytes: int) -> tuple[grpc.ChannelCredentials | None, list]:
    options = [*KEEPALIVE_OPTIONS, ("grpc.max_receive_message_length", max_receive_bytes)]
    if tls is None or tls is False:
        return None, options
    if tls is True:
        return grpc.ssl_channel_credentials(), options
    if isinstance(tls, Mapping):
        tls = TLSConfig(**tls)
    if not isinstance(tls, TLSConfig):
        raise TypeError(f"tls must be a bool, a TLSConfig or a dict of its fields, got {type(tls).__name__}")
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return tls.credentials(), options



def _backoff(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(maximum, initial * (2**attempt)))


class _Base:
    """What :class:`~accordion.client.client.Client` and its asyncio twin share: channel credentials and
    options, the API key's metadata, per-call deadlines and when (and after how long) to retry."""

    def __init__(self, target: str, api_key: str | None, tls, timeout: float | None, max_retries: int,
                 initial_backoff_s: float, max_backoff_s: float, max_receive_bytes: int):
        self.target = target
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._creds, self._options = _channel_args(tls, max_receive_bytes)

    def _deadline(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _retry_delay(self, e: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if attempt >= self.max_retries or e.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        delay = _backoff(attempt, self.initial_backoff_s, self.max_backoff_s)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay
