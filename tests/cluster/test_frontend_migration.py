"""The front end follows a migrated engine request from its old route's stream to its new one: outputs the new
route sends before the old route's RequestMoved marker wait for it, aborts go where the request is, and a
marker for a request nobody waits for any more aborts it at its new home."""

from __future__ import annotations

import asyncio

from accordion.cluster.engine_client import ModelInfo
from accordion.cluster.engine_frontend import EngineFrontend
from accordion.cluster.outputs import EngineOutput, RequestMoved
from accordion.cluster.request import FinishReason, SamplingParams
from tests.cluster.fake_engine import FakeTokenizer


class _Detok:
    def step(self, token_id: int) -> str:
        return FakeTokenizer.piece(token_id)


class _Tokenizer(FakeTokenizer):
    def decode_stream(self, prompt_token_ids, skip_special_tokens=True):
        return _Detok()


class TwoRoutes(EngineFrontend):
    """Every request goes to route "a"; aborts are recorded."""

    def __init__(self):
        super().__init__(_Tokenizer(), ModelInfo("fake", 256, 1000, [2], 1, "float32", 16))
        self.aborts: list[tuple[str, list[str]]] = []

    def _choose_route(self, requests, exclude):
        return "a"

    async def _send(self, route, requests):
        return None

    def _send_abort(self, route, request_ids):
        self.aborts.append((route, list(request_ids)))


def _tok(cid, *tokens, finish=None):
    return EngineOutput(cid, list(tokens), finish_reason=finish)


def test_outputs_stay_in_order_across_a_move_and_back():
    async def main():
        fe = TwoRoutes()
        got: list[int] = []

        async def consume():
            async for d in fe.generate("r", [5, 6], SamplingParams(max_tokens=8)):
                got.extend(d.token_ids)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        fe._on_route_outputs("a", [_tok("r-0", 10)])
        fe._on_route_outputs("b", [_tok("r-0", 12)])  # b is ahead of a's marker: held
        fe._on_route_outputs("a", [_tok("r-0", 11), RequestMoved("r-0", "b")])
        fe._on_route_outputs("a", [_tok("r-0", 14)])  # back on a before b's marker came: held
        fe._on_route_outputs("b", [_tok("r-0", 13), RequestMoved("r-0", "a")])
        await asyncio.sleep(0)
        assert got == [10, 11, 12, 13, 14]
        await fe.abort(["r"])
        assert fe.aborts[-1] == ("a", ["r-0"])
        fe._on_route_outputs("a", [_tok("r-0", 15), RequestMoved("r-0", "b")])
        await fe.abort(["r"])
        assert fe.aborts[-1] == ("b", ["r-0"])  # aborts follow the request
        fe._on_route_outputs("b", [_tok("r-0", 16, finish=FinishReason.LENGTH)])
        await task
        assert got == [10, 11, 12, 13, 14, 15, 16]

    asyncio.run(main())


def test_a_marker_for_a_closed_stream_aborts_the_request_at_its_new_home():
    async def main():
        fe = TwoRoutes()
        gen = fe.generate("r", [5, 6], SamplingParams(max_tokens=8))
        first = asyncio.create_task(gen.__anext__())
        await asyncio.sleep(0)
        fe._on_route_outputs("a", [_tok("r-0", 10)])
        await first
        await gen.aclose()  # the client went away while the request was migrating
        fe._on_route_outputs("a", [RequestMoved("r-0", "b")])
        assert fe.aborts[-1] == ("b", ["r-0"])

    asyncio.run(main())
