"""The public gRPC front end (``accordion.v1.LLMService``) on ``grpc.aio``, around an injected :class:`EngineClient`.

Build and run::

    server = build_server(engine, GrpcServeConfig(host="127.0.0.1", port=50051))
    await server.start()
    install_signal_handlers(server)          # SIGTERM/SIGINT -> drain
    await server.wait_for_termination()

Status codes (docs/reliability.md section 2): bad field or prompt too long -> INVALID_ARGUMENT (message names the
field); unknown model -> NOT_FOUND; queue full -> RESOURCE_EXHAUSTED with trailer ``retry-after-ms``; not ready or
draining -> UNAVAILABLE; duplicate in-flight request id -> ALREADY_EXISTS; missing/wrong key -> UNAUTHENTICATED;
anything else -> INTERNAL naming the request id (logged with its traceback). A request that fails to parse (for
example invalid UTF-8 in a string field) is INVALID_ARGUMENT, not the library's INTERNAL: the request deserializers
never raise and the handlers reject the marker they return instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from accordion.cluster.auth import ApiKeyInterceptor, check_bind_policy, server_credentials
from accordion.cluster.engine_client import EngineClient
from accordion.cluster.grpc_servicer import LLMServicer, method_handlers
from accordion.cluster.metrics import ServerMetrics
from accordion.protos import llm_service_pb2 as pb

log = logging.getLogger("accordion.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMService"].full_name  # "accordion.v1.LLMService"
MiB = 1 << 20


@dataclass
class GrpcServeConfig:
    """Settings of the public gRPC server. Times are seconds, sizes bytes."""

    host: str = "127.0.0.1"
    """Address to bind. A non-loopback address requires ``api_key`` (the server refuses to start otherwise)."""
    port: int = 50051
    """Port to bind; 0 picks a free one (read it back from ``GrpcServer.port``)."""
    api_key: str | None = None
    """If set, every RPC except health and reflection needs ``authorization: Bearer <api_key>``."""
    tls_cert: str | Path | None = None
    """PEM certificate chain; with ``tls_key`` turns TLS on. Without TLS a non-loopback bind logs a warning."""
    tls_key: str | Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: str | Path | None = None
    """PEM CA bundle; if set, clients must present a certificate it signed (mTLS). Needs ``tls_cert``/``tls_key``."""
    metrics_port: int | None = None
    """Prometheus scrape port on ``host`` (0 picks a free one); None disables the endpoint."""
    metrics_refresh_s: float = 1.0
    """How often the load gauges are refreshed from ``engine.server_info()``."""
    max_message_bytes: int = 4 * MiB
    """Largest request message accepted (RESOURCE_EXHAUSTED above it)."""
    max_send_message_bytes: int = 64 * MiB
    """Largest response message sent (a unary Generate with long, logprob-heavy outputs can be big)."""
    max_metadata_bytes: int = 16 * 1024
    """Largest request metadata (headers) accepted."""
    max_concurrent_rpcs: int | None = None
    """Hard cap on concurrent RPCs (the library answers RESOURCE_EXHAUSTED above it); None means no cap."""
    keepalive_time_s: float = 60.0
    """Server pings an idle connection this often."""
    keepalive_timeout_s: float = 20.0
    """...and closes it if the ping is not answered in this time."""
    min_client_ping_interval_s: float = 10.0
    """Clients may ping at most this often (``accordion.client`` pings every 30 s); faster pings get GOAWAY."""
    drain_grace_s: float = 30.0
    """Default grace period of :meth:`GrpcServer.drain` (in-flight requests get this long to finish)."""
    readiness_poll_s: float = 0.5
    """How often readiness (``engine.is_ready()``) is mirrored into the health service."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.max_message_bytes <= 0 or self.max_metadata_bytes <= 0:
            raise ValueError("max_message_bytes and max_metadata_bytes must be positive")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class GrpcServer:
    """A running (or ready to run) gRPC front end. Create with :func:`build_server`; methods run on one loop."""

    def __init__(self, engine: EngineClient, cfg: GrpcServeConfig, metrics: ServerMetrics | None = None):
        check_bind_policy(cfg.host, cfg.api_key, cfg.tls)
        self.engine = engine
        self.cfg = cfg
        self.metrics = metrics or ServerMetrics()
        self.servicer = LLMServicer(engine, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http = None
        self._tasks: list[asyncio.Task] = []
        self._drain_task: asyncio.Task | None = None
        self._stopped: asyncio.Event | None = None  # created on the serving loop in start()

    def _options(self) -> list[tuple[str, int]]:
        c = self.cfg
        return [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_send_message_bytes),
            ("grpc.max_metadata_size", c.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", c.max_metadata_bytes),
            ("grpc.keepalive_time_ms", int(c.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(c.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(c.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ]

    @property
    def address(self) -> str:
        h = self.cfg.host
        return f"[{h}]:{self.port}" if ":" in h and not h.startswith("[") else f"{h}:{self.port}"

    @property
    def draining(self) -> bool:
        return self.servicer.draining

    async def start(self) -> None:
        cfg = self.cfg
        self._stopped = asyncio.Event()
        interceptors = [ApiKeyInterceptor(cfg.api_key)] if cfg.api_key else []
        server = grpc.aio.server(
            interceptors=interceptors, options=self._options(), maximum_concurrent_rpcs=cfg.max_concurrent_rpcs
        )
        handlers = grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(self.servicer))
        server.add_generic_rpc_handlers((handlers,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
        addr = f"{host}:{cfg.port}"
        try:
            if cfg.tls:
                port = server.add_secure_port(addr, server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
            else:
                port = server.add_insecure_port(addr)
        except RuntimeError as e:
            raise OSError(f"could not bind gRPC server to {addr}: {e}") from e
        if not port:
            raise OSError(f"could not bind gRPC server to {addr}")
        self.port = port
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness
        await self._update_readiness()
        await server.start()
        if cfg.metrics_port is not None:
            self._http, self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.host.strip("[]"))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._readiness_loop()), loop.create_task(self._metrics_loop())]
        log.info(
            "gRPC server listening on %s (tls=%s, mtls=%s, auth=%s, metrics_port=%s)",
            self.address, cfg.tls, cfg.tls_client_ca is not None, bool(cfg.api_key), self.metrics_port,
        )

    async def _update_readiness(self) -> None:
        if self.servicer.draining:
            return
        try:
            ready = bool(self.engine.is_ready())
        except Exception:
            log.exception("engine.is_ready() failed")
            ready = False
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(SERVICE_NAME, status)

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.readiness_poll_s)
            await self._update_readiness()

    async def _metrics_loop(self) -> None:
        while True:
            try:
                self.metrics.refresh(await self.engine.server_info())
            except Exception as e:  # a metrics hiccup must never take the server down
                log.debug("server_info() for metrics failed: %s", e)
            await asyncio.sleep(self.cfg.metrics_refresh_s)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking work: health NOT_SERVING now, new Generate RPCs UNAVAILABLE, in-flight requests get
        ``grace_s`` (default ``cfg.drain_grace_s``) to finish, then the server stops (cancelling what is left)."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(grace_s))
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace_s: float | None) -> None:
        grace = self.cfg.drain_grace_s if grace_s is None else grace_s
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        n = self.servicer.num_inflight
        log.info("draining: %d request(s) in flight, grace %.1fs", n, grace)
        try:
            await asyncio.wait_for(self.servicer.wait_idle(), timeout=grace)
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("drain grace %.1fs expired with %d request(s) in flight; cancelling them",
                        grace, self.servicer.num_inflight)
        await self.stop(grace=0.5)

    async def stop(self, grace: float | None = None) -> None:
        """Stop now: in-flight RPCs get ``grace`` seconds, then are cancelled (which aborts them in the engine)."""
        self.servicer.draining = True
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._stopped is not None:
            self._stopped.set()

    async def wait_for_termination(self) -> None:
        if self._server is None:
            raise RuntimeError("server not started")
        await self._server.wait_for_termination()
        if self._stopped is not None:
            await self._stopped.wait()


def build_server(engine: EngineClient, cfg: GrpcServeConfig | None = None, *, metrics: ServerMetrics | None = None
                 ) -> GrpcServer:
    """Create (not start) the gRPC server. Raises :class:`~accordion.cluster.auth.InsecureBindError` for a
    non-loopback ``host`` without ``api_key``."""
    return GrpcServer(engine, cfg or GrpcServeConfig(), metrics)


def install_signal_handlers(server: GrpcServer, loop: asyncio.AbstractEventLoop | None = None,
                            grace_s: float | None = None,
                            signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """On SIGTERM/SIGINT, drain ``server`` (a second signal stops it at once). Call from the serving loop."""
    loop = loop or asyncio.get_running_loop()
    state = {"count": 0}

    def on_signal(signum: int) -> None:
        state["count"] += 1
        if state["count"] == 1:
            log.info("received %s: draining (grace %s s)", signal.Signals(signum).name,
                     server.cfg.drain_grace_s if grace_s is None else grace_s)
            loop.create_task(server.drain(grace_s))
        else:
            log.warning("received %s again: stopping now", signal.Signals(signum).name)
            loop.create_task(server.stop(0))

    for s in signals:
        loop.add_signal_handler(s, on_signal, s)


async def serve(engine: EngineClient, cfg: GrpcServeConfig) -> None:
    """Entry point for the CLI: start, hook SIGTERM/SIGINT to a drain, run until stopped."""
    server = build_server(engine, cfg)
    await server.start()
    install_signal_handlers(server)
    await server.wait_for_termination()
