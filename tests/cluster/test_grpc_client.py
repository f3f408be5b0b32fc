"""accordion.client against a real server on loopback: results, streaming, cancel, retries, async, CLI."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc
import pytest

from accordion.client import AsyncClient, Client, ClientError, build_generate_request, generate_cli
from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError
from tests.cluster.fake_engine import FakeEngine
from tests.cluster.grpc_harness import ServerThread, wait_for


@pytest.fixture(scope="module")
def srv():
    with ServerThread(FakeEngine()) as s:
        yield s


@pytest.fixture
def client(srv):
    with Client(srv.target, timeout=10, initial_backoff_s=0.01) as c:
        yield c


def test_generate_and_stream(client):
    r = client.generate("hello", max_tokens=5, ignore_eos=True, request_id="c-1")
    assert r.request_id == "c-1" and r.finish_reason == "length" and len(r.token_ids) == 5
    assert r.usage.prompt_tokens == 6 and r.completions[0].timings is not None
    chunks = list(client.stream("hello", max_tokens=5, ignore_eos=True))
    assert "".join(c.text for c in chunks) == r.text and chunks[-1].finished
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 5
    r2 = client.generate(token_ids=[5, 6], max_tokens=2, n=2, logprobs=1, stop="zz")
    assert len(r2.completions) == 2 and r2.completions[1].logprobs
    r3 = client.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert r3.finish_reason in ("length", "stop")


def test_small_rpcs(client):
    assert client.tokenize("ab") == [1, 100, 101]
    assert client.tokenize("ab", add_special_tokens=False) == [100, 101]
    assert client.detokenize([3, 4]) == "de"
    assert client.model_info().max_model_len == 256
    assert client.server_info().version == "fake-0"
    assert client.health() == "SERVING" and client.health("accordion.v1.LLMService") == "SERVING"
    assert client.abort(["nothing"]) == []


def test_request_builder_validation():
    with pytest.raises(ValueError):
        build_generate_request("a", token_ids=[1])
    with pytest.raises(ValueError):
        build_generate_request()
    with pytest.raises(TypeError, match="bogus"):
        build_generate_request("a", bogus=1)
    req = build_generate_request("a", temperature=0.0, top_k=None)
    assert req.sampling_params.HasField("temperature") and not req.sampling_params.HasField("top_k")


def test_invalid_argument_not_retried(srv, client):
    n = len(srv.engine.started)
    with pytest.raises(ClientError) as ei:
        client.generate("hi", temperature=-1)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in ei.value.details()
    assert len(srv.engine.started) == n


def test_retries_unavailable_then_succeeds(srv, client):
    srv.engine.fail_next[:] = [EngineUnavailableError("warming up"), EngineUnavailableError("warming up")]
    assert client.generate("hi", max_tokens=1).finish_reason
    srv.engine.fail_next[:] = [EngineUnavailableError("warming up")]
    assert list(client.stream("hi", max_tokens=1))[-1].finished
    srv.engine.fail_next[:] = [EngineUnavailableError("down")] * 4
    with pytest.raises(ClientError) as ei:
        client.generate("hi", max_tokens=1)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and not srv.engine.fail_next  # 1 + 3 retries
    srv.engine.fail_next[:] = [EngineOverloadedError("full", retry_after_s=2)]
    with pytest.raises(ClientError) as ei:
        client.generate("hi", max_tokens=1)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and ei.value.retry_after_s == 2.0


def test_stream_not_retried_after_data(srv, client):
    s = client.stream("hi", max_tokens=200, ignore_eos=True, request_id="c-noretry")
    next(s)
    n = len(srv.engine.started)
    srv.engine.fail_next[:] = [EngineUnavailableError("x")]  # would make a retry fail visibly
    assert client.abort("c-noretry") == ["c-noretry"]
    rest = list(s)
    assert rest[-1].finish_reason == "abort" and len(srv.engine.started) == n
    srv.engine.fail_next.clear()


def test_breaking_out_cancels(srv, client):
    for i, _chunk in enumerate(client.stream("hi", max_tokens=200, ignore_eos=True, request_id="c-break")):
        if i == 2:
            break
    assert wait_for(lambda: "c-break" in srv.engine.aborted and "c-break" not in srv.engine.inflight, 1.0)


def test_deadline(srv):
    with Client(srv.target, timeout=0.1) as c, pytest.raises(ClientError) as ei:
        c.generate("hi", max_tokens=200, ignore_eos=True)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client(srv):
    async def main():
        async with AsyncClient(srv.target, timeout=10, initial_backoff_s=0.01) as c:
            r = await c.generate("hello", max_tokens=3, ignore_eos=True)
            assert len(r.token_ids) == 3
            chunks = [ch async for ch in c.stream("hello", max_tokens=3, ignore_eos=True)]
            assert "".join(ch.text for ch in chunks) == r.text
            async with aclosing(c.stream("hi", max_tokens=200, ignore_eos=True, request_id="a-close")) as s:
                async for _ in s:
                    break
            assert await c.tokenize("ab") == [1, 100, 101]
            assert await c.detokenize([3]) == "d"
            assert (await c.model_info()).vocab_size == 1000
            assert (await c.server_info()).version == "fake-0"
            assert await c.health() == "SERVING"
            srv.engine.fail_next[:] = [EngineUnavailableError("warming up")]
            assert (await c.generate("hi", max_tokens=1)).finish_reason
            with pytest.raises(ClientError):
                await c.generate("hi", top_p=7.0)

    asyncio.run(main())
    assert wait_for(lambda: "a-close" in srv.engine.aborted, 1.0)


def test_generate_cli(srv, capsys):
    assert generate_cli(["--target", srv.target, "--max-tokens", "4", "--temperature", "0", "--usage", "hello"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip()) <= 4 and "completion=" in err
    assert generate_cli(["--target", srv.target, "--temperature", "-1", "hello"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
