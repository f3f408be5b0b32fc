"""Python client for ``accordion.v1.LLMService``: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Imports only gRPC and ``accordion.protos`` (no torch, no Ray), so it installs light.

    with Client("127.0.0.1:50051", api_key="...") as c:
        print(c.generate("Hello", max_tokens=16, temperature=0).text)
        for chunk in c.stream("Once upon a time", max_tokens=64):   # breaking out cancels the RPC
            print(chunk.text, end="", flush=True)

Errors are :class:`ClientError` (a ``grpc.RpcError`` with ``code()``/``details()``). Calls that fail with
UNAVAILABLE are retried with exponential backoff and full jitter, ``max_retries`` times, within the call's
deadline; a stream is never retried once it has yielded a chunk. Nothing else is retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from accordion.protos import llm_service_pb2 as pb

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "ClientError",
    "Completion",
    "GenerateResult",
    "TLSConfig",
    "Timings",
    "Usage",
]

_SERVICE = "/accordion.v1.LLMService/"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
_FINISH_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
}

# Paired with the server's settings: it accepts pings every 10 s or slower; we ping every 30 s while calls are open.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


# ---- results ----------------------------------------------------------------------------------------------------


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


# ---- configuration --------------------------------------------------------------------------------------------


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


def build_generate_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    request_id: str = "",
    model: str = "",
    priority: int = 0,
    add_special_tokens: bool | None = None,
    add_generation_prompt: bool | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """The request proto for ``generate``/``stream``. Sampling keywords are the fields of
    ``accordion.v1.SamplingParams`` (temperature, top_p, top_k, min_p, repetition_penalty, frequency_penalty,
    presence_penalty, max_tokens, min_tokens, seed, n, stop, stop_token_ids, ignore_eos, logprobs,
    skip_special_tokens, include_stop_str_in_output); ``None`` means the server default."""
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, token_ids or messages")
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    req = pb.GenerateRequest(request_id=request_id, model=model, priority=priority)
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.messages.SetInParent()
        for m in messages:
            req.messages.messages.add(role=m["role"], content=m["content"])
        if add_generation_prompt is not None:
            req.messages.add_generation_prompt = add_generation_prompt
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    sp = req.sampling_params
    sp.SetInParent()
    for k, v in sampling.items():
        if v is None:
            continue
        if k == "stop":
            sp.stop.extend([v] if isinstance(v, str) else v)
        elif k == "stop_token_ids":
            sp.stop_token_ids.extend(v)
        else:
            setattr(sp, k, v)
    return req


def _backoff(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(maximum, initial * (2**attempt)))


class _Base:
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


class Client(_Base):
    """Blocking client. ``tls``: False, True (system roots), a :class:`TLSConfig` or a dict of its fields.
    ``timeout`` is the default per-call deadline in seconds (None: no deadline)."""

    def __init__(self, target: str, api_key: str | None = None, tls: bool | TLSConfig | Mapping = False,
                 timeout: float | None = None, max_retries: int = 3, *, initial_backoff_s: float = 0.1,
                 max_backoff_s: float = 5.0, max_receive_bytes: int = 64 << 20):
        super().__init__(target, api_key, tls, timeout, max_retries, initial_backoff_s, max_backoff_s,
                         max_receive_bytes)
        if self._creds is None:
            self.channel = grpc.insecure_channel(target, options=self._options)
        else:
            self.channel = grpc.secure_channel(target, self._creds, options=self._options)
        ch = self.channel
        self._generate = ch.unary_unary(_SERVICE + "Generate", pb.GenerateRequest.SerializeToString,
                                        pb.GenerateResponse.FromString)
        self._stream = ch.unary_stream(_SERVICE + "GenerateStream", pb.GenerateRequest.SerializeToString,
                                       pb.GenerateChunk.FromString)
        self._abort = ch.unary_unary(_SERVICE + "Abort", pb.AbortRequest.SerializeToString, pb.AbortResponse.FromString)
        self._tokenize = ch.unary_unary(_SERVICE + "Tokenize", pb.TokenizeRequest.SerializeToString,
                                        pb.TokenizeResponse.FromString)
        self._detokenize = ch.unary_unary(_SERVICE + "Detokenize", pb.DetokenizeRequest.SerializeToString,
                                          pb.DetokenizeResponse.FromString)
        self._model_info = ch.unary_unary(_SERVICE + "GetModelInfo", pb.GetModelInfoRequest.SerializeToString,
                                          pb.ModelInfo.FromString)
        self._server_info = ch.unary_unary(_SERVICE + "GetServerInfo", pb.GetServerInfoRequest.SerializeToString,
                                           pb.ServerInfo.FromString)
        self._health = ch.unary_unary(_HEALTH_CHECK, health_pb2.HealthCheckRequest.SerializeToString,
                                      health_pb2.HealthCheckResponse.FromString)

    def _unary(self, method, request, timeout: float | None):
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=self._remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ClientError.wrap(e) from None
            time.sleep(delay)
            attempt += 1

    def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                 messages: Sequence[Mapping[str, str]] | None = None, request_id: str = "", model: str = "",
                 priority: int = 0, timeout: float | None = None, **sampling: Any) -> GenerateResult:
        req = build_generate_request(prompt, token_ids=token_ids, messages=messages, request_id=request_id,
                                     model=model, priority=priority, **sampling)
        return GenerateResult.from_proto(self._unary(self._generate, req, timeout))

    def stream(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
               messages: Sequence[Mapping[str, str]] | None = None, request_id: str = "", model: str = "",
               priority: int = 0, timeout: float | None = None, **sampling: Any) -> Iterator[Chunk]:
        """Chunks as they are generated. Closing the iterator (or breaking out of the loop) cancels the RPC,
        which aborts the request on the server."""
        req = build_generate_request(prompt, token_ids=token_ids, messages=messages, request_id=request_id,
                                     model=model, priority=priority, **sampling)
        return self._stream_iter(req, timeout)

    def _stream_iter(self, req: pb.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = self._stream(req, timeout=self._remaining(deadline), metadata=self._metadata)
            yielded = False
            try:
                for msg in call:
                    yielded = True
                    yield Chunk.from_proto(msg)
                return
            except grpc.RpcError as e:
                delay = None if yielded else self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ClientError.wrap(e) from None
            finally:
                call.cancel()  # no-op when the call already finished
            time.sleep(delay)
            attempt += 1

    def abort(self, request_ids: str | Sequence[str], timeout: float | None = None) -> list[str]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        return list(self._unary(self._abort, pb.AbortRequest(request_ids=ids), timeout).aborted_request_ids)

    def tokenize(self, text: str, add_special_tokens: bool | None = None, timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text)
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        return list(self._unary(self._tokenize, req, timeout).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool | None = None,
                   timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=list(token_ids))
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return self._unary(self._detokenize, req, timeout).text

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._unary(self._model_info, pb.GetModelInfoRequest(), timeout)

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self._unary(self._server_info, pb.GetServerInfoRequest(), timeout)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... for ``service`` ("" = the whole server; "accordion.v1.LLMService" =
        readiness). Not retried: a probe should see the truth now."""
        try:
            resp = self._health(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise ClientError.wrap(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as :class:`Client`, as coroutines. ``stream`` returns an async
    iterator; ``await it.aclose()`` (or ``contextlib.aclosing``) cancels the RPC deterministically."""

    def __init__(self, target: str, api_key: str | None = None, tls: bool | TLSConfig | Mapping = False,
                 timeout: float | None = None, max_retries: int = 3, *, initial_backoff_s: float = 0.1,
                 max_backoff_s: float = 5.0, max_receive_bytes: int = 64 << 20):
        super().__init__(target, api_key, tls, timeout, max_retries, initial_backoff_s, max_backoff_s,
                         max_receive_bytes)
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:  # created lazily, on the loop that first uses it
            if self._creds is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._creds, options=self._options)
        return self._channel

    def _method(self, name: str, req_cls, resp_cls, streaming: bool = False):
        factory = self.channel.unary_stream if streaming else self.channel.unary_unary
        return factory(_SERVICE + name, req_cls.SerializeToString, resp_cls.FromString)

    async def _unary(self, name: str, request, resp_cls, timeout: float | None):
        method = self._method(name, type(request), resp_cls)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self._remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ClientError.wrap(e) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                       messages: Sequence[Mapping[str, str]] | None = None, request_id: str = "", model: str = "",
                       priority: int = 0, timeout: float | None = None, **sampling: Any) -> GenerateResult:
        req = build_generate_request(prompt, token_ids=token_ids, messages=messages, request_id=request_id,
                                     model=model, priority=priority, **sampling)
        return GenerateResult.from_proto(await self._unary("Generate", req, pb.GenerateResponse, timeout))

    def stream(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
               messages: Sequence[Mapping[str, str]] | None = None, request_id: str = "", model: str = "",
               priority: int = 0, timeout: float | None = None, **sampling: Any) -> AsyncIterator[Chunk]:
        req = build_generate_request(prompt, token_ids=token_ids, messages=messages, request_id=request_id,
                                     model=model, priority=priority, **sampling)
        return self._stream_iter(req, timeout)

    async def _stream_iter(self, req: pb.GenerateRequest, timeout: float | None) -> AsyncIterator[Chunk]:
        method = self._method("GenerateStream", pb.GenerateRequest, pb.GenerateChunk, streaming=True)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = method(req, timeout=self._remaining(deadline), metadata=self._metadata)
            yielded = False
            try:
                async for msg in call:
                    yielded = True
                    yield Chunk.from_proto(msg)
                return
            except grpc.RpcError as e:
                delay = None if yielded else self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ClientError.wrap(e) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def abort(self, request_ids: str | Sequence[str], timeout: float | None = None) -> list[str]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        resp = await self._unary("Abort", pb.AbortRequest(request_ids=ids), pb.AbortResponse, timeout)
        return list(resp.aborted_request_ids)

    async def tokenize(self, text: str, add_special_tokens: bool | None = None,
                       timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text)
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        return list((await self._unary("Tokenize", req, pb.TokenizeResponse, timeout)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool | None = None,
                         timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=list(token_ids))
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return (await self._unary("Detokenize", req, pb.DetokenizeResponse, timeout)).text

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", pb.GetModelInfoRequest(), pb.ModelInfo, timeout)

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return await self._unary("GetServerInfo", pb.GetServerInfoRequest(), pb.ServerInfo, timeout)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        method = self.channel.unary_unary(_HEALTH_CHECK, health_pb2.HealthCheckRequest.SerializeToString,
                                          health_pb2.HealthCheckResponse.FromString)
        try:
            resp = await method(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise ClientError.wrap(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
