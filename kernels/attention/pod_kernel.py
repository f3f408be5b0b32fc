"""@triton.jit code for POD-Attention style fused prefill + decode attention (one launch, one grid).

Every program first decides whether it runs a prefill tile (`prefill_work`) or a decode work item
(`decode_work`), so compute-bound prefill tiles and bandwidth-bound decode tiles co-run on every SM.
Two schedulers (constexpr USE_SMID):
  * USE_SMID=False (interpreter / fallback): static proportional interleave of the program ids:
    program t is prefill iff floor((t+1) NP / T) > floor(t NP / T), T = NP + ND; an exact bijection.
  * USE_SMID=True (GPU): the k-th CTA to start on an SM (per-SM atomic counter indexed by %smid) picks its
    kind with the same proportional rule applied to k, then takes the next tile of that kind from a global
    atomic ticket; if that kind is exhausted it takes the other kind (total programs == NP + ND, so every
    tile is run exactly once). Needs a zeroed int32 counter buffer of 2 + SMID_SLOTS entries.
Tile orders: prefill heaviest causal m-tiles first, heads of one GQA group adjacent; decode (b, kv_head, split).
"""

import triton
import triton.language as tl

from .decode_kernel import decode_work
from .prefill_kernel import prefill_work


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# Tile counts change with every hybrid batch: keep them out of the specialization key (no recompiles).
@triton.jit(do_not_specialize=["num_prefill_tiles", "num_decode_tiles", "num_m_tiles", "num_prefill_seqs",
                               "slots_per_sm"])
def pod_attention_kernel(
    pq_ptr,  # prefill q [Tq, Hq, D]
    dq_ptr,  # decode q [Bd, Hq, D]
    k_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_ptr,  # [num_blocks, PAGE, Hkv, D]
    p_bt_ptr, p_cu_ptr, p_sl_ptr,  # prefill block_table [Bp, *], cu_seqlens_q [Bp + 1], seq_lens [Bp]
    d_bt_ptr, d_sl_ptr,  # decode block_table [Bd, *], seq_lens [Bd]
    po_ptr, plse_ptr,  # prefill out [Tq, Hq, D], lse fp32 [Tq, Hq]
    do_ptr, dlse_ptr,  # decode out [Bd, Hq, D] (split stride 0) or partial [Bd, Hq, S, D] / [Bd, Hq, S]
    counter_ptr,  # int32 [2 + SMID_SLOTS] zeroed (USE_SMID only)
    num_prefill_tiles, num_decode_tiles, num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads, slots_per_sm,
    stride_pqt, stride_pqh,
    stride_dqb, stride_dqh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_pbt, stride_dbt,
    stride_pot, stride_poh, stride_plt, stride_plh,
    stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    P_BLOCK_M: tl.constexpr,
    P_BLOCK_N: tl.constexpr,
    D_BLOCK_H: tl.constexpr,
    D_BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_SMID: tl.constexpr,
    PERSISTENT: tl.constexpr,
    SMID_SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (num_prefill_tiles + num_decode_tiles,), or any size when PERSISTENT (each program loops)."""
    if PERSISTENT:
        # Each resident program keeps one role (the first on its SM runs prefill tiles, the other slots_per_sm - 1
        # decode tiles), takes tiles of that kind from its atomic ticket until none is left, then helps with the
        # other kind; so a compute-bound and bandwidth-bound programs share every SM until one kind runs out.
        if USE_SMID:
            slot = tl.atomic_add(counter_ptr + 2 + _smid() % SMID_SLOTS, 1)
        else:
            slot = tl.program_id(0)
        kind = tl.where(slot % slots_per_sm == 0, 0, 1)
        switches = slot * 0
        while switches < 2:
            idx = tl.atomic_add(counter_ptr + kind, 1)
            if idx < tl.where(kind == 0, num_prefill_tiles, num_decode_tiles):
                _tile(kind, idx,
                      pq_ptr, dq_ptr, k_ptr, v_ptr, p_bt_ptr, p_cu_ptr, p_sl_ptr, d_bt_ptr, d_sl_ptr,
                      po_ptr, plse_ptr, do_ptr, dlse_ptr,
                      num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads,
                      stride_pqt, stride_pqh, stride_dqb, stride_dqh,
                      stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_pbt, stride_dbt,
                      stride_pot, stride_poh, stride_plt, stride_plh,
                      stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls, qk_scale,
                      GROUP, HEAD_DIM, PAGE_SIZE, P_BLOCK_M, P_BLOCK_N, D_BLOCK_H, D_BLOCK_N, NUM_SPLITS,
                      DOT_PRECISION)
            else:
                kind = 1 - kind
                switches += 1
    else:
        total = (num_prefill_tiles + num_decode_tiles).to(tl.int64)
        n_p = num_prefill_tiles.to(tl.int64)
        if USE_SMID:
            sm = _smid() % SMID_SLOTS
            t = tl.atomic_add(counter_ptr + 2 + sm, 1).to(tl.int64)
            want_p = ((t + 1) * n_p) // total > (t * n_p) // total
            kind = tl.where(want_p, 0, 1)
            idx = tl.atomic_add(counter_ptr + kind, 1)
            if idx >= tl.where(kind == 0, num_prefill_tiles, num_decode_tiles):
                kind = 1 - kind
                idx = tl.atomic_add(counter_ptr + kind, 1)
        else:
            t = tl.program_id(0).to(tl.int64)
            before = (t * n_p) // total
            want_p = ((t + 1) * n_p) // total > before
            kind = tl.where(want_p, 0, 1)
            idx = tl.where(want_p, before, t - before).to(tl.int32)
        _tile(kind, idx,
              pq_ptr, dq_ptr, k_ptr, v_ptr, p_bt_ptr, p_cu_ptr, p_sl_ptr, d_bt_ptr, d_sl_ptr,
              po_ptr, plse_ptr, do_ptr, dlse_ptr,
              num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads,
              stride_pqt, stride_pqh, stride_dqb, stride_dqh,
              stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_pbt, stride_dbt,
              stride_pot, stride_poh, stride_plt, stride_plh,
              stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls, qk_scale,
              GROUP, HEAD_DIM, PAGE_SIZE, P_BLOCK_M, P_BLOCK_N, D_BLOCK_H, D_BLOCK_N, NUM_SPLITS, DOT_PRECISION)


@triton.jit
def _tile(
    kind, idx,
    pq_ptr, dq_ptr, k_ptr, v_ptr, p_bt_ptr, p_cu_ptr, p_sl_ptr, d_bt_ptr, d_sl_ptr,
    po_ptr, plse_ptr, do_ptr, dlse_ptr,
    num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads,
    stride_pqt, stride_pqh, stride_dqb, stride_dqh,
    stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_pbt, stride_dbt,
    stride_pot, stride_poh, stride_plt, stride_plh,
    stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, P_BLOCK_M: tl.constexpr,
    P_BLOCK_N: tl.constexpr, D_BLOCK_H: tl.constexpr, D_BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Tile ``idx`` of ``kind`` (0: prefill (m_tile, b, qh), heaviest m-tiles first; 1: decode (b, kvh, split))."""
    if kind == 0:
        per_m = num_heads * num_prefill_seqs
        m_tile = num_m_tiles - 1 - idx // per_m
        rem = idx % per_m
        prefill_work(
            pq_ptr, k_ptr, v_ptr, p_bt_ptr, p_cu_ptr, p_sl_ptr, po_ptr, plse_ptr,
            m_tile, rem // num_heads, rem % num_heads,
            stride_pqt, stride_pqh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_pbt,
            stride_pot, stride_poh, stride_plt, stride_plh, qk_scale,
            GROUP, HEAD_DIM, PAGE_SIZE, P_BLOCK_M, P_BLOCK_N, DOT_PRECISION,
        )
    else:
        split = idx % NUM_SPLITS
        r = idx // NUM_SPLITS
        decode_work(
            dq_ptr, k_ptr, v_ptr, d_bt_ptr, d_sl_ptr, do_ptr, dlse_ptr,
            r // num_kv_heads, r % num_kv_heads, split,
            stride_dqb, stride_dqh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_dbt,
            stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls, qk_scale,
            GROUP, D_BLOCK_H, HEAD_DIM, PAGE_SIZE, D_BLOCK_N, NUM_SPLITS, DOT_PRECISION,
        )
