"""@triton.jit code scattering new K/V rows into the paged cache."""

import triton
import triton.language as tl


@triton.jit
def write_kv_cache_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_cache_ptr,  # [num_blocks, PAGE, Hkv, D]
    slot_ptr,  # int64 [T]; -1 = skip
    num_kv_heads,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kcp, stride_kch,
    stride_vcb, stride_vcp, stride_vch,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Grid (T, cdiv(Hkv, BLOCK_H)): copies BLOCK_H heads of token t into slot slot_mapping[t]."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HEAD_DIM)
        mask = (offs_h < num_kv_heads)[:, None]
        blk = slot // PAGE_SIZE
        row = slot % PAGE_SIZE
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        kc = k_cache_ptr + blk * stride_kcb + row * stride_kcp + offs_h[:, None] * stride_kch + offs_d[None, :]
        vc = v_cache_ptr + blk * stride_vcb + row * stride_vcp + offs_h[:, None] * stride_vch + offs_d[None, :]
        tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
