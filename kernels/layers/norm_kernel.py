"""@triton.jit code of RMSNorm, optionally fused with the residual add that precedes it."""

import triton.language as tl

from ..utils import jit_unspecialized


@jit_unspecialized("M")
def rms_norm_kernel(
    x_ptr,  # [A, B, N] (two row strides; last dim contiguous)
    res_ptr,  # [A, B, N] residual (read when HAS_RESIDUAL)
    w_ptr,  # [N]
    out_ptr,  # [A, B, N] normed output
    res_out_ptr,  # [A, B, N] new residual = x + residual (written when HAS_RESIDUAL)
    M,  # number of rows, A * B
    B,
    N,
    stride_xa, stride_xb,
    stride_ra, stride_rb,
    stride_oa, stride_ob,
    stride_qa, stride_qb,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,  # BLOCK_N >= N: the rows stay in registers between the statistics and the output
):
    """Grid (cdiv(M, BLOCK_M),); each program normalizes BLOCK_M rows.

    HF order: s = x + residual rounded to the activation dtype; rstd = 1/sqrt(mean(s.f32^2) + eps) in fp32;
    out = (w * (s.f32 * rstd).to(dtype)) with one rounding of the product.
    """
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    ra = rows // B
    rb = rows % B
    x_row = (ra * stride_xa + rb * stride_xb)[:, None]
    r_row = (ra * stride_ra + rb * stride_rb)[:, None]
    o_row = (ra * stride_oa + rb * stride_ob)[:, None]
    q_row = (ra * stride_qa + rb * stride_qb)[:, None]
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + x_row + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + r_row + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + q_row + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=1) / N + eps)
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = (xf * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
        tl.store(out_ptr + o_row + cols[None, :], y.to(dtype), mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_ptr + x_row + c[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + r_row + c[None, :], mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(res_out_ptr + q_row + c[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            acc += xf * xf
        rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            # second pass: the (new) residual this program wrote, or x again
            if HAS_RESIDUAL:
                x = tl.load(res_out_ptr + q_row + c[None, :], mask=mask, other=0.0)
            else:
                x = tl.load(x_ptr + x_row + c[None, :], mask=mask, other=0.0)
            w = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)
            y = (x.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
            tl.store(out_ptr + o_row + c[None, :], y.to(dtype), mask=mask)
