"""@triton.jit code for non-paged variable-length attention with explicit absolute positions.

Mask: key j of sequence b is visible to query i of sequence b iff k_pos[j] <= q_pos[i]. Positions may be
non-contiguous (zig-zag ring-attention shards); a key tile whose smallest position exceeds the largest query
position of the query tile is skipped.
"""

import triton
import triton.language as tl

from .paged_common import NEG_BIG, finalize


@triton.jit
def varlen_pos_kernel(
    q_ptr,  # [Tq, Hq, D]
    k_ptr,  # [Tk, Hkv, D]
    v_ptr,  # [Tk, Hkv, D]
    q_pos_ptr,  # int32 [Tq]
    k_pos_ptr,  # int32 [Tk]
    cu_q_ptr,  # int32 [B + 1]
    cu_k_ptr,  # int32 [B + 1]
    o_ptr,  # [Tq, Hq, D]
    lse_ptr,  # fp32 [Tq, Hq]
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), Hq, B)."""
    m_tile = tl.program_id(0)
    qh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 < q_len:
        k_start = tl.load(cu_k_ptr + b)
        k_len = tl.load(cu_k_ptr + b + 1) - k_start
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + qh * stride_qh + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        q_pos = tl.load(q_pos_ptr + rows, mask=m_mask, other=-1)
        q_pos_max = tl.max(q_pos, 0)
        kvh = qh // GROUP
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh

        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
        for n0 in range(0, k_len, BLOCK_N):
            n_mask = (n0 + offs_n) < k_len
            kr = (k_start + n0 + offs_n).to(tl.int64)
            k_pos = tl.load(k_pos_ptr + kr, mask=n_mask, other=2147483647)
            if tl.min(k_pos, 0) <= q_pos_max:
                k = tl.load(k_base + kr[:, None] * stride_kt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                s = tl.where((k_pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + kr[:, None] * stride_vt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new
        out, lse = finalize(acc, l_i, m_i)
        tl.store(o_ptr + rows[:, None] * stride_ot + qh * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
        tl.store(lse_ptr + rows * stride_lt + qh * stride_lh, lse, mask=m_mask)
