"""``LocalEngineClient`` (no Ray) and ``accordion serve --no-ray`` (a real process, SIGTERM drain)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from accordion import SamplingParams
from accordion.cluster.errors import RequestValidationError
from accordion.cluster.request import FinishReason
from tests.integration.conftest import MAX_MODEL_LEN, NUM_BLOCKS, engine_config

pytestmark = pytest.mark.timeout(120)


def test_local_engine_client(tiny_path, offline):
    from accordion.cluster.local_engine import LocalEngineClient

    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    expect = [o.outputs[0].token_ids for o in
              offline.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]

    async def run():
        eng = await LocalEngineClient.create(engine_config(tiny_path))
        try:
            async def one(i, p):
                toks = []
                async for d in eng.generate(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0,
                                                                        ignore_eos=True)):
                    toks += d.token_ids
                return toks

            got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            with pytest.raises(RequestValidationError, match="index 1"):
                await anext(eng.generate("bad", [5, 10**6], SamplingParams(max_tokens=2)))
            msg = f"prompt has 250 tokens; max_model_len is {MAX_MODEL_LEN}"
            with pytest.raises(RequestValidationError, match=msg):
                await anext(eng.generate("long", [5] * 250, SamplingParams(max_tokens=10)))
            # close mid-stream -> aborted, blocks back
            it = eng.generate("c", [5, 6], SamplingParams(max_tokens=200, ignore_eos=True))
            await anext(it)
            await it.aclose()
            # Abort RPC path -> the stream ends with ABORT
            it = eng.generate("a", [5, 6], SamplingParams(max_tokens=200, ignore_eos=True))
            await anext(it)
            assert await eng.abort(["a"]) == ["a"]
            last = [d async for d in it][-1]
            assert last.finish_reason == FinishReason.ABORT
            assert await asyncio.to_thread(eng.engine_loop.wait_idle, 5)
            ld = eng.load()
            assert ld.num_free_blocks == ld.num_blocks == NUM_BLOCKS
            info = await eng.server_info()
            assert info.instances[0].instance_id == "local"
            return got
        finally:
            await eng.close()

    assert asyncio.run(run()) == expect


@pytest.mark.parametrize("mode", [["--no-ray"], ["--esp", "--num-instances", "1"]], ids=["no-ray", "ray-esp"])
def test_serve_sigterm_drains_and_exits_0(tiny_path, mode):
    """``accordion serve`` as a real process (in-process engine, or its own local Ray cluster)."""
    from accordion.client import Client

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accordion.cli", "serve", *mode, "--model", tiny_path, "--port", "0",
           "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-blocks", "64", "--drain-grace", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = ""
        end = time.monotonic() + 120
        while "serving" not in line:
            assert time.monotonic() < end and proc.poll() is None, line
            line = proc.stdout.readline()
        target = re.search(r"on (\S+:\d+)", line).group(1)
        with Client(target, timeout=30) as c:
            it = c.stream(token_ids=[5, 6, 7], max_tokens=200, temperature=0, ignore_eos=True)
            first = next(it)
            proc.send_signal(signal.SIGTERM)
            rest = list(it)
        assert sum(len(ch.token_ids) for ch in [first, *rest]) == 200
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_full_queue_is_resource_exhausted_with_retry_hint_then_recovers(tiny_path):
    """A real engine whose waiting queue holds one request: extra requests get RESOURCE_EXHAUSTED with a
    retry-after-ms trailer at once; admitted ones complete, and the server stays healthy."""
    import dataclasses

    import grpc

    from accordion.client import AsyncClient, ClientError
    from accordion.cluster.config import SchedulerConfig
    from accordion.cluster.grpc_server import GrpcServeConfig, build_server
    from accordion.cluster.local_engine import LocalEngineClient

    ec = dataclasses.replace(engine_config(tiny_path), scheduler=SchedulerConfig(max_num_seqs=1, max_waiting=1))

    async def run():
        eng = await LocalEngineClient.create(ec)
        server = build_server(eng, GrpcServeConfig(host="127.0.0.1", port=0, readiness_poll_s=0.05))
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60, max_retries=0) as c:
                async def one(i):
                    try:
                        r = await c.generate(token_ids=[5, 6, 7], max_tokens=60, temperature=0, ignore_eos=True)
                        return len(r.token_ids)
                    except ClientError as e:
                        return e

                results = await asyncio.gather(*(one(i) for i in range(8)))
                assert await c.health("accordion.v1.LLMService") == "SERVING"
            return results
        finally:
            await server.stop(0)
            await eng.close()

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, ClientError)]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert all(r.retry_after_s is not None and r.retry_after_s > 0 for r in refused)
    assert [r for r in results if r == 60], "admitted requests complete"
