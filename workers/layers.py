"""Building blocks of the Llama family: RMSNorm, rotary embedding (with llama3 scaling), gated MLP.

Numerics follow HF transformers (norm statistics in fp32, rotation in the activation dtype) so greedy output is
token-for-token equal to the reference.

CUDA tensors go through the fused Triton kernels of :mod:`accordion.kernels.layers` (same numerics order, one launch
per op instead of a chain of elementwise ones); everything else runs the plain torch code. :func:`use_triton` is the
one place that decides.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from accordion.kernels import layers as kernels


def use_triton(x: torch.Tensor) -> bool:
    """Whether the layers below run their Triton kernel on ``x`` (CUDA tensors) or the torch code (CPU: HF-exact)."""
    return x.is_cuda


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., dim] -> normed [..., dim].

        With ``residual`` (the decoder's residual stream), the residual add before the norm is fused into it:
        ``s = residual + x`` (in x.dtype, as HF) -> ``(norm(s), s)``.
        """
        if use_triton(x):
            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over the full head_dim, with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling is not None:
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; q: [T, Hq, D]; k: [T, Hkv, D] (strided views are fine) -> rotated (q, k), new tensors."""
        if use_triton(q):
            return kernels.rotary_embedding(q, k, self.cos, self.sin, positions)
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # [T, 1, D]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


    def forward_into_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor | None:
        """Rotated q, with the rotated k and v already stored in ``kv_cache`` [2, N, bs, Hkv, D] at
        ``slot_mapping`` [T] (one Triton launch); None where that fused path does not apply (CPU, dtype
        mismatch), and the caller rotates and stores separately."""
        if not use_triton(q) or kv_cache.dtype != k.dtype:
            return None
        return kernels.rotary_embedding_with_cache(q, k, v, self.cos, self.sin, positions, kv_cache[0], kv_cache[1],
                                                   slot_mapping)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if use_triton(gate_up):
            return self.down(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)
