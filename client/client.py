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
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from accordion.client.connection import TLSConfig, _Base
from accordion.client.request import _abort_request, _detokenize_request, _tokenize_request, build_generate_request
from accordion.client.results import Chunk, ClientError, GenerateResult
from accordion.protos import llm_service_pb2 as pb

__all__ = ["AsyncClient", "Client"]

_SERVICE = "/accordion.v1.LLMService/"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


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
        return list(self._unary(self._abort, _abort_request(request_ids), timeout).aborted_request_ids)

    def tokenize(self, text: str, add_special_tokens: bool | None = None, timeout: float | None = None) -> list[int]:
        return list(self._unary(self._tokenize, _tokenize_request(text, add_special_tokens), timeout).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool | None = None,
                   timeout: float | None = None) -> str:
        return self._unary(self._detokenize, _detokenize_request(token_ids, skip_special_tokens), timeout).text

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
        resp = await self._unary("Abort", _abort_request(request_ids), pb.AbortResponse, timeout)
        return list(resp.aborted_request_ids)

    async def tokenize(self, text: str, add_special_tokens: bool | None = None,
                       timeout: float | None = None) -> list[int]:
        req = _tokenize_request(text, add_special_tokens)
        return list((await self._unary("Tokenize", req, pb.TokenizeResponse, timeout)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool | None = None,
                         timeout: float | None = None) -> str:
        req = _detokenize_request(token_ids, skip_special_tokens)
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
