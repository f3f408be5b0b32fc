"""Layer-kernel benchmark (a script, not a test): `python bench/layers.py [--quick]`.

On a GPU (Llama-3.1-8B shape: H 4096, Hq 32, Hkv 8, D 128, I 14336, bf16), for T = 1 and T = 4096 tokens, each fused
Triton kernel of accordion.kernels.layers against the torch sequence it replaces (the references in
accordion.kernels.layers.reference, which are the engine's CPU code):
  rms_norm, add + rms_norm (fused_add_rms_norm), per-head qk-norm (q and k, strided views of a qkv output),
  rotary (q and k), silu_and_mul.
Two timings each, median ms: `eager` (triton.testing.do_bench: launch overhead included, one call at a time) and
`graph` (triton.testing.do_bench_cudagraph: replayed from a CUDA graph, as the decode step runs). GB/s counts the
bytes the fused kernel must move; `x` = torch ms / fused ms. Writes bench/results/layers-<gpu>-<utc>.json
(bench/common.write_result). `--quick`: tiny shapes on CPU under TRITON_INTERPRET=1 (only checks that it executes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--quick" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    import torch as _t  # the interpreter flag must be set before triton is imported

    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accordion.kernels.layers import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul  # noqa: E402
from accordion.kernels.layers.reference import (  # noqa: E402
    ref_fused_add_rms_norm,
    ref_rms_norm,
    ref_rotary_embedding,
    ref_silu_and_mul,
)
from accordion.workers.layers import RotaryEmbedding  # noqa: E402
from bench.common import env_info, measure_copy_bandwidth, print_table, write_result  # noqa: E402

EPS = 1e-5
LLAMA3_SCALING = {"factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0}


def timed(fn, dev: torch.device, graph: bool) -> float | None:
    """Median milliseconds of fn(); on CPU a plain perf_counter median (graph: None)."""
    if dev.type == "cuda":
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    if graph:
        return None
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e3


def cases(T: int, H: int, Hq: int, Hkv: int, D: int, inter: int, dtype, dev):
    """(name, fused fn, torch fn, bytes the fused kernel moves) for T tokens."""
    e = torch.tensor([], dtype=dtype).element_size()
    x, r = torch.randn(T, H, dtype=dtype, device=dev), torch.randn(T, H, dtype=dtype, device=dev)
    w = torch.randn(H, dtype=dtype, device=dev)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, device=dev)
    q, k = qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    wd = torch.randn(D, dtype=dtype, device=dev)
    rope = RotaryEmbedding(D, 8192, 500000.0, LLAMA3_SCALING).to(dev)
    pos = torch.randint(0, 8192, (T,), device=dev)
    gu = torch.randn(T, 2 * inter, dtype=dtype, device=dev)
    qk_elems = T * (Hq + Hkv) * D
    return [
        ("rms_norm", lambda: rms_norm(x, w, EPS), lambda: ref_rms_norm(x, w, EPS), 2 * T * H * e + H * e),
        ("add+rms_norm", lambda: fused_add_rms_norm(x, r, w, EPS), lambda: ref_fused_add_rms_norm(x, r, w, EPS),
         4 * T * H * e + H * e),
        ("qk_norm", lambda: (rms_norm(q, wd, EPS), rms_norm(k, wd, EPS)),
         lambda: (ref_rms_norm(q, wd, EPS), ref_rms_norm(k, wd, EPS)), 2 * qk_elems * e),
        ("rotary", lambda: rotary_embedding(q, k, rope.cos, rope.sin, pos),
         lambda: ref_rotary_embedding(q, k, rope.cos, rope.sin, pos), 2 * qk_elems * e + 2 * T * D * 4),
        ("silu_and_mul", lambda: silu_and_mul(gu), lambda: ref_silu_and_mul(gu), 3 * T * inter * e),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.quick:
        shape = dict(H=256, Hq=4, Hkv=2, D=64, inter=512)
        tokens, copy_bytes = [1, 16], 16 << 20
    else:
        shape = dict(H=4096, Hq=32, Hkv=8, D=128, inter=14336)
        tokens, copy_bytes = [1, 4096], 2 << 30
    copy_bw = measure_copy_bandwidth(dev, nbytes=copy_bytes)
    print(f"device copy bandwidth: {copy_bw:.0f} GB/s (read + write); shape {shape}, {dtype}", flush=True)
    rows = []
    for T in tokens:
        for name, fused, ref, nbytes in cases(T, **shape, dtype=dtype, dev=dev):
            row = dict(op=name, T=T, bytes=nbytes)
            for mode in ("eager", "graph"):
                f_ms, t_ms = timed(fused, dev, mode == "graph"), timed(ref, dev, mode == "graph")
                row[f"fused_{mode}_ms"], row[f"torch_{mode}_ms"] = f_ms, t_ms
                row[f"x_{mode}"] = t_ms / f_ms if f_ms and t_ms else None
            f_ms = row["fused_graph_ms"] or row["fused_eager_ms"]
            row["fused_gb_s"] = nbytes / (f_ms * 1e-3) / 1e9
            row["pct_copy_bw"] = 100 * row["fused_gb_s"] / copy_bw
            rows.append(row)
    print()
    print_table([{**r, "fused_eager_us": 1e3 * r["fused_eager_ms"], "torch_eager_us": 1e3 * r["torch_eager_ms"],
                  "fused_graph_us": r["fused_graph_ms"] and 1e3 * r["fused_graph_ms"],
                  "torch_graph_us": r["torch_graph_ms"] and 1e3 * r["torch_graph_ms"]} for r in rows],
                ["op", "T", "fused_eager_us", "torch_eager_us", "x_eager", "fused_graph_us", "torch_graph_us",
                 "x_graph", "fused_gb_s", "pct_copy_bw"])
    path = write_result("layers", {
        "settings": dict(shape=shape, tokens=tokens, dtype=str(dtype), eps=EPS, quick=args.quick,
                         interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")),
        "copy_bandwidth_gb_s": copy_bw, "rows": rows, "env": env_info(),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
