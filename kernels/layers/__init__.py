"""Triton kernels of the decoder layer's elementwise work, each beside a plain torch reference (reference.py).

All follow HF transformers' numerics order (statistics in fp32, values rounded to the activation dtype where HF
rounds them), never sync with the host (CUDA-graph safe) and accept any token count T >= 0.
"""

from .activation import silu_and_mul
from .norm import fused_add_rms_norm, rms_norm
from .rotary import rotary_embedding, rotary_embedding_with_cache

__all__ = ["fused_add_rms_norm", "rms_norm", "rotary_embedding", "rotary_embedding_with_cache", "silu_and_mul"]
