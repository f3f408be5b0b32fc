"""The offline API, in vLLM's shape: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from accordion.cluster.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from accordion.cluster.instance import EngineInstance
from accordion.cluster.output_processor import OutputProcessor
from accordion.cluster.outputs import CompletionOutput, RequestOutput
from accordion.cluster.request import Request, RequestValidationError, SamplingParams
from accordion.cluster.tokenizer import Tokenizer
from accordion.default_model import DEFAULT_MODEL, resolve_model

Prompt = str | Sequence[int]


class LLM:
    """An engine in this process. Requests run with continuous batching until every one has finished."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        num_blocks: int | None = None,
        gpu_memory_utilization: float = 0.90,
        cpu_kv_bytes: int = 1 << 30,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "fcfs",
        attention_backend: str = "auto",
        hybrid_attention: str = "auto",
        cuda_graphs: bool = True,
        async_scheduling: bool | None = None,
        seed: int = 0,
    ):
        path = resolve_model(model)
        self.config = EngineConfig(
            model=ModelConfig(model=path, dtype=dtype, max_model_len=max_model_len, seed=seed),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching,
                              gpu_memory_utilization=gpu_memory_utilization, cpu_kv_bytes=cpu_kv_bytes),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      policy=scheduling_policy,
                                      **({} if async_scheduling is None else {"async_scheduling": async_scheduling})),
            device=DeviceConfig(device=device, attention_backend=attention_backend, hybrid_attention=hybrid_attention,
                                cuda_graphs=cuda_graphs),
        )
        self.tokenizer = Tokenizer(path)
        self.instance = EngineInstance(self.config)
        self._ids = itertools.count()

    @property
    def scheduler(self):
        return self.instance.scheduler

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One :class:`RequestOutput` per prompt, in order. Prompts are strings or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one object or one per prompt")
        return self._run([(p, sp) for p, sp in zip(prompts, params_list)], priority)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self.generate(prompts, sampling_params)

    # ------------------------------------------------------------------ internals
    def _run(self, items: list[tuple[Prompt, SamplingParams]], priority: Sequence[int] | None) -> list[RequestOutput]:
        core, proc = self.instance.core, OutputProcessor(self.tokenizer)
        results: list[RequestOutput] = []
        by_engine_id: dict[str, tuple[RequestOutput, int]] = {}
        eos = tuple(self.tokenizer.eos_token_ids)
        prepared = []
        for prompt, sp in items:  # validate everything before queueing anything: all or nothing
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise RequestValidationError("prompt", "prompt is empty")
            if sp.max_tokens is None:
                sp = SamplingParams(**{**sp.__dict__, "max_tokens": max(1, self.instance.max_model_len - len(ids))})
            self.scheduler.check_fits(len(ids), sp.max_tokens)
            prepared.append((prompt if isinstance(prompt, str) else None, ids, sp))
        for i, (text, ids, sp) in enumerate(prepared):
            rid = str(next(self._ids))
            ro = RequestOutput(rid, text, ids, [CompletionOutput(j, "", []) for j in range(sp.n)])
            results.append(ro)
            for j in range(sp.n):
                child = sp.child(j) if sp.n > 1 else sp
                eid = f"{rid}-{j}"
                core.add_request(Request(request_id=eid, prompt_token_ids=ids, sampling_params=child,
                                         eos_token_ids=eos, priority=priority[i] if priority else 0,
                                         arrival_time=time.monotonic()))
                proc.add(eid, rid, j, ids, child)
                by_engine_id[eid] = (ro, j)
        while core.has_unfinished():
            deltas, to_abort = proc.process(core.step())
            if to_abort:
                core.abort(to_abort)
            for d in deltas:
                ro, j = by_engine_id[f"{d.request_id}-{d.index}"]
                comp = ro.outputs[j]
                comp.token_ids.extend(d.token_ids)
                comp.text += d.text
                if d.logprobs is not None:
                    comp.logprobs = (comp.logprobs or []) + [lp.as_dict() for lp in d.logprobs]
                if d.finished:
                    comp.finish_reason = str(d.finish_reason)
                    comp.stop_reason = d.matched_stop
                    ro.num_cached_tokens = d.usage.cached_tokens
        for ro in results:
            ro.finished = all(c.finished for c in ro.outputs)
        return results
