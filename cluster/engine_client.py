"""The one interface the front end (gRPC servicer, Ray Serve app, offline ``LLM``) uses to reach an engine.

Implementations: ``accordion.cluster.local_engine.LocalEngineClient`` (engine in this process),
``accordion.cluster.ray_engine.RayEngineClient`` (instance actors on a Ray cluster behind the global manager).
Tests may inject a fake that follows this protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from accordion.cluster.outputs import StreamDelta
from accordion.cluster.request import SamplingParams


@dataclass(slots=True)
class ModelInfo:
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    dtype: str
    block_size: int


@dataclass(slots=True)
class InstanceInfo:
    instance_id: str
    device: str
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    """Fraction of KV blocks in use (0..1)."""
    num_preemptions: int = 0
    healthy: bool = True


@dataclass(slots=True)
class ServerInfo:
    version: str
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    instances: list[InstanceInfo] = field(default_factory=list)
    draining: bool = False


@runtime_checkable
class EngineClient(Protocol):
    """Async access to a running engine.

    ``generate`` yields :class:`StreamDelta` objects as tokens are produced, for every one of the ``n``
    completions (``delta.index``). Closing or cancelling the iterator aborts the request and frees its KV blocks.
    Raises :class:`~accordion.cluster.errors.RequestValidationError` (bad field),
    :class:`~accordion.cluster.errors.EngineOverloadedError` (queue full) or
    :class:`~accordion.cluster.errors.EngineUnavailableError` (not ready / draining) before the first delta.
    """

    @property
    def tokenizer(self):  # accordion.cluster.tokenizer.Tokenizer
        ...

    def model_info(self) -> ModelInfo: ...

    async def server_info(self) -> ServerInfo: ...

    def is_ready(self) -> bool: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
    ) -> AsyncIterator[StreamDelta]: ...

    async def abort(self, request_ids: list[str]) -> list[str]:
        """Abort these requests; returns the ids that were found in flight."""
        ...
