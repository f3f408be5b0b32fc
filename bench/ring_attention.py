"""Ring-attention kernel benchmark (a script, not a test): `python bench/ring_attention.py [--quick]`.

Llama-3.1-8B attention shape (Hq=32, Hkv=8, D=128, bf16), medians of triton.testing.do_bench:
  (a) causal self-attention of T tokens (default 16k, 64k): varlen_attention_with_positions (positions 0..T-1)
      vs paged_prefill_attention on the same data in a paged cache (identity block table, page 16) vs torch SDPA
      flash (is_causal); TFLOP/s over the causal half.
  (b) one ring hop at degree 4 over 128k tokens: the local zig-zag shard (32k queries) vs another shard's K/V
      (32k keys, padded with PAD positions like workers/sequence_parallel.py) for the hop patterns own shard /
      earlier rank / later rank, plain and merging into an fp32 state (prev_out/prev_lse, what the ring runs);
      TFLOP/s counts only visible (query, key) pairs.
`--compare-capped`: each varlen timing also with the prefill kernel's register-capped tiles (two 8-warp programs per
SM, 128 registers: `prefill_config`'s choice for wide head_dim-128 grids on Hopper), the ratio beside it.
Writes bench/results/ring-attention-<gpu>-<time>.json (bench/common.py write_result).
`--quick`: tiny shapes on CPU under TRITON_INTERPRET=1 (only checks that the script executes).
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
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_result  # noqa: E402

from accordion.kernels.attention import paged_prefill_attention, varlen_attention_with_positions  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
PAD_POS = 2**31 - 1
CAPPED = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128)
CAPPED_QUICK = dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1, maxnreg=128)  # interpreter-sized tiles


def bench(fn, dev) -> float:
    """Median milliseconds of fn()."""
    if dev.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def zigzag(n: int, k: int, j: int) -> torch.Tensor:
    """Positions of instance j of k (chunks j and 2k-1-j of 2k), as workers.sequence_parallel.zigzag_positions."""
    b = [round(i * n / (2 * k)) for i in range(2 * k + 1)]
    return torch.cat([torch.arange(b[j], b[j + 1]), torch.arange(b[2 * k - 1 - j], b[2 * k - j])]).int()


def sdpa_flash(q4, k4, v4):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q4.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        try:
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)
        except (RuntimeError, TypeError):
            g = q4.shape[1] // k4.shape[1]
            return F.scaled_dot_product_attention(q4, k4.repeat_interleave(g, 1), v4.repeat_interleave(g, 1),
                                                  is_causal=True)


def causal_row(dev, dtype, n, hq, hkv, capped: dict | None = None) -> dict:
    q = torch.randn(n, hq, D, dtype=dtype, device=dev)
    nb = -(-n // PAGE)
    kv = torch.randn(2, nb, PAGE, hkv, D, dtype=dtype, device=dev)
    k, v = kv[0].view(nb * PAGE, hkv, D)[:n], kv[1].view(nb * PAGE, hkv, D)[:n]
    pos = torch.arange(n, dtype=torch.int32, device=dev)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    sl = torch.tensor([n], dtype=torch.int32, device=dev)
    table = torch.arange(nb, dtype=torch.int32, device=dev).view(1, nb)
    out = torch.empty_like(q)
    lse = torch.empty(n, hq, dtype=torch.float32, device=dev)
    def varlen(config=None):
        varlen_attention_with_positions(q, k, v, pos, pos, cu, cu, scale=D**-0.5, max_seqlen_q=n, max_seqlen_k=n,
                                        out=out, lse=lse, config=config)

    ms_var = bench(varlen, dev)
    ms_cap = bench(lambda: varlen(capped), dev) if capped else float("nan")
    ms_paged = bench(lambda: paged_prefill_attention(q, kv[0], kv[1], table, cu, sl, scale=D**-0.5, max_seqlen_q=n,
                                                     out=out, lse=lse), dev)
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    try:
        ms_sdpa = bench(lambda: sdpa_flash(q4, k4, v4), dev)
    except Exception as e:  # noqa: BLE001 - report, keep going
        print(f"sdpa flash n={n} failed: {e}")
        ms_sdpa = float("nan")
    flops = 4.0 * hq * D * n * (n + 1) / 2  # visible (query, key) pairs of the causal triangle

    def tf(ms: float) -> float:
        return flops / (ms * 1e-3) / 1e12

    return {"tokens": n, "varlen_ms": ms_var, "varlen_tflop_s": tf(ms_var), "paged_ms": ms_paged,
            "paged_tflop_s": tf(ms_paged), "sdpa_flash_ms": ms_sdpa, "sdpa_flash_tflop_s": tf(ms_sdpa),
            "varlen_vs_paged": ms_paged / ms_var, "varlen_vs_sdpa": ms_sdpa / ms_var,
            "capped_ms": ms_cap, "capped_vs_default": ms_var / ms_cap}


def run_causal(dev, dtype, lengths, hq, hkv, capped=None):
    rows = []
    for n in lengths:
        rows.append(causal_row(dev, dtype, n, hq, hkv, capped))
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the previous length's tensors are gone: free them before the next
    return rows


def run_hops(dev, dtype, total, degree, hq, hkv, rank, capped=None):
    """One hop of instance `rank` against each source shard: own, earlier (rank-1), later (rank+1)."""
    pad_to = max(zigzag(total, degree, j).numel() for j in range(degree))
    qp = zigzag(total, degree, rank).to(dev)
    tq = qp.numel()
    q = torch.randn(tq, hq, D, dtype=dtype, device=dev)
    k = torch.randn(pad_to, hkv, D, dtype=dtype, device=dev)
    v = torch.randn(pad_to, hkv, D, dtype=dtype, device=dev)
    cu_q = torch.tensor([0, tq], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, pad_to], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=dev)
    state = torch.zeros(tq, hq, D, dtype=torch.float32, device=dev)
    state_lse = torch.zeros(tq, hq, dtype=torch.float32, device=dev)
    rows = []
    for name, src in (("own", rank), ("earlier", rank - 1), ("later", rank + 1)):
        if not 0 <= src < degree:
            continue
        real = zigzag(total, degree, src)
        kp = torch.full((pad_to,), PAD_POS, dtype=torch.int32)
        kp[:real.numel()] = real
        kp = kp.to(dev)
        pairs = int(torch.searchsorted(kp.sort().values, qp, right=True).sum())  # visible (query, key) pairs
        def hop(kp=kp, config=None):
            varlen_attention_with_positions(q, k, v, qp, kp, cu_q, cu_k, scale=D**-0.5, max_seqlen_q=tq,
                                            max_seqlen_k=pad_to, out=out, lse=lse, config=config)

        def hop_merge(kp=kp, config=None):
            varlen_attention_with_positions(q, k, v, qp, kp, cu_q, cu_k, scale=D**-0.5, max_seqlen_q=tq,
                                            max_seqlen_k=pad_to, out=state, lse=state_lse, prev_out=state,
                                            prev_lse=state_lse, config=config)

        ms, ms_merge = bench(hop, dev), bench(hop_merge, dev)
        ms_cap = bench(lambda: hop(config=capped), dev) if capped else float("nan")
        ms_cap_merge = bench(lambda: hop_merge(config=capped), dev) if capped else float("nan")
        flops = 4.0 * hq * D * pairs
        rows.append({"hop": name, "rank": rank, "src": src, "queries": tq, "keys": pad_to,
                     "visible_frac": pairs / (tq * pad_to), "ms": ms, "tflop_s": flops / (ms * 1e-3) / 1e12,
                     "merge_fp32_ms": ms_merge, "merge_tflop_s": flops / (ms_merge * 1e-3) / 1e12,
                     "capped_ms": ms_cap, "capped_vs_default": ms / ms_cap, "capped_merge_ms": ms_cap_merge,
                     "capped_merge_vs_default": ms_merge / ms_cap_merge})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    ap.add_argument("--lengths", default="16384,65536", help="causal self-attention lengths")
    ap.add_argument("--total", type=int, default=131072, help="ring prompt length")
    ap.add_argument("--degree", type=int, default=4)
    ap.add_argument("--rank", type=int, default=1, help="local instance (needs an earlier and a later rank)")
    ap.add_argument("--compare-capped", action="store_true", help="also time register-capped tiles (CAPPED)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        dtype, hq, hkv = (torch.bfloat16, HQ, HKV) if dev.type == "cuda" else (torch.float32, 4, 2)
        lengths, total = [64, 96], 128
    else:
        dtype, hq, hkv = torch.bfloat16, HQ, HKV
        lengths, total = [int(x) for x in args.lengths.split(",")], args.total
    capped = (CAPPED_QUICK if args.quick and dev.type != "cuda" else CAPPED) if args.compare_capped else None
    causal = run_causal(dev, dtype, lengths, hq, hkv, capped)
    print_table(causal, ["tokens", "varlen_ms", "varlen_tflop_s", "paged_ms", "paged_tflop_s", "sdpa_flash_ms",
                         "sdpa_flash_tflop_s", "varlen_vs_paged", "varlen_vs_sdpa", "capped_vs_default"])
    hops = run_hops(dev, dtype, total, args.degree, hq, hkv, args.rank, capped)
    print_table(hops, ["hop", "rank", "src", "queries", "keys", "visible_frac", "ms", "tflop_s", "merge_fp32_ms",
                       "merge_tflop_s", "capped_vs_default", "capped_merge_vs_default"])
    settings = {"quick": args.quick, "dtype": str(dtype), "hq": hq, "hkv": hkv, "head_dim": D, "page": PAGE,
                "lengths": lengths, "total": total, "degree": args.degree, "rank": args.rank, "capped": capped}
    path = write_result("ring-attention", {"settings": settings, "causal": causal, "hops": hops})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
