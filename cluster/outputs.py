"""What generation produces, at three levels.

* :class:`EngineOutput`: engine core -> front end, token ids only, one per request per step that produced tokens
  (or finished). Small plain data, so it crosses Ray cheaply.
* :class:`StreamDelta`: front end -> client, after incremental detokenization and stop-string handling by
  :class:`~accordion.cluster.output_processor.OutputProcessor`. One gRPC ``GenerateChunk`` is built from one delta.
* :class:`RequestOutput` / :class:`CompletionOutput`: the offline API's result, in vLLM's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from accordion.cluster.request import FinishReason


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities around one generated token: the sampled token's and the top-N."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """(token id, logprob) pairs, most likely first."""

    def as_dict(self) -> dict[int, float]:
        d = dict(self.top)
        d[self.token_id] = self.logprob
        return d


@dataclass(slots=True)
class RequestTimings:
    """Server-side timings of one request, in seconds."""

    queue_s: float = 0.0
    """Arrival to first scheduled."""
    prefill_s: float = 0.0
    """First scheduled to first token."""
    decode_s: float = 0.0
    """First token to finish."""


@dataclass(slots=True)
class EngineOutput:
    """New tokens of one request from one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    """The stop token (EOS or a ``stop_token_ids`` entry) that ended the request, if any."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    timings: RequestTimings | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMoved:
    """In an instance's output stream, after a request's last tokens there: the request migrated to
    ``to_instance`` and its outputs continue on that instance's stream (:mod:`accordion.cluster.migration`)."""

    request_id: str
    to_instance: str


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def to_wire(outputs: list[EngineOutput | RequestMoved]) -> list:
    """Outputs as they cross Ray: a plain token output (no logprobs, not finished) as a tuple of primitives,
    which pickles ~20x faster than the dataclass; the rest (and :class:`RequestMoved` markers) as is.
    :func:`from_wire` reverses it."""
    return [(o.request_id, o.new_token_ids, o.num_prompt_tokens, o.num_cached_tokens)
            if type(o) is EngineOutput and o.finish_reason is None and o.new_logprobs is None and o.error is None
            and o.timings is None else o
            for o in outputs]


def from_wire(items: list) -> list[EngineOutput | RequestMoved]:
    return [plain_output(i) if type(i) is tuple else i for i in items]


def plain_output(row) -> EngineOutput:
    """A plain token output from its wire row ``(request id, new token ids, prompt tokens, cached tokens)``."""
    return EngineOutput(row[0], row[1], num_prompt_tokens=row[2], num_cached_tokens=row[3])


@dataclass(slots=True)
class StreamDelta:
    """What is new for one completion since the last delta, ready to send to a client."""

    request_id: str
    index: int
    """Which of the ``n`` completions this delta belongs to."""
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    """The stop token id or stop string that ended the completion."""
    usage: Usage = field(default_factory=Usage)
    """Cumulative for this completion."""
    timings: RequestTimings | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def absorb(self, later: StreamDelta) -> None:
        """Append ``later`` (the next delta of the same completion) to this one, so a consumer that fell behind
        gets one message instead of many. Usage and timings are cumulative: the later values win."""
        self.token_ids.extend(later.token_ids)
        self.text += later.text
        if later.logprobs:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finish_reason, self.matched_stop = later.finish_reason, later.matched_stop
        self.usage, self.timings = later.usage, later.timings or self.timings
        self.error = later.error or self.error


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """'stop', 'length', 'abort' or 'error' (vLLM's strings)."""
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
