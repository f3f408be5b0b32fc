"""Launcher: causal paged prefill attention (chunked prefill with a cached prefix, variable-length batch)."""

from __future__ import annotations

import torch

from ..utils import cdiv, check_same_device, check_tensor, is_hopper, is_interpreter, num_sms, register_cap
from .decode import FLOAT_DTYPES, dot_precision, validate_paged_kv
from .paged_common import fast_offsets
from .prefill_kernel import paged_prefill_kernel


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device, tiles_128: int = 0) -> dict:
    """BLOCK_M / BLOCK_N / num_warps / num_stages (and `maxnreg`) of the prefill kernel for a launch of
    ``tiles_128`` (128-query tile, head, sequence) work items (one small config under the interpreter)."""
    if is_interpreter():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        if head_dim == 128 and is_hopper(device) and tiles_128 > num_sms(device):
            # Registers capped at 128 (some spill): two 8-warp programs per SM instead of one. 1.13x at a 4k/16k
            # full prefill, 1.29-1.32x on 1-4k-query chunks over 16-64k keys (256-2048 programs) on an H100;
            # 0.81x when the grid is one program per SM anyway (128 programs: 512 queries over 4k keys)
            # (bench/tune_attention.py --prefill, 20261127T125525Z)
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3 if is_hopper(device) else 2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def validate_prefill_inputs(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, max_seqlen_q):
    """Shared ValueError checks of the prefill / POD launchers; returns (Tq, Hq, D, B)."""
    check_tensor("q", q, 3, FLOAT_DTYPES)
    Tq, Hq, D = q.shape
    validate_paged_kv(k_cache, v_cache, D, q.dtype)
    check_tensor("block_table", block_table, 2, (torch.int32,))
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    check_same_device(q=q, k_cache=k_cache, block_table=block_table, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    B = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != B + 1 or block_table.shape[0] != B:
        raise ValueError(f"cu_seqlens_q must be [B+1], block_table [B, *] for B={B}; got "
                         f"{tuple(cu_seqlens_q.shape)}, {tuple(block_table.shape)}")
    if Hq % k_cache.shape[2] != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({k_cache.shape[2]})")
    if not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be a non-negative host int, got {max_seqlen_q!r}")
    return Tq, Hq, D, B


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    max_seqlen_q: int,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal prefill attention of packed query chunks over a paged KV cache (chunk K/V already written).

    q:            [Tq, Hq, D]                         packed queries of B sequences (last dim contiguous)
    k_cache:      [num_blocks, block_size, Hkv, D]    same dtype as q; any strides, last dim contiguous
    v_cache:      [num_blocks, block_size, Hkv, D]
    block_table:  int32 [B, max_blocks_per_seq]
    cu_seqlens_q: int32 [B + 1]                       query offsets; q_len_b = cu[b+1] - cu[b]
    seq_lens:     int32 [B]                           total KV length of each sequence (>= q_len_b)
    max_seqlen_q: host int >= max_b q_len_b           sizes the grid (no host sync)
    out:          optional [Tq, Hq, D] (q.dtype);  lse: optional fp32 [Tq, Hq]
    config:       tile-size override (keys of `prefill_config`; `maxnreg` caps registers), for tuning.
    Query i of sequence b sits at position seq_lens[b] - q_len_b + i and attends to keys at positions <= it.
    Returns (out, lse), lse = natural-log LSE of the scaled scores.
    """
    Tq, Hq, D, B = validate_prefill_inputs(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, max_seqlen_q)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    if lse is None:
        lse = torch.empty(Tq, Hq, dtype=torch.float32, device=q.device)
    elif lse.shape != (Tq, Hq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [{Tq}, {Hq}]")
    if Tq == 0 or B == 0 or max_seqlen_q == 0:
        return out, lse
    cfg = config if config is not None else prefill_config(D, q.dtype, q.device, cdiv(max_seqlen_q, 128) * Hq * B)
    grid = (cdiv(max_seqlen_q, cfg["BLOCK_M"]), Hq, B)
    paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, lse,
        *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        *out.stride()[:2], *lse.stride(), float(scale) * 1.4426950408889634,
        GROUP=Hq // k_cache.shape[2], HEAD_DIM=D, PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], DOT_PRECISION=dot_precision(q.dtype),
        FAST_OFFSETS=fast_offsets(k_cache, v_cache), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **register_cap(cfg, q.device),
    )
    return out, lse
