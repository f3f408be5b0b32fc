"""@triton.jit code for paged decode attention with every kv head of a sequence in one program ("packed").

Work item = (split, sequence b). A token's keys for all Hkv heads are one contiguous row of a
[num_blocks, PAGE, Hkv, D] cache, so the program streams whole token rows (a page of 16 tokens x 8 heads x 128
dims is one contiguous 32 KiB run) instead of eight programs each reading 256-byte slices of them. The K tile is
[BLOCK_N * Hkv, D] (row r = token r // Hkv, kv head r % Hkv); all Hq query heads multiply all of it in one
tl.dot and each score is kept only where the query head's kv head is the row's (the other Hkv - 1 of every Hkv
products are discarded: tensor-core work a bandwidth-bound kernel has to spare). Softmax state is per query head,
as in `decode_work`; split partials and the fused merge are those of the per-head kernel, with one ticket per
sequence.
"""

import triton
import triton.language as tl

from ..utils import jit_unspecialized
from .decode_kernel import merge_split_rows
from .paged_common import NEG_BIG, finalize


@jit_unspecialized("stride_btb", "num_splits", "fused_merge")
def paged_decode_packed_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_ptr,  # [num_blocks, PAGE, Hkv, D]
    bt_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    o_ptr,  # out [B, Hq, D] (split stride 0) or partial fp32 [B, Hq, S, D]
    lse_ptr,  # lse fp32 [B, Hq] (split stride 0) or partial [B, Hq, S]
    fo_ptr,  # fused_merge: final out [B, Hq, D]
    flse_ptr,  # fused_merge: final lse fp32 [B, Hq]
    ticket_ptr,  # fused_merge: int32 [B] zeroed split tickets
    num_splits, fused_merge,
    stride_qb, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_fob, stride_foh, stride_flb, stride_flh,
    qk_scale,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,  # a power of two
    BLOCK_HQ: tl.constexpr,  # next power of two >= max(16, NUM_HEADS)
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per tile (BLOCK_N * NUM_KV_HEADS K/V rows)
    DOT_PRECISION: tl.constexpr,
):
    """Grid (num_splits, B). Split s covers tokens [s * L, min((s + 1) * L, seq_len)),
    L = cdiv(cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, as in `decode_work`."""
    split = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    group: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    ROWS: tl.constexpr = BLOCK_N * NUM_KV_HEADS
    seq_len = tl.load(seq_lens_ptr + b64)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(seq_len, lo + split_len)

    heads = tl.arange(0, BLOCK_HQ)
    h_mask = heads < NUM_HEADS
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, ROWS)
    tok = offs_r // NUM_KV_HEADS
    row_kvh = offs_r % NUM_KV_HEADS
    own = (heads // group)[:, None] == row_kvh[None, :]  # [BLOCK_HQ, ROWS]: the row's kv head serves the query head
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    bt_row = bt_ptr + b64 * stride_btb
    k_row = row_kvh.to(tl.int64) * stride_kh
    v_row = row_kvh.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_HQ, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_HQ], dtype=tl.float32)
    m_i = tl.full([BLOCK_HQ], NEG_BIG, dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tok
        valid = pos < hi
        blk = tl.load(bt_row + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        slot = (pos % PAGE_SIZE).to(tl.int64)
        k_off = blk * stride_kb + slot * stride_kp + k_row
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(own & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vb + slot * stride_vp + v_row
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out, lse = finalize(acc, l_i, m_i)
    tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])
    tl.store(lse_ptr + b64 * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=h_mask)
    if fused_merge != 0:
        if num_splits > 1:
            tl.debug_barrier()  # every thread's partial stores precede the ticket (release, gpu scope)
            if tl.atomic_add(ticket_ptr + b64, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.atomic_xchg(ticket_ptr + b64, 0)
                merge_split_rows(
                    o_ptr + b64 * stride_ob, lse_ptr + b64 * stride_lb, fo_ptr + b64 * stride_fob,
                    flse_ptr + b64 * stride_flb, heads, h_mask, num_splits,
                    stride_oh, stride_os, stride_lh, stride_ls, stride_foh, stride_flh, BLOCK_HQ, HEAD_DIM,
                )
