"""Backends the replay loop drives: the only place that touches the accordion client SDK.

A backend is anything with the :class:`Backend` shape. :class:`AccordionBackend` adapts
``accordion.client.AsyncClient``; :class:`FakeBackend` streams synthetic chunks in-process (tests, dry runs).
Both feed their chunk stream through :func:`record_stream`, so timing is recorded the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from .records import RequestRecord


@runtime_checkable
class Backend(Protocol):
    """What the benchmark needs from a server connection."""

    async def stream_request(self, prompt_token_ids: list[int], max_tokens: int, request_id: str) -> RequestRecord:
        """Send one request and stream it to the end. Never raises for request failures: they land in ``status``."""
        ...

    async def model_info(self) -> dict[str, Any] | None:
        """``max_model_len``, ``vocab_size``, ``eos_token_ids``, ... when the server reports them, else None."""
        ...

    async def server_info(self) -> dict[str, Any] | None:
        """Server version and load when available, else None."""
        ...

    async def close(self) -> None: ...


def status_name(exc: BaseException) -> str:
    """A gRPC status code name (``grpc.aio.AioRpcError.code()`` or an SDK error's ``code``), else the type name."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            code = code()
        except Exception:  # noqa: BLE001 - best effort on foreign exception types
            code = None
    if code is not None:
        return str(getattr(code, "name", code)).upper()
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return type(exc).__name__


def _finish_name(reason: Any) -> str | None:
    if reason is None or reason == "" or reason == 0:
        return None  # unset (proto3 zero value)
    return str(getattr(reason, "name", reason)).lower()


async def record_stream(chunks: AsyncIterator[Any], record: RequestRecord) -> RequestRecord:
    """Consume chunks with ``token_ids``, ``finish_reason`` and cumulative ``usage``; fill ``record``.

    ``record.send_time`` must already be set. The arrival of every token-carrying chunk is timestamped.
    """
    try:
        async for chunk in chunks:
            now = time.perf_counter()
            n = len(getattr(chunk, "token_ids", None) or ())
            if n:
                record.chunk_times.append(now)
                record.chunk_tokens.append(n)
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                record.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or record.prompt_tokens)
                record.completion_tokens = int(getattr(usage, "completion_tokens", 0) or record.completion_tokens)
            record.finish_reason = _finish_name(getattr(chunk, "finish_reason", None)) or record.finish_reason
            if getattr(chunk, "error", None):
                record.error = str(chunk.error)
    except Exception as exc:  # noqa: BLE001 - every failure is data for the benchmark
        record.status, record.error = status_name(exc), str(exc)[:500]
        return record
    if record.finish_reason in ("error", "abort"):
        record.status = record.finish_reason.upper()
    elif not record.chunk_times:
        record.status, record.error = "NO_TOKENS", record.error or "stream ended without a token"
    return record


def _as_dict(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "DESCRIPTOR"):  # a protobuf message
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(obj, preserving_proto_field_name=True)
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else None


class AccordionBackend:
    """Adapter around ``accordion.client.AsyncClient`` (the gRPC SDK): the only code that calls it.

    Per request: ``client.stream(token_ids=..., request_id=..., max_tokens=..., ignore_eos=..., [model=...],
    [timeout=...])``, consumed to the end (closed on error so the RPC is cancelled). The SDK's own retries are off
    by default (``max_retries=0``): a retried request would hide a failure and inflate its TTFT.
    """

    def __init__(
        self,
        target: str,
        *,
        model: str | None = None,
        ignore_eos: bool = True,
        timeout_s: float | None = None,
        api_key: str | None = None,
        tls: bool = False,
        max_retries: int = 0,
        client: Any = None,
    ) -> None:
        if client is None:
            from accordion.client import AsyncClient  # imported lazily: tests and --backend fake never need it

            client = AsyncClient(target, api_key=api_key, tls=tls, max_retries=max_retries)
        self.client = client
        self.target, self.model, self.ignore_eos, self.timeout_s = target, model, ignore_eos, timeout_s

    async def stream_request(self, prompt_token_ids: list[int], max_tokens: int, request_id: str) -> RequestRecord:
        kw: dict[str, Any] = {"request_id": request_id, "max_tokens": max_tokens, "ignore_eos": self.ignore_eos}
        if self.model:
            kw["model"] = self.model
        if self.timeout_s:
            kw["timeout"] = self.timeout_s
        rec = RequestRecord(request_id, len(prompt_token_ids), max_tokens, send_time=time.perf_counter())
        try:
            stream = self.client.stream(token_ids=prompt_token_ids, **kw)
        except Exception as exc:  # noqa: BLE001 - bad arguments are a failed request too
            rec.status, rec.error = status_name(exc), str(exc)[:500]
            return rec
        async with contextlib.aclosing(stream):
            return await record_stream(stream, rec)

    async def _call(self, *names: str) -> dict[str, Any] | None:
        for name in names:
            fn = getattr(self.client, name, None)
            if fn is None:
                continue
            try:
                res = fn()
                return _as_dict(await res if inspect.isawaitable(res) else res)
            except Exception:  # noqa: BLE001 - optional information
                return None
        return None

    async def model_info(self) -> dict[str, Any] | None:
        return await self._call("model_info", "get_model_info")

    async def server_info(self) -> dict[str, Any] | None:
        return await self._call("server_info", "get_server_info")

    async def close(self) -> None:
        res = getattr(self.client, "close", lambda: None)()
        if inspect.isawaitable(res):
            await res


@dataclasses.dataclass
class _Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class FakeChunk:
    """The chunk shape the SDK yields: new token ids, text delta, finish reason, cumulative usage."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: _Usage


class FakeBackend:
    """In-process stand-in for a server: ``slots`` requests run at once (the rest queue, so latency grows with
    load); prefill takes ``ttft_s + prefill_s_per_token * prompt_len``, then ``tokens_per_chunk`` tokens arrive
    every ``itl_s``. Every ``fail_every``-th request fails with RESOURCE_EXHAUSTED (0: never)."""

    def __init__(
        self,
        *,
        ttft_s: float = 0.005,
        prefill_s_per_token: float = 0.0,
        itl_s: float = 0.002,
        tokens_per_chunk: int = 1,
        slots: int | None = None,
        fail_every: int = 0,
        max_model_len: int = 4096,
        vocab_size: int = 32000,
    ) -> None:
        self.ttft_s, self.prefill_s_per_token, self.itl_s = ttft_s, prefill_s_per_token, itl_s
        self.tokens_per_chunk, self.fail_every = tokens_per_chunk, fail_every
        self._slots = asyncio.Semaphore(slots) if slots else None
        self._info = {
            "model_name": "fake",
            "max_model_len": max_model_len,
            "vocab_size": vocab_size,
            "eos_token_ids": [2],
            "bos_token_id": 1,
        }
        self.calls = 0

    async def _chunks(self, prompt_len: int, max_tokens: int, fail: bool) -> AsyncIterator[FakeChunk]:
        if self._slots:
            await self._slots.acquire()
        try:
            if fail:
                raise _FakeRpcError("RESOURCE_EXHAUSTED")
            await asyncio.sleep(self.ttft_s + self.prefill_s_per_token * prompt_len)
            done = 0
            while done < max_tokens:
                if done:
                    await asyncio.sleep(self.itl_s)
                n = min(self.tokens_per_chunk, max_tokens - done)
                done += n
                finish = "length" if done == max_tokens else None
                yield FakeChunk([7] * n, "x" * n, finish, _Usage(prompt_len, done))
        finally:
            if self._slots:
                self._slots.release()

    async def stream_request(self, prompt_token_ids: list[int], max_tokens: int, request_id: str) -> RequestRecord:
        self.calls += 1
        fail = bool(self.fail_every) and self.calls % self.fail_every == 0
        rec = RequestRecord(request_id, len(prompt_token_ids), max_tokens, send_time=time.perf_counter())
        return await record_stream(self._chunks(len(prompt_token_ids), max_tokens, fail), rec)

    async def model_info(self) -> dict[str, Any] | None:
        return dict(self._info)

    async def server_info(self) -> dict[str, Any] | None:
        return {"version": "fake", "num_running": 0}

    async def close(self) -> None:
        return None


class _FakeRpcError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(f"fake {code}")
        self._code = code

    def code(self) -> str:
        return self._code
