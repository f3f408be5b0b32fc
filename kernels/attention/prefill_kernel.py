"""@triton.jit code for causal paged prefill attention over variable-length packed queries.

Work item = (m_tile, sequence b, query head qh): BLOCK_M consecutive query tokens of sequence b.
Query i of sequence b sits at position ctx + i, ctx = seq_len - q_len; it sees cached keys <= its position.
Key tiles fully visible to every row of the tile run without masks; only the diagonal tiles are masked;
tiles entirely in the future are skipped (causal block skipping).
"""

import triton
import triton.language as tl

from ..utils import jit_unspecialized
from .paged_common import NEG_BIG, finalize, paged_attn_loop


@triton.jit
def prefill_work(
    q_ptr,  # [Tq, Hq, D]
    k_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_ptr,  # [num_blocks, PAGE, Hkv, D]
    bt_ptr,  # int32 [B, max_blocks]
    cu_q_ptr,  # int32 [B + 1]
    seq_lens_ptr,  # int32 [B]
    o_ptr,  # [Tq, Hq, D]
    lse_ptr,  # fp32 [Tq, Hq]
    m_tile,
    b,
    qh,
    stride_qt, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_btb,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """One (m_tile, b, qh) prefill work item; does nothing when the tile lies past the sequence's queries.
    FAST_OFFSETS as in `paged_common.paged_attn_loop`."""
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 < q_len:
        seq_len = tl.load(seq_lens_ptr + b)
        ctx = seq_len - q_len
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + qh * stride_qh + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        q_pos = ctx + offs_m
        kvh = qh // GROUP
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb

        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
        # keys [0, full_end) are visible to every row of the tile (first row's position is ctx + m0)
        full_end = ((ctx + m0 + 1) // BLOCK_N) * BLOCK_N
        kv_end = tl.minimum(seq_len, ctx + m0 + BLOCK_M)
        acc, l_i, m_i = paged_attn_loop(
            acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, 0, full_end, seq_len, seq_len,
            stride_kb, stride_kp, stride_vb, stride_vp, qk_scale,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, False, False, DOT_PRECISION, FAST_OFFSETS,
        )
        acc, l_i, m_i = paged_attn_loop(
            acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, full_end, kv_end, seq_len, seq_len,
            stride_kb, stride_kp, stride_vb, stride_vp, qk_scale,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, True, True, DOT_PRECISION, FAST_OFFSETS,
        )
        out, lse = finalize(acc, l_i, m_i)
        tl.store(o_ptr + rows[:, None] * stride_ot + qh * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
        tl.store(lse_ptr + rows * stride_lt + qh * stride_lh, lse, mask=m_mask)


@jit_unspecialized("stride_btb", "bt_ptr", "seq_lens_ptr", "lse_ptr")  # the prefill rows of a hybrid batch
def paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_btb,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), Hq, B); m tiles run last-first (heaviest causal tiles first)."""
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    prefill_work(
        q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, seq_lens_ptr, o_ptr, lse_ptr,
        m_tile, tl.program_id(2), tl.program_id(1),
        stride_qt, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_btb,
        stride_ot, stride_oh, stride_lt, stride_lh, qk_scale,
        GROUP, HEAD_DIM, PAGE_SIZE, BLOCK_M, BLOCK_N, DOT_PRECISION, FAST_OFFSETS,
    )
