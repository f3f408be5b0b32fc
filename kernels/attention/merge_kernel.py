"""@triton.jit code merging two partial attention results computed over disjoint key sets."""

import triton
import triton.language as tl


@triton.jit
def merge_states_kernel(
    o1_ptr,  # [N, H, D]
    lse1_ptr,  # fp32 [N, H]
    o2_ptr,  # [N, H, D]
    lse2_ptr,  # fp32 [N, H]
    o_ptr,  # [N, H, D]
    lse_ptr,  # fp32 [N, H]
    H,
    stride_o1n, stride_o1h,
    stride_l1n, stride_l1h,
    stride_o2n, stride_o2h,
    stride_l2n, stride_l2h,
    stride_on, stride_oh,
    stride_ln, stride_lh,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Grid (N, cdiv(H, BLOCK_H)). o = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2); both -inf -> (0, -inf)."""
    n = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < H
    l1 = tl.load(lse1_ptr + n * stride_l1n + offs_h * stride_l1h, mask=h_mask, other=float("-inf")).to(tl.float32)
    l2 = tl.load(lse2_ptr + n * stride_l2n + offs_h * stride_l2h, mask=h_mask, other=float("-inf")).to(tl.float32)
    m = tl.maximum(l1, l2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp(l1 - m_safe)
    w2 = tl.exp(l2 - m_safe)
    tot = w1 + w2
    denom = tl.where(tot > 0.0, tot, 1.0)
    o1 = tl.load(o1_ptr + n * stride_o1n + offs_h[:, None] * stride_o1h + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    o2 = tl.load(o2_ptr + n * stride_o2n + offs_h[:, None] * stride_o2h + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    # a -inf side gets weight 0 and must not leak NaN/inf garbage from its (unused) output
    o1 = tl.where((w1 > 0.0)[:, None], o1.to(tl.float32), 0.0)
    o2 = tl.where((w2 > 0.0)[:, None], o2.to(tl.float32), 0.0)
    out = (o1 * (w1 / denom)[:, None]) + (o2 * (w2 / denom)[:, None])
    out_lse = tl.where(tot > 0.0, m_safe + tl.log(denom), float("-inf"))
    tl.store(o_ptr + n * stride_on + offs_h[:, None] * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=h_mask[:, None])
    tl.store(lse_ptr + n * stride_ln + offs_h * stride_lh, out_lse, mask=h_mask)
