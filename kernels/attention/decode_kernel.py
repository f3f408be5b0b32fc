"""@triton.jit code for paged decode attention (split-KV / flash-decoding) and the split merge.

Work item = (sequence b, kv head, split): all GROUP query heads of the kv head are processed together
(rows of a [BLOCK_H, HEAD_DIM] tile, BLOCK_H >= 16 so tl.dot maps onto MMA), so each K/V tile is
loaded once per GQA group. Split s covers keys [s * L, min((s + 1) * L, seq_len)) with
L = cdiv(cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N; empty splits write out 0, lse -inf.

With fused_merge (a runtime flag) the split partials are combined in the same launch: each (b, kv head) has a ticket
counter; the program that takes the last ticket (all other splits' partials are then stored) merges them into the
final output and resets the counter to 0 for the next launch (counters start zeroed and stay so between launches).
(A key loop split into unmasked whole tiles plus one masked tail was no faster on an H100 and cost a resident program
per SM: the two pipelined loops hold two sets of shared-memory buffers.)

Arguments that change from step to step (the split count, the block table's row stride) are plain runtime integers,
exempt from Triton's value specialization: a serving engine then compiles each kernel once, at warm-up, instead of
stalling a step on a compilation whenever a batch brings a new value.
"""

import triton
import triton.language as tl

from ..utils import jit_unspecialized
from .paged_common import NEG_BIG, finalize, merge_step, paged_attn_loop, store_merged


@triton.jit
def decode_work(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_ptr,  # [num_blocks, PAGE, Hkv, D]
    bt_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    o_ptr,  # out [B, Hq, D] (split stride 0) or partial [B, Hq, S, D] fp32
    lse_ptr,  # lse [B, Hq] (split stride 0) or partial [B, Hq, S] fp32
    fo_ptr,  # fused_merge: final out [B, Hq, D]
    flse_ptr,  # fused_merge: final lse fp32 [B, Hq]
    ticket_ptr,  # fused_merge: int32 [B * Hkv] zeroed split tickets
    b,
    kvh,
    split,
    num_splits,
    fused_merge,
    len_bound,  # HOST_BOUND: the host's upper bound of every seq_len, <= the block table's columns * PAGE_SIZE
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kp,
    stride_kh,
    stride_vb,
    stride_vp,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_fob,
    stride_foh,
    stride_flb,
    stride_flh,
    num_kv_heads,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HOST_BOUND: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """One (b, kvh, split) decode work item; stores normalised out rows and their lse (and, with fused_merge and
    num_splits > 1, merges the splits of (b, kvh) if it is the last of them to finish).

    HOST_BOUND (rows of known, equal lengths): the splits and the key loop span len_bound keys, the keys past seq_len
    masked, so that the first block-table entries are fetched beside seq_len instead of after it (one memory
    latency less before the first K/V tile is requested)."""
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = len_bound if HOST_BOUND else seq_len
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(ctx, lo + split_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None], other=0.0)

    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    acc, l_i, m_i = paged_attn_loop(
        acc, l_i, m_i, q, offs_h,
        k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, bt_ptr + b64 * stride_btb,
        lo, hi, tl.minimum(seq_len, hi) if HOST_BOUND else hi, hi,
        stride_kb, stride_kp, stride_vb, stride_vp, qk_scale,
        HEAD_DIM, PAGE_SIZE, BLOCK_N, False, True, DOT_PRECISION, FAST_OFFSETS,
    )
    finish_decode_item(
        acc, l_i, m_i, b64, kvh, split, heads, h_mask, o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr, num_splits,
        fused_merge, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        stride_fob, stride_foh, stride_flb, stride_flh, num_kv_heads, BLOCK_H, HEAD_DIM,
    )


@triton.jit
def finish_decode_item(
    acc, l_i, m_i,  # [BLOCK_H, D], [BLOCK_H], [BLOCK_H] running softmax state of one work item
    b64, kvh, split, heads, h_mask,
    o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr,  # as in `decode_work`
    num_splits, fused_merge,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    stride_fob, stride_foh, stride_flb, stride_flh, num_kv_heads,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Store a work item's normalised rows and lse (a split's partial when num_splits > 1); with fused_merge, the
    last split of (b, kvh) to finish merges them all."""
    offs_d = tl.arange(0, HEAD_DIM)
    out, lse = finalize(acc, l_i, m_i)
    o_off = b64 * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])
    tl.store(lse_ptr + b64 * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=h_mask)
    if fused_merge != 0:
        if num_splits > 1:
            tl.debug_barrier()  # every thread's partial stores precede the ticket (release, gpu scope)
            t_ptr = ticket_ptr + b64 * num_kv_heads + kvh
            if tl.atomic_add(t_ptr, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.atomic_xchg(t_ptr, 0)
                merge_split_rows(
                    o_ptr + b64 * stride_ob, lse_ptr + b64 * stride_lb, fo_ptr + b64 * stride_fob,
                    flse_ptr + b64 * stride_flb, heads, h_mask, num_splits,
                    stride_oh, stride_os, stride_lh, stride_ls, stride_foh, stride_flh, BLOCK_H, HEAD_DIM,
                )


@triton.jit
def merge_split_rows(
    mid_o_ptr,  # fp32 [Hq, S, D] (one sequence)
    mid_lse_ptr,  # fp32 [Hq, S]
    o_ptr,  # [Hq, D]
    lse_ptr,  # fp32 [Hq]
    heads,  # [BLOCK_H] head indices
    h_mask,  # [BLOCK_H]
    num_splits,
    stride_moh, stride_mos, stride_mlh, stride_mls, stride_oh, stride_lh,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Log-sum-exp weighted combination of the num_splits partials of some heads of one sequence, read through
    L2 (".cg": written by other SMs in this launch). Empty splits (lse -inf) weigh 0; all empty -> (0, -inf)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    tot = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for s in range(num_splits):
        lse_s = tl.load(mid_lse_ptr + heads * stride_mlh + s * stride_mls, mask=h_mask, other=float("-inf"),
                        cache_modifier=".cg")
        o_s = tl.load(mid_o_ptr + heads[:, None] * stride_moh + s * stride_mos + offs_d[None, :],
                      mask=h_mask[:, None], other=0.0, cache_modifier=".cg")
        acc, tot, m = merge_step(acc, tot, m, o_s, lse_s)
    store_merged(o_ptr + heads[:, None] * stride_oh + offs_d[None, :], lse_ptr + heads * stride_lh, acc, tot, m, h_mask)


@jit_unspecialized("stride_btb", "num_splits", "fused_merge", "len_bound")
def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr,
    num_splits, fused_merge, len_bound,
    stride_qb, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_fob, stride_foh, stride_flb, stride_flh,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
    HOST_BOUND: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """Grid (B, Hkv, num_splits), or (Hkv, B, num_splits) when HEADS_FASTEST: the programs that run together then
    read the same tokens of neighbouring kv heads, which are adjacent in a [num_blocks, PAGE, Hkv, D] cache.
    Tensor shapes as in `decode_work`; FAST_OFFSETS as in `paged_common.paged_attn_loop`."""
    if HEADS_FASTEST:
        b, kvh, num_kv_heads = tl.program_id(1), tl.program_id(0), tl.num_programs(0)
    else:
        b, kvh, num_kv_heads = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    decode_work(
        q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr,
        b, kvh, tl.program_id(2), num_splits, fused_merge, len_bound,
        stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_btb,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        stride_fob, stride_foh, stride_flb, stride_flh, num_kv_heads, qk_scale,
        GROUP, BLOCK_H, HEAD_DIM, PAGE_SIZE, BLOCK_N, DOT_PRECISION, HOST_BOUND, FAST_OFFSETS,
    )


@jit_unspecialized("num_splits")
def merge_splits_kernel(
    mid_o_ptr,  # fp32 [B, Hq, S, D]
    mid_lse_ptr,  # fp32 [B, Hq, S]
    o_ptr,  # [B, Hq, D]
    lse_ptr,  # fp32 [B, Hq]
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh, stride_mls,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    num_splits,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Grid (B, Hq): log-sum-exp weighted combination of the num_splits partials of one row, CHUNK splits a step
    (a running max rescales the sum between steps; the launcher picks a CHUNK that takes them in one). Empty splits
    (lse -inf) weigh 0; all empty -> (0, -inf)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    mid_lse_ptr += b * stride_mlb + h * stride_mlh
    mid_o_ptr += b * stride_mob + h * stride_moh
    m = tl.full([], NEG_BIG, dtype=tl.float32)
    tot = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        offs_s = s0 + tl.arange(0, CHUNK)
        s_mask = offs_s < num_splits
        lse = tl.load(mid_lse_ptr + offs_s * stride_mls, mask=s_mask, other=float("-inf"))
        o = tl.load(mid_o_ptr + offs_s[:, None] * stride_mos + offs_d[None, :], mask=s_mask[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        tot = tot * alpha + tl.sum(w, 0)
        m = m_new
    denom = tl.where(tot > 0.0, tot, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / denom).to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + b * stride_lb + h * stride_lh, tl.where(tot > 0.0, m + tl.log(denom), float("-inf")))
