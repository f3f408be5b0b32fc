"""``accordion bench serve``: replay a workload against a running accordion gRPC server and report vLLM-style
serving metrics (TTFT/TPOT/ITL/E2EL percentiles, throughput, goodput) for one or more request rates.

    python bench/serve.py --target localhost:50051 --workload sharegpt-like --num-prompts 500 \\
        --request-rate 1,2,4,8,inf --goodput ttft:500 tpot:50

Writes ``bench/results/serve-<label>-<timestamp>.json`` (+ a latency-vs-rate PNG; copies under ``$OUT``).
``--find-max-rate LO,HI --slo ttft:MS tpot:MS`` searches the highest rate meeting p99 TTFT/TPOT SLOs instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable for ``bench.serving``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving.arrivals import parse_rates
from bench.serving.backend import AccordionBackend, Backend, FakeBackend
from bench.serving.metrics import parse_slos
from bench.serving.report import env_info, format_table, write_results
from bench.serving.runner import RunSettings, benchmark_point, find_max_rate_async, sweep
from bench.serving.workloads import WORKLOADS, WorkloadConfig, generate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="accordion bench serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--backend",
        choices=("accordion", "fake"),
        default="accordion",
        help="accordion = gRPC SDK; fake = in-process simulated server (dry runs)",
    )
    g.add_argument("--target", default="localhost:50051", help="gRPC address of the accordion server")
    g.add_argument("--model", default=None, help="model name to request (if the server serves several)")
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly the workload's output lengths",
    )
    g.add_argument("--request-timeout", type=float, default=None, help="per-request gRPC deadline (s)")
    g.add_argument("--api-key", default=None, help="bearer token, if the server requires one")
    g.add_argument("--tls", action="store_true", help="TLS with the system roots")
    g.add_argument("--client-retries", type=int, default=0, help="SDK retries on UNAVAILABLE (0: failures count)")
    g.add_argument("--max-model-len", type=int, default=None, help="clip lengths to this (default: server's)")
    g.add_argument("--vocab-size", type=int, default=None, help="random token ids below this (default: server's)")
    g.add_argument("--special-ids", type=int, nargs="*", default=[], help="ids never put in prompts (+EOS/BOS)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="random")
    w.add_argument("--num-prompts", type=int, default=1000)
    w.add_argument("--data-dir", default=None, help="default: $ACCORDION_DATA_DIR, <repo>/../shared/data")
    w.add_argument("--random-input-len", type=int, default=1024)
    w.add_argument("--random-output-len", type=int, default=128)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--output-len", type=int, default=None, help="override every output length")
    w.add_argument("--long-fraction", type=float, default=0.1, help="long-context-mix: share of long prompts")
    w.add_argument("--long-min-len", type=int, default=8192)
    w.add_argument("--long-max-len", type=int, default=131072)
    w.add_argument(
        "--use-trace-timestamps",
        action="store_true",
        help="send at the trace's arrival times (mooncake, sharegpt-like, azure-code)",
    )
    w.add_argument("--trace-time-scale", type=float, default=1.0, help="speed-up of trace timestamps")
    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", default="inf", help="req/s, comma list to sweep (e.g. 1,2,4,8,inf)")
    t.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape: 1 = Poisson")
    t.add_argument("--max-concurrency", type=int, default=None)
    t.add_argument("--num-warmups", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("metrics and output")
    m.add_argument("--metric-percentiles", default="99", help="comma list, e.g. 50,90,99 (99 is always added)")
    m.add_argument("--goodput", nargs="*", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50")
    m.add_argument(
        "--find-max-rate",
        default=None,
        metavar="LO,HI",
        help="binary-search the highest rate in [LO,HI] meeting --slo instead of sweeping",
    )
    m.add_argument("--slo", nargs="*", default=[], metavar="NAME:MS", help="p99 ttft/tpot SLOs for the search")
    m.add_argument("--search-iters", type=int, default=6)
    m.add_argument("--label", default=None, help="result file label (default: the workload)")
    m.add_argument("--result-dir", default=None, help="default: bench/results")
    m.add_argument("--save-detailed", action="store_true", help="per-request timings in the JSON")
    f = p.add_argument_group("fake backend")
    f.add_argument("--fake-ttft-ms", type=float, default=20.0)
    f.add_argument("--fake-itl-ms", type=float, default=5.0)
    f.add_argument("--fake-slots", type=int, default=64, help="requests the fake serves at once")
    return p


def make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "fake":
        return FakeBackend(
            ttft_s=args.fake_ttft_ms / 1e3,
            itl_s=args.fake_itl_ms / 1e3,
            slots=args.fake_slots,
            max_model_len=args.max_model_len or 4096,
            vocab_size=args.vocab_size or 32000,
        )
    return AccordionBackend(
        args.target,
        model=args.model,
        ignore_eos=args.ignore_eos,
        timeout_s=args.request_timeout,
        api_key=args.api_key,
        tls=args.tls,
        max_retries=args.client_retries,
    )


def workload_config(args: argparse.Namespace, info: dict[str, Any] | None) -> WorkloadConfig:
    """Flags first, then the server's model info, then defaults."""
    info = info or {}
    specials = set(args.special_ids) | {int(t) for t in info.get("eos_token_ids") or []}
    if info.get("bos_token_id") is not None:
        specials.add(int(info["bos_token_id"]))
    return WorkloadConfig(
        name=args.workload,
        num_prompts=args.num_prompts,
        seed=args.seed,
        vocab_size=int(args.vocab_size or info.get("vocab_size") or 32000),
        special_ids=frozenset(specials),
        max_model_len=args.max_model_len or (int(info["max_model_len"]) if info.get("max_model_len") else None),
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        long_fraction=args.long_fraction,
        long_min_len=args.long_min_len,
        long_max_len=args.long_max_len,
        output_len_override=args.output_len,
        in_trace_order=args.use_trace_timestamps,
        data_dir=args.data_dir,
    )


async def run(args: argparse.Namespace, backend: Backend | None = None) -> dict[str, Any]:
    """Build the workload, run the sweep (or the capacity search) and return the full result dict."""
    backend = backend or make_backend(args)
    try:
        info, server = await backend.model_info(), await backend.server_info()
        cfg = workload_config(args, info)
        requests = generate(cfg)
        pcts = sorted({float(x) for x in args.metric_percentiles.split(",") if x} | {99.0})
        s = RunSettings(
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            use_trace_timestamps=args.use_trace_timestamps,
            trace_time_scale=args.trace_time_scale,
            seed=args.seed,
            num_warmups=args.num_warmups,
            percentiles=tuple(pcts),
            goodput_slos_ms=parse_slos(args.goodput),
            save_detailed=args.save_detailed,
        )
        result: dict[str, Any] = {
            "settings": {
                **vars(args),
                "api_key": "<redacted>" if args.api_key else None,
                "workload_config": {**vars(cfg), "special_ids": sorted(cfg.special_ids)},
            },
            "env": env_info(),
            "server": {"target": args.target, "model_info": info, "server_info": server},
            "workload": {
                "num_requests": len(requests),
                "mean_prompt_len": sum(r.prompt_len for r in requests) / max(len(requests), 1),
                "mean_output_len": sum(r.output_len for r in requests) / max(len(requests), 1),
                "max_prompt_len": max((r.prompt_len for r in requests), default=0),
            },
        }
        if args.find_max_rate:
            lo, hi = (float(x) for x in args.find_max_rate.split(","))
            n = iter(range(10**6))

            async def point(rate: float) -> dict[str, Any]:
                s_r = RunSettings(**{**vars(s), "request_rate": rate})
                res = await benchmark_point(backend, requests, s_r, tag=f"-s{next(n)}")
                print(f"  rate {rate:g}: p99 TTFT {res['p99_ttft_ms']:.1f} ms, p99 TPOT {res['p99_tpot_ms']:.2f} ms")
                return res

            search = await find_max_rate_async(point, parse_slos(args.slo), lo, hi, args.search_iters)
            result["points"] = [pr["metrics"] for pr in search["probes"]]
            result["capacity_search"] = {k: v for k, v in search.items() if k != "probes"} | {
                "probes": [{"rate": pr["rate"], "ok": pr["ok"]} for pr in search["probes"]]
            }
        else:
            result["points"] = await sweep(
                backend,
                requests,
                parse_rates(args.request_rate),
                s,
                on_point=lambda p: print(
                    f"  rate {p['request_rate']}: done, {p['completed']} ok, {p['failed']} failed"
                ),
            )
        return result
    finally:
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``accordion bench serve``). 0 on success, 1 if some point completed no request."""
    args = build_parser().parse_args(argv)
    if args.find_max_rate and not args.slo:
        build_parser().error("--find-max-rate needs --slo ttft:MS and/or tpot:MS")
    result = asyncio.run(run(args))
    label = args.label or args.workload
    path, png = write_results(result, label, args.result_dir)
    print(format_table(result["points"]))
    if "capacity_search" in result:
        mr = result["capacity_search"]["max_rate"]
        print(f"highest rate meeting p99 SLOs {args.slo}: {'none in range' if mr is None else f'{mr:.3g} req/s'}")
    print(f"results: {path}" + (f"\nplot:    {png}" if png else ""))
    return 0 if all(p["completed"] > 0 for p in result["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
