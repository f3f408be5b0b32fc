"""Launcher: neox-style rotary embedding of q and k in one kernel (HF numerics order, see reference.py)."""

from __future__ import annotations

import torch

from ..utils import cdiv, check_same_device, check_tensor, is_interpreter, next_power_of_2
from .norm import FLOAT_DTYPES
from .rotary_kernel import rotary_cache_kernel, rotary_kernel

ROW_TILE = 1024  # elements of each half-head tile per program (BLOCK_H heads x BLOCK_D2)


def _check_rotary_args(q, k, cos, sin, positions, out_q=None) -> None:
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("k", k, 3, FLOAT_DTYPES)
    check_tensor("cos", cos, 2, FLOAT_DTYPES)
    check_tensor("sin", sin, 2, FLOAT_DTYPES)
    check_tensor("positions", positions, 1, (torch.int32, torch.int64))
    T, _, D = q.shape
    if k.dtype != q.dtype:
        raise ValueError(f"k dtype ({k.dtype}) must equal q dtype ({q.dtype})")
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k must be [{T}, Hkv, {D}] like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if cos.shape != sin.shape or cos.shape[1] != D:
        raise ValueError(f"cos and sin must both be [max_pos, {D}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if positions.shape[0] != T:
        raise ValueError(f"positions must be [{T}] (one per token), got {tuple(positions.shape)}")
    if out_q is not None and (out_q.shape != q.shape or out_q.dtype != q.dtype):
        raise ValueError(f"out_q must be {tuple(q.shape)} {q.dtype}, got {tuple(out_q.shape)} {out_q.dtype}")


def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    out_q: torch.Tensor | None = None,
    out_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their token's position: ``x * cos[p] + rotate_half(x) * sin[p]`` (rotate_half on halves).

    q:         [T, Hq, D] fp16 / bf16 / fp32, last dim contiguous, token and head strides free (views split from a
               fused qkv output are fine)
    k:         [T, Hkv, D] same dtype, same rules
    cos, sin:  [max_pos, D] float tables (RotaryEmbedding's fp32 buffers), last dim contiguous; each row is cast
               to q.dtype before use, as HF does. Positions must be < max_pos (not checked: no host sync).
    positions: int32 / int64 [T]
    out_q, out_k: optional outputs shaped like q / k (same dtype, last dim contiguous); passing ``out_q=q,
               out_k=k`` rotates in place. Default: new contiguous tensors; q and k are left unchanged.
    Returns (out_q, out_k).
    """
    _check_rotary_args(q, k, cos, sin, positions)
    T, Hq, D = q.shape
    if out_q is None:
        out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        check_tensor("out_q", out_q, 3, (q.dtype,))
        if out_q.shape != q.shape:
            raise ValueError(f"out_q must be {tuple(q.shape)}, got {tuple(out_q.shape)}")
    if out_k is None:
        out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    else:
        check_tensor("out_k", out_k, 3, (k.dtype,))
        if out_k.shape != k.shape:
            raise ValueError(f"out_k must be {tuple(k.shape)}, got {tuple(out_k.shape)}")
    check_same_device(q=q, k=k, cos=cos, sin=sin, positions=positions, out_q=out_q, out_k=out_k)
    Hkv = k.shape[1]
    if T == 0 or D == 0 or Hq + Hkv == 0:
        return out_q, out_k
    half = D // 2
    block_d2 = next_power_of_2(half)
    block_h = max(1, min(next_power_of_2(max(Hq, Hkv)), ROW_TILE // block_d2))
    grid = (T, cdiv(Hq, block_h) + cdiv(Hkv, block_h))
    rotary_kernel[grid](
        q, k, out_q, out_k, cos, sin, positions, Hq, Hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        out_q.stride(0), out_q.stride(1), out_k.stride(0), out_k.stride(1),
        cos.stride(0), sin.stride(0),
        HALF=half, BLOCK_H=block_h, BLOCK_D2=block_d2, num_warps=1 if is_interpreter() else 4,
    )
    return out_q, out_k


def rotary_embedding_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    out_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`rotary_embedding` of q, with the rotated k and v stored straight into the paged KV cache (the
    attention's ``write_kv_cache``) in the same launch: one kernel per layer instead of two, and k never goes
    through memory unrotated-then-rotated.

    q:            [T, Hq, D]; k, v: [T, Hkv, D], same dtype as the caches, last dim contiguous, other strides free
    cos, sin, positions: as in :func:`rotary_embedding`
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], written in place (slot = block * block_size + offset)
    slot_mapping: int64 [T]; -1 = this token's K/V are not stored
    Returns the rotated q (``out_q`` or a new contiguous tensor). No host sync.
    """
    check_tensor("v", v, 3, FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES)
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,))
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be [num_blocks, P, "
                         f"{k.shape[1]}, {k.shape[2]}]")
    if k_cache.dtype != k.dtype or v_cache.dtype != v.dtype or v.dtype != k.dtype:
        raise ValueError("k, v and the caches must share one dtype (the fused store does not convert)")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must have T={k.shape[0]} entries, got {slot_mapping.shape[0]}")
    _check_rotary_args(q, k, cos, sin, positions, out_q)
    check_same_device(q=q, k=k, v=v, cos=cos, sin=sin, positions=positions, k_cache=k_cache, v_cache=v_cache,
                      slot_mapping=slot_mapping)
    if out_q is None:
        out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if T == 0 or Hq + Hkv == 0:
        return out_q
    half = D // 2
    block_d2 = next_power_of_2(half)
    block_h = max(1, min(next_power_of_2(max(Hq, Hkv)), ROW_TILE // block_d2))
    grid = (T, cdiv(Hq, block_h) + 2 * cdiv(Hkv, block_h))
    rotary_cache_kernel[grid](
        q, k, v, out_q, k_cache, v_cache, cos, sin, positions, slot_mapping, Hq, Hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out_q.stride(0), out_q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos.stride(0), sin.stride(0),
        PAGE_SIZE=k_cache.shape[1], HALF=half, BLOCK_H=block_h, BLOCK_D2=block_d2,
        num_warps=1 if is_interpreter() else 4,
    )
    return out_q
