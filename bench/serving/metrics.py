"""Benchmark metrics with ``vllm bench serve``'s definitions (vllm/benchmarks/serve.py ``calculate_metrics``).

Over successful requests only:

* TTFT: send -> first token-carrying chunk. E2EL: send -> last token-carrying chunk.
* TPOT: per request with more than one output token, (E2EL - TTFT) / (output_tokens - 1).
* ITL: every gap between successive chunks, pooled over all requests (a chunk may carry several tokens).
* Output tokens come from the server's usage (the streamed id count only when usage is missing).
* Throughputs divide by the run's wall duration; total token throughput = (input + output) / duration.
* Goodput (DistServe): requests meeting every SLO given (``ttft``/``tpot``/``e2el`` in ms) / duration; a request
  with <= 1 output token has TPOT 0 for this check.
* ``max_concurrent_requests`` / ``max_output_tokens_per_s``: vLLM's one-second buckets (tokens counted per chunk's
  token count, where vLLM counts one per chunk). ``peak_concurrency`` is the exact in-flight maximum and
  ``mean_concurrency`` SGLang's sum(E2EL)/duration.

Empty lists report 0, as vLLM does (``np.mean(x or 0)``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .records import RequestRecord

SLO_KEYS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_slos(items: Iterable[str] | None) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or ():
        key, _, val = item.partition(":")
        key = key.strip().lower()
        if key not in SLO_KEYS or not val:
            raise ValueError(f"bad SLO {item!r}: expected one of {SLO_KEYS} as NAME:MS")
        if float(val) < 0:
            raise ValueError(f"SLO {item!r} must be >= 0 ms")
        out[key] = float(val)
    return out


def pct_key(p: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9" (vLLM's result keys)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def request_tpot(rec: RequestRecord) -> float | None:
    """(E2EL - TTFT)/(output_tokens - 1) in seconds, or None with <= 1 output token."""
    n = rec.output_tokens
    return (rec.e2el - rec.ttft) / (n - 1) if n > 1 else None


def meets_slos(rec: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """Whether one successful request meets every SLO (a <= 1-token output has TPOT 0 here, as in vLLM)."""
    values = {"ttft": rec.ttft, "tpot": request_tpot(rec) or 0.0, "e2el": rec.e2el}
    return all(values[k] * 1000.0 <= v for k, v in slos_ms.items())


def _summary(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    x = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000.0
    out = {
        f"mean_{name}_ms": float(np.mean(x)),
        f"median_{name}_ms": float(np.median(x)),
        f"std_{name}_ms": float(np.std(x)),
    }
    for p in percentiles:
        out[f"{pct_key(p)}_{name}_ms"] = float(np.percentile(x, p))
    return out


def _second_buckets(ok: Sequence[RequestRecord]) -> tuple[float, int]:
    """vLLM's max output tokens/s and max concurrent requests over one-second buckets."""
    if not ok:
        return 0.0, 0
    t0 = min(r.send_time for r in ok)
    nb = int(np.ceil(max(r.send_time + r.e2el for r in ok) - t0)) + 1
    toks, conc = np.zeros(nb), np.zeros(nb)
    for r in ok:
        for t, k in zip(r.chunk_times, r.chunk_tokens):
            b = int(t - t0)
            if 0 <= b < nb:
                toks[b] += k
        conc[int(r.send_time - t0) : int(r.send_time + r.e2el - t0) + 1] += 1
    return float(toks.max()), int(conc.max())


def peak_concurrency(recs: Sequence[RequestRecord]) -> int:
    """Exact maximum number of requests in flight (send -> last token), ends before starts at equal times."""
    events = sorted([(r.send_time, 1) for r in recs] + [(r.send_time + r.e2el, -1) for r in recs])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = (99,),
    goodput_slos_ms: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """All metrics of one run as a flat JSON-friendly dict (keys follow vLLM's result JSON)."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    dur = max(duration_s, 1e-9)
    total_in = sum(r.prompt_tokens or r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [t for t in (request_tpot(r) for r in ok) if t is not None]
    itls = [g for r in ok for g in r.itl]
    m: dict[str, Any] = {
        "duration": duration_s,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "failed_by_status": dict(Counter(r.status for r in failed)),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    if goodput_slos_ms:
        m["request_goodput"] = sum(meets_slos(r, goodput_slos_ms) for r in ok) / dur
        m["slo_attainment"] = sum(meets_slos(r, goodput_slos_ms) for r in ok) / max(len(records), 1)
    for name, vals in (("ttft", [r.ttft for r in ok]), ("tpot", tpots), ("itl", itls), ("e2el", [r.e2el for r in ok])):
        m.update(_summary(name, vals, percentiles))
    m["max_output_tokens_per_s"], m["max_concurrent_requests"] = _second_buckets(ok)
    m["peak_concurrency"] = peak_concurrency(ok)
    m["mean_concurrency"] = sum(r.e2el for r in ok) / dur
    return m
