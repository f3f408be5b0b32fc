"""The front end's two load-adaptive batchings: submissions to an instance (one call in flight, the rest ride the
next call) and stream deltas (a lagging consumer gets one merged message per completion)."""

from __future__ import annotations

import asyncio

import pytest

from accordion.cluster.engine_frontend import _coalesce
from accordion.cluster.errors import EngineOverloadedError
from accordion.cluster.outputs import RequestTimings, StreamDelta, Usage
from accordion.cluster.ray_engine import SubmitBatcher
from accordion.cluster.request import FinishReason, Request, SamplingParams


def _req(rid: str) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1, 2], sampling_params=SamplingParams(max_tokens=2))


def test_submissions_arriving_during_a_call_share_the_next_call():
    calls: list[list[str]] = []

    async def send(groups):
        calls.append([g[0].request_id for g in groups])
        await asyncio.sleep(0.01)
        return [EngineOverloadedError("full", 0.5) if g[0].request_id == "r3" else None for g in groups]

    async def main():
        b = SubmitBatcher(send)
        first = asyncio.create_task(b.submit([_req("r0")]))
        await asyncio.sleep(0)  # r0's call is in flight
        rest = [asyncio.create_task(b.submit([_req(f"r{i}")])) for i in range(1, 5)]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    assert calls == [["r0"], ["r1", "r2", "r3", "r4"]]
    assert results[:3] == [None, None, None] and results[4] is None
    assert isinstance(results[3], EngineOverloadedError) and results[3].retry_after_s == 0.5


def test_a_failed_call_fails_every_submission_in_it_and_the_batcher_recovers():
    n = 0

    async def send(groups):
        nonlocal n
        n += 1
        if n == 1:
            raise ConnectionError("actor died")
        return [None] * len(groups)

    async def main():
        b = SubmitBatcher(send)
        bad = await asyncio.gather(b.submit([_req("a")]), return_exceptions=True)
        good = await b.submit([_req("b")])
        return bad, good

    bad, good = asyncio.run(main())
    assert isinstance(bad[0], ConnectionError) and good is None


def _delta(index, toks, text, finish=None, completion=0):
    return StreamDelta("r", index, list(toks), text, finish_reason=finish,
                       usage=Usage(5, completion, 0), timings=RequestTimings(queue_s=0.1 * completion))


def test_queued_deltas_merge_per_completion_in_order():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for d in [_delta(0, [2], "b", completion=2), _delta(1, [7], "x", completion=1),
                  _delta(0, [3], "c", FinishReason.LENGTH, completion=3), _delta(1, [8], "y", completion=2)]:
            q.put_nowait(d)
        return _coalesce(_delta(0, [1], "a", completion=1), q)

    out = asyncio.run(main())
    assert [(d.index, d.token_ids, d.text) for d in out] == [(0, [1, 2, 3], "abc"), (1, [7, 8], "xy")]
    assert out[0].finish_reason == FinishReason.LENGTH and out[0].usage.completion_tokens == 3
    assert out[0].timings.queue_s == pytest.approx(0.3) and out[1].usage.completion_tokens == 2


def test_nothing_merges_into_a_finished_delta():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        q.put_nowait(_delta(0, [], "", FinishReason.ERROR))
        return _coalesce(_delta(0, [1], "a", FinishReason.LENGTH), q)

    out = asyncio.run(main())
    assert len(out) == 2 and out[0].token_ids == [1]
