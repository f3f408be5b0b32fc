"""Attention-kernel benchmark (a script, not a test): `python bench/kernels.py [--quick]`.

On an H100 (Llama-3.1-8B attention shape: Hq=32, Hkv=8, D=128, bf16, block_size 16), side by side:
  (a) paged decode, batch x context: achieved GB/s vs device-copy bandwidth and vs torch SDPA (unpaged view of
      the same memory: the cache uses an identity block table, so K/V are also a strided [B, Hkv, ctx, D] view),
      replayed from CUDA graphs (the GPU's time, as the engine's decode steps) and eagerly (do_bench);
  (b) causal prefill of one sequence: TFLOP/s vs SDPA's flash backend on the same data;
  (c) hybrid batches: pod_attention vs the prefill kernel then the decode kernel (ratio > 1: fused is faster),
      eagerly and from CUDA graphs, and the host (CPU) time one eager call of each takes to return.
Writes bench/results/kernels-<time>.json (GPU, torch/triton versions, git commit, settings, rows).
`--quick`: tiny shapes on CPU under TRITON_INTERPRET=1 (only checks that the script executes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import env_info, git_commit  # noqa: E402

from accordion.kernels.attention import (  # noqa: E402
    DecodeArgs,
    PrefillArgs,
    paged_decode_attention,
    paged_prefill_attention,
    pod_attention,
)

HQ, HKV, D, PAGE = 32, 8, 128, 16
MAX_KV_BYTES = 40e9
L2_COPY_BYTES = 256 << 20  # graph-timed decodes rotate over cache copies of at least this much in all


def bench(fn, dev) -> float:
    """Median milliseconds of fn()."""
    if dev.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def host_us(fn, dev) -> float:
    """Median host microseconds one call of fn() takes to return (validation, allocation, launches: what an eager
    engine step pays per layer whatever the GPU does) over 200 calls (2 on CPU, where the interpreter runs the
    kernels); the GPU is drained every 8 calls so that no launch waits."""
    calls = 200 if dev.type == "cuda" else 2
    fn()
    ts = []
    for i in range(calls):
        if i % 8 == 0 and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return 1e6 * statistics.median(ts)


def copy_bandwidth(dev, nbytes: int) -> float:
    """GB/s of a device copy, counting bytes read + written."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), dev)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def identity_cache(B: int, ctx: int, dtype, dev):
    """kv [2, B*nb, PAGE, HKV, D] with sequence b in blocks b*nb ... (b+1)*nb-1 (identity block table)."""
    nb = -(-ctx // PAGE)
    kv = torch.empty(2, B * nb, PAGE, HKV, D, dtype=dtype, device=dev).normal_()
    table = torch.arange(B * nb, dtype=torch.int32, device=dev).view(B, nb)
    return kv, table, nb


def unpaged(cache: torch.Tensor, B: int, nb: int) -> torch.Tensor:
    """[B, HKV, nb*PAGE, D] strided view of an identity-mapped cache [B*nb, PAGE, HKV, D]."""
    return cache.view(B, nb * PAGE, HKV, D).transpose(1, 2)


class DecodeCase:
    """One decode benchmark case: B sequences of ``ctx`` keys in an identity-mapped paged cache, the query, output
    buffers, and SDPA's unpaged views of the same memory. ``ours(**kw)`` / ``theirs()`` run one decode each."""

    def __init__(self, B: int, ctx: int, dtype, dev):
        self.B, self.ctx = B, ctx
        self.kv, self.table, nb = identity_cache(B, ctx, dtype, dev)
        self.seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        self.equal_lengths = True  # told to the launcher, as the engine does from its host lengths
        self.q = torch.randn(B, HQ, D, dtype=dtype, device=dev)
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty(B, HQ, dtype=torch.float32, device=dev)
        self.k4, self.v4 = unpaged(self.kv[0], B, nb), unpaged(self.kv[1], B, nb)

    def ours(self, **kw):
        kw.setdefault("equal_lengths", self.equal_lengths)
        return paged_decode_attention(self.q, self.kv[0], self.kv[1], self.table, self.seq_lens, scale=D**-0.5,
                                      out=self.out, lse=self.lse, max_seq_len=self.ctx, **kw)

    def theirs(self):
        return sdpa(self.q.view(self.B, HQ, 1, D), self.k4, self.v4, False)


def sdpa(q, k, v, causal):
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (RuntimeError, TypeError):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=causal)


def graph_ms(fns, dev) -> float:
    """Median milliseconds per call of ``fns`` (called in turn) replayed from a CUDA graph: GPU time without the
    host's launch cost, as the engine's decode steps run. Each fn reads its own copy of the data, so that L2 never
    holds what the next call reads."""
    def run():
        for fn in fns:
            fn()

    if dev.type != "cuda":
        return bench(run, dev) / len(fns)
    torch.cuda.synchronize(dev)  # do_bench_cudagraph runs on a side stream: the inputs' writes must be done first
    return triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median") / len(fns)


def run_decode(dev, dtype, batches, contexts, copy_bw):
    """Decode rows: eager (`do_bench`, L2 flushed between calls; includes the host launch cost where it exceeds the
    GPU time) and from CUDA graphs (over copies of the cache adding up to >= L2_COPY_BYTES), against SDPA."""
    rows = []
    esz = torch.finfo(dtype).bits // 8
    for B in batches:
        for ctx in contexts:
            kv_bytes = 2 * B * ctx * HKV * D * esz
            if kv_bytes > MAX_KV_BYTES:
                continue
            copies = max(1, min(32, -(-L2_COPY_BYTES // kv_bytes))) if dev.type == "cuda" else 1
            cases = [DecodeCase(B, ctx, dtype, dev) for _ in range(copies)]
            ours, theirs = [c.ours for c in cases], [c.theirs for c in cases]
            ms, g_ms = bench(ours[0], dev), graph_ms(ours, dev)
            try:
                ms_sdpa, g_sdpa = bench(theirs[0], dev), graph_ms(theirs, dev)
            except Exception as e:  # noqa: BLE001 - report, keep going
                print(f"sdpa decode B={B} ctx={ctx} failed: {e}")
                ms_sdpa = g_sdpa = float("nan")
            moved = kv_bytes + 2 * cases[0].q.numel() * esz
            gbs = moved / (g_ms * 1e-3) / 1e9
            rows.append(dict(batch=B, context=ctx, ms=ms, sdpa_ms=ms_sdpa, speedup_vs_sdpa=ms_sdpa / ms,
                             graph_ms=g_ms, sdpa_graph_ms=g_sdpa, graph_speedup_vs_sdpa=g_sdpa / g_ms,
                             graph_gb_s=gbs, graph_pct_copy_bw=100 * gbs / copy_bw, cache_copies=copies))
            print(f"decode B={B:4d} ctx={ctx:6d}: graphs {g_ms * 1e3:8.1f} us {gbs:7.0f} GB/s "
                  f"({100 * gbs / copy_bw:5.1f}% copy), sdpa {g_sdpa * 1e3:8.1f} us -> x{g_sdpa / g_ms:.3f}; "
                  f"eager {ms * 1e3:8.1f} us, sdpa {ms_sdpa * 1e3:8.1f} us -> x{ms_sdpa / ms:.2f}", flush=True)
            cases = ours = theirs = None  # free the GPU memory before the next shape
    return rows


def run_prefill(dev, dtype, lengths):
    rows = []
    for n in lengths:
        kv, table, nb = identity_cache(1, n, dtype, dev)
        sl = torch.tensor([n], dtype=torch.int32, device=dev)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        q = torch.randn(n, HQ, D, dtype=dtype, device=dev)
        out = torch.empty_like(q)
        lse = torch.empty(n, HQ, dtype=torch.float32, device=dev)
        ms = bench(lambda: paged_prefill_attention(q, kv[0], kv[1], table, cu, sl, scale=D**-0.5, max_seqlen_q=n,
                                                   out=out, lse=lse), dev)
        q4 = q.unsqueeze(0).transpose(1, 2)
        k4, v4 = unpaged(kv[0], 1, nb)[:, :, :n], unpaged(kv[1], 1, nb)[:, :, :n]
        try:
            if dev.type == "cuda":
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ms_sdpa = bench(lambda: sdpa(q4, k4, v4, True), dev)
            else:
                ms_sdpa = bench(lambda: sdpa(q4, k4, v4, True), dev)
        except Exception as e:  # noqa: BLE001
            print(f"sdpa flash prefill n={n} failed: {e}")
            ms_sdpa = float("nan")
        flops = 4.0 * HQ * D * n * n / 2  # QK^T and PV over the causal half
        tf = flops / (ms * 1e-3) / 1e12
        rows.append(dict(tokens=n, ms=ms, tflop_s=tf, sdpa_flash_ms=ms_sdpa,
                         sdpa_flash_tflop_s=flops / (ms_sdpa * 1e-3) / 1e12, ratio_vs_sdpa=ms_sdpa / ms))
        print(f"prefill n={n:6d}: {ms:8.3f} ms {tf:6.1f} TFLOP/s; sdpa flash {ms_sdpa:8.3f} ms -> x{ms_sdpa / ms:.2f}",
              flush=True)
        kv = None  # free the GPU memory before the next shape
    return rows


def hybrid_batch(chunk: int, p_ctx: int, bd: int, d_ctx: int, dtype, dev):
    """One hybrid batch: a ``chunk``-query prefill over ``p_ctx`` keys and ``bd`` decodes over ``d_ctx`` keys each,
    in one paged cache. Returns (kv [2, N, PAGE, HKV, D], PrefillArgs, DecodeArgs, prefill_only, decode_only) where
    the last two run the halves through their own kernels."""
    nbp, nbd = -(-p_ctx // PAGE), -(-d_ctx // PAGE)
    kv = torch.empty(2, nbp + bd * nbd, PAGE, HKV, D, dtype=dtype, device=dev).normal_()
    p_table = torch.arange(nbp, dtype=torch.int32, device=dev).view(1, nbp)
    d_table = (nbp + torch.arange(bd * nbd, dtype=torch.int32, device=dev)).view(bd, nbd)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
    pq, dq = torch.randn(chunk, HQ, D, dtype=dtype, device=dev), torch.randn(bd, HQ, D, dtype=dtype, device=dev)
    pa = PrefillArgs(pq, p_table, cu, torch.tensor([p_ctx], dtype=torch.int32, device=dev), chunk,
                     out=torch.empty_like(pq), lse=torch.empty(chunk, HQ, dtype=torch.float32, device=dev),
                     max_seq_len=p_ctx)
    da = DecodeArgs(dq, d_table, torch.full((bd,), d_ctx, dtype=torch.int32, device=dev), out=torch.empty_like(dq),
                    lse=torch.empty(bd, HQ, dtype=torch.float32, device=dev), max_seq_len=d_ctx)

    def prefill_only():
        paged_prefill_attention(pa.q, kv[0], kv[1], pa.block_table, pa.cu_seqlens_q, pa.seq_lens, scale=D**-0.5,
                                max_seqlen_q=chunk, out=pa.out, lse=pa.lse)

    def decode_only():
        paged_decode_attention(da.q, kv[0], kv[1], da.block_table, da.seq_lens, scale=D**-0.5, out=da.out,
                               lse=da.lse, max_seq_len=d_ctx, equal_lengths=True)

    return kv, pa, da, prefill_only, decode_only


def run_hybrid(dev, dtype, chunks, decode_batches, decode_contexts):
    rows = []
    for chunk, p_ctx in chunks:
        for bd in decode_batches:
            for d_ctx in decode_contexts:
                B = 1 + bd
                kv, pa, da, prefill_only, decode_only = hybrid_batch(chunk, p_ctx, bd, d_ctx, dtype, dev)

                def seq():
                    prefill_only()
                    decode_only()

                def pod():
                    pod_attention(kv[0], kv[1], pa, da, scale=D**-0.5)

                ms_seq, ms_pod = bench(seq, dev), bench(pod, dev)
                host_seq, host_pod = host_us(seq, dev), host_us(pod, dev)
                g_seq, g_pod = graph_ms([seq], dev), graph_ms([pod], dev)
                g_p, g_d = graph_ms([prefill_only], dev), graph_ms([decode_only], dev)
                # a fused launch cannot beat the longer half alone: the speed-up's ceiling and the share of the
                # shorter half it hid
                bound = (g_p + g_d) / max(g_p, g_d)
                hidden = (g_seq - g_pod) / min(g_p, g_d)
                rows.append(dict(chunk=chunk, prefill_context=p_ctx, decodes=bd, decode_context=d_ctx, batch=B,
                                 sequential_ms=ms_seq, pod_ms=ms_pod, speedup=ms_seq / ms_pod,
                                 graph_sequential_ms=g_seq, graph_pod_ms=g_pod, graph_speedup=g_seq / g_pod,
                                 graph_prefill_ms=g_p, graph_decode_ms=g_d, overlap_bound=bound,
                                 shorter_half_hidden=hidden, host_sequential_us=host_seq, host_pod_us=host_pod))
                print(f"hybrid chunk={chunk:5d}@{p_ctx:6d} decodes={bd:4d}@{d_ctx:6d}: seq {ms_seq:7.3f} ms, "
                      f"pod {ms_pod:7.3f} ms (x{ms_seq / ms_pod:.2f}); graphs x{g_seq / g_pod:.3f} "
                      f"(bound x{bound:.2f}, {100 * hidden:.0f}% of the shorter half hidden); host us/call seq "
                      f"{host_seq:.0f}, pod {host_pod:.0f}", flush=True)
                kv = None  # free the GPU memory before the next shape
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<time>.json)")
    ap.add_argument("--parts", default="decode,prefill,hybrid", help="comma list of decode, prefill, hybrid")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.quick:
        settings = dict(batches=[1, 2], contexts=[64], prefill=[64], chunks=[(16, 48)], decodes=[2], d_ctx=[64],
                        copy_bytes=1 << 20)
    else:
        settings = dict(batches=[1, 16, 64, 128, 256], contexts=[1024, 8192, 32768, 131072],
                        prefill=[4096, 16384, 65536], chunks=[(512, 4096), (1024, 16384), (2048, 32768)],
                        decodes=[16, 64, 128], d_ctx=[4096, 16384, 32768], copy_bytes=2 << 30)
    t0 = time.time()
    copy_bw = copy_bandwidth(dev, settings["copy_bytes"])
    print(f"device copy bandwidth: {copy_bw:.0f} GB/s (read + write)", flush=True)
    decode = run_decode(dev, dtype, settings["batches"], settings["contexts"], copy_bw) if "decode" in parts else []
    prefill = run_prefill(dev, dtype, settings["prefill"]) if "prefill" in parts else []
    hybrid = (run_hybrid(dev, dtype, settings["chunks"], settings["decodes"], settings["d_ctx"])
              if "hybrid" in parts else [])
    result = dict(
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (TRITON_INTERPRET)",
        torch=torch.__version__, triton=triton.__version__, git_commit=git_commit(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"), dtype=str(dtype),
        shape=dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=PAGE),
        settings={k: v for k, v in settings.items()}, copy_bandwidth_gb_s=copy_bw,
        decode=decode, prefill=prefill, hybrid=hybrid, wall_s=time.time() - t0, env=env_info(),
    )
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / (
        f"kernels-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"\n== summary ({result['gpu']}, copy {copy_bw:.0f} GB/s) ==")
    print(f"{'decode B':>9} {'ctx':>7} {'us':>8} {'GB/s':>7} {'%copy':>6} {'xSDPA':>6} {'eager xSDPA':>11}"
          "  (CUDA graphs)")
    for r in decode:
        print(f"{r['batch']:>9} {r['context']:>7} {r['graph_ms'] * 1e3:>8.1f} {r['graph_gb_s']:>7.0f} "
              f"{r['graph_pct_copy_bw']:>6.1f} {r['graph_speedup_vs_sdpa']:>6.3f} {r['speedup_vs_sdpa']:>11.2f}")
    print(f"{'prefill n':>9} {'TFLOP/s':>8} {'SDPA':>8} {'ratio':>6}")
    for r in prefill:
        print(f"{r['tokens']:>9} {r['tflop_s']:>8.1f} {r['sdpa_flash_tflop_s']:>8.1f} {r['ratio_vs_sdpa']:>6.2f}")
    print(f"{'chunk':>6} {'pctx':>6} {'dec':>4} {'dctx':>6} {'seq ms':>8} {'pod ms':>8} {'x':>5} {'x graphs':>8} "
          f"{'bound':>6} {'hidden':>6} {'host us seq':>11} {'pod':>5}")
    for r in hybrid:
        print(f"{r['chunk']:>6} {r['prefill_context']:>6} {r['decodes']:>4} {r['decode_context']:>6} "
              f"{r['sequential_ms']:>8.3f} {r['pod_ms']:>8.3f} {r['speedup']:>5.2f} {r['graph_speedup']:>8.3f} "
              f"{r['overlap_bound']:>6.2f} {100 * r['shorter_half_hidden']:>5.0f}% {r['host_sequential_us']:>11.0f} "
              f"{r['host_pod_us']:>5.0f}")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
