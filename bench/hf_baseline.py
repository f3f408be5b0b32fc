"""Hugging Face transformers baselines for the offline benchmark: continuous batching, padded ``generate``, batch-1.

All three run greedy with EOS disabled, so every request yields exactly ``max_new_tokens`` tokens (checked).
Timings synchronise the device before the clock is read. Each function returns a plain dict for the result JSON.
"""

from __future__ import annotations

import gc
import time

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load_hf_model(path, dtype: str = "bfloat16", device: str = "cuda", attn_implementation: str = "sdpa"):
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` on ``device``, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval()


def free_model(model=None) -> None:
    """Drop the CB manager a model may cache, collect garbage and return cached GPU memory to the driver."""
    if model is not None and hasattr(model, "destroy_cached_continuous_batching_manager"):
        model.destroy_cached_continuous_batching_manager()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_generate_batch_throughput(model, prompts: list[list[int]], max_new_tokens: int,
                                 warmup_prompts: list[list[int]] | None = None, cb_config=None) -> dict:
    """Output tok/s of ``model.generate_batch`` (transformers' continuous batching) on ``prompts``.

    ``generate_batch(inputs, generation_config=None, continuous_batching_config=None, record_timestamps=False,
    progress_bar=False, persistent_manager=False, warmup=True, **kwargs)`` builds a ContinuousBatchingManager per call
    (KV-cache allocation plus CUDA-graph warm-up), sized from the call's workload. So a first, untimed call runs
    ``warmup_prompts`` (same shapes, other tokens: no prefix-cache hits) with ``persistent_manager=True`` and the
    timed call reuses that warmed manager. ``first_call_s`` reports the cold call (setup included) too.
    EOS: with ``eos_token_id=-1`` in the GenerationConfig no token ends a request.
    """
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                               pad_token_id=model.config.pad_token_id or 0)
    kwargs = dict(generation_config=gen_cfg, max_new_tokens=max_new_tokens, progress_bar=False)
    if cb_config is not None:
        kwargs["continuous_batching_config"] = cb_config
    device = model.device
    t0 = time.perf_counter()
    model.generate_batch(warmup_prompts or prompts, persistent_manager=True, **kwargs)
    _sync(device)
    first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = model.generate_batch(prompts, persistent_manager=True, **kwargs)
    _sync(device)
    wall = time.perf_counter() - t0
    model.destroy_cached_continuous_batching_manager()
    outs = [r.generated_tokens for r in results.values()]
    errors = [r.error for r in results.values() if r.error is not None]
    tokens = sum(len(o) for o in outs)
    return {"engine": "hf_generate_batch", "num_prompts": len(prompts), "returned": len(outs), "errors": errors[:3],
            "all_full_length": len(outs) == len(prompts) and all(len(o) == max_new_tokens for o in outs),
            "generated_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall, "first_call_s": first_call_s,
            "first_output": outs[0] if outs else None}


def hf_generate_throughput(model, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int = 0,
                           warmup: bool = True) -> dict:
    """Output tok/s of one ``model.generate`` call on the left-padded batch of all ``prompts`` (static batching)."""
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=pad_token_id)  # kwarg None really disables EOS
    if warmup:
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, **kw)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
    _sync(device)
    wall = time.perf_counter() - t0
    new = out[:, width:]
    tokens = new.numel()
    return {"engine": "hf_generate", "num_prompts": len(prompts), "batch": len(prompts),
            "all_full_length": new.shape[1] == max_new_tokens, "generated_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "first_output": new[0].tolist()}


class _TokenClock:
    """A ``generate`` streamer that timestamps each ``put``: the first put is the prompt, then one per new token.
    ``generate`` calls ``put`` after every step with the token on the host, so the clock reads after a sync."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_decode_tok_s(model, prompt: list[int], max_new_tokens: int, pad_token_id: int = 0, reps: int = 1) -> dict:
    """Batch-1 greedy ``generate`` with a timestamping streamer: TTFT = first new token - call start, and
    decode tok/s = ``(max_new_tokens - 1) / (last token - first token)`` (no subtraction of separate calls).
    One short untimed call warms kernels first; with ``reps`` > 1 the fastest run is kept."""
    device = model.device
    ids = torch.tensor([prompt], device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=pad_token_id)
    model.generate(ids, max_new_tokens=8, **kw)
    best = None
    for _ in range(max(reps, 1)):
        clock = _TokenClock()
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, streamer=clock, **kw)
        _sync(device)
        total = time.perf_counter() - t0
        new = out[0, len(prompt):]
        steps = clock.times[1:]  # times[0] is the prompt
        run = {"engine": "hf_generate", "prompt_len": len(prompt), "output_len": int(new.numel()),
               "ttft_s": steps[0] - t0, "total_s": total,
               "decode_tok_s": (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else None,
               "first_output": new.tolist()}
        if best is None or (run["decode_tok_s"] or 0) > (best["decode_tok_s"] or 0):
            best = run
    return best
