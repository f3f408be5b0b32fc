"""Plain data passed between the workload generators, the replay loop, the backend and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np


@dataclass(slots=True)
class SampleRequest:
    """One request of a workload: the prompt (token ids), the wanted output length, an optional trace arrival."""

    request_id: str
    prompt_token_ids: np.ndarray
    """int64 token ids; kept as an array (long prompts are cheap) and turned into a list only when sent."""
    output_len: int
    arrival_s: float | None = None
    """Offset from the start of the run taken from the trace (used with ``--use-trace-timestamps``)."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw for one request. Times are ``time.perf_counter()`` seconds.

    Only chunks that carry at least one token are recorded: empty chunks (e.g. a final usage-only or
    finish-only message) would otherwise add a near-zero gap to ITL and move E2EL past the last token.
    """

    request_id: str
    prompt_len: int
    expected_output_len: int
    send_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    """From the server's usage (0 when the server did not report it)."""
    completion_tokens: int = 0
    """From the server's usage (0 when the server did not report it)."""
    finish_reason: str | None = None
    status: str = "OK"
    """``OK`` or the failure's name: a gRPC status code name (``RESOURCE_EXHAUSTED``, ...) or an exception type."""
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.status == "OK"

    @property
    def output_tokens(self) -> int:
        """Server usage when reported, else the count of streamed token ids."""
        return self.completion_tokens or sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time if self.chunk_times else 0.0

    @property
    def e2el(self) -> float:
        """Send to the last token-carrying chunk (vLLM's ``latency``)."""
        return self.chunk_times[-1] - self.send_time if self.chunk_times else 0.0

    @property
    def itl(self) -> list[float]:
        """Gaps between successive token-carrying chunks."""
        t = self.chunk_times
        return [b - a for a, b in pairwise(t)]

    def as_dict(self, t0: float = 0.0) -> dict[str, Any]:
        """JSON-friendly form with times relative to ``t0`` (the run's start)."""
        return {
            "request_id": self.request_id,
            "prompt_len": self.prompt_len,
            "expected_output_len": self.expected_output_len,
            "send_s": self.send_time - t0,
            "chunk_s": [t - t0 for t in self.chunk_times],
            "chunk_tokens": self.chunk_tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "status": self.status,
            "error": self.error,
        }
