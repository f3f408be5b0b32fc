"""What does the serving path (gRPC front end + Ray instance actor) cost over the offline API? Same GPU, same run.

Both live side by side on the GPU (``--gpu-memory-utilization`` 0.4 each) and take turns, so that noise on the
machine (other tenants, clocks; on lent H100s it moved one path's numbers by up to 2x between calls) hits both:

1. Offline ``LLM`` with ``max_num_seqs=64``: 256 prompts x 512 in / 128 out (greedy, ignore_eos) -> output tok/s;
   low-load TTFT = latency of one ``max_tokens=1`` request.
2. ``accordion serve`` (a subprocess: Ray, global manager, one instance actor, gRPC on loopback), driven through
   ``accordion.client.AsyncClient``: the same 256 requests at a concurrency of 64 streams (a new stream starts as one
   ends, as ``vllm bench serve --max-concurrency 64``) -> output tok/s; low-load TTFT = time from sending a stream to
   its first chunk.

``--rounds`` (5) throughput runs of each, alternating which goes first; the ratio is the median round's (a slow
spell of the machine lands in one round, on one path). Each round has prompts of its own: both paths prefill every
prompt in full (no prefix-cache hits, as in ``vllm bench serve``'s random dataset). Then 50 low-load requests one at
a time, alternating paths; added TTFT is the difference of the p50s.

    python bench/serving_overhead.py [--shape 1b] [--quick] [--py-spy PREFIX]
"""

from __future__ import annotations

import argparse
import asyncio
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


class Offline:
    """The offline ``LLM`` with ``max_num_seqs`` = the served concurrency, in this process."""

    def __init__(self, path: str, args):
        self.llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.concurrency,
                       max_num_batched_tokens=args.max_num_batched_tokens, async_scheduling=args.async_scheduling,
                       # created after the server: its share counts as used memory here (non-torch), so this
                       # leaves the offline engine about as much as the server has
                       gpu_memory_utilization=min(0.9, 2 * args.gpu_memory_utilization + 0.05))
        self.params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    def throughput(self, prompts) -> dict:
        core = self.llm.instance.core
        since = core.counters()
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, self.params)
        wall = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"output_tok_s": n / wall, "wall_s": wall, "engine_loop": core.stats(since)}

    def ttft(self, prompt) -> float:
        """Latency of one ``max_tokens=1`` request (its time to first token), seconds."""
        t = time.perf_counter()
        self.llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        return time.perf_counter() - t


def triton_compilations() -> int:
    """Kernels compiled on this machine so far (entries of Triton's on-disk cache, shared by the server's engine
    and this process): a count that grows during a timed round means a step waited on a compilation."""
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return sum(1 for _ in cache.iterdir()) if cache.is_dir() else 0


def start_py_spy(pid: int, out_path: str, subprocesses: bool = True):
    """Sample a process (and its children: the server's Ray workers) for a few seconds, every thread, raw stacks."""
    cmd = ["py-spy", "record", "--pid", str(pid), *(["--subprocesses"] if subprocesses else []), "--nonblocking",
           "--threads", "--rate", "250", "--format", "raw", "--duration", "4", "-o", out_path]
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


class Served:
    """``accordion.client.AsyncClient`` streams against the server, on an event loop of its own (the offline
    ``LLM`` runs between its phases, in the same thread)."""

    def __init__(self, target: str, args):
        from accordion.client import AsyncClient

        self.args = args
        self.loop = asyncio.new_event_loop()
        self.client = AsyncClient(target, timeout=600, max_retries=0)
        self.loop.run_until_complete(self.client.__aenter__())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.__aexit__(None, None, None))
        self.loop.close()

    async def _one(self, p, max_tokens):
        first, n, t, timings = None, 0, time.perf_counter(), None
        async for chunk in self.client.stream(token_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - t
            n += len(chunk.token_ids)
            timings = chunk.timings or timings
        return first, n, timings

    def throughput(self, prompts) -> dict:
        """The prompts held at ``concurrency`` streams (a new stream starts as one ends)."""
        slots = asyncio.Semaphore(self.args.concurrency)

        async def held(p):
            async with slots:
                return await self._one(p, self.args.output_len)

        async def run():
            t0 = time.perf_counter()
            res = await asyncio.gather(*(held(p) for p in prompts))
            return res, time.perf_counter() - t0

        results, wall = self.loop.run_until_complete(run())
        ttfts = sorted(r[0] for r in results)
        return {"output_tok_s": sum(r[1] for r in results) / wall, "wall_s": wall,
                "loaded_ttft_p50_ms": 1e3 * statistics.median(ttfts), "loaded_ttft_max_ms": 1e3 * ttfts[-1]}

    def ttft(self, prompt) -> tuple[float, object]:
        """Time from sending a stream to its first chunk, seconds, and the server's timings of it."""
        first, _, timings = self.loop.run_until_complete(self._one(prompt, 1))
        return first, timings


def server_command(path: str, port: int, args) -> list[str]:
    cmd = [sys.executable, "-m", "accordion.cli", "serve", "--model", path, "--port", str(port), "--num-instances",
           "1", "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.concurrency),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if torch.cuda.is_available():
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    else:
        cmd += ["--device", "cpu"]
    if args.no_ray:  # the same front end with the engine thread in its own process: isolates Ray's share
        cmd = cmd[:3] + ["--verbose"] + cmd[3:] + ["--no-ray"]  # --verbose: the engine loop's timing lines
    if args.async_scheduling is not None:
        cmd += ["--async-scheduling" if args.async_scheduling else "--no-async-scheduling"]
    if args.engine_switch_interval_us is not None:
        cmd += ["--engine-switch-interval-us", str(args.engine_switch_interval_us)]
    return cmd


def interleaved(offline: Offline, served: Served, round_prompts, ttft_prompts, args, spy_pids=()) -> dict:
    """``--rounds`` throughput runs of each path, alternating which goes first, then the low-load requests one
    by one, alternating paths. Noise on the machine (other tenants, clock changes) then hits both alike."""
    off_runs, srv_runs = [], []
    runs = {"offline": off_runs, "served": srv_runs}
    throughput = {"offline": offline.throughput, "served": served.throughput}
    # py-spy in the last round, per path: (index in spy_pids, file suffix, with its child processes)
    spied = {"offline": [(0, "offline", False)], "served": [(1, "loaded", True), (0, "client", False)]}
    for r, prompts in enumerate(round_prompts):
        for path in ("offline", "served") if r % 2 == 0 else ("served", "offline"):
            spies = ([start_py_spy(spy_pids[i], f"{args.py_spy}.{suffix}", subprocesses=children)
                      for i, suffix, children in spied[path]] if spy_pids and r == args.rounds - 1 else [])
            compiled = triton_compilations()
            runs[path].append(throughput[path](prompts))
            runs[path][-1]["compiled"] = triton_compilations() - compiled
            for spy in spies:
                spy.wait(timeout=60)
        print(f"round {r}: offline {off_runs[-1]['output_tok_s']:.0f} tok/s ({off_runs[-1]['engine_loop']}; "
              f"{off_runs[-1]['compiled']} compilations), served {srv_runs[-1]['output_tok_s']:.0f} tok/s "
              f"({srv_runs[-1]['compiled']} compilations)", flush=True)
    spies = [start_py_spy(pid, f"{args.py_spy}.{pid}", subprocesses=pid != os.getpid()) for pid in spy_pids]
    off_ttft, srv_ttft, srv_timings = [], [], []
    for i, p in enumerate(ttft_prompts):
        for path in ("offline", "served") if i % 2 == 0 else ("served", "offline"):
            if path == "offline":
                off_ttft.append(offline.ttft(p))
            else:
                t, timings = served.ttft(p)
                srv_ttft.append(t)
                srv_timings.append(timings)
    for spy in spies:
        spy.wait(timeout=60)
    ms = (lambda xs: [round(1e3 * x, 2) for x in xs])
    off_tok = statistics.median(r["output_tok_s"] for r in off_runs)
    srv_tok = statistics.median(r["output_tok_s"] for r in srv_runs)
    # Server-side split of the low-load TTFT: queue = front end accepted -> first scheduled on the instance
    # (includes the hop to the engine process); prefill = first scheduled -> first token sampled.
    queue = [t.queue_ms for t in srv_timings if t is not None]
    prefill = [t.prefill_ms for t in srv_timings if t is not None]
    ratios = [s["output_tok_s"] / o["output_tok_s"] for s, o in zip(srv_runs, off_runs)]
    return {
        "offline": {"output_tok_s": off_tok, "runs": off_runs, "ttft_p50_ms": 1e3 * statistics.median(off_ttft),
                    "ttft_ms": ms(off_ttft)},
        "served": {"output_tok_s": srv_tok, "runs": srv_runs, "ttft_p50_ms": 1e3 * statistics.median(srv_ttft),
                   "ttft_ms": ms(srv_ttft), "server_prefill_ms": [round(x, 2) for x in prefill],
                   "server_queue_p50_ms": statistics.median(queue) if queue else None,
                   "server_prefill_p50_ms": statistics.median(prefill) if prefill else None,
                   "loaded_ttft_p50_ms": statistics.median(r["loaded_ttft_p50_ms"] for r in srv_runs)},
        "round_ratios": ratios, "ratio": statistics.median(ratios),
        "added_ttft_pairs_p50_ms": 1e3 * statistics.median(s - o for s, o in zip(srv_ttft, off_ttft)),
    }


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
    ap.add_argument("--rounds", type=int, default=5, help="throughput runs of each path, interleaved")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                    help="the server's (the offline engine, started after it, gets about as much)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="both paths with async scheduling on (off); default: the engine's default")
    ap.add_argument("--no-ray", action="store_true", help="serve with the engine in the server process")
    ap.add_argument("--engine-switch-interval-us", type=float, default=None, help="passed to the server")
    ap.add_argument("--py-spy", default=None, metavar="PREFIX",
                    help="sample this process and the server (all processes, threads) during the low-load requests; "
                         "raw stacks to PREFIX.<pid>")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.concurrency, args.input_len, args.output_len, args.ttft_requests = "tiny", 8, 32, 16, 5
        args.max_model_len, args.rounds = 256, 2
    args.num_prompts = args.num_prompts or 4 * args.concurrency
    cuda = torch.cuda.is_available()
    path = str(make_checkpoint(Path(tempfile.mkdtemp()) / args.shape, PRESETS[args.shape],
                               dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu"))
    rng = random.Random(0)
    vocab = 500 if args.shape == "tiny" else 120000
    mk = (lambda n, ln: [[rng.randrange(10, vocab) for _ in range(ln)] for _ in range(n)])
    warm = mk(args.concurrency, args.input_len)
    round_prompts = [mk(args.num_prompts, args.input_len) for _ in range(args.rounds)]
    ttft_prompts = mk(args.ttft_requests, args.input_len)
    port = free_port()
    log = Path(os.environ.get("OUT", tempfile.gettempdir())) / "server.log"
    proc = start_server(server_command(path, port, args), port, log)
    try:
        offline = Offline(path, args)
        served = Served(f"127.0.0.1:{port}", args)
        offline.throughput(warm)  # warm-up at full size (Triton compiles), other prompts (no prefix-cache hits)
        served.throughput(warm)
        res = interleaved(offline, served, round_prompts, ttft_prompts, args,
                          (os.getpid(), proc.pid) if args.py_spy else ())
        served.close()
    finally:
        stop_server(proc)
    off, srv = res["offline"], res["served"]
    # The instance's log (Ray worker files; what reaches the driver's console may be cut off by the shutdown).
    logs = [log] if args.no_ray else sorted(Path("/tmp/ray/session_latest/logs").glob("worker-*.err"))
    srv["engine_loop"] = [ln.split("busy period: ", 1)[1] for f in logs for ln in f.read_text().splitlines()
                          if "busy period: " in ln][1:]  # after the warm-up's
    print("served engine loop:", *srv["engine_loop"], sep="\n  ")
    spied = {os.getpid(): "low load, this process (offline)", proc.pid: "low load, server tree",
             "loaded": "last served round, server tree", "client": "last served round, this process (client)",
             "offline": "last offline round, this process"}
    for key, what in spied.items() if args.py_spy else ():
        if Path(f"{args.py_spy}.{key}").exists():
            print(f"py-spy, {what}:")
            for frame, n in summarize_py_spy(f"{args.py_spy}.{key}"):
                print(f"{n:6d}  {frame}")
    ratio = res["ratio"]  # the median round: a slow spell of the machine lands in one round, on one path
    added = srv["ttft_p50_ms"] - off["ttft_p50_ms"]
    write_result("serving-overhead", {"settings": vars(args), "offline": off, "served": srv,
                                      "round_ratios": res["round_ratios"],
                                      "added_ttft_pairs_p50_ms": res["added_ttft_pairs_p50_ms"],
                                      "throughput_ratio": ratio, "added_ttft_p50_ms": added})
    print_table([["offline LLM", f"{off['output_tok_s']:.0f}", f"{off['ttft_p50_ms']:.2f}"],
                 ["served (gRPC)", f"{srv['output_tok_s']:.0f}", f"{srv['ttft_p50_ms']:.2f}"]],
                ["path", f"output tok/s (median of {args.rounds})", "p50 TTFT ms (low load)"])
    print("low-load TTFT ms, in order: offline", off["ttft_ms"], "\n  served", srv["ttft_ms"],
          "\n  served, engine prefill", srv["server_prefill_ms"])
    rounds = ", ".join(f"{r:.3f}" for r in res["round_ratios"])
    print(f"served / offline throughput: {ratio:.3f}, the median round ({rounds}); "
          f"added p50 TTFT: {added:.2f} ms (server queue p50 {srv['server_queue_p50_ms']:.2f} ms, "
          f"prefill p50 {srv['server_prefill_p50_ms']:.2f} ms); loaded TTFT p50 {srv['loaded_ttft_p50_ms']:.1f} ms")


if __name__ == "__main__":
    main()
