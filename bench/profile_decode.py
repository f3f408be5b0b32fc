"""Where does a batch-1 decode step's time go? Synchronous versus async-scheduled engine loop, same run.

For each loop variant: decode tok/s over ``--tokens`` greedy tokens, then a torch.profiler trace of ``--steps``
decode steps, from which it reports per step: wall time, GPU busy time (union of kernel intervals), the idle gap
(wall - busy, the host's share), and the kernels that take most of the busy time with their achieved bandwidth
where the bytes are known (weight GEMVs). Copy bandwidth is measured in the same run.

    python bench/profile_decode.py [--shape 8b] [--tokens 256] [--steps 24]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accordion import LLM, SamplingParams  # noqa: E402
from accordion.checkpoints import make_checkpoint  # noqa: E402
from bench.common import measure_copy_bandwidth, print_table, write_result  # noqa: E402

PRESETS = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b", "tiny": "tiny-llama"}


def busy_and_kernels(trace: dict) -> tuple[float, dict[str, list[float]]]:
    """(GPU busy microseconds = union of kernel intervals, {kernel name: [durations us]}) of a chrome trace."""
    spans, by_name = [], defaultdict(list)
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in ev:
            spans.append((ev["ts"], ev["ts"] + ev["dur"]))
            by_name[ev["name"][:90]].append(ev["dur"])
    spans.sort()
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, by_name


def measure(llm: LLM, prompt: list[int], tokens: int, steps: int, out_dir: Path, tag: str, keep_trace: bool) -> dict:
    sp = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    llm.generate([prompt], sp(16))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate([prompt[::-1]], sp(1))
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = llm.generate([prompt[1:]], sp(tokens))
    total = time.perf_counter() - t0
    tok_s = (tokens - 1) / (total - ttft)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate([prompt[2:]], sp(steps + 1))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    path = out_dir / f"decode-trace-{tag}.json"
    prof.export_chrome_trace(str(path))
    busy, kernels = busy_and_kernels(json.loads(path.read_text()))
    if not keep_trace:
        path.unlink()
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {"decode_tok_s": tok_s, "ttft_s": ttft, "num_tokens": len(out[0].outputs[0].token_ids),
            "profiled_wall_us_per_step": 1e6 * wall / (steps + 1), "gpu_busy_us_per_step": busy / (steps + 1),
            "top_kernels": [{"name": n, "count": len(d), "total_us": sum(d), "mean_us": sum(d) / len(d)}
                            for n, d in top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=list(PRESETS))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--trace", action="store_true", help="keep the chrome traces in $OUT")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", tempfile.mkdtemp()))
    bw = measure_copy_bandwidth("cuda")
    path = make_checkpoint(Path(tempfile.mkdtemp()) / args.shape, PRESETS[args.shape], dtype="bfloat16",
                           device="cuda")
    rng = random.Random(0)
    prompt = [rng.randrange(10, 120000) for _ in range(args.prompt_len)]
    results, rows = {"copy_bandwidth_gb_s": bw}, []
    for variant in ("sync", "async"):
        llm = LLM(str(path), max_model_len=2048, max_num_seqs=8, gpu_memory_utilization=0.5,
                  async_scheduling=variant == "async")
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.instance.worker.model.parameters())
        embed = llm.instance.worker.model.embed_tokens.weight
        step_bytes = weight_bytes - (embed.numel() * embed.element_size()
                                     if not llm.instance.worker.arch.tie_word_embeddings else 0)
        r = measure(llm, prompt, args.tokens, args.steps, out_dir, variant, args.trace)
        r["bytes_per_step"] = step_bytes
        r["bw_util"] = step_bytes * r["decode_tok_s"] / (bw * 1e9)
        r["lookahead_steps"] = llm.instance.core.num_lookahead_steps
        results[variant] = r
        rows.append([variant, f"{r['decode_tok_s']:.1f}", f"{100 * r['bw_util']:.1f}%",
                     f"{r['profiled_wall_us_per_step']:.0f}", f"{r['gpu_busy_us_per_step']:.0f}",
                     f"{r['profiled_wall_us_per_step'] - r['gpu_busy_us_per_step']:.0f}"])
        for k in r["top_kernels"][:8]:
            print(f"  {variant:5s} {k['count']:5d} x {k['mean_us']:8.1f} us = {k['total_us'] / 1e3:8.2f} ms  {k['name']}")
        llm.instance.worker.graphs = None
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    write_result(f"profile-decode-{args.shape}", {"settings": vars(args), "results": results})
    print(f"copy bandwidth {bw:.0f} GB/s")
    print_table(rows, ["loop", "decode tok/s", "of copy BW", "wall us/step (profiled)", "GPU busy us/step",
                       "idle us/step"])


if __name__ == "__main__":
    main()
