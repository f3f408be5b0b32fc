"""The engine on the Triton attention backend (decode, prefill, fused POD hybrid steps) equals HF greedy output.

On CPU the kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py); on a GPU the same test runs compiled.
"""

from __future__ import annotations

import pytest
import torch

from accordion import LLM, SamplingParams
from tests.conftest import assert_idle_blocks_free
from tests.workers.test_hf_equality import hf_greedy, random_prompts


@pytest.mark.parametrize("hybrid", ["fused", "separate", "auto"])
def test_triton_backend_equals_hf(tiny_ckpt, hybrid):
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(4, [3, 17, 40, 9], 500, seed=1)
    expected = hf_greedy(path, prompts, 8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A 16-token budget makes hybrid steps: decodes of short prompts beside chunks of the long ones.
    llm = LLM(path, device=device, dtype="float32", attention_backend="triton", hybrid_attention=hybrid, block_size=8,
              max_model_len=256, max_num_batched_tokens=16, cuda_graphs=False)
    assert llm.instance.worker.backend.fuse_hybrid == {"fused": True, "separate": False, "auto": None}[hybrid]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, min_tokens=8, temperature=0))
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert_idle_blocks_free(llm)


def test_fused_rotary_cache_write_equals_hf(tiny_ckpt, monkeypatch):
    """Every layer on its Triton kernel, rotary storing k and v into the cache in the same launch (on CPU: the
    interpreter, by routing the layers to Triton whatever the device)."""
    from accordion.workers import layers

    if not torch.cuda.is_available():
        monkeypatch.setattr(layers, "use_triton", lambda x: True)
    calls = []
    fused = layers.RotaryEmbedding.forward_into_cache
    monkeypatch.setattr(layers.RotaryEmbedding, "forward_into_cache",
                        lambda self, *a: calls.append(1) or fused(self, *a))
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(3, [5, 21, 2], 500, seed=3)
    expected = hf_greedy(path, prompts, 6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(path, device=device, dtype="float32", attention_backend="triton", block_size=8, max_model_len=256,
              max_num_batched_tokens=16, cuda_graphs=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, min_tokens=6, temperature=0))
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert calls, "the fused rotary + cache write path did not run"
    assert_idle_blocks_free(llm)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(tiny_ckpt):
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(5, [3, 17, 40, 9, 100], 500, seed=2)
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    eager = LLM(path, device="cuda", dtype="float32", cuda_graphs=False, max_model_len=256, num_blocks=256)
    graphs = LLM(path, device="cuda", dtype="float32", cuda_graphs=True, max_model_len=256, max_num_seqs=8,
                 num_blocks=256)
    a = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    assert a == b == hf_greedy(path, prompts, 16)


def test_decode_graph_bounds():
    """The Triton backend asks for decode graphs of short rows (split-KV) and of long ones; the torch backend for
    one set."""
    from accordion.kernels.attention.decode_schedule import LEAN_MIN_CONTEXT
    from accordion.workers.attention import TorchAttentionBackend
    from accordion.workers.attention_triton import TritonAttentionBackend

    triton_backend = TritonAttentionBackend(4, 2, 16, 0.25)
    assert triton_backend.decode_graph_bounds(131072) == [LEAN_MIN_CONTEXT, 131072]
    assert triton_backend.decode_graph_bounds(LEAN_MIN_CONTEXT) == [LEAN_MIN_CONTEXT]
    assert triton_backend.decode_graph_bounds(256) == [256]
    assert TorchAttentionBackend(4, 2, 16, 0.25).decode_graph_bounds(131072) == [131072]


@pytest.mark.gpu
def test_cuda_graphs_per_context_bound_equal_hf(tiny_ckpt, monkeypatch):
    """Decode graphs captured for two context bounds (here 64 and 256 keys): steps replay the short one until a
    row passes 64 keys, then the long one, and greedy tokens equal HF's."""
    from accordion.workers import attention_triton

    monkeypatch.setattr(attention_triton, "LEAN_MIN_CONTEXT", 64)
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(6, [40, 3, 55, 17, 9, 60], 500, seed=4)
    llm = LLM(path, device="cuda", dtype="float32", cuda_graphs=True, max_model_len=256, max_num_seqs=8,
              num_blocks=256)
    graphs = llm.instance.worker.graphs
    assert graphs.bounds == [64, 256]
    replayed = []
    for key, g in graphs.graphs.items():
        g.replay = lambda key=key, run=g.replay: replayed.append(key[1]) or run()
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, min_tokens=20, temperature=0))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 20)
    assert 64 in replayed and 256 in replayed
    assert replayed.index(256) > replayed.index(64)  # the long graphs once a row has grown past 64 keys
    assert_idle_blocks_free(llm)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_tma_decode_in_engine_equals_hf(tiny_ckpt, monkeypatch, cuda_graphs):
    """Decode steps through the TMA decode kernel, forced for every decode launch and allowed in fp32 so greedy
    tokens can equal HF's: descriptors over the engine's per-layer caches, captured into CUDA graphs or not."""
    from accordion.kernels.attention import decode as dec

    auto_config, made = dec.decode_config, []  # made: one entry per TMA launch
    monkeypatch.setattr(dec, "tma_capable", dec.tma_layout)
    monkeypatch.setattr(dec, "decode_config", lambda d, dtype, split=False, programs=0, tma=False, device=None: (
        dict(BLOCK_N=32, num_warps=4, num_stages=3, TMA=True) if tma else auto_config(d, dtype, split)))
    describe = dec.tma_descriptors
    monkeypatch.setattr(dec, "tma_descriptors", lambda k, v: made.append(1) or describe(k, v))
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(5, [3, 17, 40, 9, 100], 500, seed=3)
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, cuda_graphs=cuda_graphs, max_model_len=256,
              max_num_seqs=8, num_blocks=256)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, min_tokens=12, temperature=0))
    assert made, "no decode launch read the cache by TMA"
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 12)
    assert_idle_blocks_free(llm)


@pytest.mark.gpu
@pytest.mark.parametrize("hybrid", ["separate", "fused", "auto"])
def test_no_compilation_after_warm_up(tiny_ckpt, hybrid):
    """Once the engine is built, no step compiles a kernel: prompts of many lengths (chunked, hybrid steps,
    decodes with and without split keys, block tables of every width) run on what warm-up compiled, with hybrid
    steps fused or in sequence (warm-up compiles only the mode in use)."""
    from accordion.kernels.attention.decode_kernel import merge_splits_kernel, paged_decode_kernel
    from accordion.kernels.attention.decode_lean_kernel import paged_decode_lean_kernel
    from accordion.kernels.attention.decode_tma_kernel import paged_decode_tma_kernel
    from accordion.kernels.attention.pod_kernel import pod_attention_kernel
    from accordion.kernels.attention.pod_ws_kernel import pod_ws_kernel
    from accordion.kernels.attention.prefill_kernel import paged_prefill_kernel
    from accordion.kernels.layers.activation_kernel import silu_and_mul_kernel
    from accordion.kernels.layers.norm_kernel import rms_norm_kernel
    from accordion.kernels.layers.rotary_kernel import rotary_cache_kernel
    from accordion.kernels.utils import compiled_variants

    kernels = (paged_decode_kernel, paged_decode_lean_kernel, paged_decode_tma_kernel, merge_splits_kernel,
               pod_attention_kernel, pod_ws_kernel, paged_prefill_kernel,
               silu_and_mul_kernel, rms_norm_kernel, rotary_cache_kernel)
    path = tiny_ckpt("tiny-llama")
    llm = LLM(path, device="cuda", dtype="bfloat16", block_size=16, max_model_len=2048, max_num_batched_tokens=96,
              max_num_seqs=16, enable_prefix_caching=False, hybrid_attention=hybrid,
              num_blocks=1024)  # fixed: the other mode's engine may still hold its cache in this process

    def variants():
        return {getattr(k, "__name__", repr(k)): compiled_variants(k) for k in kernels}

    before = variants()
    assert sum(before.values()) > 0
    lengths = [1, 2, 3, 15, 16, 17, 31, 33, 64, 100, 257, 511, 1000, 1500, 1900]
    prompts = random_prompts(len(lengths), lengths, 500, seed=4)
    llm.generate(prompts, [SamplingParams(max_tokens=7 + 5 * i, temperature=0, ignore_eos=True)
                           for i in range(len(prompts))])
    assert variants() == before
    assert_idle_blocks_free(llm)


def test_decode_lengths_equal_from_host_lengths():
    """A step's decode rows count as equal-length within 5% of the mean (the decode kernel then prefers split-KV);
    CUDA-graph steps' placeholder zeros and steps without decodes do not. Their exact longest row bounds the deep
    schedule's key loops."""
    from accordion.workers.attention import AttentionMetadata

    def meta(lens, num_decodes):
        t = torch.zeros(len(lens), dtype=torch.int32)
        return AttentionMetadata(num_decodes=num_decodes, slot_mapping=t.long(), block_table=t[:, None],
                                 seq_lens=t, query_start_loc=t, max_query_len=1, max_seq_len=max(lens),
                                 seq_lens_cpu=lens, query_lens_cpu=[1] * len(lens))

    assert meta([100, 102, 98, 7], 3).decode_lengths_equal  # the prefill row (7) is not a decode
    assert not meta([100, 200, 98], 3).decode_lengths_equal
    assert not meta([0, 0, 0], 3).decode_lengths_equal
    assert not meta([50], 0).decode_lengths_equal
    assert meta([100, 102, 98, 700], 3).decode_max_len == 102  # exact, the decode rows only (max_seq_len is bucketed)
    assert meta([50], 0).decode_max_len == 0


def test_auto_hybrid_fuses_balanced_steps_once_per_step(monkeypatch):
    """``hybrid_attention="auto"``: a hybrid step fuses when the warp-specialized kernel serves and its halves are
    balanced (`pod_pays_off`); decided once per step (every layer sees the same metadata), never off sm_90."""
    from accordion.workers import attention_triton
    from accordion.workers.attention import AttentionMetadata

    def meta(q_lens, p_lens, d_lens):
        nd = len(d_lens)
        return AttentionMetadata(
            num_decodes=nd, slot_mapping=torch.empty(0), block_table=torch.empty(0), seq_lens=torch.empty(0),
            query_start_loc=torch.empty(0), max_query_len=max(q_lens), max_seq_len=max(p_lens + d_lens),
            seq_lens_cpu=d_lens + p_lens, query_lens_cpu=[1] * nd + q_lens)

    backend = attention_triton.TritonAttentionBackend(32, 8, 128, 128**-0.5, fuse_hybrid=None)
    q, kv = torch.zeros(1, 32, 128, dtype=torch.bfloat16), torch.zeros(2, 1, 16, 8, 128, dtype=torch.bfloat16)
    balanced = meta([1024], [16384], [16384] * 64)
    assert not backend._fuse(q, kv, balanced)  # CPU tensors: the warp-specialized kernel does not serve
    calls = []
    monkeypatch.setattr(attention_triton, "ws_capable", lambda *a: calls.append(1) or True)
    for m, fused in ((meta([1024], [16384], [16384] * 64), True), (meta([8192], [90000], [2000] * 30), False),
                     (meta([16], [64], [32768] * 128), False)):
        calls.clear()
        assert [backend._fuse(q, kv, m) for _ in range(3)] == [fused] * 3
        assert len(calls) == 1


@pytest.mark.parametrize("ws", [True, False])
def test_fused_step_hands_the_launch_its_host_lengths(monkeypatch, ws):
    """A fused hybrid step tells `pod_attention` the prefill rows' longest length (for the warp-specialized kernel's
    estimate of its two halves) and, where that kernel serves, the exact longest decode row; the Triton POD kernel
    keeps the step's bound (`max_seq_len`), whose split-or-not variants warm-up compiles."""
    from accordion.workers import attention_triton
    from accordion.workers.attention import AttentionMetadata

    d_lens, p_lens, q_len = [300, 4000, 700], [9000], 16
    rows = len(d_lens) + q_len
    meta = AttentionMetadata(
        num_decodes=len(d_lens), slot_mapping=torch.zeros(rows, dtype=torch.long),
        block_table=torch.zeros(len(d_lens) + 1, 8, dtype=torch.int32),
        seq_lens=torch.tensor(d_lens + p_lens, dtype=torch.int32), query_start_loc=torch.zeros(5, dtype=torch.int32),
        max_query_len=q_len, max_seq_len=16384, seq_lens_cpu=d_lens + p_lens, query_lens_cpu=[1] * 3 + [q_len],
        prefill_query_start_loc=torch.tensor([0, q_len], dtype=torch.int32))
    seen = []
    monkeypatch.setattr(attention_triton, "ws_capable", lambda *a: ws)
    monkeypatch.setattr(attention_triton, "pod_attention", lambda k, v, p, d, scale: seen.append((p, d)))
    backend = attention_triton.TritonAttentionBackend(4, 2, 16, 0.25, fuse_hybrid=True)
    q, kv = torch.zeros(rows, 4, 16), torch.zeros(2, 4, 16, 2, 16)
    backend._attend(q, kv, meta, fuse=True)
    (prefill, decode), = seen
    assert prefill.max_seq_len == 9000
    assert decode.max_seq_len == (4000 if ws else 16384)
