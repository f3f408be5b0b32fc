"""Launcher: write new K/V tokens into the paged KV cache (in place)."""

from __future__ import annotations

import torch

from ..utils import cdiv, check_same_device, check_tensor, is_interpreter, is_power_of_2, next_power_of_2
from .decode import FLOAT_DTYPES
from .kv_cache_kernel import write_kv_cache_kernel


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter K/V rows into the paged cache: cache[slot // block_size, slot % block_size] = row.

    k, v:          [T, Hkv, D]                        (any float dtype; cast to the cache dtype)
    k_cache:       [num_blocks, block_size, Hkv, D]   written in place; any strides, last dim contiguous
    v_cache:       [num_blocks, block_size, Hkv, D]
    slot_mapping:  int64 [T]                          slot = block_id * block_size + offset; -1 = skip token
    No host sync; slots must be distinct (duplicate slots: unspecified which row wins).
    """
    check_tensor("k", k, 3, FLOAT_DTYPES)
    check_tensor("v", v, 3, FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES)
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,))
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    T, Hkv, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != (Hkv, D):
        raise ValueError(f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be [num_blocks, P, {Hkv}, {D}]")
    if slot_mapping.shape[0] != T:
        raise ValueError(f"slot_mapping must have T={T} entries, got {slot_mapping.shape[0]}")
    if not is_power_of_2(k_cache.shape[1]) or not is_power_of_2(D):
        raise ValueError("block_size and head_dim must be powers of two")
    if T == 0:
        return
    block_h = min(next_power_of_2(Hkv), max(1, 4096 // D))
    write_kv_cache_kernel[(T, cdiv(Hkv, block_h))](
        k, v, k_cache, v_cache, slot_mapping, Hkv,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        PAGE_SIZE=k_cache.shape[1], BLOCK_H=block_h, HEAD_DIM=D, num_warps=1 if is_interpreter() else 4,
    )
