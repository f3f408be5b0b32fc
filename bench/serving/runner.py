"""The replay loop (``vllm bench serve``'s ``benchmark``), rate sweeps and the SLO capacity search."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .arrivals import gamma_arrivals, trace_arrivals
from .backend import Backend
from .metrics import compute_metrics, pct_key
from .records import RequestRecord, SampleRequest


@dataclass
class RunSettings:
    """How one benchmark point sends its requests and what it reports."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    use_trace_timestamps: bool = False
    trace_time_scale: float = 1.0
    seed: int = 0
    num_warmups: int = 0
    percentiles: tuple[float, ...] = (99.0,)
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    save_detailed: bool = False


def send_offsets(requests: Sequence[SampleRequest], s: RunSettings) -> np.ndarray:
    """Trace timestamps (``use_trace_timestamps``) or vLLM's Gamma schedule, seeded by ``s.seed``."""
    if s.use_trace_timestamps:
        return trace_arrivals([r.arrival_s for r in requests], s.trace_time_scale)
    return gamma_arrivals(len(requests), s.request_rate, s.burstiness, np.random.default_rng(s.seed))


async def run_once(
    backend: Backend,
    requests: Sequence[SampleRequest],
    offsets: Sequence[float] | np.ndarray,
    max_concurrency: int | None = None,
    tag: str = "",
) -> tuple[list[RequestRecord], float, float]:
    """Send ``requests[i]`` at ``offsets[i]`` s after the start (at most ``max_concurrency`` in flight; the rest
    wait, so the achieved rate can fall below the schedule). Returns (records, duration s, start perf_counter)."""
    sem: Any = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

    async def one(req: SampleRequest) -> RequestRecord:
        async with sem:
            return await backend.stream_request(req.prompt_token_ids.tolist(), req.output_len, req.request_id + tag)

    t0 = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for req, off in zip(requests, offsets):
        wait = t0 + float(off) - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(req)))
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - t0, t0


async def benchmark_point(
    backend: Backend, requests: Sequence[SampleRequest], s: RunSettings, tag: str = ""
) -> dict[str, Any]:
    """Warm up, replay ``requests`` once under ``s``, and return settings + metrics (+ records if detailed)."""
    for i in range(s.num_warmups):
        w = requests[0]
        await backend.stream_request(w.prompt_token_ids.tolist(), w.output_len, f"warmup-{i}{tag}")
    records, duration, t0 = await run_once(backend, requests, send_offsets(requests, s), s.max_concurrency, tag)
    point: dict[str, Any] = {
        "request_rate": None if s.use_trace_timestamps else s.request_rate,
        "burstiness": s.burstiness,
        "max_concurrency": s.max_concurrency,
        "use_trace_timestamps": s.use_trace_timestamps,
        **compute_metrics(records, duration, s.percentiles, s.goodput_slos_ms),
    }
    if s.save_detailed:
        point["requests"] = [r.as_dict(t0) for r in records]
    return point


async def sweep(
    backend: Backend,
    requests: Sequence[SampleRequest],
    rates: Sequence[float],
    s: RunSettings,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One point per rate (or one trace-timed point), same requests each time, request ids made unique per point."""
    points = []
    for i, rate in enumerate([math.inf] if s.use_trace_timestamps else rates):
        s_i = RunSettings(**{**asdict(s), "request_rate": rate})
        points.append(await benchmark_point(backend, requests, s_i, tag=f"-p{i}-{int(time.time())}"))
        if on_point:
            on_point(points[-1])
    return points


def meets_capacity_slo(
    m: Mapping[str, Any], slo_ms: Mapping[str, float], percentile: float = 99.0, max_failed_frac: float = 0.0
) -> bool:
    """p``percentile`` TTFT and TPOT within ``slo_ms['ttft']``/``['tpot']`` and few enough failed requests."""
    p = pct_key(percentile)
    if m.get("failed", 0) > max_failed_frac * max(m.get("num_requests", 0), 1):
        return False
    return all(m[f"{p}_{k}_ms"] <= v for k, v in slo_ms.items() if k in ("ttft", "tpot"))


def _bisect(lo: float, hi: float, iters: int) -> Generator[float, bool, float | None]:
    """Yields rates to probe, receives whether each met the SLOs, returns the highest passing rate (or None)."""
    if not (yield lo):
        return None
    if (yield hi):
        return hi
    best = lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (yield mid):
            lo = best = mid
        else:
            hi = mid
    return best


def find_max_rate(
    run_fn: Callable[[float], Mapping[str, Any]],
    slo: Mapping[str, float],
    lo: float,
    hi: float,
    iters: int = 6,
    percentile: float = 99.0,
    max_failed_frac: float = 0.0,
) -> dict[str, Any]:
    """Binary search for the highest request rate in [lo, hi] whose run meets the p99 TTFT and TPOT SLOs (ms).

    ``run_fn(rate)`` runs one benchmark point and returns its metrics. ``lo`` is tried first (``max_rate`` None
    if even it fails), then ``hi`` (returned if it passes), then ``iters`` bisections; assumes latency grows with
    rate. Returns ``{"max_rate", "slo", "percentile", "probes": [{"rate", "ok", "metrics"}, ...]}``.
    """
    probes: list[dict[str, Any]] = []
    search = _bisect(lo, hi, iters)
    try:
        rate = next(search)
        while True:
            m = run_fn(rate)
            ok = meets_capacity_slo(m, slo, percentile, max_failed_frac)
            probes.append({"rate": rate, "ok": ok, "metrics": dict(m)})
            rate = search.send(ok)
    except StopIteration as stop:
        return {"max_rate": stop.value, "slo": dict(slo), "percentile": percentile, "probes": probes}


async def find_max_rate_async(
    run_fn: Callable[[float], Awaitable[Mapping[str, Any]]],
    slo: Mapping[str, float],
    lo: float,
    hi: float,
    iters: int = 6,
    percentile: float = 99.0,
    max_failed_frac: float = 0.0,
) -> dict[str, Any]:
    """:func:`find_max_rate` for an async ``run_fn`` (e.g. :func:`benchmark_point` on a live backend)."""
    probes: list[dict[str, Any]] = []
    search = _bisect(lo, hi, iters)
    try:
        rate = next(search)
        while True:
            m = await run_fn(rate)
            ok = meets_capacity_slo(m, slo, percentile, max_failed_frac)
            probes.append({"rate": rate, "ok": ok, "metrics": dict(m)})
            rate = search.send(ok)
    except StopIteration as stop:
        return {"max_rate": stop.value, "slo": dict(slo), "percentile": percentile, "probes": probes}
