"""GPU checks of the attention kernels at real sizes in bf16 (skipped without CUDA).

Bound: ||out - ref|| / ||ref|| < 1e-2 against the fp32 torch references; lse within 2e-2 absolute.
"""

from __future__ import annotations

import pytest
import torch

from accordion.kernels.attention import (
    DecodeArgs,
    PrefillArgs,
    merge_attention_states,
    paged_decode_attention,
    paged_prefill_attention,
    pod_attention,
    varlen_attention_with_positions,
    write_kv_cache,
)
from accordion.kernels.attention.reference import (
    ref_merge_attention_states,
    ref_paged_decode_attention,
    ref_paged_prefill_attention,
    ref_varlen_attention_with_positions,
)

from .attn_helpers import make_paged_kv, make_prefill_batch, poisoned, rel_err

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16
DEV = torch.device("cuda")


def _check(out, lse, ref, ref_lse):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel_err(out, ref) < 1e-2
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2


@pytest.mark.parametrize("hkv,group,head_dim", [(8, 4, 128), (8, 1, 128), (4, 8, 128), (1, 8, 64), (8, 4, 64)])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_gpu(hkv, group, head_dim, num_splits):
    gen = torch.Generator().manual_seed(hkv * 100 + group + head_dim)
    seq_lens = [1, 17, 500, 4096, 3001, 8191, 0, 2048]
    kv, table, sl = make_paged_kv(seq_lens, hkv, head_dim, 16, BF16, DEV, gen)
    q = torch.randn(len(seq_lens), hkv * group, head_dim, generator=gen).to(BF16).to(DEV)
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    paged_decode_attention(q, kv[0], kv[1], table, sl, scale=head_dim**-0.5, out=out, lse=lse, num_splits=num_splits)
    _check(out, lse, *ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=head_dim**-0.5))


@pytest.mark.parametrize("block_n,num_splits", [(16, 1), (16, 5), (32, 1), (32, 5), (None, None)])
def test_decode_tma_gpu(block_n, num_splits):
    """The TMA decode kernel (explicit one- and two-page tiles, and as chosen by default for 80 sequences x 8 kv
    heads, more programs than four per SM) against the reference, with empty and mid-page sequences."""
    from accordion.kernels.attention.decode_schedule import decode_config, tma_capable

    gen = torch.Generator().manual_seed(11 + (block_n or 0) + (num_splits or 0))
    seq_lens = [1, 17, 500, 4096, 3001, 0, 2048, 33] * 10
    kv, table, sl = make_paged_kv(seq_lens, 8, 128, 16, BF16, DEV, gen)
    assert tma_capable(kv[0], kv[1])
    q = torch.randn(len(seq_lens), 32, 128, generator=gen).to(BF16).to(DEV)
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    cfg = None if block_n is None else dict(BLOCK_N=block_n, num_warps=4, num_stages=4, TMA=True)
    if cfg is None:
        assert decode_config(128, BF16, False, 80 * 8, True, DEV).get("TMA")
    paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5, out=out, lse=lse, num_splits=num_splits,
                           config=cfg)
    _check(out, lse, *ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5))


@pytest.mark.parametrize("cfg", [None, dict(BLOCK_N=32, num_warps=4, num_stages=5, LEAN=True),
                                 dict(BLOCK_N=16, num_warps=2, num_stages=6, LEAN=True, PER_SM=4)])
@pytest.mark.parametrize("hkv,group,head_dim", [(8, 4, 128), (2, 8, 64)])
def test_decode_stream_k_gpu(cfg, hkv, group, head_dim):
    """Stream-K decode at real sizes on a ragged batch (empty, mid-page and long sequences), explicitly and as the
    default picks it (24 sequences of unknown lengths)."""
    from accordion.kernels.attention.decode_schedule import choose_num_splits, lean_pays_off

    gen = torch.Generator().manual_seed(5 + hkv + (cfg or {}).get("BLOCK_N", 0))
    seq_lens = [1, 17, 500, 4096, 3001, 0, 20000, 33] * 3
    kv, table, sl = make_paged_kv(seq_lens, hkv, head_dim, 16, BF16, DEV, gen)
    q = torch.randn(len(seq_lens), hkv * group, head_dim, generator=gen).to(BF16).to(DEV)
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    if cfg is None and hkv == 8:
        ctx = table.shape[1] * 16
        assert lean_pays_off(24, 8, choose_num_splits(24, 8, ctx, DEV, 32), DEV, uniform=False, max_context=ctx)
    paged_decode_attention(q, kv[0], kv[1], table, sl, scale=head_dim**-0.5, out=out, lse=lse, config=cfg)
    _check(out, lse, *ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=head_dim**-0.5))


@pytest.mark.parametrize("seq_lens", [[5000] * 16, [5000] * 13 + [0] * 3, [3000] * 64, [4000, 4100, 3990] * 8])
def test_decode_stream_k_equal_lengths_gpu(seq_lens):
    """The stream-K kernel (what decode CUDA graphs run, not knowing the lengths) on equally long rows takes the
    split-KV partition on the device: 2 splits a row at 16 rows (padding rows included), whole rows in rounds at 64.
    24 rows within 5% would leave too many programs idle, so they take stream-K's cuts."""
    gen = torch.Generator().manual_seed(len(seq_lens) + seq_lens[0])
    kv, table, sl = make_paged_kv(seq_lens, 8, 128, 16, BF16, DEV, gen)
    q = torch.randn(len(seq_lens), 32, 128, generator=gen).to(BF16).to(DEV)
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5, out=out, lse=lse,
                           config=dict(BLOCK_N=32, num_warps=4, num_stages=5, LEAN=True))
    _check(out, lse, *ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5))


@pytest.mark.parametrize("batch,ctx,splits", [(16, 5000, 1), (4, 9000, 4)])
def test_decode_deep_schedule_gpu(batch, ctx, splits):
    """Lengths told equal: one deep-pipelined program per SM (`deep_splits`, on a 132-SM Hopper: 16 sequences x 8 kv
    heads unsplit, 4 in four splits merged in the launch), against the reference."""
    from accordion.kernels.attention.decode_schedule import deep_splits, deep_tuned
    from accordion.kernels.utils import num_sms

    gen = torch.Generator().manual_seed(batch + ctx)
    kv, table, sl = make_paged_kv([ctx] * batch, 8, 128, 16, BF16, DEV, gen)
    q = torch.randn(batch, 32, 128, generator=gen).to(BF16).to(DEV)
    if deep_tuned(128, BF16, DEV) and num_sms(DEV) == 132:
        assert deep_splits(batch, 8, ctx, 128, BF16, DEV) == splits
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5, out=out, lse=lse, max_seq_len=ctx,
                           equal_lengths=True)
    _check(out, lse, *ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5))


@pytest.mark.parametrize("num_splits,extra", [(1, {}), (2, {}), (1, dict(BLOCK_N=128))])
def test_decode_host_bound_gpu(num_splits, extra):
    """The deep schedule's tiles, HOST_BOUND (key loops over the host's bound, keys past each seq_len masked), also
    with 128-key tiles (the H200's), on rows shorter than the bound, an empty one, lengths off the page size, against
    the reference."""
    from accordion.kernels.attention.decode_schedule import DEEP_DECODE

    gen = torch.Generator().manual_seed(7 * num_splits + len(extra))
    seq_lens = [5000] * 13 + [4097, 0, 1]
    kv, table, sl = make_paged_kv(seq_lens, 8, 128, 16, BF16, DEV, gen)
    q = torch.randn(len(seq_lens), 32, 128, generator=gen).to(BF16).to(DEV)
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5, out=out, lse=lse, max_seq_len=5003,
                           num_splits=num_splits, config={**DEEP_DECODE, "HOST_BOUND": True, **extra})
    _check(out, lse, *ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=128**-0.5))


@pytest.mark.parametrize("hkv,group,head_dim,page", [(8, 4, 128, 16), (8, 1, 64, 32), (2, 8, 128, 8)])
def test_prefill_gpu(hkv, group, head_dim, page):
    gen = torch.Generator().manual_seed(7 + hkv + group)
    q_lens, seq_lens = [1, 1000, 333, 2048, 64], [1, 1000, 4000, 2100, 5000]
    kv, table, sl = make_paged_kv(seq_lens, hkv, head_dim, page, BF16, DEV, gen)
    q, cu = make_prefill_batch(q_lens, seq_lens, hkv * group, head_dim, BF16, DEV, gen)
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    paged_prefill_attention(q, kv[0], kv[1], table, cu, sl, scale=head_dim**-0.5, max_seqlen_q=max(q_lens),
                            out=out, lse=lse)
    _check(out, lse, *ref_paged_prefill_attention(q, kv[0], kv[1], table, cu, sl, scale=head_dim**-0.5))


def test_pod_gpu_matches_references():
    gen = torch.Generator().manual_seed(11)
    p_q, p_seq, d_seq = [512, 100], [4096, 100], [4096] * 20 + [300, 1, 9000]
    kv, table, sl = make_paged_kv(p_seq + d_seq, 8, 128, 16, BF16, DEV, gen)
    pq, cu = make_prefill_batch(p_q, p_seq, 32, 128, BF16, DEV, gen)
    dq = torch.randn(len(d_seq), 32, 128, generator=gen).to(BF16).to(DEV)
    po, plse, do, dlse = pod_attention(
        kv[0], kv[1], PrefillArgs(pq, table[:2], cu, sl[:2], 512, out=poisoned(pq.shape, BF16, DEV)),
        DecodeArgs(dq, table[2:], sl[2:], out=poisoned(dq.shape, BF16, DEV)), scale=128**-0.5,
    )
    _check(po, plse, *ref_paged_prefill_attention(pq, kv[0], kv[1], table[:2], cu, sl[:2], scale=128**-0.5))
    _check(do, dlse, *ref_paged_decode_attention(dq, kv[0], kv[1], table[2:], sl[2:], scale=128**-0.5))


@pytest.mark.parametrize("hkv,group,head_dim,dtype", [(8, 4, 128, BF16), (2, 8, 64, torch.float16), (4, 1, 128, BF16)])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_pod_gpu_both_kernels_match_references(hkv, group, head_dim, dtype, num_splits):
    """The default launch (the warp-specialized Gluon kernel on sm_90 under Triton 3.6, asserted there; also with its
    copies by cp.async as where TMA cannot serve, and with one-page decode tiles in three stages) and the Triton
    kernel (taken when a config is given) against the references: ragged chunks (1 query, mid-page ends, several
    m-tiles) beside empty, one-key and long decodes, the decode split automatic, 1 or 5."""
    import triton

    from accordion.kernels.attention.pod import ws_capable, ws_supported_triton
    from accordion.kernels.attention.pod_schedule import WS_CP_ASYNC, pod_config
    from accordion.kernels.utils import cuda_capability

    gen = torch.Generator().manual_seed(hkv * 1000 + group * 10 + head_dim)
    p_q, p_seq, d_seq = [1, 300, 777], [5000, 300, 2000], [0, 1, 17, 4096, 9000, 100]
    kv, table, sl = make_paged_kv(p_seq + d_seq, hkv, head_dim, 16, dtype, DEV, gen)
    pq, cu = make_prefill_batch(p_q, p_seq, hkv * group, head_dim, dtype, DEV, gen)
    dq = torch.randn(len(d_seq), hkv * group, head_dim, generator=gen).to(dtype).to(DEV)
    ref_p = ref_paged_prefill_attention(pq, kv[0], kv[1], table[:3], cu, sl[:3], scale=head_dim**-0.5)
    ref_d = ref_paged_decode_attention(dq, kv[0], kv[1], table[3:], sl[3:], scale=head_dim**-0.5)
    launches = [(None, None), (pod_config(head_dim, dtype), None)]
    if cuda_capability(DEV) == (9, 0) and ws_supported_triton(triton.__version__):
        assert ws_capable(kv[0], group, kv[1], pq, dq)
        launches += [(None, WS_CP_ASYNC), (None, {"D_BLOCK_N": 16, "D_STAGES": 3})]
    for config, ws_config in launches:
        po, plse, do, dlse = pod_attention(
            kv[0], kv[1], PrefillArgs(pq, table[:3], cu, sl[:3], max(p_q), out=poisoned(pq.shape, dtype, DEV)),
            DecodeArgs(dq, table[3:], sl[3:], out=poisoned(dq.shape, dtype, DEV), num_splits=num_splits),
            scale=head_dim**-0.5, config=config, ws_config=ws_config,
        )
        _check(po, plse, *ref_p)
        _check(do, dlse, *ref_d)


@pytest.mark.parametrize("seed", range(4))
def test_pod_gpu_random_hybrid_batches_equal_separate_kernels(seed):
    """Engine-like hybrid batches at real sizes: 1-3 prefill chunks (1-4096 queries over cached prefixes up to
    128k), 1-96 decodes of 1-64k keys, the decode split chosen from the longest row of the whole step (as the
    engine passes it). The fused kernel's outputs equal the two kernels' in sequence."""
    gen = torch.Generator().manual_seed(100 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    p_q = [r(1, 4096) for _ in range(r(1, 3))]
    p_seq = [q + (r(0, 131072 - q) if i == 0 else r(0, 8192)) for i, q in enumerate(p_q)]
    d_seq = [r(1, 65536) if i % 8 == 0 else r(1, 4096) for i in range(r(1, 96))]
    kv, table, sl = make_paged_kv(p_seq + d_seq, 8, 128, 16, BF16, DEV, gen)
    bp = len(p_q)
    pq, cu = make_prefill_batch(p_q, p_seq, 32, 128, BF16, DEV, gen)
    dq = torch.randn(len(d_seq), 32, 128, generator=gen).to(BF16).to(DEV)
    longest = max(p_seq + d_seq)
    po, plse, do, dlse = pod_attention(
        kv[0], kv[1], PrefillArgs(pq, table[:bp], cu, sl[:bp], max(p_q), out=poisoned(pq.shape, BF16, DEV)),
        DecodeArgs(dq, table[bp:], sl[bp:], out=poisoned(dq.shape, BF16, DEV), max_seq_len=longest),
        scale=128**-0.5,
    )
    ref_p = paged_prefill_attention(pq, kv[0], kv[1], table[:bp], cu, sl[:bp], scale=128**-0.5, max_seqlen_q=max(p_q))
    ref_d = paged_decode_attention(dq, kv[0], kv[1], table[bp:], sl[bp:], scale=128**-0.5, max_seq_len=longest)
    _check(po, plse, *ref_p)
    _check(do, dlse, *ref_d)


def test_varlen_and_merge_gpu():
    gen = torch.Generator().manual_seed(12)
    n = 3000
    q = torch.randn(n, 32, 128, generator=gen).to(BF16).to(DEV)
    k, v = (torch.randn(n, 8, 128, generator=gen).to(BF16).to(DEV) for _ in range(2))
    pos = torch.randperm(n, generator=gen).int().to(DEV)
    cu = torch.tensor([0, 1000, n], dtype=torch.int32, device=DEV)
    out, lse = varlen_attention_with_positions(q, k, v, pos, pos, cu, cu, scale=0.088, max_seqlen_q=2000,
                                               max_seqlen_k=2000)
    _check(out, lse, *ref_varlen_attention_with_positions(q, k, v, pos, pos, cu, cu, scale=0.088))
    lse2 = lse.flip(0).clone()
    lse2[::7] = float("-inf")
    o, ol = merge_attention_states(out, lse, out.flip(0).contiguous(), lse2)
    ro, rl = ref_merge_attention_states(out, lse, out.flip(0), lse2)
    assert rel_err(o, ro) < 1e-2 and torch.allclose(ol, rl, atol=1e-3)


def _ref_varlen_by_head(q, k, v, qp, kp, cu_q, cu_k, scale):
    """The fp32 reference one kv head (its GQA group of q heads) at a time: the full score tensor would not fit."""
    group = q.shape[1] // k.shape[1]
    parts = [ref_varlen_attention_with_positions(q[:, h * group:(h + 1) * group], k[:, h:h + 1], v[:, h:h + 1],
                                                 qp, kp, cu_q, cu_k, scale=scale) for h in range(k.shape[1])]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _zigzag_gpu(n, shards, rank):
    c = n // (2 * shards)
    a, b = rank * c, (2 * shards - 1 - rank) * c
    return torch.cat([torch.arange(a, a + c), torch.arange(b, b + c)]).int().to(DEV)


@pytest.mark.parametrize("pattern", ["causal", "own", "earlier", "later", "random_keys"])
def test_varlen_real_sizes_gpu(pattern):
    """bf16, Llama-3.1-8B heads (32 q / 8 kv, D 128): 8k queries vs 16k keys (causal, zig-zag hops with PAD
    keys, unsorted keys), against the fp32 reference; then the in-kernel merge into an fp32 state."""
    gen = torch.Generator().manual_seed(len(pattern) * 31 + ord(pattern[0]))
    if pattern == "causal":
        qp = torch.arange(8192, 8192 + 8192, dtype=torch.int32, device=DEV)
        kp = torch.arange(16384, dtype=torch.int32, device=DEV)
    elif pattern == "random_keys":
        qp = torch.randint(0, 16384, (8192,), generator=gen).int().to(DEV)
        kp = torch.randperm(16384, generator=gen).int().to(DEV)
    else:  # degree 4 over 32k tokens: 8k local queries (two ranges) vs a 16k chunk of 8k real keys + PAD keys
        rank, src = {"own": (1, 1), "earlier": (2, 0), "later": (1, 3)}[pattern]
        qp = _zigzag_gpu(32768, 4, rank)
        real = _zigzag_gpu(32768, 4, src)
        kp = torch.full((16384,), 2**31 - 1, dtype=torch.int32, device=DEV)
        kp[:real.numel()] = real
    tq, tk = qp.numel(), kp.numel()
    q = torch.randn(tq, 32, 128, generator=gen).to(BF16).to(DEV)
    k, v = (torch.randn(tk, 8, 128, generator=gen).to(BF16).to(DEV) for _ in range(2))
    cu_q = torch.tensor([0, tq], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, tk], dtype=torch.int32, device=DEV)
    out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
    varlen_attention_with_positions(q, k, v, qp, kp, cu_q, cu_k, scale=128**-0.5, max_seqlen_q=tq, max_seqlen_k=tk,
                                    out=out, lse=lse)
    ref, ref_lse = _ref_varlen_by_head(q, k, v, qp, kp, cu_q, cu_k, 128**-0.5)
    _check(out, lse, ref, ref_lse)
    if pattern == "later":  # the first query range sees nothing
        assert torch.isneginf(lse[:4096]).all() and torch.all(out[:4096] == 0)
    prev = torch.randn(tq, 32, 128, generator=gen).to(DEV)
    prev_lse = torch.randn(tq, 32, generator=gen).to(DEV)
    state, state_lse = prev.clone(), prev_lse.clone()
    varlen_attention_with_positions(q, k, v, qp, kp, cu_q, cu_k, scale=128**-0.5, max_seqlen_q=tq, max_seqlen_k=tk,
                                    out=state, lse=state_lse, prev_out=state, prev_lse=state_lse)
    want, want_lse = ref_merge_attention_states(prev, prev_lse, ref, ref_lse)
    _check(state, state_lse, want, want_lse)


def test_write_kv_cache_gpu():
    kv = torch.zeros(2, 64, 16, 8, 128, dtype=BF16, device=DEV)
    k, v = (torch.randn(100, 8, 128, device=DEV).to(BF16) for _ in range(2))
    slots = torch.randperm(64 * 16, device=DEV)[:100]
    slots[5] = -1
    write_kv_cache(k, v, kv[0], kv[1], slots)
    keep = slots >= 0
    assert torch.equal(kv[0].view(-1, 8, 128)[slots[keep]], k[keep])
    assert torch.equal(kv[1].view(-1, 8, 128)[slots[keep]], v[keep])


def test_decode_cuda_graph_capture():
    """Captured once, replayed with new seq_lens / block tables / q: matches the reference (no host syncs)."""
    gen = torch.Generator().manual_seed(13)
    kv, table, sl = make_paged_kv([3000, 100, 7000, 50], 8, 128, 16, BF16, DEV, gen)
    q = torch.randn(4, 32, 128, generator=gen).to(BF16).to(DEV)
    out = torch.empty_like(q)
    lse = torch.empty(4, 32, device=DEV)
    paged_decode_attention(q, kv[0], kv[1], table, sl, scale=0.088, out=out, lse=lse)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        paged_decode_attention(q, kv[0], kv[1], table, sl, scale=0.088, out=out, lse=lse)
    sl.copy_(torch.tensor([49, 7000, 1, 2999], dtype=torch.int32, device=DEV))  # within the flipped tables
    table.copy_(table.flip(0))
    q.copy_(torch.randn(4, 32, 128, generator=gen).to(BF16))
    g.replay()
    _check(out, lse, *ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=0.088))


def test_pod_cuda_graph_replays():
    """The fused kernel captured once and replayed three times with new queries, eagerly launched in between: the
    graph replays its own zeroed decode-item counter and split scratch, so every replay matches the references."""
    gen = torch.Generator().manual_seed(17)
    p_q, p_seq, d_seq = [700], [5000], [4096] * 6 + [1, 300, 20000]
    kv, table, sl = make_paged_kv(p_seq + d_seq, 8, 128, 16, BF16, DEV, gen)
    pq, cu = make_prefill_batch(p_q, p_seq, 32, 128, BF16, DEV, gen)
    dq = torch.randn(len(d_seq), 32, 128, generator=gen).to(BF16).to(DEV)
    prefill = PrefillArgs(pq, table[:1], cu, sl[:1], 700, out=torch.empty_like(pq),
                          lse=torch.empty(pq.shape[:2], device=DEV))
    decode = DecodeArgs(dq, table[1:], sl[1:], out=torch.empty_like(dq), lse=torch.empty(dq.shape[:2], device=DEV))
    pod_attention(kv[0], kv[1], prefill, decode, scale=128**-0.5)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pod_attention(kv[0], kv[1], prefill, decode, scale=128**-0.5)
    for _ in range(3):
        pq.copy_(torch.randn(pq.shape, generator=gen).to(BF16))
        dq.copy_(torch.randn(dq.shape, generator=gen).to(BF16))
        g.replay()
        _check(prefill.out, prefill.lse, *ref_paged_prefill_attention(pq, kv[0], kv[1], table[:1], cu, sl[:1],
                                                                       scale=128**-0.5))
        _check(decode.out, decode.lse, *ref_paged_decode_attention(dq, kv[0], kv[1], table[1:], sl[1:],
                                                                   scale=128**-0.5))
        pod_attention(kv[0], kv[1], prefill, decode, scale=128**-0.5)


def test_decode_split_merge_two_threads_two_streams():
    """Two threads decode with in-kernel split merges on their own streams at once, a CUDA graph captured by one
    of them replaying meanwhile: ticket counters are never shared, every result matches the reference."""
    import threading

    from accordion.kernels.attention.decode import split_tickets

    gen = torch.Generator().manual_seed(29)
    kv, table, sl = make_paged_kv([5000, 300, 9000, 2047, 4096, 77], 8, 128, 16, BF16, DEV, gen)
    q = torch.randn(6, 32, 128, generator=gen).to(BF16).to(DEV)
    ref, ref_lse = ref_paged_decode_attention(q, kv[0], kv[1], table, sl, scale=0.088)
    results, errors = {}, []

    def worker(name: str, graph: bool) -> None:
        try:
            stream = torch.cuda.Stream(DEV)
            with torch.cuda.stream(stream):
                out, lse = poisoned(q.shape, BF16, DEV), poisoned(q.shape[:2], torch.float32, DEV)
                run = lambda: paged_decode_attention(q, kv[0], kv[1], table, sl, scale=0.088, out=out, lse=lse,  # noqa: E731
                                                     num_splits=4)
                run()
                if graph:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, stream=stream):
                        run()
                for _ in range(50):
                    g.replay() if graph else run()
                stream.synchronize()
                results[name] = (out.clone(), lse.clone(), split_tickets(DEV).data_ptr())
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n, n == "graph")) for n in ("graph", "eager")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for out, lse, _ in results.values():
        _check(out.float(), lse, ref, ref_lse)
    assert results["graph"][2] != results["eager"][2]
