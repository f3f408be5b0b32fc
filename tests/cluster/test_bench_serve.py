"""Fast tests (no server) for the serving benchmark in bench/serve.py and bench/serving/."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# bench/ is a folder of scripts (not part of the installed package): import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import serve
from bench.serving.arrivals import gamma_arrivals, parse_rates, trace_arrivals
from bench.serving.backend import AccordionBackend, FakeBackend, record_stream
from bench.serving.metrics import compute_metrics, parse_slos, peak_concurrency
from bench.serving.records import RequestRecord, SampleRequest
from bench.serving.runner import find_max_rate, find_max_rate_async, run_once
from bench.serving.workloads import WorkloadConfig, clip_lengths, data_dir, generate


def rec(
    rid: str,
    send: float,
    times: list[float],
    toks: list[int],
    usage: int | None = None,
    prompt_len: int = 10,
    status: str = "OK",
) -> RequestRecord:
    r = RequestRecord(rid, prompt_len, 16, send_time=send, chunk_times=times, chunk_tokens=toks, status=status)
    r.completion_tokens = sum(toks) if usage is None else usage
    return r


def synthetic() -> list[RequestRecord]:
    return [
        rec("a", 0.0, [0.1, 0.2, 0.4], [1, 1, 1], prompt_len=10),  # ttft 100, tpot 150, e2el 400
        rec("b", 1.0, [1.05], [1], prompt_len=20),  # 1 token: no TPOT; TPOT counts as 0 for goodput
        rec("c", 0.5, [0.8, 1.0], [2, 3], prompt_len=30),  # 5 tokens in 2 chunks: tpot 200/4 = 50, ITL [200]
        rec("d", 0.2, [], [], status="RESOURCE_EXHAUSTED"),
        rec("e", 0.3, [0.35], [1], status="UNAVAILABLE"),
    ]


def test_metrics_hand_computed() -> None:
    m = compute_metrics(synthetic(), duration_s=2.0, percentiles=(50, 99))
    assert (m["completed"], m["failed"]) == (3, 2)
    assert m["failed_by_status"] == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)  # (100 + 50 + 300) / 3
    assert m["median_ttft_ms"] == pytest.approx(100.0)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.98 * 200)  # numpy linear interpolation on [50, 100, 300]
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # only a (150) and c (50): b has one token
    assert m["mean_itl_ms"] == pytest.approx(500 / 3)  # pooled gaps [100, 200, 200]
    assert m["median_itl_ms"] == pytest.approx(200.0)
    assert m["mean_e2el_ms"] == pytest.approx((400 + 50 + 500) / 3)
    assert m["p50_e2el_ms"] == pytest.approx(400.0)
    assert m["peak_concurrency"] == 1  # a [0,.4], c [.5,1.0], b [1.0,1.05]: an end precedes a start at 1.0
    assert "request_goodput" not in m


@pytest.mark.parametrize(
    "slos, good",
    [
        (["ttft:200", "tpot:100"], 1),  # a misses TPOT, c misses TTFT, b passes (1 token: TPOT 0)
        (["tpot:100"], 2),  # a misses
        (["e2el:100"], 1),  # only b
        (["ttft:1000", "tpot:1000", "e2el:1000"], 3),  # failed requests never count
    ],
)
def test_goodput(slos: list[str], good: int) -> None:
    m = compute_metrics(synthetic(), 2.0, goodput_slos_ms=parse_slos(slos))
    assert m["request_goodput"] == pytest.approx(good / 2.0)
    assert m["slo_attainment"] == pytest.approx(good / 5)


def test_metrics_edge_cases() -> None:
    r = rec("u", 0.0, [0.1, 0.3], [2, 2], usage=0)  # no server usage: fall back to streamed ids
    m = compute_metrics([r], 1.0)
    assert m["total_output_tokens"] == 4 and m["mean_tpot_ms"] == pytest.approx(200 / 3)
    one = compute_metrics([rec("o", 0.0, [0.2], [1])], 1.0)  # only 1-token outputs: TPOT and ITL empty -> 0
    assert one["mean_tpot_ms"] == 0.0 and one["mean_itl_ms"] == 0.0 and one["mean_ttft_ms"] == pytest.approx(200)
    none = compute_metrics([rec("f", 0.0, [], [], status="INTERNAL")], 1.0, goodput_slos_ms={"ttft": 1.0})
    assert none["completed"] == 0 and none["request_goodput"] == 0.0 and none["p99_ttft_ms"] == 0.0
    assert peak_concurrency([rec("x", 0, [1.0], [1]), rec("y", 0.5, [2.0], [1]), rec("z", 0.7, [0.8], [1])]) == 3
    with pytest.raises(ValueError):
        parse_slos(["itl:5"])


def test_arrival_schedule_statistics() -> None:
    n, rate = 20000, 10.0
    t = gamma_arrivals(n, rate, 1.0, np.random.default_rng(1))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert t[-1] == pytest.approx(n / rate)  # vLLM's rescaling: last request at N/rate
    assert gaps.mean() == pytest.approx(1 / rate, rel=1e-9) and np.all(gaps >= 0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1
    smooth = np.diff(gamma_arrivals(n, rate, 4.0, np.random.default_rng(1)))
    assert smooth.std() / smooth.mean() == pytest.approx(0.5, abs=0.05)  # Gamma(k): CV 1/sqrt(k)
    assert np.array_equal(
        gamma_arrivals(5, rate, 1.0, np.random.default_rng(3)), gamma_arrivals(5, rate, 1.0, np.random.default_rng(3))
    )
    assert not gamma_arrivals(10, math.inf).any()
    assert np.allclose(gamma_arrivals(4, 2.0, math.inf), [0.5, 1.0, 1.5, 2.0])
    assert np.allclose(trace_arrivals([5.0, 6.0, 9.0], time_scale=2.0), [0.0, 0.5, 2.0])
    assert parse_rates("1, 2,inf") == [1.0, 2.0, math.inf]


TRACES = data_dir() / "traces"
needs_data = pytest.mark.skipif(not TRACES.is_dir(), reason=f"no trace data at {TRACES}")


def _check(reqs: list[SampleRequest], cfg: WorkloadConfig) -> None:
    assert len(reqs) == cfg.num_prompts and len({r.request_id for r in reqs}) == len(reqs)
    for r in reqs:
        assert r.prompt_len >= 1 and r.output_len >= 1
        assert cfg.max_model_len is None or r.prompt_len + r.output_len <= cfg.max_model_len
        assert r.prompt_token_ids.min() >= 0 and r.prompt_token_ids.max() < cfg.vocab_size
        assert not np.isin(r.prompt_token_ids, list(cfg.special_ids)).any()


def test_random_workload() -> None:
    cfg = WorkloadConfig(
        "random", 300, vocab_size=100, special_ids=frozenset({0, 1, 2}), input_len=100, output_len=20, range_ratio=0.5
    )
    reqs = generate(cfg)
    _check(reqs, cfg)
    assert 50 <= min(r.prompt_len for r in reqs) and max(r.prompt_len for r in reqs) <= 150
    assert 10 <= min(r.output_len for r in reqs) and max(r.output_len for r in reqs) <= 30
    assert [r.prompt_len for r in generate(cfg)] == [r.prompt_len for r in reqs]  # seeded
    assert clip_lengths(5000, 300, 4096) == (3796, 300) and clip_lengths(10, 9000, 4096) == (1, 4095)


@needs_data
@pytest.mark.parametrize("name, mean_prompt", [("sharegpt-like", 1154), ("arxiv", 2588), ("azure-code", 2047)])
def test_trace_workloads(name: str, mean_prompt: float) -> None:
    cfg = WorkloadConfig(name, 400, seed=1, vocab_size=49152, special_ids=frozenset({0, 1, 2}), max_model_len=16384)
    reqs = generate(cfg)
    _check(reqs, cfg)
    assert np.mean([r.prompt_len for r in reqs]) == pytest.approx(mean_prompt, rel=0.25)
    clipped = generate(WorkloadConfig(name, 100, max_model_len=1024))
    assert max(r.prompt_len + r.output_len for r in clipped) <= 1024


@needs_data
def test_mooncake_prefixes_and_timestamps() -> None:
    cfg = WorkloadConfig("mooncake", 200, vocab_size=49152, special_ids=frozenset({0}), max_model_len=131072)
    reqs = generate(cfg)
    _check(reqs, cfg)
    lines = (TRACES / "mooncake_synthetic.jsonl").read_text().splitlines()[:200]
    rows = [json.loads(x) for x in lines]
    assert [r.output_len for r in reqs] == [max(1, row["output_length"]) for row in rows]  # trace order
    first: dict[int, np.ndarray] = {}
    shared = 0
    for r, row in zip(reqs, rows):
        h = row["hash_ids"][0]
        if h in first and r.prompt_len >= 512 and len(first[h]) >= 512:
            assert np.array_equal(first[h][:512], r.prompt_token_ids[:512])  # same block, same ids
            shared += 1
        first.setdefault(h, r.prompt_token_ids)
    assert shared > 0
    offs = [r.arrival_s for r in reqs]
    assert offs[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(offs))
    assert len(generate(WorkloadConfig("mooncake", 20, max_model_len=8192))[5].prompt_token_ids) <= 8191


@needs_data
def test_long_context_mix() -> None:
    cfg = WorkloadConfig("long-context-mix", 400, long_fraction=0.25, max_model_len=65536)
    reqs = generate(cfg)
    _check(reqs, cfg)
    long = [r for r in reqs if r.prompt_len >= 8192]
    assert 90 <= len(long) <= 110 and max(r.prompt_len for r in long) <= 65536


@dataclass
class _U:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _C:
    token_ids: list[int]
    finish_reason: str | None
    usage: _U | None


class _Err(Exception):
    def code(self) -> object:
        class Code:
            name = "RESOURCE_EXHAUSTED"

        return Code()


class _Client:
    """Stands in for accordion.client.AsyncClient (same ``stream`` signature)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.kwargs = fail, {}

    async def stream(
        self,
        prompt: str | None = None,
        *,
        token_ids: list[int] | None = None,
        request_id: str = "",
        model: str = "",
        priority: int = 0,
        timeout: float | None = None,
        **sampling: object,
    ):
        self.kwargs = {"token_ids": token_ids, "request_id": request_id, "model": model, "timeout": timeout, **sampling}
        if self.fail:
            raise _Err("queue full")
        yield _C([5], None, _U(3, 1))
        yield _C([], None, None)  # empty chunk: not a token arrival
        yield _C([6, 7], "length", _U(3, 3))

    async def model_info(self) -> _U:
        return _U(1, 2)


def test_accordion_adapter_with_fake_client() -> None:
    client = _Client()
    b = AccordionBackend("x:1", client=client, model="m", timeout_s=5.0)
    r = asyncio.run(b.stream_request([1, 2, 3], 3, "req-1"))
    assert client.kwargs == {
        "token_ids": [1, 2, 3],
        "max_tokens": 3,
        "request_id": "req-1",
        "ignore_eos": True,
        "model": "m",
        "timeout": 5.0,
    }
    assert r.success and r.chunk_tokens == [1, 2] and r.output_tokens == 3 and r.finish_reason == "length"
    assert asyncio.run(b.model_info()) == {"prompt_tokens": 1, "completion_tokens": 2}
    bad = asyncio.run(AccordionBackend("x:1", client=_Client(fail=True)).stream_request([1], 3, "r"))
    assert not bad.success and bad.status == "RESOURCE_EXHAUSTED"


def test_against_real_grpc_server_with_fake_engine(tmp_path: Path) -> None:
    """The real SDK and gRPC servicer on loopback, the engine faked (tests/cluster/fake_engine.py)."""
    pytest.importorskip("accordion.client")
    harness = pytest.importorskip("tests.cluster.grpc_harness")
    from tests.cluster.fake_engine import FakeEngine

    argv = [
        "--workload",
        "random",
        "--num-prompts",
        "12",
        "--random-input-len",
        "300",
        "--random-output-len",
        "4",
        "--request-rate",
        "inf",
        "--max-concurrency",
        "6",
    ]
    with harness.ServerThread(FakeEngine(step_s=0.002, max_model_len=256)) as srv:
        args = serve.build_parser().parse_args([*argv, "--target", srv.target])
        res = asyncio.run(serve.run(args))
    [p] = res["points"]
    assert (p["completed"], p["failed"]) == (12, 0) and p["total_output_tokens"] == 48
    assert res["server"]["model_info"]["max_model_len"] == 256 and res["workload"]["max_prompt_len"] == 252
    assert p["mean_tpot_ms"] > 0 and p["peak_concurrency"] <= 6


def test_record_stream_error_after_tokens() -> None:
    async def chunks():
        yield _C([1], None, None)
        raise RuntimeError("boom")

    r = asyncio.run(record_stream(chunks(), RequestRecord("r", 1, 4)))
    assert r.status == "RuntimeError" and r.chunk_tokens == [1]


def test_find_max_rate() -> None:
    def run_fn(rate: float) -> dict[str, float]:  # latency grows linearly with rate
        return {"p99_ttft_ms": 10.0 * rate, "p99_tpot_ms": 1.0 * rate, "failed": 0, "num_requests": 10}

    res = find_max_rate(run_fn, {"ttft": 100.0, "tpot": 50.0}, lo=1.0, hi=32.0, iters=10)
    assert 9.9 < res["max_rate"] <= 10.0 and res["probes"][0]["rate"] == 1.0
    assert find_max_rate(run_fn, {"ttft": 5.0}, 1.0, 32.0)["max_rate"] is None
    assert find_max_rate(run_fn, {"tpot": 500.0}, 1.0, 32.0)["max_rate"] == 32.0

    async def arun(rate: float) -> dict[str, float]:
        return {**run_fn(rate), "failed": 1 if rate > 20 else 0}  # failures also break the SLO

    res = asyncio.run(find_max_rate_async(arun, {"ttft": 1000.0}, 1.0, 64.0, iters=12))
    assert 19.9 < res["max_rate"] <= 20.0


def test_sustained_capacity_stops_at_the_first_failing_rate() -> None:
    from bench.mixed_workload import sustained_capacity

    def point(rate: float, ttft_ms: float) -> dict[str, float]:
        return {"request_rate": rate, "p99_ttft_ms": ttft_ms, "p99_tpot_ms": 10.0, "failed": 0, "num_requests": 96}

    slo = {"ttft": 20_000.0, "tpot": 150.0}
    # a burst can pass at a higher rate after failing at a lower one; the capacity stops at the first failure
    pts = [point(2.0, 15_000.0), point(0.75, 9_000.0), point(1.5, 25_000.0), point(1.0, 12_000.0)]
    res = sustained_capacity(pts, slo)
    assert res["max_rate"] == 1.0 and [p["rate"] for p in res["probes"]] == [0.75, 1.0, 1.5, 2.0]
    assert sustained_capacity([point(0.75, 30_000.0)], slo)["max_rate"] is None
    assert sustained_capacity([{**point(0.75, 1.0), "failed": 1}], slo)["max_rate"] is None


def test_max_concurrency_caps_in_flight() -> None:
    reqs = [SampleRequest(f"r{i}", np.arange(8), 3) for i in range(12)]
    fake = FakeBackend(ttft_s=0.01, itl_s=0.002)
    recs, dur, _ = asyncio.run(run_once(fake, reqs, [0.0] * 12, max_concurrency=3))
    assert all(r.success for r in recs) and peak_concurrency(recs) <= 3 and dur > 0.04


def test_end_to_end_cli_with_fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    argv = [
        "--backend",
        "fake",
        "--workload",
        "random",
        "--num-prompts",
        "24",
        "--random-input-len",
        "64",
        "--random-output-len",
        "6",
        "--request-rate",
        "200,inf",
        "--fake-ttft-ms",
        "3",
        "--fake-itl-ms",
        "1",
        "--goodput",
        "ttft:1000",
        "tpot:100",
        "--metric-percentiles",
        "50,90",
        "--label",
        "e2e",
        "--result-dir",
        str(tmp_path),
        "--save-detailed",
    ]
    assert serve.main(argv) == 0
    [js] = list(tmp_path.glob("serve-e2e-*.json"))
    assert js.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {js.name, js.with_suffix(".png").name}
    res = json.loads(js.read_text())
    assert [p["request_rate"] for p in res["points"]] == [200.0, "inf"]
    for p in res["points"]:
        assert p["completed"] == 24 and p["failed"] == 0 and p["total_output_tokens"] == 24 * 6
        assert p["request_goodput"] == pytest.approx(p["request_throughput"])
        assert p["mean_ttft_ms"] >= 3.0 and p["p90_tpot_ms"] >= 1.0 and len(p["requests"]) == 24
    assert res["env"]["hostname"] and "date" in res["env"] and res["server"]["model_info"]["max_model_len"]


def test_end_to_end_counts_failures(tmp_path: Path) -> None:
    args = serve.build_parser().parse_args(
        [
            "--workload",
            "random",
            "--num-prompts",
            "10",
            "--random-input-len",
            "16",
            "--random-output-len",
            "1",
            "--request-rate",
            "inf",
        ]
    )
    res = asyncio.run(serve.run(args, backend=FakeBackend(ttft_s=0.001, fail_every=5)))
    [p] = res["points"]
    assert (p["completed"], p["failed"], p["failed_by_status"]) == (8, 2, {"RESOURCE_EXHAUSTED": 2})
    assert p["mean_tpot_ms"] == 0.0  # 1-token outputs only
