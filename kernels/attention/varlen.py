"""Launcher: non-paged varlen attention with explicit positions (ring attention / sequence parallelism)."""

from __future__ import annotations

import torch

from ..utils import cdiv, check_same_device, check_tensor, is_interpreter, is_power_of_2, register_cap
from .decode import FLOAT_DTYPES, dot_precision
from .prefill import prefill_config
from .varlen_kernel import varlen_pos_kernel, varlen_tile_bounds_kernel


def varlen_tile_bounds(q_pos: torch.Tensor, k_pos: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int, block_m: int, block_n: int) -> torch.Tensor:
    """Per query tile of BLOCK_M rows: int32 [B, cdiv(max_seqlen_q, block_m), 2] = (full_end, kv_end), key offsets
    within the sequence: keys [0, full_end) are visible to every row of the tile (whole BLOCK_N tiles, in bounds),
    keys >= kv_end to none. Entries of tiles past a sequence's queries are left unwritten. (One tiny launch.)"""
    B = cu_seqlens_q.shape[0] - 1
    m_tiles = cdiv(max_seqlen_q, block_m)
    bounds = torch.empty(B, m_tiles, 2, dtype=torch.int32, device=q_pos.device)
    if B > 0 and m_tiles > 0:
        varlen_tile_bounds_kernel[(m_tiles, B)](
            q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, bounds,
            BLOCK_M=block_m, BLOCK_N=block_n, CHUNK_TILES=4 if is_interpreter() else max(1, 2048 // block_n),
            num_warps=1 if is_interpreter() else 4,
        )
    return bounds


def varlen_attention_with_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    prev_out: torch.Tensor | None = None,
    prev_lse: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed, non-paged K/V where key j is visible to query i iff k_pos[j] <= q_pos[i].

    q:            [Tq, Hq, D]      (fp16 / bf16 / fp32; last dim contiguous)
    k, v:         [Tk, Hkv, D]     same dtype as q
    q_pos:        int32 [Tq]       absolute positions of the queries (any order, may have gaps)
    k_pos:        int32 [Tk]       absolute positions of the keys (any order; sorted runs are fastest)
    cu_seqlens_q: int32 [B + 1];   cu_seqlens_k: int32 [B + 1]   (sequence b: q rows cu_q[b]:cu_q[b+1], etc.)
    max_seqlen_q: host int (grid size); max_seqlen_k: host int (validated, informational)
    out:          optional [Tq, Hq, D] of q.dtype or fp32;  lse: optional fp32 [Tq, Hq]
    out_dtype:    dtype of a newly allocated out (default q.dtype; fp16 / bf16 / fp32)
    prev_out, prev_lse: optional earlier attention state ([Tq, Hq, D] any float dtype, fp32 [Tq, Hq]) over a
                  key set disjoint from k: the result is merged with it (as merge_attention_states would) before it
                  is stored. out / lse may alias prev_out / prev_lse (in-place accumulation across ring hops).
    config:       tile-size override (keys of `prefill_config`; `maxnreg` caps registers), for tuning.
    Returns (out, lse); rows with no visible key: out 0, lse -inf (mergeable with merge_attention_states).
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("k", k, 3, (q.dtype,))
    check_tensor("v", v, 3, (q.dtype,))
    for name, t in (("q_pos", q_pos), ("k_pos", k_pos), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, t, 1, (torch.int32,))
    check_same_device(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      out=out, lse=lse, prev_out=prev_out, prev_lse=prev_lse)
    Tq, Hq, D = q.shape
    Tk, Hkv, Dk = k.shape
    if v.shape != k.shape or Dk != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must be [Tk, Hkv, {D}]")
    if Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if not (is_power_of_2(D) and 16 <= D <= 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {D}")
    if q_pos.shape[0] != Tq or k_pos.shape[0] != Tk:
        raise ValueError("q_pos / k_pos lengths must equal Tq / Tk")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be [B + 1]")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative host int, got {val!r}")
    if out_dtype is not None and out_dtype not in (q.dtype, torch.float32):
        raise ValueError(f"out_dtype must be q.dtype ({q.dtype}) or torch.float32, got {out_dtype}")
    if out is None:
        out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    elif (out.shape != q.shape or out.dtype not in (q.dtype, torch.float32) or out.stride(-1) != 1
          or (out_dtype is not None and out.dtype != out_dtype)):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} or float32 with a contiguous last dim")
    if lse is None:
        lse = torch.empty(Tq, Hq, dtype=torch.float32, device=q.device)
    elif lse.shape != (Tq, Hq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [{Tq}, {Hq}]")
    merge = prev_out is not None or prev_lse is not None
    if merge:
        if prev_out is None or prev_lse is None:
            raise ValueError("prev_out and prev_lse must be given together")
        check_tensor("prev_out", prev_out, 3, FLOAT_DTYPES)
        check_tensor("prev_lse", prev_lse, 2, (torch.float32,))
        if prev_out.shape != q.shape or prev_lse.shape != (Tq, Hq):
            raise ValueError(f"prev_out / prev_lse must be {tuple(q.shape)} / [{Tq}, {Hq}], got "
                             f"{tuple(prev_out.shape)} / {tuple(prev_lse.shape)}")
    B = cu_seqlens_q.shape[0] - 1
    if Tq == 0 or B <= 0 or max_seqlen_q == 0:
        return out, lse
    cfg = prefill_config(D, q.dtype, q.device) if config is None else config
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_tiles = cdiv(max_seqlen_q, block_m)
    bounds = varlen_tile_bounds(q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_m, block_n)
    po, pl = (prev_out, prev_lse) if merge else (out, lse)
    varlen_pos_kernel[(m_tiles, Hq, B)](
        q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, bounds, out, lse, po, pl,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        po.stride(0), po.stride(1), pl.stride(0), pl.stride(1),
        float(scale) * 1.4426950408889634,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, MERGE=merge,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **register_cap(cfg, q.device),
    )
    return out, lse
