"""The gRPC front end over real loopback gRPC against a fake engine: bad input, errors, cancel, abort, deadlines,
drain, metrics, message limits and a fuzz test. Every rejection is followed by a health check that is SERVING."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accordion.cluster.auth import InsecureBindError
from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError
from accordion.cluster.grpc_server import GrpcServeConfig, build_server
from accordion.protos import llm_service_pb2 as pb
from tests.cluster.fake_engine import VOCAB, FakeEngine
from tests.cluster.grpc_harness import ServerThread, text_request, wait_for

SC = grpc.StatusCode


@pytest.fixture(scope="module")
def srv():
    with ServerThread(FakeEngine(), metrics_port=0, max_message_bytes=256 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def stub(srv):
    s, ch = srv.stub()
    yield s
    ch.close()


@pytest.fixture(scope="module")
def health_stub(srv):
    ch = grpc.insecure_channel(srv.target)
    yield health_pb2_grpc.HealthStub(ch)
    ch.close()


def assert_serving(health_stub):
    for service in ("", "accordion.v1.LLMService"):
        resp = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def expect_error(fn, code, *needles):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    err = ei.value
    assert err.code() == code, (err.code(), err.details())
    for n in needles:
        assert n in err.details(), (n, err.details())
    return err


# ---- happy paths ---------------------------------------------------------------------------------------------


def test_generate_unary_and_stream_agree(stub, srv, health_stub):
    req = text_request("hello", max_tokens=8, ignore_eos=True)
    req.request_id = "r-agree"
    resp = stub.Generate(req, timeout=10)
    assert resp.request_id == "r-agree"
    (c,) = resp.completions
    assert c.finish_reason == pb.FINISH_REASON_LENGTH and len(c.token_ids) == 8
    assert resp.usage.prompt_tokens == len("hello") + 1 and resp.usage.completion_tokens == 8
    assert c.HasField("timings") and c.timings.decode_ms > 0
    req.request_id = "r-agree-2"
    chunks = list(stub.GenerateStream(req, timeout=10))
    assert [t for ch in chunks for t in ch.token_ids] == list(c.token_ids)
    assert "".join(ch.text for ch in chunks) == c.text
    assert [ch.usage.completion_tokens for ch in chunks] == list(range(1, 9))  # cumulative
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and chunks[-1].HasField("timings")
    assert all(ch.finish_reason == pb.FINISH_REASON_UNSPECIFIED for ch in chunks[:-1])
    assert_serving(health_stub)


def test_inputs_token_ids_and_chat(stub, srv):
    r = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                         sampling_params=pb.SamplingParams(max_tokens=2)), timeout=10)
    assert srv.engine.last_prompt == [5, 6, 7] and r.request_id.startswith("req-")
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    stub.Generate(pb.GenerateRequest(messages=msgs, sampling_params=pb.SamplingParams(max_tokens=2)), timeout=10)
    assert srv.engine.last_prompt == srv.engine.tokenizer.encode("<user>hi\n<assistant>")
    # max_tokens unset -> whatever fits
    stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 250)), timeout=10)
    assert srv.engine.last_params.max_tokens == 256 - 250


def test_n_and_logprobs_and_stop(stub):
    resp = stub.Generate(text_request("x", max_tokens=4, n=3, logprobs=2, seed=7, ignore_eos=True), timeout=10)
    assert [c.index for c in resp.completions] == [0, 1, 2]
    assert resp.usage.completion_tokens == 12
    assert all(len(c.logprobs) == 4 and len(c.logprobs[0].top) == 2 for c in resp.completions)
    first = resp.completions[0].token_ids[1]
    resp2 = stub.Generate(text_request("x", max_tokens=4, ignore_eos=True, stop_token_ids=[first]), timeout=10)
    c = resp2.completions[0]
    assert c.finish_reason == pb.FINISH_REASON_STOP and c.matched_stop_token_id == first
    assert c.WhichOneof("matched_stop") == "matched_stop_token_id"


def test_tokenize_detokenize_info(stub):
    assert list(stub.Tokenize(pb.TokenizeRequest(text="ab"), timeout=5).token_ids) == [1, 100, 101]
    r = stub.Tokenize(pb.TokenizeRequest(text="ab", add_special_tokens=False), timeout=5)
    assert list(r.token_ids) == [100, 101]
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, 3, 4]), timeout=5).text == "de"
    mi = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert (mi.model_name, mi.max_model_len, mi.vocab_size, mi.bos_token_id) == ("fake-model", 256, VOCAB, 1)
    si = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert si.version == "fake-0" and not si.draining and si.instances[0].device == "cpu"


# ---- the bad-input table -------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("prompt longer than max_model_len", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 300)),
     ["prompt has 300 tokens; max_model_len is 256"]),
    ("prompt + max_tokens over context", text_request("hello", max_tokens=251),
     ["prompt has 6 tokens", "max_model_len is 256", "max_tokens"]),
    ("max_tokens 0", text_request("hello", max_tokens=0), ["max_tokens", "at least 1"]),
    ("max_tokens negative", text_request("hello", max_tokens=-3), ["max_tokens"]),
    ("temperature negative", text_request("hello", temperature=-0.5), ["temperature"]),
    ("temperature nan", text_request("hello", temperature=float("nan")), ["temperature", "finite"]),
    ("temperature inf", text_request("hello", temperature=float("inf")), ["temperature"]),
    ("temperature huge", text_request("hello", temperature=1000.0), ["temperature"]),
    ("top_p zero", text_request("hello", top_p=0.0), ["top_p"]),
    ("top_p over 1", text_request("hello", top_p=1.5), ["top_p"]),
    ("top_k below -1", text_request("hello", top_k=-2), ["top_k"]),
    ("min_p over 1", text_request("hello", min_p=2.0), ["min_p"]),
    ("repetition_penalty 0", text_request("hello", repetition_penalty=0.0), ["repetition_penalty"]),
    ("frequency_penalty out of range", text_request("hello", frequency_penalty=3.0), ["frequency_penalty"]),
    ("presence_penalty out of range", text_request("hello", presence_penalty=-2.5), ["presence_penalty"]),
    ("n too large", text_request("hello", n=100), ["n:"]),
    ("n zero", text_request("hello", n=0), ["n:"]),
    ("seed negative", text_request("hello", seed=-1), ["seed"]),
    ("min_tokens over max_tokens", text_request("hello", max_tokens=2, min_tokens=5), ["min_tokens"]),
    ("logprobs too many", text_request("hello", logprobs=1000), ["logprobs"]),
    ("empty text", pb.GenerateRequest(text=""), ["empty"]),
    ("empty token list", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), ["empty"]),
    ("no input", pb.GenerateRequest(), ["input"]),
    ("empty messages", pb.GenerateRequest(messages=pb.ChatMessages()), ["messages"]),
    ("chat template failure", pb.GenerateRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="forbidden", content="x")])), ["messages", "alternate"]),
    ("token id out of vocab", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 999999])),
     ["999999", "index 2"]),
    ("negative token id", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1, 5])), ["-1", "index 0"]),
    ("stop token id out of vocab", text_request("hello", stop_token_ids=[VOCAB]), ["stop_token_ids"]),
    ("empty stop string", text_request("hello", stop=[""]), ["stop"]),
    ("too many stop strings", text_request("hello", stop=[f"s{i}" for i in range(17)]), ["stop"]),
    ("stop string too long", text_request("hello", stop=["x" * 300]), ["stop"]),
    ("request id too long", pb.GenerateRequest(request_id="r" * 300, text="hi"), ["request_id"]),
    ("request id with control chars", pb.GenerateRequest(request_id="a\nb", text="hi"), ["request_id"]),
]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_invalid_argument(stub, health_stub, case, stream):
    _, req, needles = case
    call = (lambda: list(stub.GenerateStream(req, timeout=5))) if stream else (lambda: stub.Generate(req, timeout=5))
    err = expect_error(call, SC.INVALID_ARGUMENT, *needles)
    assert ("accordion-invalid-field", err.trailing_metadata()[0][1]) in err.trailing_metadata()
    assert_serving(health_stub)


def test_unknown_model_not_found(stub, health_stub):
    expect_error(lambda: stub.Generate(pb.GenerateRequest(text="hi", model="gpt-9"), timeout=5), SC.NOT_FOUND, "gpt-9")
    expect_error(lambda: stub.Tokenize(pb.TokenizeRequest(text="hi", model="gpt-9"), timeout=5), SC.NOT_FOUND)
    stub.Generate(pb.GenerateRequest(text="hi", model="fake-model", sampling_params=pb.SamplingParams(max_tokens=1)),
                  timeout=5)
    assert_serving(health_stub)


def test_detokenize_bad_ids(stub, health_stub):
    expect_error(lambda: stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, VOCAB + 5]), timeout=5),
                 SC.INVALID_ARGUMENT, "index 1")
    assert_serving(health_stub)


def _raw_call(srv, method: str, payload: bytes):
    ch = grpc.insecure_channel(srv.target)
    try:
        fn = ch.unary_unary(f"/accordion.v1.LLMService/{method}", request_serializer=None,
                            response_deserializer=None)
        return fn(payload, timeout=5)
    finally:
        ch.close()


def test_invalid_utf8_is_invalid_argument(srv, health_stub):
    bad_text = b"\x1a\x02\xff\xfe"  # field 3 (text), length 2, invalid UTF-8
    expect_error(lambda: _raw_call(srv, "Generate", bad_text), SC.INVALID_ARGUMENT, "UTF-8")
    expect_error(lambda: _raw_call(srv, "Tokenize", b"\x0a\x01\xc3"), SC.INVALID_ARGUMENT, "UTF-8")
    expect_error(lambda: _raw_call(srv, "Abort", b"\x0a\x01\x80"), SC.INVALID_ARGUMENT)
    ch = grpc.insecure_channel(srv.target)
    stream = ch.unary_stream("/accordion.v1.LLMService/GenerateStream", request_serializer=None,
                             response_deserializer=None)
    expect_error(lambda: list(stream(bad_text, timeout=5)), SC.INVALID_ARGUMENT, "UTF-8")
    ch.close()
    assert_serving(health_stub)


def test_malformed_bytes_is_invalid_argument(srv, health_stub):
    expect_error(lambda: _raw_call(srv, "Generate", b"\xff\xff\xff\xff\xff"), SC.INVALID_ARGUMENT)
    assert_serving(health_stub)


def test_message_over_size_limit(stub, health_stub):
    req = pb.GenerateRequest(text="a" * (300 * 1024))  # server limit 256 KiB in this module
    expect_error(lambda: stub.Generate(req, timeout=5), SC.RESOURCE_EXHAUSTED)
    assert_serving(health_stub)


def test_huge_metadata_rejected(stub, health_stub):
    with pytest.raises(grpc.RpcError) as ei:
        stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("x-junk", "a" * 64 * 1024),), timeout=5)
    assert ei.value.code() in (SC.RESOURCE_EXHAUSTED, SC.INTERNAL, SC.UNAVAILABLE)  # library-generated
    assert_serving(health_stub)


# ---- engine errors -------------------------------------------------------------------------------------------


def test_engine_errors_map_to_codes(srv, stub, health_stub):
    eng = srv.engine
    eng.fail_next.append(EngineOverloadedError("queue full", retry_after_s=0.25))
    err = expect_error(lambda: stub.Generate(text_request("hi"), timeout=5), SC.RESOURCE_EXHAUSTED, "queue full")
    assert ("retry-after-ms", "250") in tuple(err.trailing_metadata())
    eng.fail_next.append(EngineUnavailableError("no instance alive"))
    expect_error(lambda: list(stub.GenerateStream(text_request("hi"), timeout=5)), SC.UNAVAILABLE, "no instance")
    eng.fail_next.append(RuntimeError("kaboom"))
    req = text_request("hi")
    req.request_id = "r-internal"
    err = expect_error(lambda: stub.Generate(req, timeout=5), SC.INTERNAL, "r-internal")
    assert "kaboom" not in err.details()  # internals are logged, not leaked
    assert_serving(health_stub)


def test_duplicate_inflight_request_id(srv, stub):
    req = text_request("hi", max_tokens=100, ignore_eos=True)
    req.request_id = "r-dup"
    it = stub.GenerateStream(req, timeout=10)
    next(it)
    expect_error(lambda: stub.Generate(req, timeout=5), SC.ALREADY_EXISTS, "r-dup")
    it.cancel()


# ---- cancellation, abort, deadlines --------------------------------------------------------------------------


def test_client_cancel_aborts_engine_request(srv, stub):
    req = text_request("cancel me", max_tokens=200, ignore_eos=True)
    req.request_id = "r-cancel"
    it = stub.GenerateStream(req, timeout=10)
    next(it), next(it)
    assert "r-cancel" in srv.engine.inflight
    t0 = time.monotonic()
    it.cancel()
    assert wait_for(lambda: "r-cancel" not in srv.engine.inflight, timeout=1.0)
    assert time.monotonic() - t0 < 1.0
    assert "r-cancel" in srv.engine.aborted


def test_abort_rpc(srv, stub):
    req = text_request("abort me", max_tokens=200, ignore_eos=True)
    req.request_id = "r-abort"
    it = stub.GenerateStream(req, timeout=10)
    next(it)
    resp = stub.Abort(pb.AbortRequest(request_ids=["r-abort", "r-unknown"]), timeout=5)
    assert list(resp.aborted_request_ids) == ["r-abort"]
    rest = list(it)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert wait_for(lambda: "r-abort" not in srv.engine.inflight)


def test_deadline_expiry_aborts(srv, stub):
    req = text_request("slow", max_tokens=200, ignore_eos=True)
    req.request_id = "r-deadline"
    expect_error(lambda: stub.Generate(req, timeout=0.1), SC.DEADLINE_EXCEEDED)
    assert wait_for(lambda: "r-deadline" in srv.engine.aborted and "r-deadline" not in srv.engine.inflight, 1.0)
    req.request_id = "r-deadline-stream"
    expect_error(lambda: list(stub.GenerateStream(req, timeout=0.1)), SC.DEADLINE_EXCEEDED)
    assert wait_for(lambda: "r-deadline-stream" in srv.engine.aborted, 1.0)


# ---- metrics -------------------------------------------------------------------------------------------------


def test_metrics_endpoint(srv, stub):
    stub.Generate(text_request("metrics", max_tokens=3, ignore_eos=True), timeout=5)
    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
    assert wait_for(lambda: "accordion_num_requests_running" in urllib.request.urlopen(url, timeout=5).read().decode())
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    for name in (
        "accordion_time_to_first_token_seconds_bucket",
        "accordion_time_per_output_token_seconds_bucket",
        "accordion_e2e_request_latency_seconds_bucket",
        "accordion_prompt_tokens_total",
        "accordion_generation_tokens_total",
        'accordion_requests_finished_total{finish_reason="length"}',
        "accordion_aborts_total",
        "accordion_num_requests_waiting",
        "accordion_kv_cache_usage_ratio",
        "accordion_num_preemptions",
    ):
        assert name in body, name


# ---- fuzz ----------------------------------------------------------------------------------------------------

_ints = st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1), st.integers(-3, 300))
_floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
_sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": _floats, "top_p": _floats, "top_k": _ints, "min_p": _floats,
        "repetition_penalty": _floats, "frequency_penalty": _floats, "presence_penalty": _floats,
        "max_tokens": st.one_of(st.none(), st.integers(-5, 300)), "min_tokens": _ints,
        "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), "n": st.one_of(st.none(), st.integers(-2, 20)),
        "ignore_eos": st.booleans(), "logprobs": _ints, "skip_special_tokens": st.booleans(),
        "include_stop_str_in_output": st.booleans(),
        "stop": st.lists(st.text(max_size=5), max_size=18), "stop_token_ids": st.lists(_ints.filter(bool), max_size=5),
    },
)
_input = st.one_of(
    st.none(),
    st.builds(lambda t: {"text": t}, st.text(max_size=40)),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(st.integers(-5, 1100), max_size=300)),
    st.builds(lambda ms: {"messages": pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in ms])},
              st.lists(st.tuples(st.sampled_from(["", "user", "assistant", "forbidden"]), st.text(max_size=10)),
                       max_size=3)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(inp=_input, sampling=_sampling, model=st.sampled_from(["", "fake-model", "other"]),
       request_id=st.one_of(st.just(""), st.text(max_size=12)), priority=st.integers(-(2**31), 2**31 - 1))
def test_fuzz_never_internal(stub, inp, sampling, model, request_id, priority):
    sp = {k: v for k, v in sampling.items() if v is not None}
    if "max_tokens" not in sp:
        sp["max_tokens"] = 2  # keep the fuzz fast
    sp["max_tokens"] = min(sp["max_tokens"], 3)
    req = pb.GenerateRequest(model=model, request_id=request_id, priority=priority,
                             sampling_params=pb.SamplingParams(**sp), **(inp or {}))
    try:
        stub.Generate(req, timeout=10)
    except grpc.RpcError as e:
        assert e.code() in (SC.INVALID_ARGUMENT, SC.NOT_FOUND), (e.code(), e.details())


# ---- drain, bind policy --------------------------------------------------------------------------------------


def test_drain_finishes_inflight_and_rejects_new():
    with ServerThread(FakeEngine(step_s=0.01)) as s:
        stub, ch = s.stub()
        hstub = health_pb2_grpc.HealthStub(ch)
        it = stub.GenerateStream(text_request("long", max_tokens=40, ignore_eos=True), timeout=10)
        first = next(it)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("chunks", [first, *it]))
        t.start()
        fut = s.submit(s.server.drain(5.0))
        assert wait_for(lambda: s.server.draining)
        resp = hstub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        resp = hstub.Check(health_pb2.HealthCheckRequest(service="accordion.v1.LLMService"), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        expect_error(lambda: stub.Generate(text_request("new"), timeout=5), SC.UNAVAILABLE, "draining")
        expect_error(lambda: list(stub.GenerateStream(text_request("new"), timeout=5)), SC.UNAVAILABLE)
        t.join(5)
        chunks = result["chunks"]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and chunks[-1].usage.completion_tokens == 40
        fut.result(5)
        ch.close()


def test_drain_grace_expiry_cancels_and_aborts():
    with ServerThread(FakeEngine(step_s=0.01)) as s:
        stub, ch = s.stub()
        it = stub.GenerateStream(text_request("long", max_tokens=200, ignore_eos=True), timeout=10)
        next(it)
        s.run(s.server.drain(0.1))
        with pytest.raises(grpc.RpcError):
            list(it)
        assert wait_for(lambda: not s.engine.inflight and len(s.engine.aborted) == 1)
        ch.close()


def test_refuses_public_bind_without_key(caplog):
    with pytest.raises(InsecureBindError, match="API key"):
        build_server(FakeEngine(), GrpcServeConfig(host="0.0.0.0", port=0))
    with pytest.raises(InsecureBindError):
        build_server(FakeEngine(), GrpcServeConfig(host="::", port=0))
    with caplog.at_level("WARNING", logger="accordion.grpc"):
        build_server(FakeEngine(), GrpcServeConfig(host="0.0.0.0", port=0, api_key="k"))
    assert "without TLS" in caplog.text
    build_server(FakeEngine(), GrpcServeConfig(host="localhost", port=0))  # loopback: fine without key


def test_not_ready_engine_reports_not_serving():
    eng = FakeEngine(ready=False)
    with ServerThread(eng) as s:
        ch = grpc.insecure_channel(s.target)
        h = health_pb2_grpc.HealthStub(ch)
        def status(service):
            return h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        ready = lambda: status("accordion.v1.LLMService")  # noqa: E731
        assert ready() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status("") == health_pb2.HealthCheckResponse.SERVING
        eng.ready = True
        assert wait_for(lambda: ready() == health_pb2.HealthCheckResponse.SERVING)
        with pytest.raises(grpc.RpcError) as ei:
            h.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert ei.value.code() == SC.NOT_FOUND
        ch.close()


def test_sigterm_drains_and_stops():
    import asyncio
    import os
    import signal

    from accordion.cluster.grpc_server import install_signal_handlers

    async def main():
        server = build_server(FakeEngine(), GrpcServeConfig(host="127.0.0.1", port=0, drain_grace_s=1.0))
        await server.start()
        install_signal_handlers(server)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server.wait_for_termination(), 5)
        assert server.draining

    asyncio.run(main())
