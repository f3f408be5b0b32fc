"""Arrival schedules: vLLM's Gamma process (``vllm bench serve`` ``get_request``) or trace timestamps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def gamma_arrivals(n: int, rate: float, burstiness: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Send offsets (seconds from the start) for ``n`` requests, as ``vllm bench serve`` computes them.

    Each gap ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)) (burstiness 1 = Poisson; <1 burstier, >1 more
    regular; ``inf`` = constant 1/rate), the first request included. Offsets are the cumulative sum, then
    rescaled so the last request is sent at exactly ``n/rate`` (vLLM: closes the 1-2 % gap between seeds).
    ``rate=inf`` sends everything at t=0.
    """
    if n <= 0:
        return np.zeros(0)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    delays = np.cumsum(gaps)
    if delays[-1] != 0:
        delays *= (n / rate) / delays[-1]
    return delays


def trace_arrivals(offsets_s: Sequence[float | None], time_scale: float = 1.0) -> np.ndarray:
    """Trace timestamps shifted so the first request is at 0 and divided by ``time_scale`` (2 = twice as fast)."""
    if any(o is None for o in offsets_s):
        raise ValueError("this workload has no arrival timestamps")
    t = np.asarray(offsets_s, dtype=float)
    if len(t) > 1 and np.any(np.diff(t) < 0):
        raise ValueError("trace timestamps go backwards (more prompts than trace rows?)")
    return (t - t.min()) / time_scale if len(t) else t


def parse_rates(text: str) -> list[float]:
    """``"1,2,4,inf"`` -> [1.0, 2.0, 4.0, inf]."""
    rates = [float(x) for x in text.replace(" ", "").split(",") if x]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"request rates must be > 0 (or inf): {text!r}")
    return rates
