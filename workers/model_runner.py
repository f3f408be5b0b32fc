"""StepPlan -> tensors -> forward -> sample -> StepResult, for one device.

The runner owns the model, the paged KV tensors (one ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer),
the attention backend and, on CUDA, the decode CUDA graphs (:mod:`accordion.workers.cuda_graph`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from accordion.cluster.config import EngineConfig
from accordion.cluster.plan import StepPlan, StepResult
from accordion.workers.arch import ArchConfig
from accordion.workers.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from accordion.workers.input_batch import HostStager, InputBatch, StepInputs, inject_prev_tokens
from accordion.workers.loader import load_model
from accordion.workers.multi_master import MultiMasterAttention, SpreadExchange
from accordion.workers.sampler import Sampler

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def make_backend(kind: str, device: torch.device, arch: ArchConfig, hybrid: str = "separate") -> AttentionBackend:
    """``kind``: DeviceConfig.attention_backend; ``hybrid``: DeviceConfig.hybrid_attention (Triton only)."""
    args = (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.head_dim ** -0.5)
    if kind == "auto":
        kind = "triton" if device.type == "cuda" else "torch"
    if kind == "triton":
        from accordion.workers.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend(*args, fuse_hybrid={"fused": True, "separate": False, "auto": None}[hybrid])
    return TorchAttentionBackend(*args)


def _bucket(n: int) -> int:
    """Round a length up to a power of two (>= 256): kernels choose compile-time tiling from it."""
    return max(256, 1 << max(0, n - 1).bit_length())


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device.resolved_device())
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.arch = ArchConfig.from_hf(config.model.hf_config())
        self.max_model_len = config.model.resolved_max_model_len()
        self.block_size = config.cache.block_size
        self.backend = make_backend(config.device.attention_backend, self.device, self.arch,
                                    config.device.hybrid_attention)
        self.batch = InputBatch(self.block_size)
        self.sampler = Sampler(self.device, config.model.seed)
        self.stager = HostStager(self.device)
        self.model = None
        self.kv_caches: list[torch.Tensor] = []
        self.graphs = None
        self.device_wait_s = 0.0
        """Time the host spent blocked on sampled tokens (cumulative): what is left of a step is host work."""
        self.spread: SpreadExchange | None = None
        """Multi-master decoding's master side, while this instance is in an instance group."""

    # ------------------------------------------------------------------ set-up
    def load_model(self) -> None:
        t0 = time.perf_counter()
        self.model = load_model(self.config.model.model, self.arch, dtype=self.dtype, device=self.device,
                                max_positions=self.max_model_len)
        logger.info("loaded %s (%s, %s) in %.1fs", self.config.model.model, self.dtype, self.device,
                    time.perf_counter() - t0)

    def block_bytes(self) -> int:
        return self.arch.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8) * self.block_size

    def profile_num_blocks(self) -> int:
        """KV blocks that fit: the configured count, else from memory after a worst-case profiling step."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, cache.cpu_kv_bytes // self.block_bytes())
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        graph_reserve = 512 << 20 if self.config.device.cuda_graphs else 0
        budget = total * cache.gpu_memory_utilization - peak - non_torch - graph_reserve
        n = int(budget // self.block_bytes())
        if n <= 0:
            raise RuntimeError(f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
                               "raise gpu_memory_utilization or lower max_num_batched_tokens")
        return n

    def _profile_run(self) -> None:
        """One forward over max_num_batched_tokens tokens plus max_num_seqs logits rows, on a scratch cache."""
        t = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        nb = -(-t // self.block_size)
        scratch = [self._alloc_layer_cache(nb) for _ in range(self.arch.num_layers)]
        meta = AttentionMetadata(
            num_decodes=0,
            slot_mapping=torch.arange(t, device=self.device),
            block_table=torch.arange(nb, device=self.device, dtype=torch.int32)[None],
            seq_lens=torch.tensor([t], device=self.device, dtype=torch.int32),
            query_start_loc=torch.tensor([0, t], device=self.device, dtype=torch.int32),
            max_query_len=t, max_seq_len=t, seq_lens_cpu=[t], query_lens_cpu=[t])
        with torch.inference_mode():
            ids = torch.zeros(t, dtype=torch.long, device=self.device)
            hidden = self.model(ids, torch.arange(t, device=self.device), scratch, self.backend, meta)
            rows = min(self.config.scheduler.max_num_seqs, t)
            self.model.compute_logits(hidden[:rows])
        del scratch

    def _alloc_layer_cache(self, num_blocks: int) -> torch.Tensor:
        a = self.arch
        return torch.zeros(2, num_blocks, self.block_size, a.num_kv_heads, a.head_dim, dtype=self.dtype,
                           device=self.device)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = [self._alloc_layer_cache(num_blocks) for _ in range(self.arch.num_layers)]
        logger.info("KV cache: %d blocks x %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.block_bytes() / 2**30)
        with torch.inference_mode():
            self.backend.warm_up(self.kv_caches[0])
        if self.device.type == "cuda" and self.config.device.cuda_graphs:
            from accordion.workers.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self)
            self.graphs.capture()

    # ------------------------------------------------------------------ steps
    def build_metadata(self, inp: StepInputs, prev_tokens: torch.Tensor | None = None
                       ) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention metadata plus (input_ids, positions, logits_indices), moved in one host-to-device copy.
        With ``prev_tokens`` (async scheduling), input ids marked in ``inp.prev_rows`` are taken from it."""
        seq_lens = inp.seq_lens.tolist()
        q_lens = np.diff(inp.query_start_loc).tolist()
        nd = inp.num_decodes
        arrays = [inp.input_ids, inp.positions, inp.logits_indices, inp.slot_mapping, inp.block_table,
                  inp.seq_lens, inp.query_start_loc]
        has_prefill = len(seq_lens) > nd
        if has_prefill:
            arrays.append(inp.query_start_loc[nd:] - inp.query_start_loc[nd])
        if prev_tokens is not None:
            arrays.append(inp.prev_rows)
        ids, pos, logits_idx, slots, table, lens, qsl, *rest = self.stager.stage(arrays)
        if prev_tokens is not None:
            ids = inject_prev_tokens(ids, rest.pop(), prev_tokens)
        meta = AttentionMetadata(
            num_decodes=nd,
            slot_mapping=slots,
            block_table=table.to(torch.int32),
            seq_lens=lens.to(torch.int32),
            query_start_loc=qsl.to(torch.int32),
            max_query_len=max(q_lens[nd:], default=0),
            max_seq_len=_bucket(max(seq_lens, default=0)),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=q_lens,
            prefill_query_start_loc=rest[0].to(torch.int32) if has_prefill else None,
        )
        return meta, ids, pos, logits_idx

    def execute(self, plan: StepPlan) -> StepResult:
        return self.wait(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan, prev: PendingStep | None = None) -> PendingStep:
        """Run the step. Plain greedy steps return with their tokens still on the device (``wait`` reads them);
        with ``prev``, inputs not yet known on the host are taken from ``prev``'s device tokens."""
        for spread in self.batch.apply(plan):
            self.spread.release(spread)
        if plan.is_empty:
            if self.spread is not None and self.spread.has_releases:
                self.spread.flush()
            return PendingStep(plan.step_id, [], result=StepResult(plan.step_id, {}))
        pending = None
        if prev is not None and prev.tokens is not None:
            pending = {rid: i for i, rid in enumerate(prev.sampled_ids)}
        inp = self.batch.prepare(plan, pending)
        failed: dict[str, str] = {}
        if self.graphs is not None and not inp.spread_rows and self.graphs.can_run(plan, inp):
            inject = None if inp.prev_rows is None else (inp.prev_rows, prev.tokens)
            hidden = self.graphs.run(inp, inject)
        else:
            try:
                hidden = self._forward(inp, prev)
            except RuntimeError as e:  # a multi-master holder went away mid-step: drop those rows, run the rest
                if not inp.spread_rows:
                    raise
                failed = self._drop_spread_rows(inp, e)
                plan = StepPlan(plan.step_id, [], [c for c in plan.chunks if c.request_id not in failed], [],
                                plan.num_decodes - len(failed))
                inp = self.batch.prepare(plan, pending)
                hidden = self._forward(inp, prev) if plan.chunks else None
        if not inp.sampled_ids:
            return PendingStep(plan.step_id, [], result=StepResult(plan.step_id, {}, failed=failed))
        logits = self.model.compute_logits(hidden)
        if Sampler.plain_greedy(inp.sample_rows):
            step = PendingStep.enqueue_readback(plan.step_id, inp.sampled_ids, logits.argmax(dim=-1))
            step.failed = failed
            return step
        tokens, logprobs = self.sampler(logits, inp.sample_rows)
        sampled = dict(zip(inp.sampled_ids, tokens))
        self.batch.record_sampled(sampled)
        lps = {rid: lp for rid, lp in zip(inp.sampled_ids, logprobs) if lp is not None}
        return PendingStep(plan.step_id, inp.sampled_ids, result=StepResult(plan.step_id, sampled, lps, failed))

    def _forward(self, inp: StepInputs, prev: PendingStep | None) -> torch.Tensor:
        """The model over one step's rows, eagerly; hidden states of the sampled rows [S, hidden]."""
        meta, ids, pos, logits_idx = self.build_metadata(inp, None if inp.prev_rows is None else prev.tokens)
        backend = self.backend
        if inp.spread_rows:  # multi-master decoding: the holders complete these rows' attention
            backend = MultiMasterAttention(self.backend, self.spread.begin_step(inp.spread_rows))
        elif self.spread is not None and self.spread.has_releases:
            self.spread.flush()
        return self.model(ids, pos, self.kv_caches, backend, meta)[logits_idx]

    def _drop_spread_rows(self, inp: StepInputs, error: Exception) -> dict[str, str]:
        """Forget the step's spread requests (their live holders free their slices); request id -> error."""
        logger.warning("multi-master exchange failed (%s): failing %d spread request(s)", error, len(inp.spread_rows))
        failed = {}
        for _, rid, spread, _ in inp.spread_rows:
            self.batch.states.pop(rid, None)
            self.spread.release(spread)
            failed[rid] = f"a KV holder of this request went away ({type(error).__name__}); request failed"
        self.spread.flush()
        return failed

    def wait(self, step: PendingStep) -> StepResult:
        """The step's result; reads device tokens back (the only host sync of a plain greedy step)."""
        if step.result is None:
            t0 = time.perf_counter()
            tokens = step.host_tokens()
            self.device_wait_s += time.perf_counter() - t0
            sampled = dict(zip(step.sampled_ids, tokens))
            self.batch.record_sampled(sampled)
            step.result = StepResult(step.step_id, sampled, failed=step.failed)
        return step.result

    @staticmethod
    def can_lookahead(step: PendingStep) -> bool:
        """Whether the next step may be launched from this one's device tokens (not after failed rows: the
        scheduler must drop them first)."""
        return step.tokens is not None and step.result is None and not step.failed


@dataclass
class PendingStep:
    """A launched step: its result, or (plain greedy) its sampled tokens still on the device."""

    step_id: int
    sampled_ids: list[str]
    tokens: torch.Tensor | None = None
    """[S] int64 on the device, row i for ``sampled_ids[i]``."""
    result: StepResult | None = None
    failed: dict[str, str] = field(default_factory=dict)
    """Rows dropped from the step (see ``StepResult.failed``)."""
    _pinned: torch.Tensor | None = None
    _copied: torch.cuda.Event | None = None

    @classmethod
    def enqueue_readback(cls, step_id: int, sampled_ids: list[str], tokens: torch.Tensor) -> PendingStep:
        """A step whose tokens are copied to pinned host memory in stream order, right behind the sampling: a
        later step launched before :meth:`host_tokens` does not delay the read-back."""
        step = cls(step_id, sampled_ids, tokens=tokens)
        if tokens.is_cuda:
            step._pinned = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            step._pinned.copy_(tokens, non_blocking=True)
            step._copied = torch.cuda.Event()
            step._copied.record()
        return step

    def host_tokens(self) -> list[int]:
        """The sampled tokens on the host; waits for the copy alone (the GIL is released while waiting)."""
        if self._copied is None:
            return self.tokens.tolist()
        self._copied.synchronize()
        return self._pinned.tolist()
