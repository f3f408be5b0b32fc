"""Where a decode call's time goes (a diagnostic, not a test): `python bench/decode_timing.py` on a GPU.

For each (batch, context), paged decode and SDPA on the same data (bench/kernels.py's identity cache), timed four
ways: host microseconds per call (launches queued without a sync), `do_bench` eager (L2 flushed between calls,
as bench/kernels.py does), CUDA-graph replay (bench/kernels.graph_ms), and the kernels' own time from torch.profiler;
then a cProfile of the decode launcher. `--host-only`: host microseconds per call of the decode, prefill and POD
launchers alone (small shapes), for A/B runs of launcher changes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_result  # noqa: E402
from bench.kernels import D, DecodeCase, graph_ms  # noqa: E402


SHAPES = [(1, 1024), (1, 8192), (1, 32768), (16, 1024), (16, 8192), (64, 8192)]


def host_us(fn, n: int = 200) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def kernel_us(fn, reps: int = 20) -> tuple[float, str]:
    """Mean CUDA time per call summed over kernels, and the kernel names."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in evs) / reps
    return total, ";".join(f"{e.key[:40]}x{e.count // reps}" for e in evs)


def launcher_profile(fn, n: int = 1000) -> None:
    """cProfile of n launcher calls: where the host microseconds go."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def launcher_host_us(dev, dtype) -> dict:
    """Host microseconds per call of the decode, prefill and POD launchers on small shapes (GPU time << host)."""
    from bench.kernels import hybrid_batch

    from accordion.kernels.attention import pod_attention

    kv, pa, da, prefill_only, decode_only = hybrid_batch(64, 1024, 4, 1024, dtype, dev)
    fns = dict(decode=decode_only, prefill=prefill_only,
               pod=lambda: pod_attention(kv[0], kv[1], pa, da, scale=D**-0.5))
    out = {}
    for name, fn in fns.items():
        fn()
        out[name] = min(host_us(fn) for _ in range(5))
    return out


def main() -> None:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    if "--host-only" in sys.argv:
        res = launcher_host_us(dev, dtype)
        print("launcher host us per call:", {k: round(v, 1) for k, v in res.items()})
        write_result("launch-host", dict(host_us=res))
        return
    rows = []
    for B, ctx in SHAPES:
        case = DecodeCase(B, ctx, dtype, dev)
        fns = {"triton": case.ours, "sdpa": case.theirs}
        for name, fn in fns.items():
            fn()
            h_us = host_us(fn)
            k_us, kernels = kernel_us(fn)
            rows.append(dict(batch=B, context=ctx, impl=name, host_us=h_us,
                             eager_us=triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3,
                             graph_us=graph_ms([fn], dev) * 1e3, kernel_us=k_us, kernels=kernels))
            print(rows[-1], flush=True)
        if (B, ctx) == (1, 1024):
            launcher_profile(fns["triton"])
        case = None
    cols = ["batch", "context", "impl", "host_us", "eager_us", "graph_us", "kernel_us"]
    write_result("decode-timing", dict(rows=rows))
    print_table(rows, cols)


if __name__ == "__main__":
    main()
