"""@triton.jit code for non-paged variable-length attention with explicit absolute positions.

Mask: key j of sequence b is visible to query i of sequence b iff k_pos[j] <= q_pos[i]. Positions are arbitrary
(zig-zag ring-attention shards: two contiguous ranges per side, pad keys at 2**31 - 1).

Two kernels per call:
  * ``varlen_tile_bounds_kernel`` (tiny pre-pass, grid (m_tiles, B)): for every query tile it computes, from the
    tile's smallest / largest query position and every key tile's min / max position,
      full_end: keys [0, full_end) are visible to every row of the tile (the leading key tiles whose largest
                position is <= the tile's smallest query position; whole tiles only),
      kv_end:   keys >= kv_end are hidden from every row (past the last key tile whose smallest position is <=
                the tile's largest query position).
  * ``varlen_pos_kernel`` (grid (m_tiles, Hq, B), heaviest tiles first): keys [0, full_end) run without any
    mask or position load (the loop body is the same as the paged prefill kernel's interior loop, so it software-
    pipelines); only keys [full_end, kv_end) load positions and apply the mask. For sorted positions (every ring
    hop) that is the 2-3 key tiles straddling the diagonal; for arbitrary positions it is still exact, just slower.

Optionally the result is merged with an earlier attention state (prev_out, prev_lse) over a disjoint key set
(ring attention's next hop) before it is stored, so no separate merge launch is needed.
"""

import triton
import triton.language as tl

from .paged_common import NEG_BIG, finalize

INT32_MAX = tl.constexpr(2147483647)
INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def varlen_tile_bounds_kernel(
    q_pos_ptr,  # int32 [Tq]
    k_pos_ptr,  # int32 [Tk]
    cu_q_ptr,  # int32 [B + 1]
    cu_k_ptr,  # int32 [B + 1]
    bounds_ptr,  # int32 [B, m_tiles, 2]: (full_end, kv_end) key offsets within the sequence
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK_TILES: tl.constexpr,
):
    """Grid (m_tiles, B). Query tiles past the sequence's queries write nothing (the main kernel skips them)."""
    m_tile = tl.program_id(0)
    b = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 < q_len:
        k_start = tl.load(cu_k_ptr + b)
        k_len = tl.load(cu_k_ptr + b + 1) - k_start
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        qp = tl.load(q_pos_ptr + q_start + offs_m, mask=m_mask, other=0)
        q_min = tl.min(tl.where(m_mask, qp, INT32_MAX), 0)
        q_max = tl.max(tl.where(m_mask, qp, INT32_MIN), 0)
        n_tiles = (k_len + BLOCK_N - 1) // BLOCK_N
        first_hidden = n_tiles  # first key tile with a position > q_min (not visible to every row)
        last_visible = n_tiles * 0 - 1  # last key tile with a position <= q_max (visible to some row)
        offs_t = tl.arange(0, CHUNK_TILES)
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(0, n_tiles, CHUNK_TILES):
            tiles = t0 + offs_t
            idx = tiles[:, None] * BLOCK_N + offs_n[None, :]
            valid = idx < k_len
            kp = tl.load(k_pos_ptr + k_start + idx, mask=valid, other=0)
            k_min = tl.min(tl.where(valid, kp, INT32_MAX), 1)
            k_max = tl.max(tl.where(valid, kp, INT32_MIN), 1)
            live = tiles < n_tiles
            first_hidden = tl.minimum(first_hidden, tl.min(tl.where(live & (k_max > q_min), tiles, n_tiles), 0))
            last_visible = tl.maximum(last_visible, tl.max(tl.where(live & (k_min <= q_max), tiles, -1), 0))
        # a partial last key tile always goes through the masked (bounds-checked) loop
        full_end = tl.minimum(first_hidden, k_len // BLOCK_N) * BLOCK_N
        kv_end = tl.maximum((last_visible + 1) * BLOCK_N, full_end)
        out = bounds_ptr + (b * tl.num_programs(0) + m_tile) * 2
        tl.store(out, full_end)
        tl.store(out + 1, kv_end)


@triton.jit
def varlen_attn_loop(
    acc, l_i, m_i,  # running (unnormalised out [M, D], denominator [M], max [M]) in the log2 domain
    q,  # [M, D] query tile
    q_pos,  # int32 [M] (used only when MASKED)
    k_seq,  # pointer: k + k_start * stride_kt + kv_head * stride_kh
    v_seq,  # pointer: v + k_start * stride_vt + kv_head * stride_vh
    kp_seq,  # pointer: k_pos + k_start
    lo,  # first key (multiple of BLOCK_N)
    hi,  # loop end (exclusive)
    k_len,  # keys >= k_len are out of bounds (used only when MASKED)
    stride_kt,
    stride_vt,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate keys [lo, hi) into (acc, l_i, m_i). MASKED=False: every key is in bounds and visible."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        kn = n0 + offs_n
        kr = kn.to(tl.int64)
        if MASKED:
            n_mask = kn < k_len
            k = tl.load(k_seq + kr[:, None] * stride_kt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            k_pos = tl.load(kp_seq + kn, mask=n_mask, other=0)
        else:
            k = tl.load(k_seq + kr[:, None] * stride_kt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where((k_pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_seq + kr[:, None] * stride_vt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        else:
            v = tl.load(v_seq + kr[:, None] * stride_vt + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def varlen_pos_kernel(
    q_ptr,  # [Tq, Hq, D]
    k_ptr,  # [Tk, Hkv, D]
    v_ptr,  # [Tk, Hkv, D]
    q_pos_ptr,  # int32 [Tq]
    k_pos_ptr,  # int32 [Tk]
    cu_q_ptr,  # int32 [B + 1]
    cu_k_ptr,  # int32 [B + 1]
    bounds_ptr,  # int32 [B, m_tiles, 2] from varlen_tile_bounds_kernel
    o_ptr,  # [Tq, Hq, D] (any float dtype)
    lse_ptr,  # fp32 [Tq, Hq]
    po_ptr,  # [Tq, Hq, D] earlier state's output (read only when MERGE; may alias o_ptr)
    plse_ptr,  # fp32 [Tq, Hq] earlier state's lse (read only when MERGE; may alias lse_ptr)
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    stride_pot, stride_poh,
    stride_plt, stride_plh,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MERGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), Hq, B); m tiles run last-first (later positions: more visible keys)."""
    n_m = tl.num_programs(0)
    m_tile = n_m - 1 - tl.program_id(0)
    qh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 < q_len:
        k_start = tl.load(cu_k_ptr + b)
        k_len = tl.load(cu_k_ptr + b + 1) - k_start
        bnd = bounds_ptr + (b * n_m + m_tile) * 2
        full_end = tl.load(bnd)
        kv_end = tl.load(bnd + 1)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + qh * stride_qh + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        q_pos = tl.load(q_pos_ptr + rows, mask=m_mask, other=0)
        kvh = qh // GROUP
        k_seq = k_ptr + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
        v_seq = v_ptr + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
        kp_seq = k_pos_ptr + k_start

        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
        acc, l_i, m_i = varlen_attn_loop(
            acc, l_i, m_i, q, q_pos, k_seq, v_seq, kp_seq, 0, full_end, k_len, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, BLOCK_N, False, DOT_PRECISION,
        )
        acc, l_i, m_i = varlen_attn_loop(
            acc, l_i, m_i, q, q_pos, k_seq, v_seq, kp_seq, full_end, kv_end, k_len, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, BLOCK_N, True, DOT_PRECISION,
        )
        out, lse = finalize(acc, l_i, m_i)
        if MERGE:
            # same formula as merge_states_kernel: o = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2)
            l1 = tl.load(plse_ptr + rows * stride_plt + qh * stride_plh, mask=m_mask, other=float("-inf"))
            m = tl.maximum(l1, lse)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            w1 = tl.exp(l1 - m_safe)
            w2 = tl.exp(lse - m_safe)
            tot = w1 + w2
            denom = tl.where(tot > 0.0, tot, 1.0)
            o1 = tl.load(po_ptr + rows[:, None] * stride_pot + qh * stride_poh + offs_d[None, :],
                         mask=m_mask[:, None], other=0.0).to(tl.float32)
            o1 = tl.where((w1 > 0.0)[:, None], o1, 0.0)
            out = o1 * (w1 / denom)[:, None] + out * (w2 / denom)[:, None]
            lse = tl.where(tot > 0.0, m_safe + tl.log(denom), float("-inf"))
        tl.store(o_ptr + rows[:, None] * stride_ot + qh * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
        tl.store(lse_ptr + rows * stride_lt + qh * stride_lh, lse, mask=m_mask)
