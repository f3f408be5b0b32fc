"""One engine instance: a scheduler over the KV pool of one device and the worker that executes its plans.

The worker class is named by import path and resolved here, lazily, so the control plane never imports the data
plane (``accordion.workers``) at module level.
"""

from __future__ import annotations

import importlib
import logging

from accordion.cluster.config import EngineConfig
from accordion.cluster.engine import EngineCore
from accordion.cluster.outputs import EngineOutput
from accordion.cluster.plan import SPPrefillJob
from accordion.cluster.request import FinishReason, Request
from accordion.cluster.scheduler import Scheduler

logger = logging.getLogger(__name__)

DEFAULT_WORKER = "accordion.workers.model_runner:ModelRunner"


def load_class(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class EngineInstance:
    """Builds the worker (load weights, size and allocate the KV cache), then the scheduler over that pool."""

    def __init__(self, config: EngineConfig, worker_cls: str = DEFAULT_WORKER):
        self.config = config
        self.worker = load_class(worker_cls)(config)
        self.worker.load_model()
        self.num_blocks = self.worker.profile_num_blocks()
        self.worker.init_kv_cache(self.num_blocks)
        self.max_model_len = config.model.resolved_max_model_len()
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks=self.num_blocks,
                                   max_model_len=self.max_model_len)
        self.core = EngineCore(self.scheduler, self.worker, async_scheduling=config.scheduler.async_scheduling)
        self.rank: int | None = None
        logger.info("engine instance ready: %d KV blocks, max_model_len %d", self.num_blocks, self.max_model_len)

    # ------------------------------------------------------------------ elastic sequence parallelism
    def join_group(self, init_method: str, world_size: int, rank: int, backend: str | None = None) -> None:
        """Join the instances' torch.distributed group (NCCL on GPU, gloo on CPU) at the manager's address."""
        from accordion.workers.parallel import init_instance_group

        backend = backend or ("nccl" if self.worker.device.type == "cuda" else "gloo")
        init_instance_group(init_method, world_size, rank, backend=backend)
        self.rank = rank

    def leave_group(self) -> None:
        """Leave the instances' process group (on shutdown)."""
        from accordion.workers.parallel import leave_instance_group

        if self.rank is not None:
            leave_instance_group()
            self.rank = None

    def run_sp_prefill(self, job: SPPrefillJob, request: Request | None = None) -> EngineOutput | None:
        """Run this instance's share of a sequence-parallel prefill.

        A slice of the placement whose ``block_ids`` are empty is allocated here, from this instance's pool. The
        master (``job.group[0]``), given the ``request``, adopts it for decoding (it holds the whole prompt's
        KV) and returns its first output; an instance that cannot store its slice still serves the ring (the
        others would wait for it) and the master then fails the request.
        """
        from accordion.workers.input_batch import CachedRequestState
        from accordion.workers.sequence_parallel import SequenceParallelPrefill

        mine = job.slice_of(self.rank)
        stored = True
        if mine is not None and not mine.block_ids:
            blocks = self.scheduler.reserve_slice(job.request_id, mine.end - mine.start)
            if blocks is None:
                stored = False
                job.placement = [s for s in job.placement if s.rank != self.rank]
            else:
                mine.block_ids = blocks
        master = self.rank == job.group[0]
        prompt_len = len(job.prompt_token_ids)
        try:
            token = SequenceParallelPrefill(self.worker, self.rank).run(job)
        except Exception as e:  # a failed collective: end the request with a clear error, never leave it hanging
            logger.exception("sequence-parallel prefill of %s failed on rank %s", job.request_id, self.rank)
            self.scheduler.release_slice(job.request_id)
            if not master:
                return None
            return EngineOutput(job.request_id, [], finish_reason=FinishReason.ERROR, num_prompt_tokens=prompt_len,
                                error=f"sequence-parallel prefill failed: {type(e).__name__}: {e}")
        if not master:
            return None
        if not stored or mine is None or (mine.start, mine.end) != (0, prompt_len):
            self.scheduler.release_slice(job.request_id)
            return EngineOutput(job.request_id, [], finish_reason=FinishReason.ERROR, num_prompt_tokens=prompt_len,
                                error="no room for the prompt's KV on the decoding instance; retry")
        self.worker.batch.states[job.request_id] = CachedRequestState(
            job.request_id, list(job.prompt_token_ids), [token], job.sampling_params, list(mine.block_ids),
            tuple(job.eos_token_ids))
        return self.scheduler.adopt(request, token)
