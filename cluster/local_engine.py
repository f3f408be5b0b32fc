"""``LocalEngineClient``: one :class:`EngineInstance` in this process, its engine loop in a thread.

Used by ``accordion serve --no-ray`` (a single-process server) and to measure what Ray adds to serving. The
request path (fan-out, per-request queues, output processing, abort on close) is :class:`EngineFrontend`'s.
"""

from __future__ import annotations

import asyncio
import logging

import accordion
from accordion.cluster.config import EngineConfig
from accordion.cluster.engine_client import InstanceInfo, ServerInfo
from accordion.cluster.engine_frontend import EngineFrontend, model_info_for
from accordion.cluster.engine_loop import EngineLoop
from accordion.cluster.instance import DEFAULT_WORKER, EngineInstance
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import EngineOutput
from accordion.cluster.request import Request
from accordion.cluster.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROUTE = "local"


class LocalEngineClient(EngineFrontend):
    """An :class:`EngineClient` over an in-process engine. Build with :meth:`create` (on the serving loop)."""

    def __init__(self, config: EngineConfig, instance: EngineInstance, tokenizer: Tokenizer):
        super().__init__(tokenizer, model_info_for(config, tokenizer, str(getattr(instance.worker, "dtype", ""))
                                                   .removeprefix("torch.") or None))
        self.config = config
        self.instance = instance
        self._loop = asyncio.get_running_loop()
        self._load = LoadReport(ROUTE, num_blocks=instance.num_blocks, num_free_blocks=instance.num_blocks,
                                num_spare_blocks=instance.num_blocks)
        self.engine_loop = EngineLoop(instance, self._from_thread, ROUTE)
        self.engine_loop.start()

    @classmethod
    async def create(cls, config: EngineConfig, worker_cls: str = DEFAULT_WORKER) -> LocalEngineClient:
        """Load the model (in a worker thread, so the loop stays responsive) and start the engine thread."""
        instance = await asyncio.to_thread(EngineInstance, config, worker_cls)
        tokenizer = await asyncio.to_thread(Tokenizer, config.model.model)
        return cls(config, instance, tokenizer)

    def _from_thread(self, outputs: list[EngineOutput], load: LoadReport) -> None:
        self._loop.call_soon_threadsafe(self._on_step, outputs, load)

    def _on_step(self, outputs: list[EngineOutput], load: LoadReport) -> None:
        self._load = load
        self._on_outputs(outputs)

    def _choose_route(self, requests: list[Request], exclude: set[str]) -> str:
        return ROUTE

    async def _send(self, route: str, requests: list[Request]) -> None:
        self.engine_loop.submit(requests)

    def _send_abort(self, route: str, request_ids: list[str]) -> None:
        self.engine_loop.abort(request_ids)

    def is_ready(self) -> bool:
        return not self.draining and self.engine_loop.failed is None

    async def server_info(self) -> ServerInfo:
        ld = self._load
        inst = InstanceInfo(ROUTE, str(getattr(self.instance.worker, "device", "cpu")), ld.num_running,
                            ld.num_waiting, ld.kv_usage, ld.num_preemptions, self.engine_loop.failed is None)
        return ServerInfo(accordion.__version__, ld.num_running, ld.num_waiting, ld.kv_usage, ld.num_preemptions,
                          [inst], self.draining)

    def load(self) -> LoadReport:
        return self.engine_loop.load()

    async def close(self) -> None:
        """Stop the engine thread (call after draining)."""
        await asyncio.to_thread(self.engine_loop.stop)
