"""The Ray front end arranges each multi-master scale-up once, however many load reports list it.

An instance's output stream runs a report or two behind its engine, so reports made before a scale-up was arranged
still list the spill after the arrangement ended. Arranging it again reserved a second slice for the same request
on its holder, which refused with "request id ... already holds blocks here". No Ray here: fake handles.
"""

from __future__ import annotations

import asyncio

from accordion.cluster import ray_engine
from accordion.cluster.config import EngineConfig, ESPConfig, ModelConfig
from accordion.cluster.engine_client import ModelInfo
from accordion.cluster.global_manager import InstanceRecord, InstanceState
from accordion.cluster.load import LoadReport
from tests.cluster.fake_engine import FakeTokenizer


class _Remote:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        return self._fn(*args)


class _Handle:
    def __init__(self):
        self.calls: list[tuple] = []
        self.engine_call = _Remote(self._engine_call)

    async def _engine_call(self, name, *args):
        self.calls.append((name, *args))


class _Manager:
    def __init__(self, result: bool = True):
        self.scale_ups: list[tuple] = []
        self.result = result
        self.scale_up = _Remote(self._scale_up)

    async def _scale_up(self, *args):
        self.scale_ups.append(args)
        await asyncio.sleep(0)
        return self.result


def _client(monkeypatch, manager) -> ray_engine.RayEngineClient:
    monkeypatch.setattr(ray_engine, "model_info_for",
                        lambda config, tok: ModelInfo("fake", 256, 1000, [2], 1, "float32", 16))
    config = EngineConfig(model=ModelConfig(model="/nonexistent/fake", max_model_len=256))
    client = ray_engine.RayEngineClient(manager, config, FakeTokenizer(), esp=ESPConfig(enabled=True))
    for iid in ("a", "b"):
        client._records[iid] = InstanceRecord(iid, _Handle(), InstanceState.SERVING)
        client._subscribed.add(iid)
        client._loads[iid] = LoadReport(iid, num_free_blocks=40, num_blocks=40)
    return client


async def _settle():
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_spill_listed_again_by_an_older_report_is_arranged_once(monkeypatch):
    async def main():
        manager = _Manager()
        client = _client(monkeypatch, manager)
        spill = ("z-0", 300, 150)
        client.sp_placement._on_spills("a", (spill,))
        await _settle()  # arranged and done: "a" attached the tail
        client.sp_placement._on_spills("a", (spill,))  # a report made before the attach
        await _settle()
        assert manager.scale_ups == [("a", "z-0", "b", 300, 150)]
        client.sp_placement._on_spills("a", ())  # the spill is over
        client.sp_placement._on_spills("a", (("z-0", 460, 10),))  # a new one (of the same request) is arranged
        await _settle()
        assert [s[:4] for s in manager.scale_ups] == [("a", "z-0", "b", 300), ("a", "z-0", "b", 460)]
        assert client._records["a"].handle.calls == []

    asyncio.run(main())


def test_a_refused_scale_up_tells_the_master_to_stop_waiting(monkeypatch):
    """Arranged once, a refusal must end the master's wait (it preempts as usual), whatever the manager did."""
    async def main():
        manager = _Manager(result=False)
        client = _client(monkeypatch, manager)
        client.sp_placement._on_spills("a", (("z-0", 300, 150),))
        await _settle()
        client.sp_placement._on_spills("a", (("z-0", 300, 150),))
        await _settle()
        assert len(manager.scale_ups) == 1
        assert client._records["a"].handle.calls == [("spill_failed", "z-0")]

    asyncio.run(main())
