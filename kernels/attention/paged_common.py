"""@triton.jit helpers shared by the paged decode, prefill and POD kernels (online softmax over paged K/V).

Conventions (all kernels): scores are kept in the log2 domain (`qk_scale = scale * log2(e)`, `tl.exp2`),
fp32 accumulation, running max initialised to a large finite negative number so fully masked rows never
produce NaN (they end with l == 0 and are written as out 0, lse -inf).
"""

import triton
import triton.language as tl

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)  # running-max init (finite: exp2(-inf - NEG_BIG) == 0, never NaN)


@triton.jit
def paged_attn_loop(
    acc,  # [ROWS, HEAD_DIM] fp32 running (unnormalised) output
    l_i,  # [ROWS] fp32 running softmax denominator
    m_i,  # [ROWS] fp32 running max (log2 domain)
    q,  # [ROWS, HEAD_DIM] query tile (input dtype)
    q_pos,  # [ROWS] int32 absolute query positions (used only when CAUSAL)
    k_base,  # pointer: k_cache + kv_head * stride_kh
    v_base,  # pointer: v_cache + kv_head * stride_vh
    bt_row,  # pointer: block_table + b * stride_btb
    lo,  # first key position (multiple of BLOCK_N)
    hi,  # loop end (exclusive, key positions)
    kv_len,  # keys at positions >= kv_len are masked (used only when BOUNDED)
    tbl_len,  # block-table entries are read for positions < tbl_len only (used only when BOUNDED; >= kv_len)
    stride_kb,
    stride_kp,
    stride_vb,
    stride_vp,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    BOUNDED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """Accumulate keys [lo, hi) of one sequence / kv head into (acc, l_i, m_i); returns the new triple.

    FAST_OFFSETS (`fast_offsets` of the caches): K/V element offsets in int32 and V's the same as K's, instead of
    int64 offsets computed for each (the loop's address arithmetic was most of its instructions: 934 SASS
    instructions a 128-key decode tile against 586, sm_90)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + offs_n
        if BOUNDED:
            n_mask = pos < kv_len
            blk = tl.load(bt_row + pos // PAGE_SIZE, mask=pos < tbl_len, other=0)
        else:
            blk = tl.load(bt_row + pos // PAGE_SIZE)
        if not FAST_OFFSETS:
            blk = blk.to(tl.int64)
        k_off = blk * stride_kb + (pos % PAGE_SIZE) * stride_kp
        if BOUNDED:
            k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k = tl.load(k_base + k_off[:, None] + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL:
            s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        if BOUNDED:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FAST_OFFSETS:
            v_off = k_off
        else:
            v_off = blk * stride_vb + (pos % PAGE_SIZE) * stride_vp
        if BOUNDED:
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        else:
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def fast_offsets(k_cache, v_cache) -> bool:
    """Whether `paged_attn_loop` may take FAST_OFFSETS for these caches: the same strides, and every element's offset
    from the first (of each) below 2**31. True for the engine's caches (views of one [2, ...] tensor) unless a
    layer's K cache holds 2**31 elements or more."""
    if k_cache.stride() != v_cache.stride() or k_cache.shape != v_cache.shape:
        return False
    return sum((n - 1) * st for n, st in zip(k_cache.shape, k_cache.stride())) < 2**31 - 1


@triton.jit
def finalize(acc, l_i, m_i):
    """Normalise: returns (out [ROWS, D] fp32, lse [ROWS] fp32 natural log); rows with l == 0 -> (0, -inf)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


@triton.jit
def merge_step(acc, tot, m, o_s, lse_s):
    """Fold one normalised partial (o_s [ROWS, D], lse_s [ROWS], natural log) into a running log-sum-exp merge
    (acc [ROWS, D], tot [ROWS], m [ROWS]; start from 0, 0, NEG_BIG); returns the new triple."""
    m_new = tl.maximum(m, lse_s)
    alpha = tl.exp(m - m_new)
    w = tl.exp(lse_s - m_new)
    return acc * alpha[:, None] + o_s * w[:, None], tot * alpha + w, m_new


@triton.jit
def store_merged(o_ptrs, lse_ptrs, acc, tot, m, mask):
    """Store a merge's out [ROWS, D] at ``o_ptrs`` and lse [ROWS] at ``lse_ptrs`` (rows whose partials were all
    empty: 0, -inf); ``mask`` [ROWS] selects the rows."""
    denom = tl.where(tot > 0.0, tot, 1.0)
    tl.store(o_ptrs, (acc / denom[:, None]).to(o_ptrs.dtype.element_ty), mask=mask[:, None])
    tl.store(lse_ptrs, tl.where(tot > 0.0, m + tl.log(denom), float("-inf")), mask=mask)
