"""Gluon (Hopper) POD attention: one persistent CTA per SM whose warps are specialized by role.

The default partition (8 warps, two warpgroups) runs prefill tiles of 128 query rows with wgmma (Q in registers),
fed by a one-warp loader partition that copies their K/V tiles into a shared-memory ring (TMA, or cp.async; mbarrier
handshakes: the consumer warps issue no loads and wait on no copies of their own). Beside them three one-warp
partitions stream decode work items, each on its own: keys are the MMA's M and the GQA group's heads its N (mma_v2,
S^T = K q^T, O^T += V^T P^T), so a 32-key tile costs 32 MMAs in independent chains and the softmax runs down columns
inside the warp, with no cross-warp reduction or barrier; each keeps its own ring of tiles (TMA pages, or cp.async).
Every partition has its own registers (setmaxnreg), so a compute-bound and a bandwidth-bound stream share every SM
with the resources each needs -- what one Triton program, whose registers, shared memory and pipeline depth are the
larger role's, cannot do (`pod_kernel.py`). When its prefill tiles are done, the prefill partition takes decode items
too.

Work split: prefill tiles (m_tile, b, qh), heaviest causal m-tiles first, go to CTAs round-robin (CTA c takes c,
c + grid, ...: the loader and the prefill warps walk the same list); decode items (b, kv_head, split) by ticket
(counter_ptr[0]), split boundaries at multiples of SPLIT_ALIGN keys whichever partition takes them.
Conventions are those of `paged_common` (log2-domain scores, finite running-max init, rows with no keys written as
0 / lse -inf); the math matches `paged_prefill_attention` / `paged_decode_attention`.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LN2 = gl.constexpr(0.6931471805599453)

NEG_BIG = gl.constexpr(-1.0e30)


@gluon.jit
def _issue_kv(k_dst, v_dst, k_base, v_base, pages, start, kv_len, stride_kb, stride_kp, stride_vb, stride_vp,
              HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, LD: gl.constexpr):
    """cp.async keys [start, start + BLOCK_N) of one kv head into k_dst / v_dst [BLOCK_N, D] (zero past kv_len).
    pages: [BLOCK_N] int32 physical block of each key (SliceLayout(1, LD))."""
    offs_n = start + gl.arange(0, BLOCK_N, gl.SliceLayout(1, LD))
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, LD))
    n_mask = gl.expand_dims(offs_n < kv_len, 1)
    blk = pages.to(gl.int64)
    row = offs_n % PAGE_SIZE
    k_off = gl.expand_dims(blk * stride_kb + row * stride_kp, 1) + gl.expand_dims(offs_d, 0)
    v_off = gl.expand_dims(blk * stride_vb + row * stride_vp, 1) + gl.expand_dims(offs_d, 0)
    async_copy.async_copy_global_to_shared(k_dst, k_base + k_off, mask=n_mask)
    async_copy.async_copy_global_to_shared(v_dst, v_base + v_off, mask=n_mask)


@gluon.jit
def _pages(bt_row, start, kv_len, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, LD: gl.constexpr):
    """[BLOCK_N] physical blocks of keys [start, start + BLOCK_N) (0 past kv_len)."""
    offs_n = start + gl.arange(0, BLOCK_N, gl.SliceLayout(1, LD))
    return gl.load(bt_row + offs_n // PAGE_SIZE, mask=offs_n < kv_len, other=0)


@gluon.jit
def _tma_pages(k_desc, v_desc, bar, k_dst, v_dst, bt_row, first, last, col, PAGE_SIZE: gl.constexpr,
               PAGES: gl.constexpr):
    """TMA pages first, first + 1, ... (PAGES of them; indices into the block-table row ``bt_row``, clamped to
    ``last``) of K and V, columns [col, col + D) of the [num_blocks * PAGE_SIZE, Hkv * D] cache views, into
    k_dst / v_dst [PAGES * PAGE_SIZE, D]; ``bar`` completes when all have landed."""
    mbarrier.expect(bar, 2 * k_dst.numel * k_dst.dtype.primitive_bitwidth // 8)
    for c in gl.static_range(PAGES):
        row = gl.load(bt_row + gl.minimum(first + c, last)) * PAGE_SIZE
        _tma_kv(k_desc, v_desc, bar, k_dst.slice(c * PAGE_SIZE, PAGE_SIZE), v_dst.slice(c * PAGE_SIZE, PAGE_SIZE),
                row, col)


@gluon.jit
def _tma_kv(k_desc, v_desc, bar, k_dst, v_dst, row, col):
    """TMA rows [row, row + PAGE_SIZE), columns [col, col + D) of both cache views into k_dst / v_dst, completing
    ``bar`` (whose expected bytes the caller has set)."""
    tma.async_copy_global_to_shared(k_desc, [row, col], bar, k_dst)
    tma.async_copy_global_to_shared(v_desc, [row, col], bar, v_dst)


@gluon.jit
def _ring_refill(t, pages, k_smem, v_smem, k_base, v_base, bt_row, lo, kv_len, n_tiles, stride_kb, stride_kp,
                 stride_vb, stride_vp, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, LD: gl.constexpr):
    """Issue key tile t (keys from ``lo``, masked at ``kv_len``; ``pages`` its blocks) into stage t % STAGES if
    t < n_tiles, as one commit group (empty past the last tile, so that group counts stay fixed); returns the pages
    of tile t + 1."""
    if t < n_tiles:
        _issue_kv(k_smem.index(t % STAGES), v_smem.index(t % STAGES), k_base, v_base, pages, lo + t * BLOCK_N,
                  kv_len, stride_kb, stride_kp, stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N, LD)
        pages = _pages(bt_row, lo + (t + 1) * BLOCK_N, kv_len, PAGE_SIZE, BLOCK_N, LD)
    async_copy.commit_group()
    return pages


@gluon.jit
def _ring_start(k_smem, v_smem, k_base, v_base, bt_row, lo, kv_len, n_tiles, stride_kb, stride_kp, stride_vb,
                stride_vp, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, LD: gl.constexpr):
    """Issue key tiles 0 .. STAGES-2 into the ring, one commit group each; returns the pages of tile STAGES-1."""
    pages = _pages(bt_row, lo, kv_len, PAGE_SIZE, BLOCK_N, LD)
    for j in gl.static_range(STAGES - 1):
        pages = _ring_refill(j, pages, k_smem, v_smem, k_base, v_base, bt_row, lo, kv_len, n_tiles, stride_kb,
                             stride_kp, stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N, STAGES, LD)
    return pages


@gluon.jit
def _ring_step(j, next_pages, k_smem, v_smem, k_base, v_base, bt_row, lo, kv_len, n_tiles, stride_kb, stride_kp,
               stride_vb, stride_vp, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, LD: gl.constexpr):
    """Before consuming tile j: issue tile j + STAGES - 1, then wait until
    tile j has landed and every thread of the partition sees it; returns the next tile's pages."""
    next_pages = _ring_refill(j + STAGES - 1, next_pages, k_smem, v_smem, k_base, v_base, bt_row, lo, kv_len,
                              n_tiles, stride_kb, stride_kp, stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N,
                              STAGES, LD)
    async_copy.wait_group(STAGES - 1)
    gl.thread_barrier()
    return next_pages


@gluon.jit
def _decode_item(idx, sl_ptr, num_splits, num_kv_heads, SPLIT_ALIGN: gl.constexpr, BLOCK_N: gl.constexpr):
    """Decode item ``idx`` = (b, kvh, split), split fastest: returns (b as int64, kvh, split, lo, hi, n_tiles), the
    split's keys [lo, hi) with boundaries at multiples of SPLIT_ALIGN and their count of BLOCK_N-key tiles (an empty
    split, lo >= hi, has none)."""
    split = idx % num_splits
    r = idx // num_splits
    b = r // num_kv_heads
    seq_len = gl.load(sl_ptr + b)
    split_len = gl.cdiv(gl.cdiv(seq_len, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    lo = split * split_len
    hi = gl.minimum(seq_len, lo + split_len)
    n_tiles = gl.cdiv(gl.maximum(hi - lo, 0), BLOCK_N)  # hi - lo < 0 would floor to -1 tiles
    return b.to(gl.int64), r % num_kv_heads, split, lo, hi, n_tiles


# ----------------------------------------------------------------------------------------------------------- prefill
@gluon.jit
def _prefill_tile(idx, cu_ptr, sl_ptr, num_heads, num_m_tiles, num_seqs, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr):
    """Prefill tile ``idx`` = (m_tile, b, qh), heaviest m-tiles first: returns (b, qh, q_start, q_len, m0, seq_len,
    n_tiles, full_tiles): query rows [m0, m0 + BLOCK_M) of sequence b (none when m0 >= q_len), its n_tiles key tiles
    of BLOCK_N and the first of them some row does not see whole."""
    per_m = num_heads * num_seqs
    m0 = (num_m_tiles - 1 - idx // per_m) * BLOCK_M
    rem = idx % per_m
    b = rem // num_heads
    q_start = gl.load(cu_ptr + b)
    q_len = gl.load(cu_ptr + b + 1) - q_start
    seq_len = gl.load(sl_ptr + b)
    ctx = seq_len - q_len
    n_tiles = gl.cdiv(gl.minimum(seq_len, ctx + m0 + BLOCK_M), BLOCK_N)
    return b, rem % num_heads, q_start, q_len, m0, seq_len, n_tiles, (ctx + m0 + 1) // BLOCK_N


@gluon.jit
def _prefill_loader(k_ptr, v_ptr, k_desc, v_desc, bt_ptr, cu_ptr, sl_ptr, num_tiles, num_heads, num_m_tiles,
                    num_seqs, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_btb,
                    k_smem, v_smem, ready, empty,
                    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, TMA: gl.constexpr):
    """One warp: the K/V key tiles of this CTA's prefill tiles (idx = program id, + grid, ...: the order
    `_prefill_tiles` consumes them in) into the STAGES-deep ring. Stage s is refilled once empty[s] completes (its
    readers are done); ready[s] completes when its copies have landed.

    By cp.async (TMA False): eight rows of 64 bytes per copy instruction, few enough rows a thread to hold a tile's
    block-table entries in registers, loaded while the previous tile's stage is awaited; keys past the sequence are
    zero-filled. By TMA (k_desc / v_desc over the cache viewed as [num_blocks * PAGE_SIZE, Hkv * HEAD_DIM], box one
    page of one kv head): one copy per page, pages past the sequence's last one re-read it; the rows past seq_len of
    that page are read too, masked out of the softmax but multiplied by P = 0, so they must be finite (the engine's
    caches are zero-initialized)."""
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, 1], [1, 0])
    PAGES: gl.constexpr = BLOCK_N // PAGE_SIZE
    it = 0
    for idx in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, qh, q_start, q_len, m0, seq_len, n_tiles, full_tiles = _prefill_tile(
            idx, cu_ptr, sl_ptr, num_heads, num_m_tiles, num_seqs, BLOCK_M, BLOCK_N)
        if m0 < q_len:
            kvh = qh // GROUP
            bt_row = bt_ptr + b.to(gl.int64) * stride_btb
            if TMA:
                last_page = (seq_len - 1) // PAGE_SIZE
                for j in range(n_tiles):
                    stage = it % STAGES
                    mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
                    _tma_pages(k_desc, v_desc, ready.index(stage), k_smem.index(stage), v_smem.index(stage), bt_row,
                               j * PAGES, last_page, kvh * HEAD_DIM, PAGE_SIZE, PAGES)
                    it += 1
            else:
                k_base = k_ptr + kvh * stride_kh
                v_base = v_ptr + kvh * stride_vh
                pages = _pages(bt_row, 0, seq_len, PAGE_SIZE, BLOCK_N, LD)
                for j in range(n_tiles):
                    stage = it % STAGES
                    mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
                    _issue_kv(k_smem.index(stage), v_smem.index(stage), k_base, v_base, pages, j * BLOCK_N, seq_len,
                              stride_kb, stride_kp, stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N, LD)
                    pages = _pages(bt_row, (j + 1) * BLOCK_N, seq_len, PAGE_SIZE, BLOCK_N, LD)
                    async_copy.mbarrier_arrive(ready.index(stage), increment_count=False)
                    it += 1


@gluon.jit
def _prefill_tiles(p_q_ptr, cu_ptr, sl_ptr, o_ptr, lse_ptr, num_tiles, num_heads, num_m_tiles, num_seqs,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh, qk_scale,
                   k_smem, v_smem, ready, empty, decode_args,
                   GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, D_BLOCK_H: gl.constexpr, HELP: gl.constexpr):
    """This CTA's prefill tiles (idx = program id, + grid, ...; heaviest m-tiles first), BLOCK_M = 16 * num_warps
    query rows each (one wgmma M of 64 rows per warpgroup), K/V from `_prefill_loader`'s ring; then, with HELP,
    decode items (`decode_args`, through the same ring memory by cp.async) until none is left."""
    gl.static_assert(BLOCK_M == 16 * gl.num_warps(), "a prefill tile is 16 rows per warp")
    it = 0
    for idx in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, qh, q_start, q_len, m0, seq_len, n_tiles, full_tiles = _prefill_tile(
            idx, cu_ptr, sl_ptr, num_heads, num_m_tiles, num_seqs, BLOCK_M, BLOCK_N)
        if m0 < q_len:
            _prefill_rows(p_q_ptr, o_ptr, lse_ptr, qh, q_start, q_len, m0, seq_len, n_tiles, full_tiles,
                          stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh, qk_scale,
                          k_smem, v_smem, ready, empty, it, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)
            it += n_tiles
    if HELP:
        _decode_items(*decode_args, k_smem, v_smem, GROUP, D_BLOCK_H, HEAD_DIM, PAGE_SIZE, BLOCK_N, STAGES)


@gluon.jit
def _softmax_step(s, j, m_i, l_i, q_pos, full_tiles, kv_len, qk_scale, BLOCK_N: gl.constexpr, S_L: gl.constexpr,
                  P_L: gl.constexpr, DTYPE: gl.constexpr):
    """Online softmax of key tile j's raw scores s [BLOCK_M, BLOCK_N] (layout S_L; causal and kv_len masks from
    tile ``full_tiles`` on): returns P in DTYPE as the register A operand of the P V wgmma (layout P_L), the
    running output's rescale factor, and the new row max and row sum."""
    s = s * qk_scale
    if j >= full_tiles:
        k_pos = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, S_L))
        vis = (gl.expand_dims(k_pos, 0) <= gl.expand_dims(q_pos, 1)) & gl.expand_dims(k_pos < kv_len, 0)
        s = gl.where(vis, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    l_i = l_i * alpha + gl.sum(p, 1)
    return gl.convert_layout(p.to(DTYPE), P_L), alpha, m_new, l_i


@gluon.jit
def _release(empty, stage):
    """Every warp of the partition is done reading ring stage ``stage``: hand it back to the loader (one elected
    arrive)."""
    gl.thread_barrier()
    mbarrier.arrive(empty.index(stage), count=1)


@gluon.jit
def _prefill_rows(p_q_ptr, o_ptr, lse_ptr, qh, q_start, q_len, m0, seq_len, n_tiles, full_tiles,
                  stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh, qk_scale,
                  k_smem, v_smem, ready, empty, it,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Queries [m0, m0 + BLOCK_M) of one prefill sequence, head qh (q at position seq_len - q_len + i sees keys up to
    its position) against its n_tiles key tiles, which arrive in ring stages it, it + 1, ... (mod STAGES): wgmma
    with Q in registers (its A operand; 32 registers a thread at head_dim 128, no Q tile in shared memory), only the
    diagonal key tiles masked; stores the out rows and their lse.

    Software pipeline: S_{j+1} = Q K_{j+1}^T runs on the tensor cores while the CUDA cores do the softmax of S_j,
    then O += P_j V_j; a stage goes back to the loader once both have read it. (Overlapping the softmax with
    O += P_{j-1} V_{j-1} instead measured slower: ptxas moves the exponentials below that wgmma's wait, and with
    both wgmmas in flight across iterations it serializes every wgmma.)"""
    W: gl.constexpr = gl.num_warps()
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BLOCK_N, 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, HEAD_DIM, 16])
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    Q_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_L, k_width=2)
    dtype: gl.constexpr = k_smem.dtype
    # Q stays in registers, the A operand of every Q K^T wgmma, loaded straight into that layout
    offs_m = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, Q_L))
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, Q_L))
    rows = (q_start + offs_m).to(gl.int64)
    q = gl.load(p_q_ptr + gl.expand_dims(rows * stride_qt + qh * stride_qh, 1) + gl.expand_dims(offs_d, 0),
                mask=gl.expand_dims(offs_m < q_len, 1), other=0.0)

    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, O_L)
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, S_L))
    m_i = gl.full([BLOCK_M], NEG_BIG, gl.float32, gl.SliceLayout(1, S_L))
    q_pos = seq_len - q_len + m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, S_L))
    stage = it % STAGES
    mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
    fence_async_shared()
    s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_L),
                      use_acc=False)
    for j in range(0, n_tiles - 1):
        nxt = (it + j + 1) % STAGES
        mbarrier.wait(ready.index(nxt), ((it + j + 1) // STAGES) & 1)
        fence_async_shared()
        s_tok = warpgroup_mma(q, k_smem.index(nxt).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_L), use_acc=False, is_async=True)
        p16, alpha, m_i, l_i = _softmax_step(s, j, m_i, l_i, q_pos, full_tiles, seq_len, qk_scale, BLOCK_N, S_L,
                                             P_L, dtype)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_L)), 1)
        acc_tok = warpgroup_mma(p16, v_smem.index(stage), acc, is_async=True)
        # register operands stay live until their wgmmas retire
        s, acc, p16, q = warpgroup_mma_wait(0, deps=[s_tok, acc_tok, p16, q])
        _release(empty, stage)
        stage = nxt
    p16, alpha, m_i, l_i = _softmax_step(s, n_tiles - 1, m_i, l_i, q_pos, full_tiles, seq_len, qk_scale, BLOCK_N,
                                         S_L, P_L, dtype)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_L)), 1)
    acc = warpgroup_mma(p16, v_smem.index(stage), acc)
    _release(empty, stage)

    no_keys = l_i == 0.0
    inv = 1.0 / gl.where(no_keys, 1.0, l_i)
    out = acc * gl.expand_dims(gl.convert_layout(inv, gl.SliceLayout(1, O_L)), 1)
    lse = gl.where(no_keys, float("-inf"), (m_i + gl.log2(gl.where(no_keys, 1.0, l_i))) * LN2)
    o_m = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, O_L))
    o_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, O_L))
    o_rows = (q_start + o_m).to(gl.int64)
    gl.store(o_ptr + gl.expand_dims(o_rows * stride_ot + qh * stride_oh, 1) + gl.expand_dims(o_d, 0),
             out.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(o_m < q_len, 1))
    l_m = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, S_L))
    gl.store(lse_ptr + (q_start + l_m).to(gl.int64) * stride_lt + qh * stride_lh, lse, mask=l_m < q_len)


# ------------------------------------------------------------------------------------------------------------ decode
@gluon.jit
def _normalized(acc, m_i, l_i, AXIS: gl.constexpr):
    """A decode item's output acc / l (l_i broadcast along acc's dim AXIS, its row max m_i, log2 domain) and its
    natural-log lse; an item with no keys gives 0 / -inf."""
    no_keys = l_i == 0.0
    out = acc / gl.expand_dims(gl.where(no_keys, 1.0, l_i), AXIS)
    return out, gl.where(no_keys, float("-inf"), (m_i + gl.log2(gl.where(no_keys, 1.0, l_i))) * LN2)


@gluon.jit
def _decode_items(d_q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, o_ptr, lse_ptr, counter_ptr,
                  num_items, num_kv_heads, num_splits,
                  stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                  stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls, qk_scale,
                  k_smem, v_smem,
                  GROUP: gl.constexpr, BLOCK_H: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Decode (b, kvh, split) items from ticket counter_ptr[0]: the GROUP query heads of kv head kvh are rows of a
    [BLOCK_H, D] tile (mma_v2) against the split's keys [lo, hi), K/V through a STAGES-deep cp.async ring; stores
    normalised rows and lse (a split's partial when num_splits > 1; empty splits 0 / -inf). The prefill warps'
    way of helping with decode items (split boundaries at multiples of BLOCK_N keys, as in `_decode_warp`)."""
    W: gl.constexpr = gl.num_warps()
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, W], instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [W, 1], [1, 0])
    idx = gl.atomic_add(counter_ptr, 1)
    while idx < num_items:
        b64, kvh, split, lo, hi, n_tiles = _decode_item(idx, sl_ptr, num_splits, num_kv_heads, BLOCK_N, BLOCK_N)
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        bt_row = bt_ptr + b64 * stride_btb

        gl.thread_barrier()  # previous item's readers of the ring are done
        next_pages = _ring_start(k_smem, v_smem, k_base, v_base, bt_row, lo, hi, n_tiles, stride_kb, stride_kp,
                                 stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N, STAGES, LD)

        offs_h = gl.arange(0, BLOCK_H, gl.SliceLayout(1, LD))
        offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, LD))
        heads = kvh * GROUP + offs_h
        q = gl.load(d_q_ptr + b64 * stride_qb + gl.expand_dims(heads * stride_qh, 1) + gl.expand_dims(offs_d, 0),
                    mask=gl.expand_dims(offs_h < GROUP, 1), other=0.0)
        q = gl.convert_layout(q, A_L)
        acc = gl.zeros([BLOCK_H, HEAD_DIM], gl.float32, MMA)
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, MMA))
        m_i = gl.full([BLOCK_H], NEG_BIG, gl.float32, gl.SliceLayout(1, MMA))
        for j in range(0, n_tiles):
            next_pages = _ring_step(j, next_pages, k_smem, v_smem, k_base, v_base, bt_row, lo, hi, n_tiles,
                                    stride_kb, stride_kp, stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N, STAGES,
                                    LD)
            stage = j % STAGES
            kt = k_smem.index(stage).permute((1, 0)).load(B_L)
            s = mma_v2(q, kt, gl.zeros([BLOCK_H, BLOCK_N], gl.float32, MMA)) * qk_scale
            k_pos = lo + j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, MMA))
            s = gl.where(gl.expand_dims(k_pos < hi, 0), s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, 1)
            v = v_smem.index(stage).load(B_L)
            acc = mma_v2(gl.convert_layout(p.to(k_smem.dtype), A_L), v, acc * gl.expand_dims(alpha, 1))
            m_i = m_new
            gl.thread_barrier()
        async_copy.wait_group(0)

        out, lse = _normalized(acc, m_i, l_i, 1)
        o_h = gl.arange(0, BLOCK_H, gl.SliceLayout(1, MMA))
        o_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, MMA))
        o_heads = kvh * GROUP + o_h
        h_mask = o_h < GROUP
        gl.store(o_ptr + b64 * stride_ob + split * stride_os + gl.expand_dims(o_heads * stride_oh, 1)
                 + gl.expand_dims(o_d, 0), out.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(h_mask, 1))
        gl.store(lse_ptr + b64 * stride_lb + split * stride_ls + o_heads * stride_lh, lse, mask=h_mask)
        idx = gl.atomic_add(counter_ptr, 1)


@gluon.jit
def _decode_warp(decode_args, k_desc, v_desc, k_smem, v_smem, bars,
                 GROUP: gl.constexpr, NH: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT_ALIGN: gl.constexpr, TMA: gl.constexpr):
    """One warp: decode (b, kvh, split) items from ticket counter_ptr[0] (``decode_args``: the decode half's
    pointers, counts and strides, as `_decode_items` takes them), keys as the MMA's M and the GROUP heads
    (padded to NH) as its N: S^T [BLOCK_N, NH] = K q^T, O^T [D, NH] += V^T P^T, the softmax down each column
    within the warp (no cross-warp reductions); its own STAGES-deep ring of BLOCK_N-key tiles, by cp.async or, with
    TMA, BLOCK_N // PAGE_SIZE pages a tile by TMA (bars: the ring's mbarriers; the rows of a split's last page past
    its end are read, masked, and must be finite, as for `_prefill_loader`)."""
    (d_q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, o_ptr, lse_ptr, counter_ptr, num_items, num_kv_heads, num_splits,
     stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
     stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls, qk_scale) = decode_args
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [1, 1], [1, 0])
    QT: gl.constexpr = gl.BlockedLayout([8, 1], [HEAD_DIM // 8, 32 * 8 // HEAD_DIM], [1, 1], [0, 1])
    TILE_BYTES: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * k_smem.dtype.primitive_bitwidth // 8  # K and V
    PAGES: gl.constexpr = BLOCK_N // PAGE_SIZE  # a TMA tile's pages
    if TMA:
        gl.static_assert(BLOCK_N % PAGE_SIZE == 0, "a TMA decode tile is whole pages")
    it = 0  # ring tiles consumed so far (TMA: stage and mbarrier phase)
    idx = gl.atomic_add(counter_ptr, 1)
    while idx < num_items:
        b64, kvh, split, lo, hi, n_tiles = _decode_item(idx, sl_ptr, num_splits, num_kv_heads, SPLIT_ALIGN,
                                                        BLOCK_N)
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        bt_row = bt_ptr + b64 * stride_btb
        first_page = lo // PAGE_SIZE
        last_page = gl.maximum((hi - 1) // PAGE_SIZE, 0)  # clamps block-table reads (also of an empty split)

        gl.thread_barrier()  # the previous item's readers of the ring are done
        if TMA:
            for t in gl.static_range(STAGES - 1):
                if t < n_tiles:
                    _tma_pages(k_desc, v_desc, bars.index((it + t) % STAGES), k_smem.index((it + t) % STAGES),
                               v_smem.index((it + t) % STAGES), bt_row, first_page + t * PAGES, last_page,
                               kvh * HEAD_DIM, PAGE_SIZE, PAGES)
            # the cache row of the next tile's first page, loaded a tile ahead of its copy
            next_pages = gl.load(bt_row + gl.minimum(first_page + (STAGES - 1) * PAGES, last_page)) * PAGE_SIZE
        else:
            next_pages = _ring_start(k_smem, v_smem, k_base, v_base, bt_row, lo, hi, n_tiles, stride_kb, stride_kp,
                                     stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N, STAGES, LD)

        offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(1, QT))
        offs_h = gl.arange(0, NH, gl.SliceLayout(0, QT))
        qt = gl.load(d_q_ptr + b64 * stride_qb + gl.expand_dims((kvh * GROUP + offs_h) * stride_qh, 0)
                     + gl.expand_dims(offs_d, 1), mask=gl.expand_dims(offs_h < GROUP, 0), other=0.0)
        qt = gl.convert_layout(qt, B_L)  # q^T [D, NH]
        acc = gl.zeros([HEAD_DIM, NH], gl.float32, MMA)  # O^T
        l_i = gl.zeros([NH], gl.float32, gl.SliceLayout(0, MMA))
        m_i = gl.full([NH], NEG_BIG, gl.float32, gl.SliceLayout(0, MMA))
        for j in range(0, n_tiles):
            if TMA:
                # refill the stage tile j - 1 left (every thread has read it: the barrier closing each iteration)
                if j + STAGES - 1 < n_tiles:
                    refill = (it + j + STAGES - 1) % STAGES
                    mbarrier.expect(bars.index(refill), TILE_BYTES)
                    k_dst, v_dst = k_smem.index(refill), v_smem.index(refill)
                    _tma_kv(k_desc, v_desc, bars.index(refill), k_dst.slice(0, PAGE_SIZE),
                            v_dst.slice(0, PAGE_SIZE), next_pages, kvh * HEAD_DIM)
                    refill_page = first_page + (j + STAGES - 1) * PAGES
                    for c in gl.static_range(1, PAGES):  # a multi-page tile's other pages
                        row = gl.load(bt_row + gl.minimum(refill_page + c, last_page)) * PAGE_SIZE
                        _tma_kv(k_desc, v_desc, bars.index(refill), k_dst.slice(c * PAGE_SIZE, PAGE_SIZE),
                                v_dst.slice(c * PAGE_SIZE, PAGE_SIZE), row, kvh * HEAD_DIM)
                    next_pages = gl.load(bt_row + gl.minimum(refill_page + PAGES, last_page)) * PAGE_SIZE
                stage = (it + j) % STAGES
                mbarrier.wait(bars.index(stage), ((it + j) // STAGES) & 1)
            else:
                next_pages = _ring_step(j, next_pages, k_smem, v_smem, k_base, v_base, bt_row, lo, hi, n_tiles,
                                        stride_kb, stride_kp, stride_vb, stride_vp, HEAD_DIM, PAGE_SIZE, BLOCK_N,
                                        STAGES, LD)
                stage = j % STAGES
            k = k_smem.index(stage).load(A_L)  # [BLOCK_N, D]
            st = mma_v2(k, qt, gl.zeros([BLOCK_N, NH], gl.float32, MMA)) * qk_scale  # S^T [BLOCK_N, NH]
            k_pos = lo + j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, MMA))
            st = gl.where(gl.expand_dims(k_pos < hi, 1), st, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(st, 0))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(st - gl.expand_dims(m_new, 0))
            l_i = l_i * alpha + gl.sum(p, 0)
            vt = v_smem.index(stage).permute((1, 0)).load(A_L)  # V^T [D, BLOCK_N]
            acc = mma_v2(vt, gl.convert_layout(p.to(k_smem.dtype), B_L), acc * gl.expand_dims(alpha, 0))
            m_i = m_new
            gl.thread_barrier()
        if not TMA:
            async_copy.wait_group(0)
        it += n_tiles

        out, lse = _normalized(acc, m_i, l_i, 0)
        o_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(1, MMA))
        o_h = gl.arange(0, NH, gl.SliceLayout(0, MMA))
        h_mask = o_h < GROUP
        o_heads = kvh * GROUP + o_h
        gl.store(o_ptr + b64 * stride_ob + split * stride_os + gl.expand_dims(o_heads * stride_oh, 0)
                 + gl.expand_dims(o_d, 1), out.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(h_mask, 0))
        gl.store(lse_ptr + b64 * stride_lb + split * stride_ls + o_heads * stride_lh, lse, mask=h_mask)
        idx = gl.atomic_add(counter_ptr, 1)


# Counts, split and block-table strides and pointers into the middle of a step's tensors change from step to step:
# plain runtime arguments (one compiled variant; see `accordion.kernels.utils.jit_unspecialized`). K/V pointers
# and strides keep their divisibility (the cp.async copies are 16 bytes wide).
_RUNTIME = ["p_bt_ptr", "p_cu_ptr", "p_sl_ptr", "d_bt_ptr", "d_sl_ptr", "plse_ptr", "dlse_ptr", "num_prefill_tiles",
            "num_decode_items", "num_m_tiles", "num_prefill_seqs", "num_splits", "stride_pbt", "stride_dbt",
            "stride_dob", "stride_doh", "stride_dos", "stride_dlb", "stride_dlh", "stride_dls"]


@gluon.jit(do_not_specialize=_RUNTIME, do_not_specialize_on_alignment=_RUNTIME)
def pod_ws_kernel(
    pq_ptr, dq_ptr, k_ptr, v_ptr, k_desc, v_desc, p_bt_ptr, p_cu_ptr, p_sl_ptr, d_bt_ptr, d_sl_ptr,
    po_ptr, plse_ptr, do_ptr, dlse_ptr, counter_ptr,
    num_prefill_tiles, num_decode_items, num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads, num_splits,
    stride_pqt, stride_pqh, stride_dqb, stride_dqh,
    stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
    stride_pbt, stride_dbt,
    stride_pot, stride_poh, stride_plt, stride_plh,
    stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls,
    qk_scale,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr,
    P_BLOCK_M: gl.constexpr, P_BLOCK_N: gl.constexpr, P_STAGES: gl.constexpr, P_TMA: gl.constexpr,
    D_BLOCK_H: gl.constexpr, D_NH: gl.constexpr, D_BLOCK_N: gl.constexpr, D_STAGES: gl.constexpr,
    D_TMA: gl.constexpr, D_REGS: gl.constexpr,
):
    """Grid: one persistent CTA per SM (any size is correct); num_warps = 8 (the prefill partition, 128-row tiles)
    plus one worker warpgroup of D_REGS registers a thread (setmaxnreg is per warpgroup): the one-warp prefill
    loader and three one-warp decode partitions. P_BLOCK_N is the split alignment of both decode paths.
    k_desc / v_desc: with P_TMA or D_TMA the caches' TMA descriptors (`_prefill_loader`, `_decode_warp`), else unused
    (any value).
    counter_ptr: int32 [1] zeroed ticket of the decode items."""
    dtype: gl.constexpr = pq_ptr.dtype.element_ty
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([P_BLOCK_N, HEAD_DIM], dtype)
    d_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D_BLOCK_N, HEAD_DIM], dtype)
    pk_smem = gl.allocate_shared_memory(dtype, [P_STAGES, P_BLOCK_N, HEAD_DIM], kv_sl)
    pv_smem = gl.allocate_shared_memory(dtype, [P_STAGES, P_BLOCK_N, HEAD_DIM], kv_sl)
    ready = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(P_STAGES):
        # completed by the loader's expect (TMA) or by each loader thread's cp.async arrive
        mbarrier.init(ready.index(i), count=1 if P_TMA else 32)
        mbarrier.init(empty.index(i), count=1)  # the prefill partition's elected arrive
    fence_async_shared()
    k0 = gl.allocate_shared_memory(dtype, [D_STAGES, D_BLOCK_N, HEAD_DIM], d_sl)
    v0 = gl.allocate_shared_memory(dtype, [D_STAGES, D_BLOCK_N, HEAD_DIM], d_sl)
    k1 = gl.allocate_shared_memory(dtype, [D_STAGES, D_BLOCK_N, HEAD_DIM], d_sl)
    v1 = gl.allocate_shared_memory(dtype, [D_STAGES, D_BLOCK_N, HEAD_DIM], d_sl)
    k2 = gl.allocate_shared_memory(dtype, [D_STAGES, D_BLOCK_N, HEAD_DIM], d_sl)
    v2 = gl.allocate_shared_memory(dtype, [D_STAGES, D_BLOCK_N, HEAD_DIM], d_sl)
    bars0 = gl.allocate_shared_memory(gl.int64, [D_STAGES, 1], mbarrier.MBarrierLayout())
    bars1 = gl.allocate_shared_memory(gl.int64, [D_STAGES, 1], mbarrier.MBarrierLayout())
    bars2 = gl.allocate_shared_memory(gl.int64, [D_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(D_STAGES):  # with D_TMA: completed by the decode warp's expect
        mbarrier.init(bars0.index(i), count=1)
        mbarrier.init(bars1.index(i), count=1)
        mbarrier.init(bars2.index(i), count=1)
    fence_async_shared()
    HELP: gl.constexpr = True
    decode_args = (dq_ptr, k_ptr, v_ptr, d_bt_ptr, d_sl_ptr, do_ptr, dlse_ptr, counter_ptr,
                   num_decode_items, num_kv_heads, num_splits,
                   stride_dqb, stride_dqh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                   stride_dbt, stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls, qk_scale)
    # The decode arguments travel as one tuple member (in Triton 3.6 a tuple built by concatenation,
    # decode_args + (...), loses its members' constexpr-ness, which a partition's arguments need).
    gl.warp_specialize([
        (_prefill_tiles, (pq_ptr, p_cu_ptr, p_sl_ptr, po_ptr, plse_ptr, num_prefill_tiles, num_heads, num_m_tiles,
                          num_prefill_seqs, stride_pqt, stride_pqh, stride_pot, stride_poh, stride_plt, stride_plh,
                          qk_scale, pk_smem, pv_smem, ready, empty, decode_args,
                          GROUP, HEAD_DIM, PAGE_SIZE, P_BLOCK_M, P_BLOCK_N, P_STAGES, D_BLOCK_H, HELP)),
        (_prefill_loader, (k_ptr, v_ptr, k_desc, v_desc, p_bt_ptr, p_cu_ptr, p_sl_ptr, num_prefill_tiles, num_heads,
                           num_m_tiles, num_prefill_seqs, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp,
                           stride_vh, stride_pbt, pk_smem, pv_smem, ready, empty,
                           GROUP, HEAD_DIM, PAGE_SIZE, P_BLOCK_M, P_BLOCK_N, P_STAGES, P_TMA)),
        (_decode_warp, (decode_args, k_desc, v_desc, k0, v0, bars0, GROUP, D_NH, HEAD_DIM, PAGE_SIZE, D_BLOCK_N,
                        D_STAGES, P_BLOCK_N, D_TMA)),
        (_decode_warp, (decode_args, k_desc, v_desc, k1, v1, bars1, GROUP, D_NH, HEAD_DIM, PAGE_SIZE, D_BLOCK_N,
                        D_STAGES, P_BLOCK_N, D_TMA)),
        (_decode_warp, (decode_args, k_desc, v_desc, k2, v2, bars2, GROUP, D_NH, HEAD_DIM, PAGE_SIZE, D_BLOCK_N,
                        D_STAGES, P_BLOCK_N, D_TMA)),
    ], [1, 1, 1, 1], [D_REGS, D_REGS, D_REGS, D_REGS])
