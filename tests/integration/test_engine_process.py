"""The engine process behind an instance actor: requests in, steps out, typed refusals, and no lost or hanging work
when the child dies or its parent does."""

from __future__ import annotations

import threading
import time

import pytest

from accordion.cluster.engine_process import EngineProcess
from accordion.cluster.errors import EngineUnavailableError, RequestTooLargeError
from accordion.cluster.outputs import from_wire
from accordion.cluster.request import FinishReason, Request, SamplingParams
from tests.integration.conftest import engine_config


class Collector:
    def __init__(self):
        self.outputs = []
        self.cond = threading.Condition()

    def __call__(self, wire, load):
        with self.cond:
            self.outputs.extend(from_wire(wire))
            self.cond.notify_all()

    def wait_finished(self, rid: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        with self.cond:
            while not any(o.request_id == rid and o.finished for o in self.outputs):
                assert self.cond.wait(deadline - time.time()), f"{rid} did not finish"
        return [o for o in self.outputs if o.request_id == rid]


def _req(rid: str, max_tokens: int = 8, prompt=(5, 6, 7)) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


@pytest.fixture()
def engine(tiny_ckpt):
    got = Collector()
    ep = EngineProcess(engine_config(tiny_ckpt("tiny-llama")), "accordion.workers.model_runner:ModelRunner", "ep-0",
                       got, cpu_threads=1)
    info = ep.start(timeout_s=120)
    assert info["num_blocks"] > 0 and info["device"] == "cpu"
    yield ep, got
    ep.stop()


def test_requests_stream_out_and_the_engine_ends_idle(engine):
    ep, got = engine
    ep.submit([_req("a"), _req("b", 5)]).result(30)
    a, b = got.wait_finished("a"), got.wait_finished("b")
    assert sum(len(o.new_token_ids) for o in a) == 8 and sum(len(o.new_token_ids) for o in b) == 5
    assert ep.wait_idle(10)
    assert ep.call("check_idle").result(10).idle


def test_a_request_that_can_never_fit_is_refused_with_its_type(engine):
    ep, _ = engine
    with pytest.raises(RequestTooLargeError):
        ep.submit([_req("huge", prompt=[5] * 300)]).result(30)  # over max_model_len (256)
    with pytest.raises(ValueError, match="unknown engine call"):
        ep.call("__del__")


def test_a_dead_child_fails_its_requests_and_refuses_new_ones(engine):
    ep, got = engine
    ep.submit([_req("long", max_tokens=200)]).result(30)
    ep._proc.kill()
    out = got.wait_finished("long")
    assert out[-1].finish_reason == FinishReason.ERROR and "failed" in out[-1].error
    with pytest.raises(EngineUnavailableError):
        ep.submit([_req("late")])


def test_the_child_exits_when_its_parent_goes_away(engine):
    ep, _ = engine
    ep._cmd.close()  # what the parent's death looks like from the child: end of file on its command pipe
    ep._proc.join(30)
    assert not ep._proc.is_alive()


def test_a_child_that_cannot_build_its_engine_reports_why(tmp_path):
    ep = EngineProcess(engine_config(str(tmp_path / "no-such-model")), "accordion.workers.model_runner:ModelRunner",
                       "ep-bad", Collector(), cpu_threads=1)
    with pytest.raises(RuntimeError, match="failed to start"):
        ep.start(timeout_s=120)
