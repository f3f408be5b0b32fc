"""@triton.jit code for paged decode attention whose K/V pages arrive by TMA (Hopper tensor descriptors).

Same work split, math, outputs and arguments as `decode_kernel.paged_decode_kernel` (see there; without its
HOST_BOUND option), with K/V given as descriptors instead of pointers. Only the key loop differs: each page of one
kv head (PAGE_SIZE rows of HEAD_DIM, rows Hkv * HEAD_DIM apart) is one descriptor load of a [PAGE_SIZE, HEAD_DIM]
box from the cache viewed as [num_blocks * PAGE_SIZE, Hkv * HEAD_DIM]. A key tile is BLOCK_N = PAGE_SIZE or
2 * PAGE_SIZE keys (one or two pages scored separately, folded into the running softmax together). A page past the
sequence's last one is never looked up in the block table: it re-reads the last page, whose keys past seq_len are
masked.

The TMA unit walks the strided page rows, so the loop computes no per-row addresses. On an H100 this ran 1-3%
faster than the pointer kernel at the launch sizes where `decode.decode_config` picks it (bench/tune_attention.py
--tma).
"""

import triton
import triton.language as tl

from ..utils import jit_unspecialized
from .decode_kernel import finish_decode_item
from .paged_common import NEG_BIG


@triton.jit
def _page(q, k_desc, v_desc, bt_row, page, last_page, col, kv_len, qk_scale,
          PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores [BLOCK_H, PAGE_SIZE] (log2 domain, keys >= kv_len at -inf) and V [PAGE_SIZE, D] of one page."""
    row = tl.load(bt_row + tl.minimum(page, last_page)) * PAGE_SIZE
    k = k_desc.load([row, col])
    v = v_desc.load([row, col])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    pos = page * PAGE_SIZE + tl.arange(0, PAGE_SIZE)
    return tl.where(pos[None, :] < kv_len, s, float("-inf")), v


@jit_unspecialized("stride_btb", "num_splits", "fused_merge")
def paged_decode_tma_kernel(
    q_ptr, k_desc, v_desc, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr,
    num_splits, fused_merge,
    stride_qb, stride_qh,
    stride_kb, stride_kp, stride_kh,  # unused (the descriptors hold the cache layout)
    stride_vb, stride_vp, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_fob, stride_foh, stride_flb, stride_flh,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
):
    """Grid as `paged_decode_kernel`'s. k_desc / v_desc: descriptors of the [num_blocks * PAGE_SIZE, Hkv * HEAD_DIM]
    cache views, block [PAGE_SIZE, HEAD_DIM]; BLOCK_N is PAGE_SIZE or 2 * PAGE_SIZE."""
    if HEADS_FASTEST:
        b, kvh, num_kv_heads = tl.program_id(1), tl.program_id(0), tl.num_programs(0)
    else:
        b, kvh, num_kv_heads = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(seq_len, lo + split_len)
    last_page = tl.maximum(seq_len - 1, 0) // PAGE_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    bt_row = bt_ptr + b64 * stride_btb
    col = kvh * HEAD_DIM

    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        page = n0 // PAGE_SIZE
        s0, v0 = _page(q, k_desc, v_desc, bt_row, page, last_page, col, seq_len, qk_scale, PAGE_SIZE, DOT_PRECISION)
        if BLOCK_N == 2 * PAGE_SIZE:
            s1, v1 = _page(q, k_desc, v_desc, bt_row, page + 1, last_page, col, seq_len, qk_scale, PAGE_SIZE,
                           DOT_PRECISION)
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
            p0 = tl.exp2(s0 - m_new[:, None])
            p1 = tl.exp2(s1 - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
            acc = acc * alpha[:, None] + tl.dot(p0.to(v0.dtype), v0, input_precision=DOT_PRECISION)
            acc += tl.dot(p1.to(v1.dtype), v1, input_precision=DOT_PRECISION)
        else:
            m_new = tl.maximum(m_i, tl.max(s0, 1))
            p0 = tl.exp2(s0 - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p0, 1)
            acc = acc * alpha[:, None] + tl.dot(p0.to(v0.dtype), v0, input_precision=DOT_PRECISION)
        m_i = m_new
    finish_decode_item(
        acc, l_i, m_i, b64, kvh, split, heads, h_mask, o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr, num_splits,
        fused_merge, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        stride_fob, stride_foh, stride_flb, stride_flh, num_kv_heads, BLOCK_H, HEAD_DIM,
    )
