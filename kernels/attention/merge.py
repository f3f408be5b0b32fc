"""Launcher: merge two attention states (out, lse) over disjoint key sets (ring attention, cascade)."""

from __future__ import annotations

import torch

from ..utils import cdiv, check_same_device, check_tensor, is_interpreter, is_power_of_2, next_power_of_2
from .decode import FLOAT_DTYPES
from .merge_kernel import merge_states_kernel


def merge_attention_states(
    o1: torch.Tensor,
    lse1: torch.Tensor,
    o2: torch.Tensor,
    lse2: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attention results over two disjoint key sets.

    o1, o2:        [N, H, D]   (fp16 / bf16 / fp32, same shape; last dim contiguous)
    lse1, lse2:    fp32 [N, H] natural-log LSE of each part; -inf = that part saw no key (its o is ignored)
    out:           optional [N, H, D] (o1.dtype); may alias o1 or o2 (each element is read before written)
    out_lse:       optional fp32 [N, H]; may alias lse1 or lse2
    Returns (out, out_lse); both sides -inf -> out 0, lse -inf.
    """
    check_tensor("o1", o1, 3, FLOAT_DTYPES)
    check_tensor("o2", o2, 3, FLOAT_DTYPES)
    check_tensor("lse1", lse1, 2, (torch.float32,))
    check_tensor("lse2", lse2, 2, (torch.float32,))
    check_same_device(o1=o1, o2=o2, lse1=lse1, lse2=lse2)
    if o1.shape != o2.shape or lse1.shape != o1.shape[:2] or lse2.shape != o1.shape[:2]:
        raise ValueError(f"shape mismatch: o1 {tuple(o1.shape)}, o2 {tuple(o2.shape)}, "
                         f"lse1 {tuple(lse1.shape)}, lse2 {tuple(lse2.shape)}")
    N, H, D = o1.shape
    if not is_power_of_2(D):
        raise ValueError(f"head_dim must be a power of two, got {D}")
    if out is None:
        out = torch.empty_like(o1)
    elif out.shape != o1.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(o1.shape)} with a contiguous last dim")
    if out_lse is None:
        out_lse = torch.empty(N, H, dtype=torch.float32, device=o1.device)
    elif out_lse.shape != (N, H) or out_lse.dtype != torch.float32:
        raise ValueError(f"out_lse must be fp32 [{N}, {H}]")
    if N == 0 or H == 0:
        return out, out_lse
    block_h = min(next_power_of_2(H), max(1, 4096 // D))
    merge_states_kernel[(N, cdiv(H, block_h))](
        o1, lse1, o2, lse2, out, out_lse, H,
        o1.stride(0), o1.stride(1), lse1.stride(0), lse1.stride(1),
        o2.stride(0), o2.stride(1), lse2.stride(0), lse2.stride(1),
        out.stride(0), out.stride(1), out_lse.stride(0), out_lse.stride(1),
        BLOCK_H=block_h, HEAD_DIM=D, num_warps=1 if is_interpreter() else 4,
    )
    return out, out_lse
