"""@triton.jit code of the gated-MLP activation silu(gate) * up."""

import triton.language as tl

from ..utils import jit_unspecialized


@jit_unspecialized("T")
def silu_and_mul_kernel(
    x_ptr,  # [T, 2I] = [gate | up], last dim contiguous
    out_ptr,  # [T, I], last dim contiguous
    T,
    I,
    stride_x,
    stride_o,
    BLOCK: tl.constexpr,
):
    """Grid (T, cdiv(I, BLOCK)). silu in fp32 rounded to the activation dtype, then the product (as torch/HF)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(dtype), mask=mask)
