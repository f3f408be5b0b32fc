"""Plain torch references of the layer kernels, in HF transformers' numerics order (the kernels' specification).

Every reference keeps the activation dtype where HF keeps it: statistics in fp32, the normalized value cast back to the
input dtype, products and sums rounded to the activation dtype one operation at a time.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H]; weight: [H] (x.dtype) -> weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def ref_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ref_rms_norm(residual + x), residual + x), the sum rounded to x.dtype."""
    new_residual = residual + x
    return ref_rms_norm(new_residual, weight, eps), new_residual


def ref_rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def ref_rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary: q [T, Hq, D], k [T, Hkv, D]; cos/sin [max_pos, D]; positions [T] -> new (q, k).

    The table rows are cast to q.dtype first, then ``x * cos + rotate_half(x) * sin`` in q.dtype (as HF).
    """
    c = cos[positions].to(q.dtype)[:, None, :]  # [T, 1, D]
    s = sin[positions].to(q.dtype)[:, None, :]
    return q * c + ref_rotate_half(q) * s, k * c + ref_rotate_half(k) * s


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2I] = [gate | up] -> silu(gate) * up: [..., I] (silu rounded to x.dtype, then the product)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
