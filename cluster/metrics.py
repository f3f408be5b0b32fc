"""Prometheus metrics of the gRPC front end, in a registry of their own (no module globals).

Latency histograms and token/request counters are recorded per request by the servicer; the load gauges
(running/waiting requests, KV usage, preemptions) are refreshed from ``engine.server_info()`` by a periodic task
(:meth:`ServerMetrics.refresh`), since the scrape thread cannot await the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from accordion.cluster.engine_client import ServerInfo

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    """All metrics of one server. Names are prefixed ``accordion_``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "accordion_time_to_first_token_seconds", "Arrival to first token, per request.", registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "accordion_time_per_output_token_seconds",
            "Per request (e2e - ttft) / (output tokens - 1); requests with one token are not observed.",
            registry=r, buckets=_TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            "accordion_e2e_request_latency_seconds", "Arrival to last token, per request.", registry=r,
            buckets=_E2E_BUCKETS,
        )
        self.prompt_tokens = Counter("accordion_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("accordion_generation_tokens", "Generated tokens.", registry=r)
        self.requests = Counter(
            "accordion_requests_finished", "Finished requests by finish reason (stop/length/abort/error).",
            ["finish_reason"], registry=r,
        )
        self.rejected = Counter(
            "accordion_requests_rejected", "Requests rejected before generation, by gRPC status code.", ["code"],
            registry=r,
        )
        self.aborts = Counter(
            "accordion_aborts", "Requests aborted, by source (cancel: client cancel or deadline; rpc: Abort RPC).",
            ["source"], registry=r,
        )
        self.running = Gauge("accordion_num_requests_running", "Requests running in the engine.", registry=r)
        self.waiting = Gauge("accordion_num_requests_waiting", "Requests waiting in the engine.", registry=r)
        self.kv_usage = Gauge("accordion_kv_cache_usage_ratio", "Fraction of KV blocks in use (0..1).", registry=r)
        self.preemptions = Gauge("accordion_num_preemptions", "Preemptions since start (engine total).", registry=r)
        self.inflight = Gauge("accordion_grpc_inflight_requests", "Generate RPCs in flight in this server.", registry=r)

    def refresh(self, info: ServerInfo) -> None:
        self.running.set(info.num_running)
        self.waiting.set(info.num_waiting)
        self.kv_usage.set(info.kv_usage)
        self.preemptions.set(info.num_preemptions)

    def serve_http(self, port: int, addr: str) -> tuple[object, int]:
        """Start the scrape endpoint in a daemon thread; returns (http server, bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, server.server_port


@dataclass
class RequestTimer:
    """Per-request latency bookkeeping on the front end (monotonic clock)."""

    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0

    def on_tokens(self, n: int) -> None:
        if n and self.first_token is None:
            self.first_token = time.monotonic()
        self.tokens += n

    def finish(self, metrics: ServerMetrics) -> None:
        end = time.monotonic()
        metrics.e2e.observe(end - self.start)
        if self.first_token is not None:
            ttft = self.first_token - self.start
            metrics.ttft.observe(ttft)
            if self.tokens > 1:
                metrics.tpot.observe((end - self.first_token) / (self.tokens - 1))
