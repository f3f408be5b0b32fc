"""Prefill kernel configs on full prefills and long-context chunks, from CUDA graphs (--prefill)."""

from __future__ import annotations

from accordion.kernels.attention import paged_prefill_attention

from bench.kernels import HQ, D, graph_ms, hybrid_batch

# --prefill: the default (one 8-warp program per SM) against registers capped at 128 (two per SM, as the POD
# candidates that beat the prefill kernel on 2048-query chunks over 32k keys) and 4-warp 64-row tiles
PREFILL_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                   dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128),
                   dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, maxnreg=128),
                   dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)]


def tune_prefill(dev, dtype, shapes, configs) -> list[dict]:
    """Prefill kernel configs on full prefills and long-context chunks (q chunk over a cached prefix), timed from
    CUDA graphs; TFLOP/s counts the causal part once."""
    rows = []
    for chunk, ctx in shapes:
        kv, pa, _, _, _ = hybrid_batch(chunk, ctx, 1, 16, dtype, dev)
        flops = 4 * chunk * (ctx - chunk / 2) * HQ * D
        base = None
        for cfg in configs:
            def run():
                paged_prefill_attention(pa.q, kv[0], kv[1], pa.block_table, pa.cu_seqlens_q, pa.seq_lens,
                                        scale=D**-0.5, max_seqlen_q=chunk, out=pa.out, lse=pa.lse, config=cfg)
            try:
                ms = graph_ms([run], dev)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not the end
                print(f"prefill {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            base = ms if base is None else base
            rows.append(dict(chunk=chunk, context=ctx, **cfg, graph_ms=ms, tflop_s=flops / ms / 1e9,
                             vs_first=base / ms))
            print(f"prefill {chunk}@{ctx} {cfg}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, x{base / ms:.3f}",
                  flush=True)
        kv = None
    return rows
