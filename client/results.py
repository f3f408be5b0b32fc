"""What calls return: the result types parsed from the response protos (:class:`GenerateResult`,
:class:`Completion`, :class:`Chunk`, :class:`Usage`, :class:`Timings`) and :class:`ClientError` for a failed call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from accordion.protos import llm_service_pb2 as pb

__all__ = ["Chunk", "ClientError", "Completion", "GenerateResult", "Timings", "Usage"]

_FINISH_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
}


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_proto(cls, u: pb.Usage) -> Usage:
        return cls(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


@dataclass(slots=True)
class Timings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


def _matched_stop(msg) -> int | str | None:
    which = msg.WhichOneof("matched_stop")
    return None if which is None else getattr(msg, which)


def _timings(msg) -> Timings | None:
    if not msg.HasField("timings"):
        return None
    return Timings(msg.timings.queue_ms, msg.timings.prefill_ms, msg.timings.decode_ms)


def _logprobs(msg) -> list[dict[int, float]] | None:
    if not msg.logprobs:
        return None
    out = []
    for lp in msg.logprobs:
        d = {t.token_id: t.logprob for t in lp.top}
        d[lp.token_id] = lp.logprob
        out.append(d)
    return out


@dataclass(slots=True)
class Chunk:
    """One streamed piece of one completion (``index``). ``usage`` is cumulative for that completion."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    """None until the completion's last chunk; then 'stop', 'length', 'abort' or 'error'."""
    matched_stop: int | str | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings | None = None
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None

    @classmethod
    def from_proto(cls, m: pb.GenerateChunk) -> Chunk:
        return cls(
            m.request_id, m.index, list(m.token_ids), m.text, _FINISH_NAMES.get(m.finish_reason, "error"),
            _matched_stop(m), Usage.from_proto(m.usage), _timings(m), _logprobs(m), m.error or None,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    matched_stop: int | str | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings | None = None
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None

    @classmethod
    def from_proto(cls, m: pb.Completion) -> Completion:
        return cls(
            m.index, m.text, list(m.token_ids), _FINISH_NAMES.get(m.finish_reason, "error"), _matched_stop(m),
            Usage.from_proto(m.usage), _timings(m), _logprobs(m), m.error or None,
        )


@dataclass(slots=True)
class GenerateResult:
    request_id: str
    completions: list[Completion]
    usage: Usage

    @classmethod
    def from_proto(cls, m: pb.GenerateResponse) -> GenerateResult:
        return cls(m.request_id, [Completion.from_proto(c) for c in m.completions], Usage.from_proto(m.usage))

    @property
    def text(self) -> str:
        """Text of the first completion."""
        return self.completions[0].text if self.completions else ""

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids if self.completions else []

    @property
    def finish_reason(self) -> str | None:
        return self.completions[0].finish_reason if self.completions else None


class ClientError(grpc.RpcError):
    """A failed call. ``code()``, ``details()`` and ``trailing_metadata()`` as on ``grpc.RpcError``."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, Any]] = ()):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailers = code, details, tuple(trailing_metadata or ())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailers

    @property
    def retry_after_s(self) -> float | None:
        """The server's retry hint (RESOURCE_EXHAUSTED), if any."""
        for k, v in self._trailers:
            if k == "retry-after-ms":
                try:
                    return int(v) / 1000.0
                except ValueError:
                    return None
        return None

    @classmethod
    def wrap(cls, e: grpc.RpcError) -> ClientError:
        if isinstance(e, ClientError):
            return e
        try:
            code, details, trailers = e.code(), e.details() or "", e.trailing_metadata() or ()
        except Exception:  # an RpcError that is not a call (should not happen)
            code, details, trailers = grpc.StatusCode.UNKNOWN, str(e), ()
        return cls(code, details, trailers)
