"""Runs a real ``GrpcServer`` on loopback (port 0) in a background thread with its own event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from accordion.cluster.grpc_server import GrpcServeConfig, build_server
from accordion.protos import llm_service_pb2 as pb
from accordion.protos import llm_service_pb2_grpc as pb_grpc
from tests.cluster.fake_engine import FakeEngine


class ServerThread:
    def __init__(self, engine: FakeEngine | None = None, **cfg):
        self.engine = engine or FakeEngine()
        cfg.setdefault("host", "127.0.0.1")
        cfg.setdefault("port", 0)
        cfg.setdefault("readiness_poll_s", 0.05)
        cfg.setdefault("metrics_refresh_s", 0.05)
        self.cfg = GrpcServeConfig(**cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = None

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def __enter__(self) -> ServerThread:
        self.thread.start()

        async def _start():
            self.server = build_server(self.engine, self.cfg)
            await self.server.start()

        self.run(_start())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def __exit__(self, *exc) -> None:
        try:
            self.run(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def stub(self, channel=None):
        ch = channel or grpc.insecure_channel(self.target)
        return pb_grpc.LLMServiceStub(ch), ch


def wait_for(cond, timeout: float = 2.0, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def text_request(text: str = "hello", **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling_params=pb.SamplingParams(**sampling))
