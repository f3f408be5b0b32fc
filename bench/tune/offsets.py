"""int32 K/V offsets shared by V against int64 ones, decode and prefill, from CUDA graphs (--offsets)."""

from __future__ import annotations

import torch

from accordion.kernels.attention import paged_prefill_attention

from bench.kernels import HQ, D, DecodeCase, graph_ms, identity_cache, sdpa, unpaged

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
