"""Decode tile sweeps: every config x split factor against torch SDPA on the same memory (unpaged view), and ragged
batches split-KV against stream-K (`bench/tune_attention.py` default, --orders, --merge, --tma, --lean)."""

from __future__ import annotations

import torch

from accordion.kernels.attention.decode_schedule import choose_num_splits

from bench.kernels import HKV, DecodeCase, bench, graph_ms

DECODE_CONFIGS = [dict(BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=4),
                  dict(BLOCK_N=128, num_warps=4, num_stages=3), dict(BLOCK_N=128, num_warps=8, num_stages=3),
                  dict(BLOCK_N=32, num_warps=2, num_stages=4)]
# --orders: the default decode tiles with the grid's order changed (kv heads fastest), timed eagerly and in a CUDA
# graph (POD's decode tickets in that order gave -2.4% to +1% on an H100, 20261127T081054Z, and were dropped)
ORDER_DECODE = [dict(BLOCK_N=64, num_warps=4, num_stages=3, HEADS_FASTEST=False),
                dict(BLOCK_N=64, num_warps=4, num_stages=3, HEADS_FASTEST=True)]
# --merge: split partials merged in the decode launch (last split of a row merges) or by a second launch
MERGE_DECODE = [dict(BLOCK_N=n, num_warps=w, num_stages=st, FUSED_MERGE=True)
                for n, w, st in ((64, 4, 3), (64, 4, 4), (32, 4, 5), (32, 4, 6), (16, 4, 8), (128, 8, 3))]
MERGE_DECODE.append(dict(BLOCK_N=32, num_warps=4, num_stages=5, FUSED_MERGE=False))
# --tma: K/V pages fetched by TMA descriptors (one or two 16-token pages a tile) against the default tiles (split
# and unsplit launches' configs), auto splits, eager and in CUDA graphs
# (round 1, 20261127T151205Z: one page, 2 warps, 6 stages 1-3% faster than the default at batch 16-64, 8% slower at
# 256, where two pages, 4 warps, 6 stages was 0.5% faster; 4 stages 12-15% slower everywhere). Split factors auto/2,
# auto and 2 x auto.
TMA_DECODE = [dict(BLOCK_N=32, num_warps=4, num_stages=5), dict(BLOCK_N=64, num_warps=4, num_stages=3)]
TMA_DECODE += [dict(BLOCK_N=16 * pages, num_warps=w, num_stages=st, TMA=True)
               for pages, w, st in ((1, 2, 6), (1, 2, 8), (1, 2, 10), (1, 1, 8), (1, 4, 7), (2, 4, 6), (2, 4, 7),
                                    (2, 2, 8))]
# --lean: stream-K decode (every program the same number of key tiles over all rows, one wave) against the
# default split-KV, at small batches
LEAN_DECODE = [dict(BLOCK_N=32, num_warps=4, num_stages=5, FUSED_MERGE=True)]
LEAN_DECODE += [dict(BLOCK_N=n, num_warps=w, num_stages=st, LEAN=True, PER_SM=per_sm)
                for n, w, st, per_sm in ((32, 4, 5, 2), (32, 4, 6, 2))]
# (round 2, 20261127T154233Z: three or four 4-warp programs per SM 0.61-0.84x split-KV, dropped; round 3,
# T154957Z: 64-key tiles or 2-warp 16-key tiles at four per SM no better than 32-key tiles at two)


def tune_decode(dev, dtype, shapes, configs, auto_only=False, splits_list=None, factors=None) -> list[dict]:
    """Every config x split factor against SDPA: a fixed ``splits_list``, else ``factors`` x the automatic one
    (default: 1 with ``auto_only``, else 1/2 to 4). Also from CUDA graphs unless the default four factors run."""
    graphs = auto_only or factors is not None
    factors = factors or ((1,) if auto_only else (0.5, 1, 2, 4))
    rows = []
    for B, ctx in shapes:
        case = DecodeCase(B, ctx, dtype, dev)
        ms_sdpa = bench(case.theirs, dev)
        graph_sdpa = graph_ms([case.theirs], dev) if graphs else None
        expect = None
        for cfg in configs:
            auto = choose_num_splits(B, HKV, ctx, dev, cfg["BLOCK_N"])
            got = case.ours(config=cfg)[0].float()
            expect = got if expect is None else expect
            err = (got - expect).abs().max().item()  # against the first config's output
            candidates = splits_list or [max(1, int(auto * f)) for f in factors]
            for splits in sorted(set(candidates)):
                if splits == 1 and not cfg.get("FUSED_MERGE", True):
                    continue  # one split merges nothing
                def run():
                    case.ours(num_splits=splits, config=cfg)
                ms = bench(run, dev)
                rows.append(dict(batch=B, context=ctx, **cfg, splits=splits, auto_splits=auto, ms=ms,
                                 sdpa_ms=ms_sdpa, vs_sdpa=ms_sdpa / ms, max_abs_diff_vs_first=err))
                if graph_sdpa is not None:
                    g = graph_ms([run], dev)
                    rows[-1].update(graph_ms=g, graph_sdpa_ms=graph_sdpa, graph_vs_sdpa=graph_sdpa / g)
                print(f"decode B={B} ctx={ctx} {cfg} splits={splits}: {ms:.4f} ms, x{ms_sdpa / ms:.3f} sdpa, "
                      f"err {err:.1e}"
                      + (f"; graphs x{rows[-1]['graph_vs_sdpa']:.3f}" if graph_sdpa is not None else ""), flush=True)
        case = None
    return rows


def tune_lean_ragged(dev, dtype, batches, max_ctx) -> list[dict]:
    """Ragged batches (lengths uniform in [512, max_ctx], seeded): split-KV at the automatic split against stream-K,
    and what the launcher picks by default, from CUDA graphs (no SDPA: it would need padding)."""
    rows = []
    for B in batches:
        case = DecodeCase(B, max_ctx, dtype, dev)
        g = torch.Generator().manual_seed(B)
        case.seq_lens.copy_(torch.randint(min(512, max_ctx // 2), max_ctx + 1, (B,), generator=g, dtype=torch.int32))
        case.equal_lengths = False
        auto = choose_num_splits(B, HKV, max_ctx, dev, 32)
        split = case.ours(num_splits=auto)[0].float()
        lean = case.ours(config=LEAN_DECODE[1])[0].float()
        err = (split - lean).abs().max().item()
        times = {name: graph_ms([lambda kw=kw: case.ours(**kw)], dev)
                 for name, kw in (("split", dict(num_splits=auto)), ("lean", dict(config=LEAN_DECODE[1])),
                                  ("default", {}))}
        rows.append(dict(batch=B, max_context=max_ctx, total_keys=int(case.seq_lens.sum()), splits=auto,
                         **{f"{k}_ms": v for k, v in times.items()}, lean_vs_split=times["split"] / times["lean"],
                         max_abs_diff=err))
        print(f"ragged B={B} <= {max_ctx}: split x{auto} {times['split'] * 1e3:.1f} us, stream-K "
              f"{times['lean'] * 1e3:.1f} us (x{times['split'] / times['lean']:.3f}), default "
              f"{times['default'] * 1e3:.1f} us, err {err:.1e}", flush=True)
    return rows
