"""@triton.jit code for stream-K paged decode attention (LeanAttention's split): every program gets the same number
of key tiles, whatever the batch's lengths.

Per kv head, the key tiles of all sequences are laid end to end: sequence b holds T_b = max(1, cdiv(seq_len_b,
BLOCK_N)) tiles from offset F_b = sum of T over the sequences before b (each program computes the F_b from seq_lens
in registers). Program p = r * Hkv + kvh of P takes kv head kvh's tiles [r * L, (r + 1) * L), L = cdiv(total,
P / Hkv): whole rows (sequence, kv head) inside its range are written out directly; a row cut at either end of the
range becomes a partial (out, lse) in the program's slot 0 (its first row) or 1 (its last), and the last program to
finish a cut row (a ticket per row) merges the row's partials. Split-KV instead gives each row the same number of
splits, so when rows x splits do not divide evenly over the SMs, some SMs idle at the end; here one wave of programs
does equal work.

Cutting a row costs its two programs a pipeline restart and a merge (about 3% at 32 x 8k keys on an H100, where
one whole row a program ran as fast as split-KV). So when the batch's non-empty rows are (within 5%) equally long
and a split-KV partition keeps at least 90% of the programs busy, the kernel partitions as split-KV does, on the
device: every row in k = max(1, (P / Hkv) // B) equal splits, work item i = b * k + split on program r = i mod
(P / Hkv). A CUDA graph captured once thus runs the better partition for whatever lengths it replays.
"""

import triton
import triton.language as tl

from ..utils import jit_unspecialized
from .paged_common import NEG_BIG, finalize, merge_step, paged_attn_loop, store_merged


@triton.jit
def _merge_pieces(
    part_o_ptr, part_lse_ptr,  # fp32 [P, 2, BLOCK_H, D], [P, 2, BLOCK_H]
    o_rows, lse_rows,  # pointers of the row's output [BLOCK_H, D] / lse [BLOCK_H] (head offsets applied)
    p0, p1, first_slot, kvh, num_kv_heads, offs_h, h_mask,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Log-sum-exp combination of a cut row's partials: those of kv head ``kvh``'s programs of range indices p0 .. p1
    (program ids p * Hkv + kvh), p0's in slot ``first_slot``, the others' in slot 0, read through L2 (".cg": written
    by other SMs in this launch)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    tot = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for p in range(p0, p1 + 1):
        piece = ((p * num_kv_heads + kvh) * 2 + tl.where(p == p0, first_slot, 0)).to(tl.int64) * BLOCK_H
        lse_s = tl.load(part_lse_ptr + piece + offs_h, cache_modifier=".cg")
        o_s = tl.load(part_o_ptr + (piece + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], cache_modifier=".cg")
        acc, tot, m = merge_step(acc, tot, m, o_s, lse_s)
    store_merged(o_rows[:, None] + offs_d[None, :], lse_rows, acc, tot, m, h_mask)


@jit_unspecialized("num_seqs", "stride_btb")
def paged_decode_lean_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_ptr,  # [num_blocks, PAGE, Hkv, D]
    bt_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    o_ptr,  # out [B, Hq, D]
    lse_ptr,  # fp32 [B, Hq]
    part_o_ptr,  # fp32 [P, 2, BLOCK_H, D] scratch
    part_lse_ptr,  # fp32 [P, 2, BLOCK_H] scratch
    ticket_ptr,  # int32 [B * Hkv] zeroed tickets (left zeroed)
    num_seqs,  # B <= MAX_SEQS
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
    MAX_SEQS: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """Grid (P,), P a multiple of Hkv: P / Hkv programs per kv head, each of an equal range of that head's tiles
    (best: one wave of resident programs). Every program computes the sequences' tile offsets itself from seq_lens
    (a [MAX_SEQS] prefix sum in registers): no preparatory launch."""
    p = tl.program_id(0)
    kvh = p % num_kv_heads  # programs of one range index and neighbouring kv heads run side by side, reading the
    r = p // num_kv_heads  # same tokens (adjacent in the cache), as split-KV's heads-fastest grid does
    per_head = tl.num_programs(0) // num_kv_heads
    offs_s = tl.arange(0, MAX_SEQS)
    s_mask = offs_s < num_seqs
    lens = tl.load(seq_lens_ptr + offs_s, mask=s_mask, other=0)
    tiles = tl.where(s_mask, tl.maximum(tl.cdiv(lens, BLOCK_N), 1), 0)
    real_tiles = tl.where(lens > 0, tiles, 0)
    k = tl.maximum(per_head // num_seqs, 1)  # split-KV partition: splits per row, items per program round
    items = num_seqs * k
    aligned = ((tl.max(real_tiles, 0) * tl.sum((lens > 0).to(tl.int32), 0) * 20 <= 21 * tl.sum(real_tiles, 0))
               & (items * 10 >= tl.cdiv(items, per_head) * per_head * 9))
    if aligned:
        for i in range(r, items, per_head):
            b = i // k
            seq_len = tl.load(seq_lens_ptr + b)
            split_len = tl.cdiv(tl.cdiv(seq_len, k), BLOCK_N) * BLOCK_N
            lo = (i % k) * split_len
            _row_piece(q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, ticket_ptr,
                       b, kvh, num_kv_heads, lo, tl.minimum(seq_len, lo + split_len), k == 1, p, 0,
                       b * k, b * k + k - 1, 0,
                       stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                       stride_btb, stride_ob, stride_oh, stride_lb, stride_lh, qk_scale,
                       GROUP, BLOCK_H, HEAD_DIM, PAGE_SIZE, BLOCK_N, DOT_PRECISION, FAST_OFFSETS)
    else:
        # The range's rows from a prefix sum of the tile counts; the vectors die before the key loops (held across
        # them they cost the loops registers), which walk the rows from the first one's offset.
        first = tl.cumsum(tiles, 0) - tiles  # each sequence's first tile in its kv head's flattened range
        total = tl.sum(tiles, 0)
        L = tl.cdiv(total, per_head)
        start = r * L
        end = tl.minimum(start + L, total)
        b_first = tl.sum((s_mask & (first <= start)).to(tl.int32), 0) - 1
        b_last = tl.where(start < end, tl.sum((s_mask & (first <= end - 1)).to(tl.int32), 0) - 1, -1)
        row_start = tl.sum(tl.where(offs_s < b_first, tiles, 0), 0)
        for b in range(b_first, b_last + 1):
            seq_len = tl.load(seq_lens_ptr + b)
            row_end = row_start + tl.maximum(tl.cdiv(seq_len, BLOCK_N), 1)
            seg_start = tl.maximum(start, row_start)
            seg_end = tl.minimum(end, row_end)
            _row_piece(q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, ticket_ptr,
                       b, kvh, num_kv_heads, (seg_start - row_start) * BLOCK_N,
                       tl.minimum((seg_end - row_start) * BLOCK_N, seq_len),
                       (seg_start == row_start) & (seg_end == row_end), p, tl.where(seg_start == start, 0, 1),
                       row_start // L, (row_end - 1) // L, tl.where(row_start == (row_start // L) * L, 0, 1),
                       stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                       stride_btb, stride_ob, stride_oh, stride_lb, stride_lh, qk_scale,
                       GROUP, BLOCK_H, HEAD_DIM, PAGE_SIZE, BLOCK_N, DOT_PRECISION, FAST_OFFSETS)
            row_start = row_end

@triton.jit
def _row_piece(
    q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, ticket_ptr,  # as in the kernel
    b, kvh, num_kv_heads,
    lo, hi,  # keys [lo, hi) of row (b, kvh); lo a multiple of BLOCK_N
    whole,  # the piece is the whole row: stored as the output
    p, slot,  # else a partial, in program p's scratch slot
    p0, p1, first_slot,  # the row's pieces: range indices p0 .. p1, p0's in slot first_slot
    stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_btb,
    stride_ob, stride_oh, stride_lb, stride_lh, qk_scale,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_OFFSETS: tl.constexpr,
):
    """Attention of row (b, kvh)'s query heads over keys [lo, hi): the output if ``whole``, else a partial that the
    last of the row's pieces to finish (a ticket per row) merges."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    b64 = tl.cast(b, tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None],
                other=0.0)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    acc, l_i, m_i = paged_attn_loop(
        acc, l_i, m_i, q, offs_h,
        k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, bt_ptr + b64 * stride_btb, lo, hi, hi, hi,
        stride_kb, stride_kp, stride_vb, stride_vp, qk_scale,
        HEAD_DIM, PAGE_SIZE, BLOCK_N, False, True, DOT_PRECISION, FAST_OFFSETS,
    )
    out, lse = finalize(acc, l_i, m_i)
    o_rows = o_ptr + b64 * stride_ob + heads * stride_oh
    lse_rows = lse_ptr + b64 * stride_lb + heads * stride_lh
    if whole:
        tl.store(o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])
        tl.store(lse_rows, lse, mask=h_mask)
    else:
        piece = (p * 2 + slot).to(tl.int64) * BLOCK_H
        tl.store(part_o_ptr + (piece + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], out)
        tl.store(part_lse_ptr + piece + offs_h, lse)
        tl.debug_barrier()  # every thread's partial stores precede the ticket (release, gpu scope)
        t_ptr = ticket_ptr + b64 * num_kv_heads + kvh
        if tl.atomic_add(t_ptr, 1, sem="acq_rel", scope="gpu") == p1 - p0:
            tl.atomic_xchg(t_ptr, 0)
            _merge_pieces(part_o_ptr, part_lse_ptr, o_rows, lse_rows, p0, p1, first_slot, kvh, num_kv_heads, offs_h,
                          h_mask, BLOCK_H, HEAD_DIM)
