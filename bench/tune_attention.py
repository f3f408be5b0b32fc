"""Tile-size sweep of the decode, POD and prefill kernels on a GPU (a script, not a test).

    python bench/tune_attention.py            # H100: Llama-3.1-8B attention shape, bf16
    python bench/tune_attention.py --merge    # decode: split merge in the launch or a second one, splits 1-4
    python bench/tune_attention.py --prefill  # prefill: default tiles against registers capped at 128
    python bench/tune_attention.py --tma      # decode: K/V pages by TMA descriptors against the default tiles
    python bench/tune_attention.py --lean     # decode: stream-K (equal key tiles per program) against split-KV
    python bench/tune_attention.py --short    # decode: short batches as a CUDA graph sees them (split-KV vs stream-K)
    python bench/tune_attention.py --deep     # decode, equal lengths: one deep program per SM against the others
    python bench/tune_attention.py --streams  # hybrid batches: the two kernels in sequence, on two streams, POD
    python bench/tune_attention.py --ws       # hybrid batches: warp-specialized POD variants, fused and prefill-only
    python bench/tune_attention.py --offsets  # decode, prefill: int32 K/V offsets shared by V against int64 ones
    python bench/tune_attention.py --quick    # CPU smoke run under TRITON_INTERPRET=1

Decode: every config x split factor against torch SDPA on the same memory (unpaged view), contexts >= 8k,
batch >= 16 (issue 4's target regime). POD: every config against the prefill kernel then the decode
kernel on hybrid batches, with each compiled kernel's registers, spills, shared memory and resident programs
per SM. The defaults in `decode_config` / `pod_config` / `prefill_config` come from these tables. Writes
bench/results/tune-attention-<gpu>-<time>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if "--quick" in sys.argv:
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from accordion.kernels.attention import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
    pod_attention,
    ws_capable,
)
from accordion.kernels.attention.decode import decode_plan  # noqa: E402
from accordion.kernels.attention.decode_schedule import (  # noqa: E402
    DEEP_DECODE,
    choose_num_splits,
    tma_capable,
)
from accordion.kernels.utils import num_sms  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from bench.kernels import (  # noqa: E402
    HKV,
    HQ,
    D,
    DecodeCase,
    bench,
    graph_ms,
    hybrid_batch,
    identity_cache,
    sdpa,
    unpaged,
)

DECODE_CONFIGS = [dict(BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=4),
                  dict(BLOCK_N=128, num_warps=4, num_stages=3), dict(BLOCK_N=128, num_warps=8, num_stages=3),
                  dict(BLOCK_N=32, num_warps=2, num_stages=4)]
POD_CONFIGS = [dict(P_BLOCK_M=64, P_BLOCK_N=64, D_BLOCK_N=64, num_warps=4, num_stages=3),  # the default
               # eight warps capped at 128 registers: two programs per SM, so the prefill role keeps the prefill
               # kernel's 128-row tile and two warpgroups while a decode program streams beside it
               dict(P_BLOCK_M=128, P_BLOCK_N=32, D_BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128),
               dict(P_BLOCK_M=128, P_BLOCK_N=64, D_BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128),
               dict(P_BLOCK_M=128, P_BLOCK_N=32, D_BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128)]
# Earlier candidates (4 warps at maxnreg 128 / 168, smaller tiles, %smid-only schedules): 20261126T164801Z and
# 20261126T165103Z, none above 1.14x.
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
# --prefill: the default (one 8-warp program per SM) against registers capped at 128 (two per SM, as the POD
# candidates that beat the prefill kernel on 2048-query chunks over 32k keys) and 4-warp 64-row tiles
PREFILL_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                   dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128),
                   dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, maxnreg=128),
                   dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)]
HYBRIDS = [(512, 4096, 16, 4096), (512, 4096, 128, 32768), (1024, 16384, 64, 16384), (1024, 16384, 128, 4096),
           (2048, 32768, 16, 4096), (2048, 32768, 128, 32768)]


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


def _call(case: DecodeCase, **kw):
    """One decode of ``case`` through the launcher with its arguments (``max_seq_len`` default: the case's context)."""
    kw.setdefault("max_seq_len", case.ctx)
    return paged_decode_attention(case.q, case.kv[0], case.kv[1], case.table, case.seq_lens, scale=D**-0.5,
                                  out=case.out, lse=case.lse, **kw)


def tune_short(dev, dtype, batches, contexts, ragged, copies=6) -> tuple[list[dict], list[dict]]:
    """Short batches from CUDA graphs (microseconds), over ``copies`` batches each so L2 holds none of the next.

    Equal lengths: SDPA; the default told the context and equal lengths; the default as a decode graph sees it
    (lengths unknown, bound 128k or 2k); fixed splits 1-8. Ragged lengths (uniform in each of ``ragged``'s ranges):
    split-KV at the split count a 1k / 4k / 8k bound gives, stream-K, and the default under a 128k bound."""
    equal, uneven = [], []
    for B in batches:
        for ctx in contexts:
            cases = [DecodeCase(B, ctx, dtype, dev) for _ in range(copies)]
            res = {"sdpa": graph_ms([c.theirs for c in cases], dev),
                   "told": graph_ms([lambda c=c: _call(c, equal_lengths=True) for c in cases], dev),
                   "graph_128k": graph_ms([lambda c=c: _call(c, max_seq_len=1 << 17) for c in cases], dev),
                   "graph_2k": graph_ms([lambda c=c: _call(c, max_seq_len=2048) for c in cases], dev)}
            for s in (1, 2, 4, 8):
                res[f"split_{s}"] = graph_ms([lambda c=c, s=s: _call(c, num_splits=s) for c in cases], dev)
            equal.append(dict(batch=B, context=ctx, **{f"{k}_us": v * 1e3 for k, v in res.items()}))
            print(f"short equal B={B} ctx={ctx}: " + " ".join(f"{k} {v * 1e3:.1f}" for k, v in res.items()), flush=True)
    for lo, hi in ragged:
        for B in batches:
            cases = []
            for i in range(copies):
                c = DecodeCase(B, hi, dtype, dev)
                g = torch.Generator().manual_seed(B * 100 + i)
                c.seq_lens.copy_(torch.randint(lo, hi + 1, (B,), generator=g, dtype=torch.int32))
                cases.append(c)
            res = {}
            for bound in sorted({hi, 4096, 8192}):
                s = choose_num_splits(B, HKV, bound, dev, 32)
                res[f"split_at_{bound}_x{s}"] = graph_ms(
                    [lambda c=c, s=s, bound=bound: _call(c, num_splits=s, max_seq_len=bound) for c in cases], dev)
            res["stream_k"] = graph_ms([lambda c=c: _call(c, config=LEAN_DECODE[1]) for c in cases], dev)
            res["default_128k"] = graph_ms([lambda c=c: _call(c, max_seq_len=1 << 17) for c in cases], dev)
            uneven.append(dict(lengths=[lo, hi], batch=B, **{f"{k}_us": v * 1e3 for k, v in res.items()}))
            print(f"short ragged [{lo}, {hi}] B={B}: " + " ".join(f"{k} {v * 1e3:.1f}" for k, v in res.items()),
                  flush=True)
    return equal, uneven


# --deep: equal lengths told to the launcher, from CUDA graphs: SDPA; the default; one deep program per SM at the
# fewest splits (powers of two) that fill >= 70% of the SMs once; split-KV at `choose_num_splits` with its own tiles;
# stream-K (not told); TMA two pages a tile, unsplit (the many-rows default before ee3e4fd).
# (bench/results/experiments/decode-deep-pipeline-*.json, decode-many-rows-*.json)
DEEP_SHAPES = [(1, 32768), (1, 131072), (4, 8192), (4, 32768), (7, 8192), (8, 32768), (12, 8192), (14, 8192),
               (15, 8192), (16, 2048), (16, 4096), (16, 8192), (16, 16384), (16, 32768), (16, 131072), (64, 8192),
               (96, 8192), (128, 4096), (128, 32768), (192, 8192), (256, 8192)]


def tune_deep(dev, dtype, shapes, copies_bytes=256 << 20) -> list[dict]:
    """Equal-length decodes, every schedule against SDPA, each over copies of the cache (>= ``copies_bytes`` in all)
    so L2 never holds the next call's keys."""
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    tma2p = dict(BLOCK_N=32, num_warps=4, num_stages=6, TMA=True, HEADS_FASTEST=True)
    rows = []
    for B, ctx in shapes:
        kv_bytes = 2 * B * ctx * HKV * D * torch.finfo(dtype).bits // 8
        cases = [DecodeCase(B, ctx, dtype, dev) for _ in range(max(1, min(16, -(-copies_bytes // kv_bytes))))]
        deep = next((s for s in (1, 2, 4, 8, 16, 32) if 0.7 * sms <= B * HKV * s <= sms), None)
        auto = choose_num_splits(B, HKV, ctx, dev, 32)
        variants = {"sdpa": [c.theirs for c in cases],
                    "default": [lambda c=c: _call(c, equal_lengths=True) for c in cases],
                    f"split_x{auto}": [lambda c=c: _call(c, num_splits=auto) for c in cases],
                    "stream_k": [lambda c=c: _call(c) for c in cases]}
        if deep:
            variants[f"deep_x{deep}"] = [lambda c=c: _call(c, num_splits=deep, config=DEEP_DECODE) for c in cases]
        if dev.type == "cuda" and B * HKV > 2 * sms:
            variants["tma2p"] = [lambda c=c: _call(c, num_splits=1, config=tma2p) for c in cases]
        us = {k: graph_ms(fns, dev) * 1e3 for k, fns in variants.items()}
        rows.append(dict(batch=B, context=ctx, us=us, vs_sdpa={k: us["sdpa"] / t for k, t in us.items()}))
        print(f"deep {B} x {ctx}: " + " ".join(f"{k} {t:.1f} ({us['sdpa'] / t:.3f})" for k, t in us.items()),
              flush=True)
    return rows


# --gap: the decode cells below 1.0x SDPA in the kernels table (ee3e4fd), the launcher's choice against candidate
# schedules, SDPA timed in every round, alternating, so that a lease's drift cancels. Round 1 (20261128T042122Z):
# stream-K with 32-key tiles, 5 stages ran 1.001-1.008x SDPA at 128-256 x 8k / 32k where the launcher's 64-key tiles,
# 3 stages ran 0.986-0.993x (hence `lean_config`); an L2 evict-first hint on the K/V loads changed nothing (+-0.1%).
GAP_SHAPES = [(16, 8192), (16, 32768), (64, 8192), (128, 8192), (128, 32768), (256, 8192), (256, 32768)]
GAP_DEEP_SHAPES = [(16, 4096), (16, 8192), (16, 32768)]  # round 5 also ran 2k, 6k, 12k, 16k, 24k
# Round 5 (20261128T062422Z, T062851Z): Triton 3.6 software-pipelines the paged loop's two-level loads (table entry,
# then K/V) into floor((num_stages - 1) / 2) K/V buffers (sm_90 compiles): "3 stages" stream one tile, the deep
# schedule's "5" two, "6" as "5". Three or four 64-key tiles in flight ran 0.8-5% slower than two (one program per
# row), stream-K with 64-key tiles at 5 stages or 32-key at 7 / 9 0.1-2% slower than `lean_config`; 8 warps or
# 128-key tiles slower too. HOST_BOUND (key loops over the host's bound: the table read beside seq_len, not after
# it) ran 0.3-1.5% faster at 16 x 2k-32k: `DEEP_DECODE` takes it.
# Rounds 1-4 (tried, not kept): stream-K 64-key tiles 3 stages, 32-key 6 stages, 32 programs a kv head;
# one program per row with 32-key tiles at 8 / 10 stages (0.79-0.83x SDPA), 2 warps (0.68-0.88x), 8 warps at 4
# stages, rows fastest (no change), 4 stages (0.67-0.69x), two splits a row at 32-key tiles (0.95-1.00x); TMA pages,
# one or two a tile, 8-12 stages (0.55-0.64x); stream-K over all 132 SMs, ranges crossing kv heads, cutting every row
# (662a81c, reverted; experiments/decode-flat-stream-k-*): 0.87-0.95x where the deep program ran 0.988-1.012x.
# Round 6 (20261128T174552Z, first lease on an H200, rules tuned on the H100): the deep schedule ran 0.83-0.85x SDPA
# at 16 x 4k-32k, 128-key tiles 0.96-0.99x; a tail split (two splits, the second a row's last 4 / 8 128-key tiles,
# launched one program per SM so that the block scheduler hands tails to SMs that finish first) 0.89-0.98x, dropped.
# Round 7 (H200, 20261128T175953Z), more bytes in flight per SM: the deep schedule takes 128-key tiles (0.966-0.987x)
# and stream-K 64-key tiles (0.976-0.989x at 128 / 256 x 8k / 32k; one program per row over several waves 0.966-0.995x,
# best at 256 rows); none of the candidates reached SDPA on the H200.
GAP_MANY_ROWS = {  # more rows than SMs: stream-K, or a program per row over several waves
    "lean_n64": dict(config=dict(BLOCK_N=64, num_warps=4, num_stages=5, LEAN=True)),
    "lean_n32_s7": dict(config=dict(BLOCK_N=32, num_warps=4, num_stages=7, LEAN=True)),
    "lean_n64_1": dict(config=dict(BLOCK_N=64, num_warps=4, num_stages=5, LEAN=True, PROGRAMS=128)),
    "lean_n128_1": dict(config=dict(BLOCK_N=128, num_warps=4, num_stages=5, LEAN=True, PROGRAMS=128)),
    "lean_n64_s7_1": dict(config=dict(BLOCK_N=64, num_warps=4, num_stages=7, LEAN=True, PROGRAMS=128)),
    "rows_n64": dict(config={**DEEP_DECODE, "HOST_BOUND": False}),
    "rows_n128": dict(config={**DEEP_DECODE, "BLOCK_N": 128, "HOST_BOUND": False}),
    # round 8 (H200, batch 64: 2-4 rows per SM, where the H100's one-page TMA tiles ran 0.984-0.988x SDPA): more
    # TMA pages in flight, and stream-K with three 64-key tiles in flight. 20261129T053248Z (machine B): 8 stages
    # 1.006-1.010x where 6 ran 0.972-0.988x (10: 0.982-0.990x; two pages a tile 0.84-0.87x; stream-K at 7 stages
    # 0.965-0.974x); T053755Z (machine C) 8 stages 0.973-0.978x against 6's 0.979-0.980x, stream-K 0.987-0.999x,
    # a 128-key program per row 0.983-1.008x (a repeat there: experiments/decode-gap-batch64-h200-machine-c-*).
    # `decode_config` takes 8 stages on an H200. rows_n128_hb: rows_n128 over the host's bound (same times)
    "rows_n128_hb": dict(config={**DEEP_DECODE, "BLOCK_N": 128}),
    "tma_p1_w2_s6": dict(config=dict(BLOCK_N=16, num_warps=2, num_stages=6, TMA=True)),
    "tma_p1_w2_s8": dict(config=dict(BLOCK_N=16, num_warps=2, num_stages=8, TMA=True)),
    "tma_p1_w2_s10": dict(config=dict(BLOCK_N=16, num_warps=2, num_stages=10, TMA=True)),
    "tma_p2_w4_s6": dict(config=dict(BLOCK_N=32, num_warps=4, num_stages=6, TMA=True)),
    "tma_p2_w4_s8": dict(config=dict(BLOCK_N=32, num_warps=4, num_stages=8, TMA=True)),
    "lean_n64_s7": dict(config=dict(BLOCK_N=64, num_warps=4, num_stages=7, LEAN=True)),
}
GAP_DEEP = {  # one program per row where the rows fill the SMs once (at the launcher's split unless named)
    "n128": dict(config={**DEEP_DECODE, "BLOCK_N": 128}),
    "n128_s7": dict(config={**DEEP_DECODE, "BLOCK_N": 128, "num_stages": 7}),
    "n128_w8": dict(config={**DEEP_DECODE, "BLOCK_N": 128, "num_warps": 8}),
    "n64_s7": dict(config={**DEEP_DECODE, "num_stages": 7}),
    "n64_s9": dict(config={**DEEP_DECODE, "num_stages": 9}),
    "split2_n64": dict(num_splits=2, config=DEEP_DECODE),
    "lean_n64": dict(config=dict(BLOCK_N=64, num_warps=4, num_stages=5, LEAN=True)),
}


def tune_gap(dev, dtype, shapes, rounds=3, names=None) -> list[dict]:
    """Equal-length decodes: the launcher's choice, `GAP_MANY_ROWS` (more rows than SMs) or `GAP_DEEP` (at the
    launcher's split; either only the variants in ``names`` where given), and SDPA timed in turn from CUDA graphs,
    ``rounds`` times; a variant's ratio is the median over rounds of SDPA's time in that round over its own."""
    rows = []
    for B, ctx in shapes:
        case = DecodeCase(B, ctx, dtype, dev)
        chosen = _default_config(case)
        sms = num_sms(dev) if dev.type == "cuda" else 132
        variants = {"default": {}, **(GAP_MANY_ROWS if B * HKV > sms else GAP_DEEP)}
        variants = {k: kw for k, kw in variants.items() if k == "default" or names is None or k in names}
        if B * HKV <= sms:
            variants = {k: {"num_splits": chosen[0], **kw} if kw else kw for k, kw in variants.items()}
        ref = case.ours()[0].float()
        err = {}
        for k, kw in list(variants.items()):
            try:
                err[k] = (case.ours(**kw)[0].float() - ref).abs().max().item()
            except Exception as e:  # e.g. a config past the shared memory: drop it, say why
                print(f"gap {B} x {ctx}: {k} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                del variants[k]
        times = {k: [] for k in ("sdpa", *variants)}
        for _ in range(rounds):
            times["sdpa"].append(graph_ms([case.theirs], dev))
            for k, kw in variants.items():
                times[k].append(graph_ms([lambda kw=kw: case.ours(**kw)], dev))
        ratio = {k: sorted(s / t for s, t in zip(times["sdpa"], ts))[len(ts) // 2] for k, ts in times.items()}
        rows.append(dict(batch=B, context=ctx, default=dict(splits=chosen[0], config=chosen[1]), us={
            k: [t * 1e3 for t in ts] for k, ts in times.items()}, vs_sdpa=ratio, max_abs_diff_vs_default=err))
        print(f"gap {B} x {ctx} (default {chosen}): " + " ".join(f"{k} {v:.3f}" for k, v in ratio.items()),
              flush=True)
        case = ref = None
    return rows


# --offsets: the pointer kernels' int32 K/V offsets shared by V (`paged_common.fast_offsets`) against the int64
# offsets computed for K and V apart (the code before), each launch as the launcher picks it, in alternating rounds.
OFFSETS_EQUAL = [(16, 8192), (16, 32768), (16, 131072), (64, 32768), (128, 32768), (256, 8192), (256, 32768)]
OFFSETS_RAGGED = [(64, 512, 32768), (128, 512, 32768), (256, 512, 32768), (16, 4096, 131072)]
OFFSETS_PREFILL = [(16384, 16384), (1024, 16384), (2048, 32768)]


def tune_offsets(dev, dtype, equal, ragged, prefill, rounds=2) -> list[dict]:
    """Each case timed from CUDA graphs with `fast_offsets` as the launchers compute it ("int32") and forced off
    ("int64"), SDPA beside the equal-length decodes and the prefills (flash), ``rounds`` alternating rounds; the
    best round of each. Ragged lengths are uniform in [lo, hi], told to the launcher as unequal (stream-K)."""
    from accordion.kernels.attention import decode as decode_mod
    from accordion.kernels.attention import prefill as prefill_mod

    def timed(fns: dict) -> dict:
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                times[k].append(graph_ms([f], dev))
        return {k: min(v) * 1e3 for k, v in times.items()}

    def both(fn):  # (int32 offsets, int64 offsets) versions of a launch
        def int64():
            saved = decode_mod.fast_offsets, prefill_mod.fast_offsets
            decode_mod.fast_offsets = prefill_mod.fast_offsets = lambda k, v: False
            try:
                return fn()
            finally:
                decode_mod.fast_offsets, prefill_mod.fast_offsets = saved
        return fn, int64

    rows = []
    cases = [("decode", B, (ctx, ctx)) for B, ctx in equal] + [("ragged", B, (lo, hi)) for B, lo, hi in ragged]
    for kind, B, (lo, hi) in cases:
        case = DecodeCase(B, hi, dtype, dev)
        if kind == "ragged":
            g = torch.Generator().manual_seed(B + hi)
            case.seq_lens.copy_(torch.randint(lo, hi + 1, (B,), generator=g, dtype=torch.int32))
            case.equal_lengths = False
        fast, slow = both(case.ours)
        err = (fast()[0].float() - slow()[0].float()).abs().max().item()
        fns = {"int32": fast, "int64": slow, **({"sdpa": case.theirs} if kind == "decode" else {})}
        us = timed(fns)
        rows.append(dict(kind=kind, batch=B, lengths=[lo, hi], us=us, int32_vs_int64=us["int64"] / us["int32"],
                         max_abs_diff=err, **({"int32_vs_sdpa": us["sdpa"] / us["int32"],
                                               "int64_vs_sdpa": us["sdpa"] / us["int64"]} if "sdpa" in us else {})))
        print(f"{kind} {B} x [{lo}, {hi}]: " + " ".join(f"{k} {v:.1f} us" for k, v in us.items())
              + f" -> int32 x{us['int64'] / us['int32']:.3f} the int64 offsets"
              + (f", x{us['sdpa'] / us['int32']:.3f} SDPA (int64 x{us['sdpa'] / us['int64']:.3f})"
                 if "sdpa" in us else ""), flush=True)
        case = None
    for chunk, ctx in prefill:
        q = torch.randn(chunk, HQ, D, dtype=dtype, device=dev)
        kv, table, _ = identity_cache(1, ctx, dtype, dev)
        cu = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
        sl = torch.tensor([ctx], dtype=torch.int32, device=dev)

        def ours(q=q, kv=kv, table=table, cu=cu, sl=sl, chunk=chunk):
            return paged_prefill_attention(q, kv[0], kv[1], table, cu, sl, scale=D**-0.5, max_seqlen_q=chunk)

        fast, slow = both(ours)
        fns = {"int32": fast, "int64": slow}
        if chunk == ctx:  # a full prefill: SDPA's flash kernel on the same keys, unpaged
            k4, v4 = (unpaged(kv[i], 1, table.shape[1]) for i in (0, 1))
            fns["sdpa"] = lambda q=q, k4=k4, v4=v4: sdpa(q.transpose(0, 1)[None], k4, v4, True)
        us = timed(fns)
        rows.append(dict(kind="prefill", chunk=chunk, context=ctx, us=us, int32_vs_int64=us["int64"] / us["int32"]))
        print(f"prefill {chunk} @ {ctx}: " + " ".join(f"{k} {v:.1f} us" for k, v in us.items())
              + f" -> int32 x{us['int64'] / us['int32']:.3f}", flush=True)
    return rows


def _default_config(case: DecodeCase) -> tuple[int, dict]:
    """(num_splits, config) that the launcher picks for ``case`` on its own (equal lengths, as the table runs)."""
    return decode_plan(case.B, HKV, D, case.q.dtype, case.q.device, case.ctx, equal_lengths=True,
                       tma=tma_capable(case.kv[0], case.kv[1]))


def tune_streams(dev, dtype, hybrids) -> list[dict]:
    """Hybrid batches from CUDA graphs: the prefill and decode kernels alone, in sequence, on two streams (forked and
    joined inside the graph, either launched first) and POD fused. Replay time by CUDA events, median of 7 x 20."""
    import statistics

    def graph_time(body):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                body()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        ts = []
        for _ in range(7):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                g.replay()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 20)
        return statistics.median(ts)

    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def two_streams(first, second):
        def body():
            cur = torch.cuda.current_stream()
            s1.wait_stream(cur)
            s2.wait_stream(cur)
            with torch.cuda.stream(s1):
                first()
            with torch.cuda.stream(s2):
                second()
            cur.wait_stream(s1)
            cur.wait_stream(s2)
        return body

    rows = []
    for chunk, p_ctx, bd, d_ctx in hybrids:
        kv, pa, da, prefill_only, decode_only = hybrid_batch(chunk, p_ctx, bd, d_ctx, dtype, dev)
        ms = {"prefill": graph_time(prefill_only), "decode": graph_time(decode_only),
              "sequence": graph_time(lambda: (prefill_only(), decode_only())),
              "streams_decode_first": graph_time(two_streams(decode_only, prefill_only)),
              "streams_prefill_first": graph_time(two_streams(prefill_only, decode_only)),
              "pod": graph_time(lambda: pod_attention(kv[0], kv[1], pa, da, scale=D**-0.5))}
        rows.append(dict(chunk=chunk, prefill_context=p_ctx, decodes=bd, decode_context=d_ctx, ms=ms,
                         vs_sequence={k: ms["sequence"] / v for k, v in ms.items()},
                         ideal=ms["sequence"] / max(ms["prefill"], ms["decode"])))
        print(f"streams {chunk}@{p_ctx} + {bd}@{d_ctx}: " + " ".join(f"{k} {v:.3f}" for k, v in ms.items())
              + f" (ideal x{rows[-1]['ideal']:.2f})", flush=True)
        kv = pa = da = None
    return rows


# `WS_CONFIG` overrides for --ws (the first, none, is the shipped kernel)
WS_VARIANTS = [{}, {"D_BLOCK_N": 16, "D_REGS": 152}, {"D_BLOCK_N": 16, "D_STAGES": 3}, {"ITEMS_PER_SM": 16},
               {"D_REGS": 112}]
WS_HYBRIDS = [(512, 4096, 16, 4096), (512, 4096, 16, 16384), (512, 4096, 64, 16384), (1024, 16384, 16, 4096),
              (1024, 16384, 64, 16384), (1024, 16384, 128, 4096), (2048, 32768, 16, 4096),
              (2048, 32768, 128, 16384)]


def tune_ws(dev, dtype, hybrids, variants) -> list[dict]:
    """Warp-specialized POD variants (`pod_attention(ws_config=...)`) on hybrid batches, from CUDA graphs: each
    fused, and with every decode emptied ("prefill-only": the prefill partition's own time, to set against the
    prefill kernel's), beside the prefill and decode kernels alone and in sequence; the largest difference from the
    sequence's outputs."""
    import dataclasses

    rows = []
    for chunk, p_ctx, bd, d_ctx in hybrids:
        kv, pa, da, prefill_only, decode_only = hybrid_batch(chunk, p_ctx, bd, d_ctx, dtype, dev)
        no_decode = dataclasses.replace(da, seq_lens=torch.zeros_like(da.seq_lens), out=torch.empty_like(da.out),
                                        lse=torch.empty_like(da.lse))

        def sequence():
            prefill_only()
            decode_only()
        sequence()
        ref_p, ref_d = pa.out.clone(), da.out.clone()
        ms = {"prefill": graph_ms([prefill_only], dev), "decode": graph_ms([decode_only], dev),
              "sequence": graph_ms([sequence], dev)}
        out = []
        for variant in variants:
            def fused(d=da, variant=variant):
                pod_attention(kv[0], kv[1], pa, d, scale=D**-0.5, ws_config=variant)
            pa.out.fill_(float("nan"))
            da.out.fill_(float("nan"))
            try:
                fused()
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit is a row, not the end
                print(f"ws {variant}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                out.append(dict(variant=variant, error=f"{type(e).__name__}: {str(e)[:200]}",
                                vs_sequence=float("nan"), prefill_only_vs_prefill=float("nan")))
                continue
            err = max((pa.out.float() - ref_p.float()).abs().max().item(),
                      (da.out.float() - ref_d.float()).abs().max().item())
            t, t_p = graph_ms([fused], dev), graph_ms([lambda f=fused: f(d=no_decode)], dev)
            out.append(dict(variant=variant, ms=t, prefill_only_ms=t_p, vs_sequence=ms["sequence"] / t,
                            prefill_only_vs_prefill=ms["prefill"] / t_p, max_abs_err=err))
            print(f"ws {chunk}@{p_ctx} + {bd}@{d_ctx} {variant or 'shipped'}: {t:.3f} ms (x{ms['sequence'] / t:.3f} "
                  f"the sequence {ms['sequence']:.3f}); prefill-only {t_p:.3f} ms (prefill kernel "
                  f"{ms['prefill']:.3f}); err {err:.2e}", flush=True)
        rows.append(dict(chunk=chunk, prefill_context=p_ctx, decodes=bd, decode_context=d_ctx, ms=ms,
                         ideal=ms["sequence"] / max(ms["prefill"], ms["decode"]), variants=out))
        kv = pa = da = no_decode = None
    return rows


def tune_pod(dev, dtype, hybrids, configs) -> list[dict]:
    """Every POD config against the prefill kernel then the decode kernel; each timed eagerly and replayed from a
    CUDA graph (GPU time alone: an eager ~0.1 ms decode launch can be host-bound under do_bench)."""
    rows = []
    for chunk, p_ctx, bd, d_ctx in hybrids:
        kv, pa, da, prefill_only, decode_only = hybrid_batch(chunk, p_ctx, bd, d_ctx, dtype, dev)
        ms_p, ms_d = bench(prefill_only, dev), bench(decode_only, dev)
        g_p, g_d = graph_ms([prefill_only], dev), graph_ms([decode_only], dev)
        for cfg in configs:
            def fused():
                pod_attention(kv[0], kv[1], pa, da, scale=D**-0.5, config=cfg)
            try:
                ms = bench(fused, dev)
                g = graph_ms([fused], dev)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not the end
                print(f"pod {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(dict(chunk=chunk, prefill_context=p_ctx, decodes=bd, decode_context=d_ctx,
                             **cfg, prefill_ms=ms_p, decode_ms=ms_d, pod_ms=ms,
                             speedup=(ms_p + ms_d) / ms, ideal=(ms_p + ms_d) / max(ms_p, ms_d),
                             graph_prefill_ms=g_p, graph_decode_ms=g_d, graph_pod_ms=g,
                             graph_speedup=(g_p + g_d) / g, graph_ideal=(g_p + g_d) / max(g_p, g_d)))
            print(f"pod {chunk}@{p_ctx} + {bd}@{d_ctx} {cfg}: {ms:.3f} ms vs {ms_p:.3f}+{ms_d:.3f} "
                  f"-> x{(ms_p + ms_d) / ms:.3f}; graphs {g:.3f} vs {g_p:.3f}+{g_d:.3f} -> x{(g_p + g_d) / g:.3f}",
                  flush=True)
        kv = None
    return rows


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


def resources() -> list[dict]:
    """Registers, spills, shared memory and resident programs of every compiled POD / decode kernel."""
    from accordion.kernels.attention.decode_kernel import paged_decode_kernel
    from accordion.kernels.attention.pod_kernel import pod_attention_kernel
    from accordion.kernels.utils import resident_programs

    out = []
    for name, fn in (("pod", pod_attention_kernel), ("decode", paged_decode_kernel)):
        for cache in getattr(fn, "device_caches", {}).values():
            for key, k in cache[0].items():
                out.append(dict(kernel=name, key=str(key)[-160:], regs=k.n_regs, spills=k.n_spills,
                                shared=k.metadata.shared, warps=k.metadata.num_warps,
                                resident=resident_programs(k, torch.device("cuda"))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--orders", action="store_true",
                    help="decode only: default tiles, kv heads fastest or not, auto splits, also in CUDA graphs")
    ap.add_argument("--prefill", action="store_true",
                    help="prefill only: the default tiles against registers capped at 128 (two programs per SM), "
                         "full prefills and long-context chunks, CUDA graphs")
    ap.add_argument("--tma", action="store_true",
                    help="decode only: K/V pages by TMA descriptors against the default tiles, also in CUDA graphs")
    ap.add_argument("--lean", action="store_true",
                    help="decode only: stream-K (equal key tiles per program) against split-KV, also in CUDA graphs")
    ap.add_argument("--short", action="store_true",
                    help="decode only: short batches (512-8k keys) as a CUDA graph sees them, split-KV vs stream-K")
    ap.add_argument("--deep", action="store_true",
                    help="decode only, equal lengths: one deep program per SM against split-KV, stream-K, TMA, SDPA")
    ap.add_argument("--streams", action="store_true",
                    help="hybrid batches: the two kernels in sequence, on two CUDA streams, and POD fused (CUDA)")
    ap.add_argument("--ws", action="store_true",
                    help="hybrid batches: warp-specialized POD variants fused and prefill-only (sm_90, Triton 3.6)")
    ap.add_argument("--gap", action="store_true",
                    help="decode only: issue 4's cells below SDPA, candidate schedules and tiles, rounds of "
                         "alternating timings against SDPA (CUDA graphs)")
    ap.add_argument("--gap-deep", action="store_true", help="with --gap: only the rows that fill the SMs once")
    ap.add_argument("--shapes", default="", help="with --gap: batch x context pairs, e.g. 16x8192,256x32768")
    ap.add_argument("--variants", default="", help="with --gap: comma list of variant names (default: all)")
    ap.add_argument("--offsets", action="store_true",
                    help="decode and prefill: int32 K/V offsets shared by V against int64 offsets (CUDA graphs)")
    ap.add_argument("--merge", action="store_true",
                    help="decode only: split merge fused into the decode launch or a second launch, splits 1-8, "
                         "also in CUDA graphs")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    decode_configs, pod_configs = (ORDER_DECODE, []) if args.orders else (DECODE_CONFIGS, POD_CONFIGS)
    if args.merge:
        decode_configs, pod_configs = MERGE_DECODE, []
    if args.tma:
        decode_configs, pod_configs = TMA_DECODE, []
    if args.lean:
        decode_configs, pod_configs = LEAN_DECODE, []
    if args.quick:
        extra = decode_configs[-1:] if args.tma or args.lean else []
        decode_configs, pod_configs = decode_configs[:1] + extra, pod_configs[:1]
        dshapes, hybrids = [(2, 64)], [(16, 64, 2, 48)]
    else:
        dshapes = [(16, 8192), (16, 32768), (64, 8192), (64, 32768), (256, 8192), (16, 131072)]
        hybrids = HYBRIDS
    if args.orders and not args.quick:
        dshapes = [(16, 8192), (16, 32768), (64, 8192), (64, 32768), (256, 8192), (256, 32768)]
    if args.deep:
        rows = tune_deep(dev, dtype, [(2, 64)] if args.quick else DEEP_SHAPES)
        print("wrote", write_result("tune-attention", dict(deep=rows, quick=args.quick)))
        return
    if args.offsets:
        if args.quick:
            rows = tune_offsets(dev, dtype, [(2, 64)], [(2, 16, 64)], [(16, 48)], rounds=1)
        else:
            rows = tune_offsets(dev, dtype, OFFSETS_EQUAL, OFFSETS_RAGGED, OFFSETS_PREFILL)
        print("wrote", write_result("tune-attention", dict(offsets=rows, quick=args.quick)))
        return
    if args.gap:
        shapes = [(2, 64)] if args.quick else GAP_DEEP_SHAPES if args.gap_deep else GAP_SHAPES
        if args.shapes:
            shapes = [tuple(int(x) for x in pair.split("x")) for pair in args.shapes.split(",")]
        rows = tune_gap(dev, dtype, shapes, rounds=1 if args.quick else 3,
                        names=set(args.variants.split(",")) if args.variants else None)
        print("wrote", write_result("tune-attention", dict(gap=rows, quick=args.quick)))
        return
    if args.streams:
        if dev.type != "cuda":
            print("--streams needs CUDA")
            return
        hybrids = [(512, 4096, 16, 4096), (1024, 16384, 64, 4096), (1024, 16384, 64, 16384),
                   (1024, 16384, 128, 16384), (2048, 32768, 64, 32768), (2048, 32768, 128, 16384)]
        print("wrote", write_result("tune-attention", dict(streams=tune_streams(dev, dtype, hybrids))))
        return
    if args.ws:
        if not (dev.type == "cuda" and ws_capable(torch.empty(1, 16, HKV, D, dtype=dtype, device=dev), HQ // HKV)):
            print("--ws needs the warp-specialized kernel (sm_90, Triton 3.6)")
            return
        rows = tune_ws(dev, dtype, WS_HYBRIDS, WS_VARIANTS)
        print_table([[f"{r['chunk']}@{r['prefill_context']}+{r['decodes']}@{r['decode_context']}",
                      f"{r['ideal']:.2f}"] + [f"{v['vs_sequence']:.3f} / {v['prefill_only_vs_prefill']:.3f}"
                                              for v in r["variants"]] for r in rows],
                    ["hybrid", "ideal"] + [str(v or "shipped") for v in WS_VARIANTS])
        print("x the sequence / prefill-only x the prefill kernel (CUDA graphs)")
        print("wrote", write_result("tune-attention", dict(ws=rows, variants=WS_VARIANTS)))
        return
    if args.short:
        if args.quick:
            equal, uneven = tune_short(dev, dtype, [1, 4], [48], [(8, 64)], copies=1)
        else:
            equal, uneven = tune_short(dev, dtype, [1, 2, 4, 8, 16, 32, 64, 128], [512, 1024, 4096],
                                       [(16, 1024), (64, 4096), (256, 8192)])
        print("wrote", write_result("tune-attention", dict(short_equal=equal, short_ragged=uneven, quick=args.quick)))
        return
    if args.prefill:
        shapes = [(16, 64), (16, 48)] if args.quick else [(4096, 4096), (16384, 16384), (512, 4096), (1024, 16384),
                                                           (2048, 32768), (4096, 65536)]
        rows = tune_prefill(dev, dtype, shapes, PREFILL_CONFIGS[:2] if args.quick else PREFILL_CONFIGS)
        print("wrote", write_result("tune-attention", dict(prefill=rows, quick=args.quick)))
        return
    if args.lean and not args.quick:
        # (33 x 8 kv heads = 264 rows: one split-KV wave that fills every slot of an H100)
        dshapes = [(2, 8192), (8, 8192), (16, 8192), (16, 32768), (24, 8192), (32, 8192), (48, 8192), (64, 8192),
                   (128, 8192)]
    if args.merge and not args.quick:
        dshapes = [(16, 8192), (16, 32768), (64, 8192), (64, 32768), (256, 8192)]
    decode = [] if args.skip_decode else tune_decode(
        dev, dtype, dshapes, decode_configs, auto_only=args.orders or args.merge or args.lean,
        splits_list=[1, 2, 3, 4] if args.merge else None, factors=(0.5, 1, 2) if args.tma else None)
    pod = tune_pod(dev, dtype, hybrids, pod_configs) if pod_configs else []
    ragged = tune_lean_ragged(dev, dtype, [2, 4] if args.quick else [2, 4, 8, 16, 32, 48, 64, 128],
                              64 if args.quick else 32768) if args.lean else []
    res = resources() if dev.type == "cuda" else []
    path = write_result("tune-attention", dict(decode=decode, pod=pod, ragged=ragged, resources=res, quick=args.quick))
    best = {}
    for r in decode:
        k = (r["batch"], r["context"])
        if k not in best or r["vs_sdpa"] > best[k]["vs_sdpa"]:
            best[k] = r
    print_table([[f"{k[0]}@{k[1]}", f"N{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']}"
                  + (" heads-fastest" if r.get("HEADS_FASTEST") else "")
                  + (f" tma x{r['BLOCK_N'] // 16}" if r.get("TMA") else "")
                  + (f" lean {r['PER_SM']}/SM" if r.get("LEAN") else ""),
                  f"{r['splits']} ({r['auto_splits']})", f"{r['vs_sdpa']:.3f}",
                  f"{r.get('graph_vs_sdpa', float('nan')):.3f}"]
                 for k, r in best.items()],
                ["B@ctx", "best decode config", "splits (auto)", "x SDPA", "x SDPA, graphs"])
    bestp = {}
    for r in pod:
        k = (r["chunk"], r["prefill_context"], r["decodes"], r["decode_context"])
        if k not in bestp or r["speedup"] > bestp[k]["speedup"]:
            bestp[k] = r
    print_table([[f"{k[0]}@{k[1]}+{k[2]}@{k[3]}",
                  f"M{r['P_BLOCK_M']} N{r['P_BLOCK_N']} dN{r['D_BLOCK_N']} w{r['num_warps']} "
                  f"s{r['num_stages']} r{r.get('maxnreg', '-')}", f"{r['speedup']:.3f}", f"{r['ideal']:.2f}",
                  f"{r.get('graph_speedup', float('nan')):.3f}", f"{r.get('graph_ideal', float('nan')):.2f}"]
                 for k, r in bestp.items()],
                ["hybrid", "best POD", "x sequential", "ideal", "x seq, graphs", "ideal, graphs"])
    for r in res:
        if r["kernel"] == "pod":
            print({k: v for k, v in r.items() if k != "key"})
    print("wrote", path)


if __name__ == "__main__":
    main()
