"""Requests and their sampling parameters: the control plane's view of one generation.

Ownership: the front end (gRPC servicer or the offline ``LLM``) builds a :class:`Request` with validated
:class:`SamplingParams`; the :class:`~accordion.cluster.scheduler.Scheduler` owns its mutable state
(status, ``num_computed_tokens``, output tokens) from ``add_request`` until it finishes. This module imports
neither torch nor Ray, so requests travel between processes as plain data.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

# Front-door caps (reliability.md, "cap everything at the edge").
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_N = 16
MAX_LOGPROBS = 20


class RequestStatus(enum.IntEnum):
    """Where a request is in the scheduler. Ints, so the wire form stays small."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.IntEnum):
    """Why a request ended (mirrors ``accordion.v1.FinishReason``)."""

    STOP = 1
    LENGTH = 2
    ABORT = 3
    ERROR = 4

    def __str__(self) -> str:  # vLLM spells them in lower case: 'stop', 'length', ...
        return self.name.lower()


_STATUS_TO_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class RequestValidationError(ValueError):
    """A request field is invalid. ``field`` names it, so the gRPC layer can answer INVALID_ARGUMENT."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message

    def __reduce__(self):  # picklable (it crosses Ray), whatever the subclass
        return (type(self), (self.field, self.message))


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise RequestValidationError(field_name, message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop, in vLLM's shape. Validated on construction.

    ``temperature == 0`` means greedy. ``top_k`` of -1 or 0 disables top-k. ``seed`` makes one request's samples
    reproducible whatever else shares its batch.
    """

    n: int = 1
    """Number of completions for the prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """Multiplicative penalty (>1 discourages) on tokens already in the prompt or output (CTRL / HF style)."""
    frequency_penalty: float = 0.0
    """Additive penalty times each token's count in the output so far (OpenAI style)."""
    presence_penalty: float = 0.0
    """Additive penalty on every token present in the output so far (OpenAI style)."""
    seed: int | None = None
    max_tokens: int | None = 16
    """Upper bound on generated tokens; None means up to the context length."""
    min_tokens: int = 0
    """EOS, stop token ids and stop strings are ignored until this many tokens exist."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Return this many top log-probabilities (plus the sampled token's) per generated token."""
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}], got {self.n}")
        _check(_finite(self.temperature), "temperature", f"must be a finite number, got {self.temperature}")
        _check(self.temperature >= 0, "temperature", f"must be non-negative, got {self.temperature}")
        _check(self.temperature <= 100, "temperature", f"must be at most 100, got {self.temperature}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", f"must be -1 (off) or >= 0, got {self.top_k}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(
            _finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
            "repetition_penalty",
            f"must be in (0, 10], got {self.repetition_penalty}",
        )
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            _check(_finite(v) and -2 <= v <= 2, name, f"must be in [-2, 2], got {v}")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", f"must be in [0, 2^63), got {self.seed}")
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
                   f"must be at least 1, got {self.max_tokens}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            _check(isinstance(s, str) and len(s) > 0, "stop", "stop strings must be non-empty")
            _check(len(s) <= MAX_STOP_STRING_CHARS, "stop", f"each stop string is at most {MAX_STOP_STRING_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"at most {MAX_STOP_TOKEN_IDS} stop token ids")
        for t in self.stop_token_ids:
            _check(isinstance(t, int) and t >= 0, "stop_token_ids", f"must be non-negative ints, got {t}")
        if self.logprobs is not None:
            _check(isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
                   f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def child(self, index: int) -> SamplingParams:
        """Parameters of the ``index``-th of ``n`` completions: n=1, and a seed of its own when seeded."""
        from dataclasses import replace

        seed = None if self.seed is None else (self.seed + index) % 2**63
        return replace(self, n=1, seed=seed)


@dataclass(kw_only=True)
class Request:
    """One sequence to generate. ``n > 1`` is fanned out into n requests by the front end.

    Token accounting (all counts are tokens)::

        |<------------- prompt ------------->|<------ output ------>|
        |<---- num_computed_tokens (KV in cache) ---->|<- to compute ->|
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    """Lower value is served first under the priority policy; ties go FCFS."""
    arrival_time: float = field(default_factory=time.monotonic)

    # Scheduler-owned state.
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at first admission (reported as usage)."""
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    spread_local_tokens: int | None = None
    """Multi-master decoding: only positions ``[0, spread_local_tokens)`` have KV here; the rest, and every new
    token's, live on other instances, so decoding takes no blocks here."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_tokens(self) -> int:
        mt = self.sampling_params.max_tokens
        return mt if mt is not None else 1 << 30

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return _STATUS_TO_REASON.get(self.status)

    @property
    def in_prefill(self) -> bool:
        """True while prompt (or recomputed) tokens remain to be computed before the next sample."""
        return self.num_tokens - self.num_computed_tokens > 1
