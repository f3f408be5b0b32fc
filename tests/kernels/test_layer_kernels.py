"""Layer kernels (RMSNorm, fused residual-add RMSNorm, rotary, silu-and-mul) vs the torch references.

CPU: fp32 through TRITON_INTERPRET=1 at small shapes (atol = rtol = 1e-5). The interpreter rounds fp32 -> bf16 by
truncation (the GPU rounds to nearest even), so 16-bit exactness is only checked on the GPU (@pytest.mark.gpu, bf16,
real sizes). Outputs are pre-filled with NaN so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from accordion.kernels.attention.reference import ref_write_kv_cache
from accordion.kernels.layers import (
    fused_add_rms_norm,
    rms_norm,
    rotary_embedding,
    rotary_embedding_with_cache,
    silu_and_mul,
)
from accordion.kernels.layers import norm as norm_module
from accordion.kernels.layers.reference import (
    ref_fused_add_rms_norm,
    ref_rms_norm,
    ref_rotary_embedding,
    ref_silu_and_mul,
)

from .attn_helpers import device, poisoned

TOL = dict(atol=1e-5, rtol=1e-5)
F32 = torch.float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=F32, dev=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(dev or device())


def _close(out, ref, tol=TOL):
    assert not torch.isnan(out).any(), "unwritten (NaN) elements"
    torch.testing.assert_close(out, ref, **tol)


# ----------------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("H", [64, 100])
def test_rms_norm_matches_reference(T, H):
    gen = _gen(T * 1000 + H)
    x, w = _randn(T, H, gen=gen), _randn(H, gen=gen)
    out = poisoned((T, H), F32, device())
    assert rms_norm(x, w, 1e-6, out=out) is out
    _close(out, ref_rms_norm(x, w, 1e-6))
    _close(rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("T", [1, 5])
def test_fused_add_rms_norm_matches_reference(T):
    gen = _gen(50 + T)
    x, r, w = _randn(T, 96, gen=gen), _randn(T, 96, gen=gen), _randn(96, gen=gen)
    out, res_out = poisoned((T, 96), F32, device()), poisoned((T, 96), F32, device())
    got = fused_add_rms_norm(x, r, w, 1e-5, out=out, residual_out=res_out)
    assert got[0] is out and got[1] is res_out
    ref, ref_res = ref_fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res_out, ref_res)  # one fp32 add each: exact
    _close(out, ref)


def test_fused_add_rms_norm_in_place_and_empty():
    """The vLLM in-place pattern: normed into x, new residual into residual; T = 0 launches nothing."""
    gen = _gen(3)
    x, r, w = _randn(4, 40, gen=gen), _randn(4, 40, gen=gen), _randn(40, gen=gen)
    ref, ref_res = ref_fused_add_rms_norm(x, r, w, 1e-6)
    out, res = fused_add_rms_norm(x, r, w, 1e-6, out=x, residual_out=r)
    assert out is x and res is r
    _close(x, ref)
    assert torch.equal(r, ref_res)
    e = torch.empty(0, 40, device=device())
    out, res = fused_add_rms_norm(e, e.clone(), w, 1e-6)
    assert out.shape == res.shape == (0, 40)


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_two_pass_long_rows(monkeypatch, residual):
    """Rows longer than MAX_BLOCK_N take the two-pass path (statistics, then output): force it with a tiny block."""
    monkeypatch.setattr(norm_module, "MAX_BLOCK_N", 32)
    gen = _gen(11)
    x, r, w = _randn(6, 100, gen=gen), _randn(6, 100, gen=gen), _randn(100, gen=gen)
    if residual:
        out, res = fused_add_rms_norm(x, r, w, 1e-6)
        ref, ref_res = ref_fused_add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(res, ref_res)
        _close(out, ref)
        out, res = fused_add_rms_norm(x, r, w, 1e-6, out=x, residual_out=r)  # in place on the two-pass path
        _close(x, ref)
        assert torch.equal(r, ref_res)
    else:
        _close(rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6))


def test_qk_norm_on_strided_head_views():
    """Per-head norm of q / k viewed out of a fused qkv output: [T, heads, D] with a token stride > heads * D."""
    gen = _gen(21)
    T, Hq, Hkv, D = 5, 4, 2, 32
    qkv = _randn(T, (Hq + 2 * Hkv) * D, gen=gen)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    wq, wk = _randn(D, gen=gen), _randn(D, gen=gen)
    _close(rms_norm(q, wq, 1e-6), ref_rms_norm(q, wq, 1e-6))
    _close(rms_norm(k, wk, 1e-6), ref_rms_norm(k, wk, 1e-6))
    # more leading dims, and a 1-D row
    x4 = _randn(2, 3, 4, D, gen=gen)
    _close(rms_norm(x4, wq, 1e-6), ref_rms_norm(x4, wq, 1e-6))
    _close(rms_norm(x4[0, 0, 0], wq, 1e-6), ref_rms_norm(x4[0, 0, 0], wq, 1e-6))


# ----------------------------------------------------------------------------------------------------- rotary


def _tables(max_pos: int, D: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin like RotaryEmbedding's (halves duplicated) but perturbed so each half is used on its own."""
    ang = torch.rand(max_pos, D, generator=gen) * 6.3
    return ang.cos().to(device()), ang.sin().to(device())


@pytest.mark.parametrize("T,Hq,Hkv,D", [(1, 4, 2, 64), (7, 8, 1, 32), (3, 3, 3, 48), (0, 4, 2, 64)])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rotary_matches_reference_on_qkv_views(T, Hq, Hkv, D, pos_dtype):
    gen = _gen(T * 100 + Hq * 10 + Hkv + D)
    qkv = _randn(T, (Hq + 2 * Hkv) * D, gen=gen)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    cos, sin = _tables(40, D, gen)
    pos = torch.randint(0, 40, (T,), generator=gen, dtype=torch.int64).to(pos_dtype).to(device())
    before = qkv.clone()
    oq, ok = poisoned(q.shape, F32, device()), poisoned(k.shape, F32, device())
    got = rotary_embedding(q, k, cos, sin, pos, out_q=oq, out_k=ok)
    assert got[0] is oq and got[1] is ok
    rq, rk = ref_rotary_embedding(q, k, cos, sin, pos.long())
    _close(oq, rq)
    _close(ok, rk)
    assert torch.equal(qkv, before), "out-of-place rotary must not touch q / k"
    nq, nk = rotary_embedding(q, k, cos, sin, pos)  # default: new contiguous tensors
    assert nq.is_contiguous() and nk.is_contiguous()
    _close(nq, rq)
    _close(nk, rk)


def test_rotary_in_place_with_real_tables():
    from accordion.workers.layers import RotaryEmbedding

    gen = _gen(5)
    rope = RotaryEmbedding(64, 128, 500000.0, {"factor": 8.0, "original_max_position_embeddings": 64,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0}).to(device())
    q, k = _randn(6, 4, 64, gen=gen), _randn(6, 2, 64, gen=gen)
    pos = torch.tensor([0, 1, 2, 127, 64, 3], device=device())
    rq, rk = ref_rotary_embedding(q, k, rope.cos, rope.sin, pos)
    oq, ok = rotary_embedding(q, k, rope.cos, rope.sin, pos, out_q=q, out_k=k)
    assert oq is q and ok is k
    _close(q, rq)
    _close(k, rk)


@pytest.mark.parametrize("T,Hq,Hkv,D,page", [(1, 4, 4, 64, 16), (7, 8, 1, 64, 4), (5, 32, 8, 128, 16)])
def test_rotary_with_cache_write_equals_rotary_then_write(T, Hq, Hkv, D, page):
    """The fused launch: q rotated out of place, k rotated and v copied into their paged slots (slots with holes,
    -1 = not stored, positions not in order), everything else in the cache untouched."""
    gen = _gen(T * 1000 + Hq * 10 + Hkv + D)
    qkv = _randn(T, (Hq + 2 * Hkv) * D, gen=gen)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
    cos, sin = _tables(64, D, gen)
    pos = torch.randint(0, 64, (T,), generator=gen, dtype=torch.int64).to(device())
    num_blocks = 2 * T // page + 3
    slots = torch.randperm(num_blocks * page, generator=gen)[:T]
    slots[::3] = -1  # tokens whose K/V this instance does not keep
    slots = slots.to(device())
    kc, vc = _randn(num_blocks, page, Hkv, D, gen=gen), _randn(num_blocks, page, Hkv, D, gen=gen)
    want_k, want_v = kc.clone(), vc.clone()
    rq, rk = ref_rotary_embedding(q, k, cos, sin, pos)
    ref_write_kv_cache(rk, v, want_k, want_v, slots)
    oq = poisoned(q.shape, F32, device())
    assert rotary_embedding_with_cache(q, k, v, cos, sin, pos, kc, vc, slots, out_q=oq) is oq
    _close(oq, rq)
    _close(kc, want_k)
    assert torch.equal(vc, want_v)


def test_rotary_with_cache_refuses_a_cache_of_another_dtype():
    q, k, v = (torch.zeros(2, 2, 64, device=device()) for _ in range(3))
    cos, sin = torch.zeros(8, 64, device=device()), torch.zeros(8, 64, device=device())
    cache = torch.zeros(4, 4, 2, 64, dtype=torch.float16, device=device())
    with pytest.raises(ValueError, match="one dtype"):
        rotary_embedding_with_cache(q, k, v, cos, sin, torch.zeros(2, dtype=torch.long, device=device()), cache,
                                    cache, torch.zeros(2, dtype=torch.long, device=device()))


# ----------------------------------------------------------------------------------------------------- silu*mul


@pytest.mark.parametrize("T,I", [(0, 8), (1, 1), (5, 300), (3, 2500)])
def test_silu_and_mul_matches_reference(T, I):
    gen = _gen(T * 7 + I)
    x = _randn(T, 2 * I, gen=gen) * 4
    out = poisoned((T, I), F32, device())
    assert silu_and_mul(x, out=out) is out
    _close(out, ref_silu_and_mul(x))


def test_silu_and_mul_strided_rows_and_leading_dims():
    gen = _gen(9)
    big = _randn(4, 3 * 64, gen=gen)
    x = big[:, :128]  # row stride 192
    _close(silu_and_mul(x), ref_silu_and_mul(x))
    x3 = _randn(2, 3, 128, gen=gen)
    out = silu_and_mul(x3)
    assert out.shape == (2, 3, 64)
    _close(out, ref_silu_and_mul(x3))


# ----------------------------------------------------------------------------------------------------- validation


def _bad_calls():
    d = device()
    x, w = torch.randn(3, 8, device=d), torch.randn(8, device=d)
    q, k = torch.randn(2, 4, 8, device=d), torch.randn(2, 2, 8, device=d)
    cos = sin = torch.randn(16, 8, device=d)
    pos = torch.zeros(2, dtype=torch.long, device=d)
    return {
        "norm x int": (lambda: rms_norm(x.long(), w, 1e-6), "dtype"),
        "norm weight shape": (lambda: rms_norm(x, torch.randn(7, device=d), 1e-6), r"weight must be a \[8\]"),
        "norm weight dtype": (lambda: rms_norm(x, w.double(), 1e-6), "weight dtype"),
        "norm last dim strided": (lambda: rms_norm(x.t(), torch.randn(3, device=d), 1e-6), "contiguous"),
        "norm eps": (lambda: rms_norm(x, w, -1.0), "eps"),
        "norm out shape": (lambda: rms_norm(x, w, 1e-6, out=torch.empty(3, 9, device=d)), "out must match"),
        "add residual shape": (lambda: fused_add_rms_norm(x, x[:2], w, 1e-6), "residual must match"),
        "add residual dtype": (lambda: fused_add_rms_norm(x, x.double(), w, 1e-6), "residual must match"),
        "add out aliases": (lambda: fused_add_rms_norm(x, x.clone(), w, 1e-6, out=x, residual_out=x), "alias"),
        "rope q dims": (lambda: rotary_embedding(q[0], k, cos, sin, pos), "q must have 3 dims"),
        "rope k dtype": (lambda: rotary_embedding(q, k.double(), cos, sin, pos), "dtype"),
        "rope k tokens": (lambda: rotary_embedding(q, k[:1], cos, sin, pos), "k must be"),
        "rope odd D": (lambda: rotary_embedding(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7], pos), "even|contig"),
        "rope table D": (lambda: rotary_embedding(q, k, cos[:, :4], sin[:, :4], pos), "cos and sin"),
        "rope positions dtype": (lambda: rotary_embedding(q, k, cos, sin, pos.float()), "positions dtype"),
        "rope positions len": (lambda: rotary_embedding(q, k, cos, sin, pos[:1]), "positions must be"),
        "rope out shape": (lambda: rotary_embedding(q, k, cos, sin, pos, out_q=k), "out_q must be"),
        "silu odd": (lambda: silu_and_mul(torch.randn(2, 7, device=d)), "even"),
        "silu dtype": (lambda: silu_and_mul(torch.randn(2, 8, device=d).long()), "dtype"),
        "silu strided": (lambda: silu_and_mul(torch.randn(8, 2, device=d).t()), "contiguous"),
        "silu out": (lambda: silu_and_mul(torch.randn(2, 8, device=d), out=torch.empty(2, 8, device=d)), "out must"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_validation_errors(case):
    fn, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        fn()


# ----------------------------------------------------------------------------------------------------- the model


def test_model_on_triton_layers_equals_hf(tiny_ckpt, monkeypatch):
    """The decoder with every layer op on its Triton kernel (forced on CPU through the interpreter, fp32) keeps
    HF's greedy output; tiny-qwen3 covers per-head qk-norm on strided q / k views."""
    from accordion import LLM, SamplingParams
    from accordion.workers import layers
    from tests.workers.test_hf_equality import hf_greedy, random_prompts

    calls = {"n": 0}

    def always(x):
        calls["n"] += 1
        return True

    monkeypatch.setattr(layers, "use_triton", always)
    for preset in ["tiny-llama", "tiny-qwen3"]:
        path = tiny_ckpt(preset)
        prompts = random_prompts(3, [3, 17, 9], 500, seed=1)
        expected = hf_greedy(path, prompts, 6)
        llm = LLM(path, device="cpu", block_size=8, max_model_len=128)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=6, min_tokens=6,
                                                                                    temperature=0.0))]
        assert got == expected, preset
    assert calls["n"] > 0


# ----------------------------------------------------------------------------------------------------- GPU, bf16

BF16 = torch.bfloat16
BF16_TOL = dict(atol=2e-2, rtol=1.6e-2)  # about one bf16 ulp
GPU_T = [1, 7, 512]


def _cuda_gen(seed):
    return torch.Generator().manual_seed(seed)


def _mismatch_frac(a, b) -> float:
    return (a != b).float().mean().item()


@pytest.mark.gpu
@pytest.mark.parametrize("T", GPU_T)
def test_rms_norm_gpu(T):
    gen, dev = _cuda_gen(T), torch.device("cuda")
    x, r = _randn(T, 4096, gen=gen, dtype=BF16, dev=dev), _randn(T, 4096, gen=gen, dtype=BF16, dev=dev)
    w = (1 + 0.1 * _randn(4096, gen=gen, dev=dev)).to(BF16)
    out = poisoned((T, 4096), BF16, dev)
    rms_norm(x, w, 1e-5, out=out)
    ref = ref_rms_norm(x, w, 1e-5)
    _close(out, ref, BF16_TOL)
    assert _mismatch_frac(out, ref) < 1e-2  # differs from torch only where rsqrt's last fp32 bit flips a rounding
    out, res = poisoned((T, 4096), BF16, dev), poisoned((T, 4096), BF16, dev)
    fused_add_rms_norm(x, r, w, 1e-5, out=out, residual_out=res)
    ref, ref_res = ref_fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, ref_res)
    _close(out, ref, BF16_TOL)
    assert _mismatch_frac(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("T", GPU_T)
def test_qk_norm_and_rotary_gpu(T):
    """Llama-3.1-8B head layout (Hq 32, Hkv 8, D 128) split from a fused qkv output, llama3-scaled tables."""
    from accordion.workers.layers import RotaryEmbedding

    gen, dev = _cuda_gen(100 + T), torch.device("cuda")
    Hq, Hkv, D = 32, 8, 128
    qkv = _randn(T, (Hq + 2 * Hkv) * D, gen=gen, dtype=BF16, dev=dev)
    q, k = qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    w = (1 + 0.1 * _randn(D, gen=gen, dev=dev)).to(BF16)
    nq = rms_norm(q, w, 1e-6)
    _close(nq, ref_rms_norm(q, w, 1e-6), BF16_TOL)
    rope = RotaryEmbedding(D, 8192, 500000.0, {"factor": 8.0, "original_max_position_embeddings": 8192,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0}).to(dev)
    pos = torch.randint(0, 8192, (T,), generator=gen).to(dev)
    oq, ok = poisoned(q.shape, BF16, dev), poisoned(k.shape, BF16, dev)
    rotary_embedding(q, k, rope.cos, rope.sin, pos, out_q=oq, out_k=ok)
    rq, rk = ref_rotary_embedding(q, k, rope.cos, rope.sin, pos)
    # One fused op vs HF's op-by-op roundings: equal up to about one bf16 ulp (not bit-exact on the H100).
    _close(oq, rq, BF16_TOL)
    _close(ok, rk, BF16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("T", GPU_T)
def test_silu_and_mul_gpu(T):
    gen, dev = _cuda_gen(200 + T), torch.device("cuda")
    x = (4 * _randn(T, 2 * 14336, gen=gen, dev=dev)).to(BF16)
    out = poisoned((T, 14336), BF16, dev)
    silu_and_mul(x, out=out)
    ref = ref_silu_and_mul(x)
    _close(out, ref, BF16_TOL)
    assert _mismatch_frac(out, ref) < 1e-2


@pytest.mark.gpu
def test_layer_kernels_in_cuda_graph():
    """Captured once, replayed on new inputs written into the same buffers: no host syncs, no stale values."""
    gen, dev = _cuda_gen(300), torch.device("cuda")
    T, H, Hq, Hkv, D, I = 4, 4096, 32, 8, 128, 14336
    x, r = _randn(T, H, gen=gen, dtype=BF16, dev=dev), _randn(T, H, gen=gen, dtype=BF16, dev=dev)
    w = _randn(H, gen=gen, dtype=BF16, dev=dev)
    qkv = _randn(T, (Hq + 2 * Hkv) * D, gen=gen, dtype=BF16, dev=dev)
    gu = _randn(T, 2 * I, gen=gen, dtype=BF16, dev=dev)
    cos, sin = (t.to(dev) for t in _tables(64, D, gen))
    pos = torch.zeros(T, dtype=torch.long, device=dev)

    def step():
        q, k = qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
        return (*fused_add_rms_norm(x, r, w, 1e-5), *rotary_embedding(q, k, cos, sin, pos), silu_and_mul(gu))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for src in (x, r, qkv, gu):
        src.copy_(torch.randn(src.shape, generator=gen).to(BF16))
    pos.copy_(torch.randint(0, 64, (T,), generator=gen))
    g.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(outs, eager):
        assert torch.equal(a, b)
