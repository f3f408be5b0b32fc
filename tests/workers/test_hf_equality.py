"""Greedy output equals HF transformers (eager, fp32) token for token, across architectures and engine paths."""

from __future__ import annotations

import random

import pytest
import torch

from accordion import LLM, SamplingParams
from tests.conftest import assert_idle_blocks_free

PRESETS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]


def hf_greedy(path: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
                               do_sample=False, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs


def random_prompts(n: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


# min_tokens == max_tokens masks EOS exactly as HF's min_new_tokens does.
GREEDY = SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0)


@pytest.mark.parametrize("preset", PRESETS)
def test_mixed_batch_equals_hf(tiny_ckpt, preset):
    path = tiny_ckpt(preset)
    prompts = random_prompts(6, [3, 17, 40, 9, 64, 1], 500, seed=1)
    expected = hf_greedy(path, prompts, GREEDY.max_tokens)
    llm = LLM(path, device="cpu", block_size=8, max_model_len=512)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == expected
    assert_idle_blocks_free(llm)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_chunked_prefill_preemption_and_prefix_cache_equal_hf(tiny_ckpt, preset):
    path = tiny_ckpt(preset)
    shared = random_prompts(1, [40], 500, seed=2)[0]
    prompts = [shared + p for p in random_prompts(5, [5, 30, 1, 60, 12], 500, seed=3)] + [shared]
    expected = hf_greedy(path, prompts, GREEDY.max_tokens)
    # Budget of 16 tokens splits every long prompt into chunks; 40 blocks of 4 tokens cannot hold all six
    # requests at once, so decodes preempt (recompute) others.
    llm = LLM(path, device="cpu", block_size=4, max_num_batched_tokens=16, num_blocks=40, max_model_len=256)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == expected
    assert llm.scheduler.num_preemptions > 0
    assert_idle_blocks_free(llm)
    # Second round: the shared prefix is served from the prefix cache, output unchanged.
    again = llm.generate(prompts[:2], GREEDY)
    assert [o.outputs[0].token_ids for o in again] == expected[:2]
    assert again[0].num_cached_tokens >= 40 - 4
    assert_idle_blocks_free(llm)


def test_async_scheduling_changes_nothing_but_overlaps(tiny_ckpt):
    """Lookahead steps (launched from the previous step's device tokens) give the same tokens, including when
    requests stop on EOS or stop ids mid-flight (the speculative row is dropped) and when one is aborted."""
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(6, [3, 17, 40, 9, 64, 1], 500, seed=5)
    params = [SamplingParams(max_tokens=20, temperature=0.0), SamplingParams(max_tokens=7, temperature=0.0),
              SamplingParams(max_tokens=12, temperature=0.0)] * 2
    sync = LLM(path, device="cpu", block_size=4, max_model_len=256, async_scheduling=False)
    lookahead = LLM(path, device="cpu", block_size=4, max_model_len=256, async_scheduling=True)
    a = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in sync.generate(prompts, params)]
    b = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in lookahead.generate(prompts, params)]
    assert a == b
    assert sync.instance.core.num_lookahead_steps == 0 and lookahead.instance.core.num_lookahead_steps > 0
    stop_at = a[0][0][5]
    c = lookahead.generate(prompts[:1], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]))
    assert c[0].outputs[0].token_ids == a[0][0][: a[0][0].index(stop_at) + 1]
    assert_idle_blocks_free(lookahead)


def test_repetition_penalty_equals_hf(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    path = tiny_ckpt("tiny-llama")
    prompt = random_prompts(1, [20], 500, seed=4)[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                       do_sample=False, repetition_penalty=1.5, pad_token_id=0)
    llm = LLM(path, device="cpu", max_model_len=256)
    out = llm.generate([prompt], SamplingParams(max_tokens=16, min_tokens=16, temperature=0,
                                                repetition_penalty=1.5))
    assert out[0].outputs[0].token_ids == g[0, len(prompt):].tolist()


@pytest.mark.slow
def test_smollm2_real_prompts_equal_hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    llm = LLM(smollm2_path, device="cpu", max_model_len=1024, max_num_batched_tokens=64)
    tok = llm.get_tokenizer()
    convs = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a hash table is in two sentences.", "List three prime numbers."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in convs]
    params = SamplingParams(max_tokens=24, temperature=0)
    outs = llm.generate(prompts, params)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        ref = g[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].text == tok.decode(ref)
    assert "Paris" in outs[0].outputs[0].text
    assert_idle_blocks_free(llm)
