"""Launchers: RMSNorm and RMSNorm fused with the residual add before it (HF numerics order, see reference.py)."""

from __future__ import annotations

import torch

from ..utils import cdiv, check_same_device, is_interpreter, next_power_of_2
from .norm_kernel import rms_norm_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BLOCK_N = 8192  # rows up to this many elements stay in registers (one pass); longer rows take two passes
ROW_TILE = 2048  # elements per program for short rows (per-head qk-norm packs 2048 // head_dim rows)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: ``weight * (x.f32 * rsqrt(mean(x.f32^2) + eps)).to(x.dtype)``.

    x:      [..., H] fp16 / bf16 / fp32, last dim contiguous; leading dims may be strided (e.g. q of a fused qkv
            output viewed as [T, heads, D], for per-head qk-norm)
    weight: [H] (x.dtype, contiguous)
    out:    optional [..., H] (x.dtype, last dim contiguous); may alias x. Default: a new contiguous tensor.
    Returns out.
    """
    out, _ = _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to x.dtype), then ``rms_norm(s)``, in one pass over memory.

    x, residual:  [..., H] same shape and dtype, last dim contiguous (a decoder layer's sublayer output and the
                  running residual stream)
    out:          optional normed output; may alias x or residual (not residual_out)
    residual_out: optional new residual s; may alias x or residual (in-place update of the residual stream)
    Returns (out, residual_out); both new contiguous tensors unless given.
    """
    if not isinstance(residual, torch.Tensor):
        raise ValueError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    return _launch(x, residual, weight, eps, out, residual_out)


def _as_rows(name: str, t: torch.Tensor, *, output: bool) -> torch.Tensor:
    """[..., H] -> a [A, B, H] view (A * B rows with two strides). Inputs that do not fit are copied; outputs raise."""
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, t.shape[-2], t.shape[-1])
    except RuntimeError:
        if output:
            raise ValueError(f"{name} with {t.dim()} dims must be viewable as [-1, {t.shape[-2]}, {t.shape[-1]}], "
                             f"got strides {t.stride()}") from None
        return t.reshape(-1, t.shape[-2], t.shape[-1])


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape or t.dtype != x.dtype:
        raise ValueError(f"{name} must match x: shape {tuple(x.shape)} dtype {x.dtype}, "
                         f"got shape {tuple(t.shape)} dtype {t.dtype}")
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride(-1)==1), got strides {t.stride()}")


def _launch(x, residual, weight, eps, out, residual_out):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim [..., H]")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    _check_like("x", x, x)
    H = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != H:
        raise ValueError(f"weight must be a [{H}] tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype ({weight.dtype}) must equal x dtype ({x.dtype})")
    if H > 1 and weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous, got stride {weight.stride()}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if residual is not None:
        _check_like("residual", residual, x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _check_like("out", out, x)
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        else:
            _check_like("residual_out", residual_out, x)
        if residual_out.numel() > 0 and out.data_ptr() == residual_out.data_ptr():
            raise ValueError("out and residual_out must not alias")
    check_same_device(x=x, weight=weight, residual=residual, out=out, residual_out=residual_out)
    if x.numel() == 0:
        return out, residual_out
    x3 = _as_rows("x", x, output=False)
    r3 = _as_rows("residual", residual, output=False) if residual is not None else x3
    o3 = _as_rows("out", out, output=True)
    q3 = _as_rows("residual_out", residual_out, output=True) if residual is not None else o3
    A, B, _ = x3.shape
    block_n = min(next_power_of_2(H), MAX_BLOCK_N)
    block_m = max(1, ROW_TILE // block_n)
    num_warps = 1 if is_interpreter() else min(16, max(1, block_m * block_n // 512))
    rms_norm_kernel[(cdiv(A * B, block_m),)](
        x3, r3, weight, o3, q3, A * B, B, H,
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        o3.stride(0), o3.stride(1), q3.stride(0), q3.stride(1),
        float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=block_n >= H,
        num_warps=num_warps,
    )
    return out, residual_out
