"""A client process that dies mid-stream (SIGKILL: no cancel, no goodbye) leaves nothing behind in the engine.

reliability.md R3: the kernel closes the dead client's socket, the server sees its streams end as cancelled, and the
engine aborts their requests and frees every KV block, on both instances, within two seconds of the kill."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(120)

NUM_STREAMS = 8

CLIENT = """
import asyncio, sys
from accordion.client import AsyncClient

async def main(target, n):
    client = AsyncClient(target, timeout=60, max_retries=0)
    started = 0
    all_started = asyncio.Event()

    async def one(i):
        nonlocal started
        async for chunk in client.stream(token_ids=[5 + i, 17, 23, 42], max_tokens=200, temperature=0.0,
                                         ignore_eos=True):
            if chunk.token_ids:
                started += 1
                if started == n:
                    all_started.set()
                await asyncio.sleep(3600)  # stop reading: the process is killed while its streams run

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await all_started.wait()
    print("streaming", flush=True)
    await asyncio.gather(*tasks)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _aborted_by_cancel(stack) -> float:
    return stack.server.metrics.registry.get_sample_value("accordion_aborts_total", {"source": "cancel"}) or 0.0


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
        return proc.stdout.readline()


def test_killed_client_frees_every_block(stack):
    before = _aborted_by_cancel(stack)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, stack.target, str(NUM_STREAMS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc, 60)
        assert line.strip() == "streaming", f"client did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    loads = stack.wait_idle(time.monotonic() + 2.0)
    assert all(ld.num_free_blocks == ld.num_blocks for ld in loads)
    # They ended because the client went away, not because they ran out of tokens.
    assert _aborted_by_cancel(stack) - before == NUM_STREAMS
