"""What does the serving path (gRPC front end + Ray instance actor) cost over the offline API? Same GPU, same run.

1. Offline ``LLM`` with ``max_num_seqs=64``: 256 prompts x 512 in / 128 out (greedy, ignore_eos) -> output tok/s;
   low-load TTFT = latency of one ``max_tokens=1`` request, p50 over sequential requests.
2. ``accordion serve`` (a subprocess: Ray, global manager, one instance actor, gRPC on loopback), driven through
   ``accordion.client.AsyncClient``: the same 256 requests at a concurrency of 64 streams (a new stream starts as one
   ends, as ``vllm bench serve --max-concurrency 64``) -> output tok/s; low-load TTFT = time from sending a stream to
   its first chunk, p50 over sequential requests. ``--num-prompts 64`` is one wave of 64 at once, whose short run
   (about 0.4 s on an H100) the ramp-up and the last stragglers weigh on.

    python bench/serving_overhead.py [--shape 1b] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accordion import LLM, SamplingParams  # noqa: E402
from accordion.checkpoints import make_checkpoint  # noqa: E402
from bench.common import free_port, print_table, start_server, stop_server, write_result  # noqa: E402

PRESETS = {"1b": "llama-3.2-1b", "tiny": "tiny-llama"}


def offline(path: str, warm, prompts, ttft_prompts, args) -> dict:
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.concurrency,
              max_num_batched_tokens=args.max_num_batched_tokens, async_scheduling=args.async_scheduling)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(warm, params)  # warm-up at full size (Triton compiles), other prompts (no prefix-cache hits)
    core = llm.instance.core
    since = core.counters()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    loop_stats = core.stats(since)
    print("offline engine loop:", loop_stats)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = []
    for p in ttft_prompts:
        t = time.perf_counter()
        llm.generate([p], SamplingParams(max_tokens=1, temperature=0))
        ttfts.append(time.perf_counter() - t)
    llm.instance.worker.graphs = None
    del llm, outs, core
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"output_tok_s": n / wall, "wall_s": wall, "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_ms_sorted": sorted(round(1e3 * t, 2) for t in ttfts), "ttft_ms": [round(1e3 * t, 2) for t in ttfts],
            "engine_loop": loop_stats}


def start_py_spy(pid: int, out_path: str):
    """Sample the server process and its children (Ray workers) for a few seconds, every thread, raw stacks."""
    cmd = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--threads", "--rate", "250",
           "--format", "raw", "--duration", "4", "-o", out_path]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return proc


def summarize_py_spy(path: str, top: int = 30) -> list[tuple[str, int]]:
    """Sample counts per (process, thread, deepest accordion frame or else the leaf), most first.

    Raw format: one ``frame;frame;... count`` line per distinct stack; the first frames name processes (``process
    PID:"cmd"``) and the thread."""
    counts: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        cmd = procs[-1].split(":", 1)[-1].strip('"').split() if procs else ["?"]
        proc = " ".join(c.rsplit("/", 1)[-1] for c in cmd[:3])[:50]
        ours = [f for f in code if "accordion" in f or "/cluster/" in f or "/workers/" in f]
        leaf = code[-1] if code else "?"
        where = f"{ours[-1]} > {leaf}" if ours and ours[-1] != leaf else leaf
        key = f"[{proc} {thread[:22]}] {where}"
        counts[key] = counts.get(key, 0) + int(n)
    return sorted(counts.items(), key=lambda kv: -kv[1])[:top]


async def served(target: str, warm, prompts, ttft_prompts, args, server_pid: int = 0) -> dict:
    from accordion.client import AsyncClient

    async with AsyncClient(target, timeout=600, max_retries=0) as client:
        async def one(p, max_tokens):
            first, n, t, timings = None, 0, time.perf_counter(), None
            async for chunk in client.stream(token_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - t
                n += len(chunk.token_ids)
                timings = chunk.timings or timings
            return first, n, timings

        slots = asyncio.Semaphore(args.concurrency)

        async def held(p):
            async with slots:
                return await one(p, args.output_len)

        await asyncio.gather(*(one(p, args.output_len) for p in warm))
        spy = start_py_spy(server_pid, args.py_spy) if args.py_spy else None
        t0 = time.perf_counter()
        results = await asyncio.gather(*(held(p) for p in prompts))
        wall = time.perf_counter() - t0
        if spy is not None:
            spy.wait(timeout=60)
        low = [await one(p, 1) for p in ttft_prompts]
    n = sum(r[1] for r in results)
    loaded_ttft = sorted(r[0] for r in results)
    # Server-side split of the low-load TTFT: queue = front end accepted -> first scheduled on the instance
    # (includes the hop to the actor); prefill = first scheduled -> first token sampled.
    queue = [r[2].queue_ms for r in low if r[2] is not None]
    prefill = [r[2].prefill_ms for r in low if r[2] is not None]
    return {"output_tok_s": n / wall, "wall_s": wall, "ttft_p50_ms": 1e3 * statistics.median(r[0] for r in low),
            "ttft_ms_sorted": sorted(round(1e3 * r[0], 2) for r in low), "ttft_ms": [round(1e3 * r[0], 2) for r in low],
            "server_prefill_ms": [round(x, 2) for x in prefill],
            "server_prefill_ms_sorted": sorted(round(x, 2) for x in prefill),
            "loaded_ttft_p50_ms": 1e3 * statistics.median(loaded_ttft), "loaded_ttft_max_ms": 1e3 * loaded_ttft[-1],
            "server_queue_p50_ms": statistics.median(queue) if queue else None,
            "server_prefill_p50_ms": statistics.median(prefill) if prefill else None}


def server_command(path: str, port: int, args) -> list[str]:
    cmd = [sys.executable, "-m", "accordion.cli", "serve", "--model", path, "--port", str(port), "--num-instances",
           "1", "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.concurrency),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if not torch.cuda.is_available():
        cmd += ["--device", "cpu"]
    if args.no_ray:  # the same front end with the engine thread in its own process: isolates Ray's share
        cmd = cmd[:3] + ["--verbose"] + cmd[3:] + ["--no-ray"]  # --verbose: the engine loop's timing lines
    if args.async_scheduling is not None:
        cmd += ["--async-scheduling" if args.async_scheduling else "--no-async-scheduling"]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=list(PRESETS))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=None, help="requests timed (default: 4 x concurrency)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--ttft-requests", type=int, default=50)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="both paths with async scheduling on (off); default: the engine's default")
    ap.add_argument("--no-ray", action="store_true", help="serve with the engine in the server process")
    ap.add_argument("--py-spy", default=None, metavar="FILE",
                    help="sample the server (all processes and threads) during the timed run; raw stacks to FILE")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.concurrency, args.input_len, args.output_len, args.ttft_requests = "tiny", 8, 32, 16, 5
        args.max_model_len = 256
    args.num_prompts = args.num_prompts or 4 * args.concurrency
    cuda = torch.cuda.is_available()
    path = str(make_checkpoint(Path(tempfile.mkdtemp()) / args.shape, PRESETS[args.shape],
                               dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu"))
    rng = random.Random(0)
    vocab = 500 if args.shape == "tiny" else 120000
    mk = (lambda n, ln: [[rng.randrange(10, vocab) for _ in range(ln)] for _ in range(n)])
    warm, prompts = mk(args.concurrency, args.input_len), mk(args.num_prompts, args.input_len)
    ttft_prompts = mk(args.ttft_requests, args.input_len)
    off = offline(path, warm, prompts, ttft_prompts, args)
    port = free_port()
    log = Path(os.environ.get("OUT", tempfile.gettempdir())) / "server.log"
    proc = start_server(server_command(path, port, args), port, log)
    try:
        srv = asyncio.run(served(f"127.0.0.1:{port}", warm, prompts, ttft_prompts, args, proc.pid))
    finally:
        stop_server(proc)
    # The instance's log (Ray worker files; what reaches the driver's console may be cut off by the shutdown).
    logs = [log] if args.no_ray else sorted(Path("/tmp/ray/session_latest/logs").glob("worker-*.err"))
    busy = [ln.split("busy period: ", 1)[1] for f in logs for ln in f.read_text().splitlines() if "busy period: " in ln]
    srv["engine_loop"] = busy[1] if len(busy) > 1 else None  # warm-up, then the timed run
    print("served engine loop: ", srv["engine_loop"])
    if args.py_spy and Path(args.py_spy).exists():
        for frame, n in summarize_py_spy(args.py_spy):
            print(f"{n:6d}  {frame}")
    ratio = srv["output_tok_s"] / off["output_tok_s"]
    added = srv["ttft_p50_ms"] - off["ttft_p50_ms"]
    write_result("serving-overhead", {"settings": vars(args), "offline": off, "served": srv,
                                      "throughput_ratio": ratio, "added_ttft_p50_ms": added})
    print_table([["offline LLM", f"{off['output_tok_s']:.0f}", f"{off['ttft_p50_ms']:.2f}"],
                 ["gRPC + Ray", f"{srv['output_tok_s']:.0f}", f"{srv['ttft_p50_ms']:.2f}"]],
                ["path", "output tok/s", "p50 TTFT ms (low load)"])
    print("low-load TTFT ms, sorted: offline", off["ttft_ms_sorted"], "\n  served", srv["ttft_ms_sorted"],
          "\n  served, engine prefill", srv["server_prefill_ms_sorted"])
    print(f"loaded TTFT ({args.concurrency} streams): offline -, served p50 {srv['loaded_ttft_p50_ms']:.1f} ms, "
          f"max {srv['loaded_ttft_max_ms']:.1f} ms")
    print(f"served / offline throughput: {ratio:.3f}; added p50 TTFT: {added:.2f} ms "
          f"(server queue p50 {srv['server_queue_p50_ms']} ms, prefill p50 {srv['server_prefill_p50_ms']} ms)")


if __name__ == "__main__":
    main()
