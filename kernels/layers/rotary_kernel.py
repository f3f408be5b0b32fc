"""@triton.jit code of the neox-style rotary embedding (rotate_half over the two halves of each head)."""

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr, stride_it, stride_ih, stride_ot, stride_oh,
    t, h0, num_heads, c1, c2, s1, s2,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """Rotate heads h0 .. h0+BLOCK_H-1 of token t: out = x * cos + rotate_half(x) * sin, rounded as HF does
    (each product and the sum in the activation dtype; cos/sin already rounded to it by the caller)."""
    dtype = out_ptr.dtype.element_ty
    heads = h0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D2)
    mask = (heads < num_heads)[:, None] & (d < HALF)[None, :]
    src = in_ptr + t * stride_it + heads[:, None] * stride_ih + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o1.to(dtype), mask=mask)
    tl.store(dst + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, pos_ptr, t, stride_cos, stride_sin, dtype: tl.constexpr, HALF: tl.constexpr,
             BLOCK_D2: tl.constexpr):
    """Token t's cos/sin table rows, halves [1, BLOCK_D2] each, rounded to the activation dtype as HF does."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D2)
    dm = d < HALF
    c1 = tl.load(cos_ptr + pos * stride_cos + d, mask=dm, other=0.0).to(dtype).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + d, mask=dm, other=0.0).to(dtype).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * stride_sin + d, mask=dm, other=0.0).to(dtype).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + d, mask=dm, other=0.0).to(dtype).to(tl.float32)[None, :]
    return c1, c2, s1, s2


@triton.jit
def rotary_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    qo_ptr,  # [T, Hq, D] (may alias q)
    ko_ptr,  # [T, Hkv, D] (may alias k)
    cos_ptr,  # [max_pos, D]
    sin_ptr,  # [max_pos, D]
    pos_ptr,  # int32 / int64 [T]
    Hq, Hkv,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D2: tl.constexpr,
):
    """Grid (T, cdiv(Hq, BLOCK_H) + cdiv(Hkv, BLOCK_H)): one token, one block of q heads or of k heads."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    num_q_blocks = tl.cdiv(Hq, BLOCK_H)
    dtype = qo_ptr.dtype.element_ty
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, pos_ptr, t, stride_cos, stride_sin, dtype, HALF, BLOCK_D2)
    if hb < num_q_blocks:
        _rotate_heads(q_ptr, qo_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, t, hb * BLOCK_H, Hq,
                      c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_D2)
    else:
        _rotate_heads(k_ptr, ko_ptr, stride_kt, stride_kh, stride_kot, stride_koh, t, (hb - num_q_blocks) * BLOCK_H,
                      Hkv, c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_D2)


@triton.jit
def rotary_cache_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    qo_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_cache_ptr,  # [num_blocks, PAGE, Hkv, D]
    cos_ptr,  # [max_pos, D]
    sin_ptr,  # [max_pos, D]
    pos_ptr,  # int32 / int64 [T]
    slot_ptr,  # int64 [T]; -1 = do not store this token's K/V
    Hq, Hkv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh,
    stride_kcb, stride_kcp, stride_kch, stride_vcb, stride_vcp, stride_vch,
    stride_cos, stride_sin,
    PAGE_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D2: tl.constexpr,
):
    """Grid (T, nq + 2 * nk) with nq = cdiv(Hq, BLOCK_H), nk = cdiv(Hkv, BLOCK_H): a block of q heads is rotated
    into qo; a block of k heads is rotated straight into its paged cache slot; a block of v heads is copied there."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    nq = tl.cdiv(Hq, BLOCK_H)
    nk = tl.cdiv(Hkv, BLOCK_H)
    dtype = qo_ptr.dtype.element_ty
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, pos_ptr, t, stride_cos, stride_sin, dtype, HALF, BLOCK_D2)
    if hb < nq:
        _rotate_heads(q_ptr, qo_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, t, hb * BLOCK_H, Hq,
                      c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_D2)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            blk = slot // PAGE_SIZE
            row = slot % PAGE_SIZE
            if hb < nq + nk:  # the cache row is the output "token" (token stride 0)
                _rotate_heads(k_ptr, k_cache_ptr + blk * stride_kcb + row * stride_kcp, stride_kt, stride_kh, 0,
                              stride_kch, t, (hb - nq) * BLOCK_H, Hkv, c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_D2)
            else:
                heads = (hb - nq - nk) * BLOCK_H + tl.arange(0, BLOCK_H)
                d = tl.arange(0, BLOCK_D2)
                mask = (heads < Hkv)[:, None] & (d < HALF)[None, :]
                src = v_ptr + t * stride_vt + heads[:, None] * stride_vh + d[None, :]
                dst = v_cache_ptr + blk * stride_vcb + row * stride_vcp + heads[:, None] * stride_vch + d[None, :]
                cdt = v_cache_ptr.dtype.element_ty
                tl.store(dst, tl.load(src, mask=mask).to(cdt), mask=mask)
                tl.store(dst + HALF, tl.load(src + HALF, mask=mask).to(cdt), mask=mask)
