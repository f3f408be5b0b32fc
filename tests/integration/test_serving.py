"""The real stack end to end: gRPC SDK -> server -> RayEngineClient -> 2 CPU instance actors (tiny-llama)."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request

import grpc
import pytest

from accordion import SamplingParams
from accordion.client import AsyncClient, Client, ClientError

pytestmark = pytest.mark.timeout(120)

SERVICE = "accordion.v1.LLMService"


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 24))] for _ in range(n)]


def offline_tokens(offline, batch: list[list[int]], **sampling) -> list[list[int]]:
    outs = offline.generate(batch, SamplingParams(**sampling))
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_stream_and_unary_equal_offline(stack, offline):
    batch = prompts(6, seed=1)
    texts = ["Hello world", "The capital of France is"]
    expect = offline_tokens(offline, batch, max_tokens=12, temperature=0, ignore_eos=True)
    expect_text = [o.outputs[0] for o in offline.generate(texts, SamplingParams(max_tokens=12, temperature=0))]
    with Client(stack.target, timeout=30) as c:
        for p, exp in zip(batch, expect):
            streamed = [t for ch in c.stream(token_ids=p, max_tokens=12, temperature=0, ignore_eos=True)
                        for t in ch.token_ids]
            assert streamed == exp
            assert c.generate(token_ids=p, max_tokens=12, temperature=0, ignore_eos=True).token_ids == exp
        for t, exp in zip(texts, expect_text):
            r = c.generate(t, max_tokens=12, temperature=0)
            assert r.token_ids == exp.token_ids and r.text == exp.text


def test_n_greater_than_one_fans_out(stack, offline):
    p = prompts(1, seed=2)[0]
    with Client(stack.target, timeout=30) as c:
        r = c.generate(token_ids=p, max_tokens=6, temperature=0, n=3, ignore_eos=True)
    exp = offline_tokens(offline, [p], max_tokens=6, temperature=0, ignore_eos=True)[0]
    assert [comp.token_ids for comp in r.completions] == [exp] * 3


def test_cancel_30_of_100_streams_frees_every_block(stack, offline):
    batch = prompts(100, seed=3)
    expect = offline_tokens(offline, batch, max_tokens=32, temperature=0, ignore_eos=True)
    rng = random.Random(4)
    cancel_at = {i: rng.randrange(1, 32) for i in rng.sample(range(100), 30)}

    async def run():
        client = AsyncClient(stack.target, timeout=60)
        last_end = [0.0]

        async def one(i: int):
            toks: list[int] = []
            it = client.stream(token_ids=batch[i], max_tokens=32, temperature=0, ignore_eos=True)
            try:
                async for ch in it:
                    toks += ch.token_ids
                    if i in cancel_at and len(toks) >= cancel_at[i]:
                        break
            finally:
                await it.aclose()
                last_end[0] = max(last_end[0], time.monotonic())
            return toks

        try:
            res = await asyncio.gather(*(one(i) for i in range(100)))
        finally:
            await client.close()
        return res, last_end[0]

    res, last_end = asyncio.run(run())
    for i in range(100):
        if i not in cancel_at:
            assert res[i] == expect[i], f"stream {i} differs from the uncancelled run"
    deadline = last_end + 1.0
    loads = stack.wait_idle(deadline)
    assert time.monotonic() <= deadline + 0.5
    assert all(ld.num_free_blocks == ld.num_blocks for ld in loads)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "text"),
    (dict(token_ids=list(range(3, 303))), "prompt"),
    (dict(token_ids=[5, 6, 100000]), "token_ids"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(token_ids=[5] * 250, max_tokens=10), "max_tokens"),
])
def test_bad_input_then_still_serving(stack, kwargs, field):
    with Client(stack.target, timeout=10, max_retries=0) as c:
        with pytest.raises(ClientError) as ei:
            c.generate(**kwargs)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in ei.value.details()
        assert c.health(SERVICE) == "SERVING"
        assert c.generate(token_ids=[5, 6, 7], max_tokens=2).token_ids


def test_out_of_vocab_message_names_index(stack):
    with Client(stack.target, timeout=10, max_retries=0) as c:
        with pytest.raises(ClientError) as ei:
            c.generate(token_ids=[5, 6, 100000], max_tokens=2)
    assert "index 2" in ei.value.details()


def test_typed_errors_cross_ray(stack):
    """A request the instance refuses comes back as the typed error, not a RayTaskError."""
    import ray

    from accordion.cluster.errors import RequestTooLargeError
    from accordion.cluster.instance_actor import unwrap_ray_error
    from accordion.cluster.request import Request

    h = stack.instances()[0].handle
    req = Request(request_id="too-big", prompt_token_ids=[5] * 300, sampling_params=SamplingParams(max_tokens=4))
    with pytest.raises(Exception) as ei:
        ray.get(h.add_requests.remote([req]), timeout=10)
    err = unwrap_ray_error(ei.value)
    assert isinstance(err, RequestTooLargeError) and err.field == "prompt"
    assert "prompt has 300 tokens; max_model_len is 256" in str(err)


def test_auth(stack):
    server = stack.start_server(api_key="s3cret")
    target = f"127.0.0.1:{server.port}"
    try:
        for key in (None, "wrong"):
            with Client(target, api_key=key, timeout=10, max_retries=0) as c:
                with pytest.raises(ClientError) as ei:
                    c.generate(token_ids=[5, 6], max_tokens=2)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, api_key="s3cret", timeout=10) as c:
            assert len(c.generate(token_ids=[5, 6], max_tokens=2, ignore_eos=True).token_ids) == 2
    finally:
        stack.run(server.stop(0))


def test_drain(stack, offline):
    server = stack.start_server(drain_grace_s=30.0)
    target = f"127.0.0.1:{server.port}"
    batch = prompts(4, seed=5)
    expect = offline_tokens(offline, batch, max_tokens=200, temperature=0, ignore_eos=True)

    async def run():
        client = AsyncClient(target, timeout=60, max_retries=0)
        started = asyncio.Event()
        first = [0]

        async def one(p):
            toks = []
            async for ch in client.stream(token_ids=p, max_tokens=200, temperature=0, ignore_eos=True):
                toks += ch.token_ids
                if len(toks) == len(ch.token_ids):
                    first[0] += 1
                    if first[0] == len(batch):
                        started.set()
            return toks

        tasks = [asyncio.ensure_future(one(p)) for p in batch]
        await asyncio.wait_for(started.wait(), 30)
        drain = stack.submit(server.drain(30.0))
        t0 = time.monotonic()
        probe = AsyncClient(target, timeout=5, max_retries=0)
        while await probe.health(SERVICE) != "NOT_SERVING":
            assert time.monotonic() - t0 < 1.0
            await asyncio.sleep(0.01)
        with pytest.raises(ClientError) as ei:
            await probe.generate(token_ids=[5, 6], max_tokens=2)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        await probe.close()
        res = await asyncio.gather(*tasks)
        await client.close()
        await asyncio.wrap_future(drain)
        return res

    assert asyncio.run(run()) == expect


def test_metrics_after_traffic(stack):
    with Client(stack.target, timeout=10) as c:
        c.generate(token_ids=[5, 6, 7], max_tokens=4, ignore_eos=True)
    time.sleep(0.3)
    body = urllib.request.urlopen(f"http://127.0.0.1:{stack.server.metrics_port}/metrics", timeout=5).read().decode()
    for series in ("accordion_generation_tokens_total", "accordion_prompt_tokens_total",
                   "accordion_kv_cache_usage_ratio", "accordion_num_requests_running"):
        assert series in body
    gen = [ln for ln in body.splitlines() if ln.startswith("accordion_generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= 4


def test_requests_spread_over_both_instances(stack):
    before = dict(stack.engine.routed)

    async def run():
        client = AsyncClient(stack.target, timeout=30)
        await asyncio.gather(*(client.generate(token_ids=p, max_tokens=16, ignore_eos=True)
                               for p in prompts(20, seed=6)))
        await client.close()

    asyncio.run(run())
    delta = {k: v - before.get(k, 0) for k, v in stack.engine.routed.items()}
    assert len([v for v in delta.values() if v > 0]) == 2, delta
    assert max(delta.values()) <= 14, delta  # least loaded: neither instance gets (almost) everything


def test_server_info_aggregates_instances(stack):
    with Client(stack.target, timeout=10) as c:
        info = c.server_info()
    assert len(info.instances) == 2
    assert all(i.healthy for i in info.instances)


def test_ray_wildcard_listeners_are_found(stack):
    """`accordion serve` warns about Ray's listeners on all interfaces (Ray 2.60 binds them whatever node IP it
    is given); the helper finds them among this process's descendants."""
    from accordion.serve import ray_wildcard_listeners

    found = ray_wildcard_listeners()
    assert all(isinstance(port, int) and port > 0 and isinstance(name, str) for port, name in found)
    assert any(name in ("gcs_server", "raylet") for _, name in found), found  # update this test if Ray fixes it
