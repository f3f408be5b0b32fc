"""One real serving stack per session: a local Ray cluster (loopback, no dashboard), the global manager, two CPU
instances of the tiny-llama checkpoint, a ``RayEngineClient`` and a real gRPC server on loopback port 0, all on
a background event loop. Tests talk to it with the real SDK (``accordion.client``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from accordion.cluster.config import CacheConfig, ClusterConfig, DeviceConfig, EngineConfig, ModelConfig

MAX_MODEL_LEN = 256
NUM_BLOCKS = 256


def engine_config(path: str) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model=path, max_model_len=MAX_MODEL_LEN),
                        cache=CacheConfig(num_blocks=NUM_BLOCKS), device=DeviceConfig(device="cpu"))


class Stack:
    """The running stack. ``run(coro)`` executes on the serving loop."""

    def __init__(self, path: str):
        self.path = path
        self.engine_config = engine_config(path)
        self.cluster_config = ClusterConfig(engine=self.engine_config, namespace="accordion-test",
                                            health_check_interval_s=0.5, health_check_timeout_s=5.0,
                                            drain_timeout_s=20.0, direct_host="127.0.0.1")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="serving-loop", daemon=True)
        self.manager = None
        self.engine = None
        self.server = None

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> None:
        import ray

        from accordion.cluster.global_manager import start_manager

        if not ray.is_initialized():  # another module (elastic SP) may have started it with the same settings
            ray.init(num_cpus=4, include_dashboard=False, object_store_memory=80 << 20,
                     _node_ip_address="127.0.0.1", namespace="accordion-test", log_to_driver=False,
                     configure_logging=False)
        self.manager = start_manager(self.cluster_config)
        ray.get(self.manager.start.remote(2), timeout=120)
        self.thread.start()
        self.engine = self.run(self._make_engine(), timeout=60)
        self.server = self.start_server(metrics_port=0)

    async def _make_engine(self):
        from accordion.cluster.ray_engine import RayEngineClient

        engine = await RayEngineClient.create(self.manager, self.engine_config)
        await engine.wait_for_instances(2, timeout_s=30)
        return engine

    def start_server(self, **cfg):
        """Another gRPC server over the same engine (its own auth / drain state)."""
        from accordion.cluster.grpc_server import GrpcServeConfig, build_server

        cfg.setdefault("host", "127.0.0.1")
        cfg.setdefault("port", 0)
        cfg.setdefault("readiness_poll_s", 0.05)
        cfg.setdefault("metrics_refresh_s", 0.1)

        async def _start():
            server = build_server(self.engine, GrpcServeConfig(**cfg))
            await server.start()
            return server

        return self.run(_start())

    def instances(self) -> list:
        import ray

        return ray.get(self.manager.list_instances.remote(), timeout=10)

    def check_idle(self) -> list:
        """Every instance's ``check_idle()`` (raises if any request runs or a KV block is held)."""
        import ray

        return ray.get([r.handle.check_idle.remote() for r in self.instances()], timeout=10)

    def wait_idle(self, deadline: float) -> list:
        """:meth:`check_idle` once it passes, polled until ``deadline`` (``time.monotonic()``); its last error
        after that."""
        while True:
            try:
                return self.check_idle()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        import ray

        try:
            if self.server is not None:
                self.run(self.server.stop(0), timeout=10)
            if self.engine is not None:
                self.run(self.engine.close(), timeout=10)
            if self.manager is not None:
                ray.get(self.manager.shutdown.remote(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_path(tiny_ckpt) -> str:
    return tiny_ckpt("tiny-llama")


@pytest.fixture(scope="session")
def stack(tiny_path):
    s = Stack(tiny_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def offline(tiny_path):
    """The offline ``LLM`` with the same checkpoint and engine settings, for expected outputs."""
    from accordion import LLM

    return LLM(tiny_path, device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
