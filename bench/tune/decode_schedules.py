"""Decode schedule sweeps from CUDA graphs: short batches (--short), equal lengths against every schedule (--deep),
and the cells below SDPA in alternating rounds (--gap)."""

from __future__ import annotations

import torch

from accordion.kernels.attention import paged_decode_attention
from accordion.kernels.attention.decode import decode_plan
from accordion.kernels.attention.decode_schedule import DEEP_DECODE, choose_num_splits, tma_capable
from accordion.kernels.utils import num_sms

from bench.kernels import HKV, D, DecodeCase, graph_ms
from bench.tune.decode_tiles import LEAN_DECODE


def call(case: DecodeCase, **kw):
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
                   "told": graph_ms([lambda c=c: call(c, equal_lengths=True) for c in cases], dev),
                   "graph_128k": graph_ms([lambda c=c: call(c, max_seq_len=1 << 17) for c in cases], dev),
                   "graph_2k": graph_ms([lambda c=c: call(c, max_seq_len=2048) for c in cases], dev)}
            for s in (1, 2, 4, 8):
                res[f"split_{s}"] = graph_ms([lambda c=c, s=s: call(c, num_splits=s) for c in cases], dev)
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
                    [lambda c=c, s=s, bound=bound: call(c, num_splits=s, max_seq_len=bound) for c in cases], dev)
            res["stream_k"] = graph_ms([lambda c=c: call(c, config=LEAN_DECODE[1]) for c in cases], dev)
            res["default_128k"] = graph_ms([lambda c=c: call(c, max_seq_len=1 << 17) for c in cases], dev)
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
                    "default": [lambda c=c: call(c, equal_lengths=True) for c in cases],
                    f"split_x{auto}": [lambda c=c: call(c, num_splits=auto) for c in cases],
                    "stream_k": [lambda c=c: call(c) for c in cases]}
        if deep:
            variants[f"deep_x{deep}"] = [lambda c=c: call(c, num_splits=deep, config=DEEP_DECODE) for c in cases]
        if dev.type == "cuda" and B * HKV > 2 * sms:
            variants["tma2p"] = [lambda c=c: call(c, num_splits=1, config=tma2p) for c in cases]
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
        chosen = default_config(case)
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


def default_config(case: DecodeCase) -> tuple[int, dict]:
    """(num_splits, config) that the launcher picks for ``case`` on its own (equal lengths, as the table runs)."""
    return decode_plan(case.B, HKV, D, case.q.dtype, case.q.device, case.ctx, equal_lengths=True,
                       tma=tma_capable(case.kv[0], case.kv[1]))
