"""@triton.jit code for stream-K paged decode attention (LeanAttention's split): every program gets the same number
of key tiles, whatever the batch's lengths.

The key tiles of all (sequence, kv head) rows are laid end to end: row (b, kvh) holds T_b = max(1, cdiv(seq_len_b,
BLOCK_N)) tiles from offset cu_tiles[b] * Hkv + kvh * T_b. Program p of P takes tiles [p * L, (p + 1) * L),
L = cdiv(total, P): whole rows in the middle of its range are written out directly; a row cut at either end of the
range becomes a partial (out, lse) in the program's slot 0 (its first row) or 1 (its last), and the last program to
finish a cut row (a ticket per row) merges the row's partials. Split-KV instead gives each row the same number of
splits, so the SMs idle once the rows run out; here the grid is one wave of equal work.
"""

import triton
import triton.language as tl

from ..utils import jit_unspecialized
from .paged_common import NEG_BIG, finalize, paged_attn_loop


@triton.jit
def _find_seq(cu_tiles_ptr, num_seqs, num_kv_heads, pos):
    """The sequence b whose rows hold flattened tile ``pos``: the largest b with cu_tiles[b] * Hkv <= pos."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(cu_tiles_ptr + mid) * num_kv_heads <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _merge_pieces(
    part_o_ptr, part_lse_ptr,  # fp32 [P, 2, BLOCK_H, D], [P, 2, BLOCK_H]
    o_rows, lse_rows,  # pointers of the row's output [BLOCK_H, D] / lse [BLOCK_H] (head offsets applied)
    p0, p1, first_slot, offs_h, h_mask,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Log-sum-exp combination of a cut row's partials: program p0's slot ``first_slot``, then slot 0 of programs
    p0 + 1 .. p1, read through L2 (".cg": written by other SMs in this launch)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    tot = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for p in range(p0, p1 + 1):
        piece = (p * 2 + tl.where(p == p0, first_slot, 0)).to(tl.int64) * BLOCK_H
        lse_s = tl.load(part_lse_ptr + piece + offs_h, cache_modifier=".cg")
        o_s = tl.load(part_o_ptr + (piece + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], cache_modifier=".cg")
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_s - m_new)
        acc = acc * alpha[:, None] + o_s * w[:, None]
        tot = tot * alpha + w
        m = m_new
    denom = tl.where(tot > 0.0, tot, 1.0)
    tl.store(o_rows[:, None] + offs_d[None, :], (acc / denom[:, None]).to(o_rows.dtype.element_ty),
             mask=h_mask[:, None])
    tl.store(lse_rows, tl.where(tot > 0.0, m + tl.log(denom), float("-inf")), mask=h_mask)


@jit_unspecialized("num_seqs", "stride_btb")
def paged_decode_lean_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_ptr,  # [num_blocks, PAGE, Hkv, D]
    bt_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    cu_tiles_ptr,  # int32 [B + 1]: prefix sums of max(1, cdiv(seq_len, BLOCK_N))
    o_ptr,  # out [B, Hq, D]
    lse_ptr,  # fp32 [B, Hq]
    part_o_ptr,  # fp32 [P, 2, BLOCK_H, D] scratch
    part_lse_ptr,  # fp32 [P, 2, BLOCK_H] scratch
    ticket_ptr,  # int32 [B * Hkv] zeroed tickets (left zeroed)
    num_seqs,
    num_kv_heads,
    stride_qb, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_btb,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (P,): P programs of equal tile ranges (best: one wave of resident programs)."""
    p = tl.program_id(0)
    L = tl.cdiv(tl.load(cu_tiles_ptr + num_seqs) * num_kv_heads, tl.num_programs(0))
    start = p * L
    end = tl.minimum(start + L, tl.load(cu_tiles_ptr + num_seqs) * num_kv_heads)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < GROUP
    pos = start
    while pos < end:
        b = _find_seq(cu_tiles_ptr, num_seqs, num_kv_heads, pos)
        c0 = tl.load(cu_tiles_ptr + b)
        T = tl.load(cu_tiles_ptr + b + 1) - c0
        kvh = (pos - c0 * num_kv_heads) // T
        row_start = c0 * num_kv_heads + kvh * T
        row_end = row_start + T
        seg_end = tl.minimum(end, row_end)
        seq_len = tl.load(seq_lens_ptr + b)
        hi = tl.minimum((seg_end - row_start) * BLOCK_N, seq_len)

        heads = kvh * GROUP + offs_h
        b64 = b.to(tl.int64)
        q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None],
                    other=0.0)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        m_i = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
        acc, l_i, m_i = paged_attn_loop(
            acc, l_i, m_i, q, offs_h,
            k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, bt_ptr + b64 * stride_btb,
            (pos - row_start) * BLOCK_N, hi, hi,
            stride_kb, stride_kp, stride_vb, stride_vp, qk_scale,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, False, True, DOT_PRECISION,
        )
        out, lse = finalize(acc, l_i, m_i)
        o_rows = o_ptr + b64 * stride_ob + heads * stride_oh
        lse_rows = lse_ptr + b64 * stride_lb + heads * stride_lh
        if (pos == row_start) & (seg_end == row_end):  # the whole row: final
            tl.store(o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])
            tl.store(lse_rows, lse, mask=h_mask)
        else:
            piece = (p * 2 + tl.where(pos == start, 0, 1)).to(tl.int64) * BLOCK_H
            tl.store(part_o_ptr + (piece + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], out)
            tl.store(part_lse_ptr + piece + offs_h, lse)
            tl.debug_barrier()  # every thread's partial stores precede the ticket (release, gpu scope)
            p0 = row_start // L
            p1 = (row_end - 1) // L
            t_ptr = ticket_ptr + b64 * num_kv_heads + kvh
            if tl.atomic_add(t_ptr, 1, sem="acq_rel", scope="gpu") == p1 - p0:
                tl.atomic_xchg(t_ptr, 0)
                _merge_pieces(part_o_ptr, part_lse_ptr, o_rows, lse_rows, p0, p1,
                              tl.where(row_start == p0 * L, 0, 1), offs_h, h_mask, BLOCK_H, HEAD_DIM)
        pos = seg_end
