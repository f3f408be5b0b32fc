"""Launcher: silu(gate) * up of a fused gate|up projection output (HF numerics order, see reference.py)."""

from __future__ import annotations

import torch

from ..utils import cdiv, check_same_device, is_interpreter, next_power_of_2
from .activation_kernel import silu_and_mul_kernel
from .norm import FLOAT_DTYPES

MAX_BLOCK = 1024


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., 2I] = [gate | up] (fp16 / bf16 / fp32, last dim contiguous) -> silu(gate) * up: [..., I].

    out: optional [..., I] (x.dtype, last dim contiguous, viewable as [rows, I]). Default: a new contiguous tensor.
    Returns out.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be [..., 2I] with dtype in {FLOAT_DTYPES}, got shape {tuple(x.shape)} {x.dtype}")
    if x.shape[-1] % 2:
        raise ValueError(f"x last dim must be even ([gate | up]), got {x.shape[-1]}")
    if x.numel() > 0 and x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in its last dim (stride(-1)==1), got strides {x.stride()}")
    I = x.shape[-1] // 2
    shape = (*x.shape[:-1], I)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {shape} {x.dtype}, got "
                         f"{(tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__}")
    elif out.numel() > 0 and I > 1 and out.stride(-1) != 1:
        raise ValueError(f"out must be contiguous in its last dim (stride(-1)==1), got strides {out.stride()}")
    check_same_device(x=x, out=out)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, 2 * I)  # a view unless the leading dims are not collapsible (then a copy of the input)
    try:
        o2 = out.view(-1, I)
    except RuntimeError:
        raise ValueError(f"out must be viewable as [-1, {I}], got strides {out.stride()}") from None
    T = x2.shape[0]
    block = min(next_power_of_2(I), MAX_BLOCK)
    silu_and_mul_kernel[(T, cdiv(I, block))](
        x2, o2, T, I, x2.stride(0), o2.stride(0), BLOCK=block,
        num_warps=1 if is_interpreter() else max(1, min(8, block // 256)),
    )
    return out
