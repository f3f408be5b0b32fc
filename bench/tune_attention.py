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
bench/results/tune-attention-<gpu>-<time>.json. This file is the command line; the sweeps live in `bench/tune/`.
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

from accordion.kernels.attention import ws_capable  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from bench.kernels import HKV, HQ, D  # noqa: E402
from bench.tune.decode_schedules import (  # noqa: E402
    DEEP_SHAPES,
    GAP_DEEP_SHAPES,
    GAP_SHAPES,
    tune_deep,
    tune_gap,
    tune_short,
)
from bench.tune.decode_tiles import (  # noqa: E402
    DECODE_CONFIGS,
    LEAN_DECODE,
    MERGE_DECODE,
    ORDER_DECODE,
    TMA_DECODE,
    tune_decode,
    tune_lean_ragged,
)
from bench.tune.hybrid import (  # noqa: E402
    HYBRIDS,
    POD_CONFIGS,
    WS_HYBRIDS,
    WS_VARIANTS,
    resources,
    tune_pod,
    tune_streams,
    tune_ws,
)
from bench.tune.offsets import OFFSETS_EQUAL, OFFSETS_PREFILL, OFFSETS_RAGGED, tune_offsets  # noqa: E402
from bench.tune.prefill import PREFILL_CONFIGS, tune_prefill  # noqa: E402


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
