"""Run-time membership on the real stack: drain-remove an instance under load, add one, lose one mid-stream.
Runs after test_serving.py (it changes which instances exist; it leaves two serving)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import ray

from accordion.client import AsyncClient

pytestmark = pytest.mark.timeout(120)


def _wait(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


async def _streams(target: str, n: int, max_tokens: int, started: asyncio.Event | None = None) -> list:
    client = AsyncClient(target, timeout=60, max_retries=0)
    count = [0]

    async def one(i: int):
        chunks = []
        async for ch in client.stream(token_ids=[5 + i, 6, 7, 8], max_tokens=max_tokens, temperature=0,
                                      ignore_eos=True):
            if not chunks:
                count[0] += 1
                if started is not None and count[0] == n:
                    started.set()
            chunks.append(ch)
        return chunks

    try:
        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    finally:
        await client.close()


def test_remove_with_drain_then_add(stack):
    ids = [r.instance_id for r in stack.instances()]
    victim, survivor = ids[0], ids[1]

    async def run():
        started = asyncio.Event()
        streams = asyncio.ensure_future(_streams(stack.target, 8, 150, started))
        await asyncio.wait_for(started.wait(), 30)
        on_victim = stack.engine.routed.get(victim, 0)
        removal = stack.manager.remove_instance.remote(victim, True)
        res = await streams
        clean = await removal
        return res, clean, on_victim

    res, clean, on_victim = asyncio.run(run())
    assert on_victim > 0
    assert clean is True
    for chunks in res:
        assert not isinstance(chunks, BaseException), chunks
        assert sum(len(c.token_ids) for c in chunks) == 150 and chunks[-1].finish_reason == "length"
    assert [r.instance_id for r in stack.instances()] == [survivor]

    before = dict(stack.engine.routed)
    res = asyncio.run(_streams(stack.target, 6, 4))
    assert all(not isinstance(r, BaseException) for r in res)
    assert stack.engine.routed.get(victim, 0) == before.get(victim, 0)
    assert stack.engine.routed[survivor] - before.get(survivor, 0) == 6

    new = ray.get(stack.manager.add_instance.remote(), timeout=60).instance_id
    stack.run(stack.engine.wait_for_instances(2, timeout_s=30))
    res = asyncio.run(_streams(stack.target, 10, 8))
    assert all(not isinstance(r, BaseException) for r in res)
    assert stack.engine.routed.get(new, 0) > 0
    stack.check_idle()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_instance_death_fails_its_requests_then_replaced(stack):
    recs = stack.instances()
    victim = recs[0]

    async def run():
        started = asyncio.Event()
        streams = asyncio.ensure_future(_streams(stack.target, 6, 200, started))
        await asyncio.wait_for(started.wait(), 30)
        on_victim = stack.engine.routed.get(victim.instance_id, 0)
        engine_pid = (await victim.handle.start.remote())["engine_pid"]  # started already: returns its info
        ray.kill(victim.handle, no_restart=True)
        return await asyncio.wait_for(streams, 30), on_victim, engine_pid

    res, on_victim, engine_pid = asyncio.run(run())
    assert on_victim > 0
    _wait(lambda: not _alive(engine_pid), timeout=10)  # the killed actor's engine process exits: no orphan
    errors = [r for r in res if not isinstance(r, BaseException) and r[-1].finish_reason == "error"]
    ok = [r for r in res if not isinstance(r, BaseException) and r[-1].finish_reason == "length"]
    assert not [r for r in res if isinstance(r, BaseException)], res
    assert errors and len(errors) + len(ok) == 6
    assert all("failed" in r[-1].error for r in errors)
    # The manager's health check notices, removes it; a new instance takes its place.
    _wait(lambda: victim.instance_id not in [r.instance_id for r in stack.instances()], timeout=10)
    ray.get(stack.manager.add_instance.remote(), timeout=60)
    stack.run(stack.engine.wait_for_instances(2, timeout_s=30))
    res = asyncio.run(_streams(stack.target, 4, 4))
    assert all(not isinstance(r, BaseException) for r in res)
    stack.check_idle()


def test_instances_and_their_engines_run_at_niceness_zero(stack):
    """Ray renices worker processes to 15; the manager and the instance actors ask for 0 (``actor_niceness``),
    and the engine processes they spawn inherit it, so the engine's host loop does not yield the CPU to every
    other process on the node (a local cluster: the processes are on this machine)."""
    pids = [ray.get(r.handle.start.remote(), timeout=30)["engine_pid"] for r in stack.instances()]
    pids += [ray.get(r.handle.__ray_call__.remote(lambda self: os.getpid()), timeout=10) for r in stack.instances()]
    assert len(pids) >= 4 and [os.getpriority(os.PRIO_PROCESS, p) for p in pids] == [0] * len(pids)
    manager_pid = ray.get(stack.manager.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    assert os.getpriority(os.PRIO_PROCESS, manager_pid) == 0
