"""The engine processes' front-end sockets (cluster/direct_server.py) on the real stack: requests take them,
a wrong token is refused, and a connection that breaks fails its requests, frees their blocks and comes back."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from accordion.client import AsyncClient
from accordion.cluster.direct_server import recv_frame
from accordion.cluster.request import Request, SamplingParams
from accordion.cluster.wire_codec import encode_frame

pytestmark = pytest.mark.timeout(120)


async def _generate(target: str, n: int, max_tokens: int, started: asyncio.Event | None = None) -> list:
    """``n`` greedy streams; ``started`` is set once every stream has received two chunks (all are in flight)."""
    streaming = 0
    async with AsyncClient(target, timeout=60, max_retries=0) as client:
        async def one(i):
            nonlocal streaming
            chunks = []
            async for ch in client.stream(token_ids=[9 + i, 4, 4, 2], max_tokens=max_tokens, temperature=0,
                                          ignore_eos=True):
                chunks.append(ch)
                if len(chunks) == 2:
                    streaming += 1
                    if started is not None and streaming == n:
                        started.set()
            return chunks

        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def test_requests_travel_the_direct_connections(stack, offline):
    iids = sorted(r.instance_id for r in stack.instances())
    assert stack.engine.direct.connected == iids  # connected before the instances became routable
    before = stack.engine.direct.sent
    res = asyncio.run(_generate(stack.target, 6, 5))
    assert stack.engine.direct.sent - before == 6
    want = [o.outputs[0].token_ids for o in offline.generate([[9 + i, 4, 4, 2] for i in range(6)],
                                                              SamplingParams(max_tokens=5, temperature=0,
                                                                             ignore_eos=True))]
    assert [[t for ch in r for t in ch.token_ids] for r in res] == want
    assert not any(stack.engine.direct.unfinished(i) for i in iids)


def test_wrong_token_or_huge_hello_is_refused_and_the_engine_keeps_serving(stack):
    rec = stack.instances()[0]
    host, _, port = rec.info["direct"]["address"].rpartition(":")
    assert host == "127.0.0.1"  # the node's Ray address: loopback here
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        asyncio.run(_generate(stack.target, 2, 3))  # steps run while it is connected: it must hear none of them
        sock.sendall(encode_frame(("hello", "0" * 64)))
        req = Request(request_id="intruder-0", prompt_token_ids=[1, 2], sampling_params=SamplingParams(max_tokens=2))
        sock.sendall(encode_frame(("submit", 0, [[req]])))
        with pytest.raises(ConnectionError):
            recv_frame(sock)  # closed without a reply
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((32 << 20).to_bytes(4, "big"))  # a "hello" of 32 MiB: refused before it is read
        with pytest.raises(ConnectionError):
            recv_frame(sock)
    res = asyncio.run(_generate(stack.target, 2, 3))
    assert all(not isinstance(r, BaseException) for r in res)
    stack.check_idle()


def test_broken_connection_fails_its_requests_frees_blocks_and_reconnects(stack):
    engine = stack.engine

    async def run():
        started = asyncio.Event()
        streams = asyncio.ensure_future(_generate(stack.target, 4, 240, started))
        await asyncio.wait_for(started.wait(), 30)

        async def cut():
            for d in list(engine.direct._clients.values()):
                d._writer.transport.abort()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(cut(), stack.loop))
        return await asyncio.wait_for(streams, 30)

    res = asyncio.run(run())
    assert all(not isinstance(r, BaseException) for r in res), res
    assert all(r[-1].finish_reason == "error" and "connection" in r[-1].error for r in res)
    stack.wait_idle(time.monotonic() + 10)  # the engines aborted the orphaned requests: every block is free
    deadline = time.monotonic() + 10
    while engine.direct.connected != sorted(r.instance_id for r in stack.instances()):
        assert time.monotonic() < deadline, "direct connections did not come back"
        time.sleep(0.05)
    before = engine.direct.sent
    assert all(not isinstance(r, BaseException) for r in asyncio.run(_generate(stack.target, 2, 3)))
    assert engine.direct.sent - before == 2
