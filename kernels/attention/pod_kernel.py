"""@triton.jit code for POD-Attention style fused prefill + decode attention (one launch, one grid).

Persistent: every program keeps one role. The first program resident on an SM (per-SM atomic counter indexed
by %smid; the program id under the interpreter) takes prefill tiles (`prefill_work`), the others on that SM decode
work items (`decode_work`), each from its kind's global atomic ticket; a program whose kind has run out helps with
the other kind, then exits. So compute-bound prefill tiles and bandwidth-bound decode tiles co-run on every SM
until one kind is done, and every tile runs exactly once whatever the grid. Needs a zeroed int32 counter buffer
of 2 + SMID_SLOTS entries.
Tile orders: prefill heaviest causal m-tiles first, heads of one GQA group adjacent; decode (b, kv_head, split).
"""

import triton
import triton.language as tl

from ..utils import jit_unspecialized
from .decode_kernel import decode_work
from .prefill_kernel import prefill_work


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# Tile counts change with every hybrid batch: keep them out of the specialization key (no recompiles).
@jit_unspecialized("num_prefill_tiles", "num_decode_tiles", "num_m_tiles", "num_prefill_seqs", "slots_per_sm",
                   "num_splits", "d_fused_merge", "stride_pbt", "stride_dbt", "p_bt_ptr", "p_sl_ptr", "plse_ptr")
def pod_attention_kernel(
    pq_ptr,  # prefill q [Tq, Hq, D]
    dq_ptr,  # decode q [Bd, Hq, D]
    k_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_ptr,  # [num_blocks, PAGE, Hkv, D]
    p_bt_ptr, p_cu_ptr, p_sl_ptr,  # prefill block_table [Bp, *], cu_seqlens_q [Bp + 1], seq_lens [Bp]
    d_bt_ptr, d_sl_ptr,  # decode block_table [Bd, *], seq_lens [Bd]
    po_ptr, plse_ptr,  # prefill out [Tq, Hq, D], lse fp32 [Tq, Hq]
    do_ptr, dlse_ptr,  # decode out [Bd, Hq, D] (split stride 0) or partial [Bd, Hq, S, D] / [Bd, Hq, S]
    dfo_ptr, dflse_ptr, d_ticket_ptr,  # d_fused_merge: decode out [Bd, Hq, D], lse [Bd, Hq], tickets [Bd * Hkv]
    counter_ptr,  # int32 [2 + SMID_SLOTS] zeroed (USE_SMID only)
    num_prefill_tiles, num_decode_tiles, num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads, slots_per_sm,
    num_splits, d_fused_merge,
    stride_pqt, stride_pqh,
    stride_dqb, stride_dqh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_pbt, stride_dbt,
    stride_pot, stride_poh, stride_plt, stride_plh,
    stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls,
    stride_dfob, stride_dfoh, stride_dflb, stride_dflh,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    P_BLOCK_M: tl.constexpr,
    P_BLOCK_N: tl.constexpr,
    D_BLOCK_H: tl.constexpr,
    D_BLOCK_N: tl.constexpr,
    USE_SMID: tl.constexpr,
    SMID_SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """Grid: any size (each program loops); best one program per resident slot of every SM. FAST_OFFSETS as in
    `paged_common.paged_attn_loop`."""
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
                  po_ptr, plse_ptr, do_ptr, dlse_ptr, dfo_ptr, dflse_ptr, d_ticket_ptr,
                  num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads, num_splits, d_fused_merge,
                  stride_pqt, stride_pqh, stride_dqb, stride_dqh,
                  stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_pbt, stride_dbt,
                  stride_pot, stride_poh, stride_plt, stride_plh,
                  stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls,
                  stride_dfob, stride_dfoh, stride_dflb, stride_dflh, qk_scale,
                  GROUP, HEAD_DIM, PAGE_SIZE, P_BLOCK_M, P_BLOCK_N, D_BLOCK_H, D_BLOCK_N, DOT_PRECISION,
                  FAST_OFFSETS)
        else:
            kind = 1 - kind
            switches += 1


@triton.jit
def _tile(
    kind, idx,
    pq_ptr, dq_ptr, k_ptr, v_ptr, p_bt_ptr, p_cu_ptr, p_sl_ptr, d_bt_ptr, d_sl_ptr,
    po_ptr, plse_ptr, do_ptr, dlse_ptr, dfo_ptr, dflse_ptr, d_ticket_ptr,
    num_heads, num_m_tiles, num_prefill_seqs, num_kv_heads, num_splits, d_fused_merge,
    stride_pqt, stride_pqh, stride_dqb, stride_dqh,
    stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_pbt, stride_dbt,
    stride_pot, stride_poh, stride_plt, stride_plh,
    stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls,
    stride_dfob, stride_dfoh, stride_dflb, stride_dflh, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, P_BLOCK_M: tl.constexpr,
    P_BLOCK_N: tl.constexpr, D_BLOCK_H: tl.constexpr, D_BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FAST_OFFSETS: tl.constexpr,
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
            GROUP, HEAD_DIM, PAGE_SIZE, P_BLOCK_M, P_BLOCK_N, DOT_PRECISION, FAST_OFFSETS,
        )
    else:
        split = idx % num_splits
        r = idx // num_splits
        decode_work(
            dq_ptr, k_ptr, v_ptr, d_bt_ptr, d_sl_ptr, do_ptr, dlse_ptr, dfo_ptr, dflse_ptr, d_ticket_ptr,
            r // num_kv_heads, r % num_kv_heads, split, num_splits, d_fused_merge, 0,
            stride_dqb, stride_dqh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_dbt,
            stride_dob, stride_doh, stride_dos, stride_dlb, stride_dlh, stride_dls,
            stride_dfob, stride_dfoh, stride_dflb, stride_dflh, num_kv_heads, qk_scale,
            GROUP, D_BLOCK_H, HEAD_DIM, PAGE_SIZE, D_BLOCK_N, DOT_PRECISION, False, FAST_OFFSETS,
        )
