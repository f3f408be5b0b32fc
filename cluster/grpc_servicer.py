"""The ``accordion.v1.LLMService`` servicer: request validation, engine driving, error -> status mapping.

Used by :mod:`accordion.cluster.grpc_server`, which owns the server, security, health, drain and metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from accordion.cluster import grpc_convert as conv
from accordion.cluster.engine_client import EngineClient
from accordion.cluster.errors import (
    EngineOverloadedError,
    EngineUnavailableError,
    ModelNotFoundError,
    RequestValidationError,
)
from accordion.cluster.metrics import RequestTimer, ServerMetrics
from accordion.protos import llm_service_pb2 as pb

log = logging.getLogger("accordion.grpc")


class _BadMessage:
    """Returned by the request deserializer instead of raising (which gRPC would report as INTERNAL)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _safe_deserializer(cls):
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except Exception:  # DecodeError: malformed bytes or invalid UTF-8 in a string field
            msg = f"request is not a valid {name} (malformed, or invalid UTF-8 in a string field)"
            return _BadMessage(ValueError(msg))

    return deserialize


def _status_of(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str, tuple]:
    if isinstance(exc, RequestValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), (("accordion-invalid-field", exc.field),)
    if isinstance(exc, EngineOverloadedError):
        ms = max(0, int(exc.retry_after_s * 1000))
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "server overloaded", (("retry-after-ms", str(ms)),)
    if isinstance(exc, EngineUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "engine unavailable", ()
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), ()
    log.error("internal error in request %s", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request_id={request_id})", ()


class _Prepared:
    __slots__ = ("request_id", "prompt", "params", "priority")

    def __init__(self, request_id, prompt, params, priority):
        self.request_id, self.prompt, self.params, self.priority = request_id, prompt, params, priority


class LLMServicer:
    """Implements ``accordion.v1.LLMService`` over an :class:`EngineClient`."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self.draining = False
        self.started_at = time.monotonic()
        self._inflight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- plumbing -------------------------------------------------------------------------------------------

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _check_model(self, model: str) -> None:
        served = self.engine.model_info().model_name
        if model and model != served:
            raise ModelNotFoundError(f"model {model!r} is not served here (this server serves {served!r})")

    async def _tokenize_input(self, request: pb.GenerateRequest) -> list[int]:
        tok = self.engine.tokenizer
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.text:
                raise RequestValidationError("text", "prompt is empty")
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            text = request.text
            if len(text) > 4096:  # long prompts: keep the event loop responsive
                return list(await asyncio.to_thread(tok.encode, text, add_special_tokens=add))
            return list(tok.encode(text, add_special_tokens=add))
        if kind == "token_ids":
            return conv.validate_token_ids(request.token_ids.ids, self.engine.model_info().vocab_size)
        if kind == "messages":
            msgs, add_gen = conv.chat_messages_to_dicts(request.messages)
            try:
                return list(await asyncio.to_thread(tok.apply_chat_template, msgs, add_generation_prompt=add_gen))
            except Exception as e:  # template errors are about the conversation the client sent
                raise RequestValidationError("messages", f"chat template failed: {e}") from e
        raise RequestValidationError("input", "one of text, token_ids or messages is required")

    async def _prepare(self, request: pb.GenerateRequest, request_id: str) -> _Prepared:
        conv.validate_request_id(request_id)
        self._check_model(request.model)
        mi = self.engine.model_info()
        prompt = await self._tokenize_input(request)
        if not prompt:
            raise RequestValidationError(request.WhichOneof("input") or "input", "prompt is empty (0 tokens)")
        conv.validate_token_ids(request.sampling_params.stop_token_ids, mi.vocab_size, "stop_token_ids")
        params = conv.sampling_params_from_proto(request.sampling_params, len(prompt), mi.max_model_len)
        return _Prepared(request_id, prompt, params, request.priority)

    def _admit(self, request_id: str) -> None:
        if self.draining:
            raise EngineUnavailableError("server is draining; retry on another replica")
        if request_id in self._inflight:
            raise _AlreadyExists(f"request_id {request_id!r} is already in flight")
        self._inflight.add(request_id)
        self._idle.clear()
        self.metrics.inflight.set(len(self._inflight))

    def _release(self, request_id: str) -> None:
        self._inflight.discard(request_id)
        self.metrics.inflight.set(len(self._inflight))
        if not self._inflight:
            self._idle.set()

    async def _run(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Validate, admit and drive one request; yields :class:`StreamDelta` objects. Errors become statuses."""
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        admitted = False
        timer = RequestTimer()
        finished_all = False
        try:
            if self.draining:
                raise EngineUnavailableError("server is draining; retry on another replica")
            prep = await self._prepare(request, request_id)
            self._admit(request_id)
            admitted = True
            self.metrics.prompt_tokens.inc(len(prep.prompt))
            log.debug("request %s admitted: %d prompt tokens, n=%d", request_id, len(prep.prompt), prep.params.n)
            remaining = set(range(prep.params.n))
            it = self.engine.generate(request_id, prep.prompt, prep.params, priority=prep.priority)
            try:
                async for delta in it:
                    timer.on_tokens(len(delta.token_ids))
                    if delta.token_ids:
                        self.metrics.generation_tokens.inc(len(delta.token_ids))
                    if delta.finish_reason is not None:
                        remaining.discard(delta.index)
                        self.metrics.requests.labels(str(delta.finish_reason)).inc()
                        if delta.error:
                            log.error("request %s index %d failed in the engine: %s",
                                      request_id, delta.index, delta.error)
                    yield request_id, prep, delta
                finished_all = not remaining
            finally:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:  # closing the iterator aborts the request in the engine
                    await aclose()
        except (asyncio.CancelledError, GeneratorExit):
            # The client cancelled or its deadline expired: the handler was cancelled while this waited for the
            # engine (CancelledError), or while it was writing a chunk, and then it closed this (GeneratorExit).
            self.metrics.aborts.labels("cancel").inc()
            self.metrics.requests.labels("abort").inc()
            log.info("request %s cancelled by the client (or its deadline); aborted in the engine", request_id)
            raise
        except grpc.aio.AbortError:
            raise
        except _AlreadyExists as e:
            self.metrics.rejected.labels("ALREADY_EXISTS").inc()
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except Exception as e:
            code, details, trailers = _status_of(e, request_id)
            self.metrics.rejected.labels(code.name).inc()
            if code != grpc.StatusCode.INTERNAL:
                log.info("request %s rejected: %s %s", request_id, code.name, details)
            await context.abort(code, details, trailing_metadata=trailers)
        finally:
            if admitted:
                self._release(request_id)
                timer.finish(self.metrics)
                if finished_all:
                    log.debug("request %s finished: %d tokens in %.3fs", request_id, timer.tokens,
                              time.monotonic() - timer.start)

    # ---- RPCs -----------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        acc = None
        async with contextlib.aclosing(self._run(request, context)) as deltas:
            async for request_id, prep, delta in deltas:
                if acc is None:
                    acc = conv.CompletionAccumulator(request_id, prep.params.n)
                acc.add(delta)
        if acc is None:  # an engine that finished without a single delta
            rid = request.request_id
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request_id={rid}): no output")
        return acc.response()

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> None:
        # Written here rather than yielded, so that a cancellation while writing lands in this frame and closes
        # the request at once, instead of whenever grpc's abandoned generator is collected.
        async with contextlib.aclosing(self._run(request, context)) as deltas:
            async for request_id, _prep, delta in deltas:
                await context.write(conv.delta_to_chunk(delta, request_id))

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        ids = list(dict.fromkeys(request.request_ids))
        for rid in ids:
            conv.validate_request_id(rid)
        aborted = await self.engine.abort(ids) if ids else []
        self.metrics.aborts.labels("rpc").inc(len(aborted))
        log.info("Abort RPC: requested %s, aborted %s", ids, aborted)
        return pb.AbortResponse(aborted_request_ids=aborted)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        self._check_model(request.model)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await asyncio.to_thread(self.engine.tokenizer.encode, request.text, add_special_tokens=add)
        return pb.TokenizeResponse(token_ids=list(ids))

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        self._check_model(request.model)
        ids = conv.validate_token_ids(request.token_ids, self.engine.model_info().vocab_size)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await asyncio.to_thread(self.engine.tokenizer.decode, ids, skip_special_tokens=skip)
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return conv.model_info_to_proto(self.engine.model_info())

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        info = await self.engine.server_info()
        return conv.server_info_to_proto(info, draining=self.draining, uptime_s=time.monotonic() - self.started_at)


class _AlreadyExists(Exception):
    pass


def _guard(fn):
    """Wrap a handler (unary, or server-streaming through ``context.write``): reject unparsable requests, map
    exceptions to status codes (never UNKNOWN)."""

    async def handler(request, context):
        if isinstance(request, _BadMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
        try:
            return await fn(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            code, details, trailers = _status_of(e, getattr(request, "request_id", "") or "-")
            await context.abort(code, details, trailing_metadata=trailers)

    return handler


def method_handlers(servicer: LLMServicer) -> dict[str, grpc.RpcMethodHandler]:
    methods = pb.DESCRIPTOR.services_by_name["LLMService"].methods_by_name
    handlers = {}
    for name, md in methods.items():
        req_cls = getattr(pb, md.input_type.name)
        resp_cls = getattr(pb, md.output_type.name)
        fn = getattr(servicer, name)
        des, ser = _safe_deserializer(req_cls), resp_cls.SerializeToString
        make = grpc.unary_stream_rpc_method_handler if md.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(_guard(fn), des, ser)
    return handlers
