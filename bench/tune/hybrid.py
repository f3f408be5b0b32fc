"""Hybrid batches: Triton POD configs (default run), the two kernels on two CUDA streams (--streams) and the
warp-specialized POD's variants (--ws), each against the prefill kernel then the decode kernel; the compiled
kernels' resources."""

from __future__ import annotations

import torch

from accordion.kernels.attention import pod_attention

from bench.kernels import D, bench, graph_ms, hybrid_batch

POD_CONFIGS = [dict(P_BLOCK_M=64, P_BLOCK_N=64, D_BLOCK_N=64, num_warps=4, num_stages=3),  # the default
               # eight warps capped at 128 registers: two programs per SM, so the prefill role keeps the prefill
               # kernel's 128-row tile and two warpgroups while a decode program streams beside it
               dict(P_BLOCK_M=128, P_BLOCK_N=32, D_BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128),
               dict(P_BLOCK_M=128, P_BLOCK_N=64, D_BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128),
               dict(P_BLOCK_M=128, P_BLOCK_N=32, D_BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128)]
# Earlier candidates (4 warps at maxnreg 128 / 168, smaller tiles, %smid-only schedules): 20261126T164801Z and
# 20261126T165103Z, none above 1.14x.
HYBRIDS = [(512, 4096, 16, 4096), (512, 4096, 128, 32768), (1024, 16384, 64, 16384), (1024, 16384, 128, 4096),
           (2048, 32768, 16, 4096), (2048, 32768, 128, 32768)]


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
