"""One engine instance: a scheduler over the KV pool of one device and the worker that executes its plans.

The worker class is named by import path and resolved here, lazily, so the control plane never imports the data
plane (``accordion.workers``) at module level.
"""

from __future__ import annotations

import importlib
import logging
import queue
from collections.abc import Callable

from accordion.cluster.config import EngineConfig
from accordion.cluster.engine import EngineCore
from accordion.cluster.migration import MigrationCandidate, MigrationState, NotMigratable
from accordion.cluster.outputs import EngineOutput, RequestMoved
from accordion.cluster.plan import SPPrefillBatch, SPPrefillJob
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
        self.pair_groups: dict[tuple[int, int], object] = {}
        """One gloo group per ordered (rank, rank) pair while in a group (multi-master traffic, migration)."""
        self.slice_server = None
        """Multi-master decoding's holder side (``accordion.workers.multi_master.SliceServer``) while in a group."""
        self._posted: queue.SimpleQueue = queue.SimpleQueue()
        self.post: Callable[[Callable[[EngineInstance], object]], object] = self._posted.put
        """Run a function on the thread that owns this instance (other threads must not touch the scheduler).
        :class:`~accordion.cluster.engine_loop.EngineLoop` points it at its queue of calls; without a loop, the
        owner runs :meth:`run_posted`."""
        logger.info("engine instance ready: %d KV blocks, max_model_len %d", self.num_blocks, self.max_model_len)

    # ------------------------------------------------------------------ elastic sequence parallelism
    def run_posted(self) -> None:
        """Run what other threads posted (see :attr:`post`)."""
        while not self._posted.empty():
            self._posted.get()(self)

    def join_group(self, init_method: str, world_size: int, rank: int, backend: str | None = None
                   ) -> list[EngineOutput]:
        """Join the instances' torch.distributed group (NCCL on GPU, gloo on CPU) at the manager's address, with
        the pair groups of multi-master decoding. Returns the outputs of requests that leaving the old group
        ended."""
        from accordion.workers.multi_master import SliceServer, SpreadExchange, pair_groups
        from accordion.workers.parallel import init_instance_group

        lost = self.leave_group()
        backend = backend or ("nccl" if self.worker.device.type == "cuda" else "gloo")
        init_instance_group(init_method, world_size, rank, backend=backend)
        self.rank = rank
        groups = self.pair_groups = pair_groups(world_size)
        cap = self.config.scheduler.max_num_seqs
        self.worker.spread = SpreadExchange(rank, groups, cap, self.worker.device)
        self.slice_server = SliceServer(self.worker, rank, groups, cap, self._release_later)
        self.scheduler.spill_enabled = world_size > 1
        return lost

    def _release_later(self, request_id: str) -> None:
        self.post(lambda inst: inst.scheduler.release_slice(request_id))

    def leave_group(self) -> list[EngineOutput]:
        """Leave the instances' process group (on shutdown, or before re-joining). Spread requests still decoding
        lose their remote slices: they end with an error (returned)."""
        from accordion.workers.parallel import leave_instance_group

        if self.rank is None:
            return []
        lost = self.scheduler.abort([r.request_id for r in self.scheduler.running if r.spread_local_tokens is not None])
        for out in lost:
            out.finish_reason = FinishReason.ERROR
            out.error = "the instance group re-formed while this request's KV was spread over instances; retry"
        for rid, *_ in self.scheduler.spill_requests:
            self.scheduler.spill_failed(rid)
        self.scheduler.spill_enabled = False
        try:
            self.worker.spread.stop()
            self.slice_server.join()
        finally:
            self.worker.spread, self.slice_server, self.pair_groups = None, None, {}
            leave_instance_group()
            self.rank = None
        return lost

    def _release_holders(self, job: SPPrefillJob) -> None:
        """The master gave up on a spread request: the other slices' holders free them."""
        from accordion.workers.multi_master import SpreadState

        holders = [s.rank for s in job.placement if s.rank != self.rank]
        if len(job.placement) > 1 and holders and self.worker.spread is not None:
            self.worker.spread.release(SpreadState(job.job_id, 0, holders))
            self.worker.spread.flush()

    # ------------------------------------------------------------------ multi-master scale-up
    def register_slice(self, master: int, sid: int, request_id: str, block_ids: list[int], start: int) -> None:
        """Take the KV of a decoding request's new tokens from position ``start`` on, into reserved blocks."""
        self.slice_server.register(master, sid, request_id, block_ids, start, 0)

    def drop_slice(self, sid: int) -> None:
        """Forget a registered slice whose master no longer wants it, and free its blocks."""
        request_id = self.slice_server.drop(sid)
        if request_id is not None:
            self.scheduler.release_slice(request_id)

    def attach_tail(self, request_id: str, sid: int, holder: int, start: int) -> bool:
        """The request's new tokens' KV now goes to ``holder`` (rank), from position ``start`` on."""
        from accordion.workers.multi_master import SpreadState

        if not self.scheduler.attach_tail(request_id, start):
            return False
        self.worker.batch.states[request_id].spread = SpreadState(sid, start, [holder])
        logger.info("request %s scales up: its KV from position %d goes to rank %d", request_id, start, holder)
        return True

    def held_slices(self) -> int:
        """KV slices kept here for other masters' requests (an instance drains only once they are gone)."""
        return 0 if self.slice_server is None else self.slice_server.num_slices

    # ------------------------------------------------------------------ live migration (accordion.cluster.migration)
    def migration_candidates(self) -> list[MigrationCandidate]:
        return self.scheduler.migration_candidates()

    def export_request(self, request_id: str) -> MigrationState | NotMigratable | None:
        """Source: pause the request and describe it (None: a step in flight still computes it; ask again)."""
        return self.scheduler.export_request(request_id, self.core.inflight_request_ids())

    def resume_migration(self, request_id: str) -> None:
        self.scheduler.resume_migration(request_id)

    def send_kv(self, block_ids: list[int], dst_rank: int) -> int:
        """Source: send the KV of these blocks, all layers, to ``dst_rank`` (which runs :meth:`receive_request`).
        Sent even if the request ended meanwhile (the destination is waiting for it); returns the bytes."""
        from accordion.workers.kv_transfer import send_blocks

        return send_blocks(self.worker.kv_caches, block_ids, dst_rank, self._pair_group(self.rank, dst_rank))

    def kv_room(self) -> tuple[int, int]:
        """``(free blocks, spare blocks)`` now, on the engine thread: unlike a load report (sent after the next
        step), it reflects the engine calls that ran before it (a migration's commit, a reservation)."""
        return self.scheduler.kv.num_free_blocks, self.scheduler.num_spare_blocks

    def hold_room(self, request_id: str, num_tokens: int) -> bool:
        """Take the blocks for a request about to be prefilled here (compaction made the room), so decoding
        requests cannot take them first (:meth:`~accordion.cluster.scheduler.Scheduler.hold_room`)."""
        return self.scheduler.hold_room(request_id, num_tokens)

    def reserve_migration(self, state: MigrationState) -> list[int] | None:
        """Destination: blocks for the request's KV, if it and the requests here can all finish here
        (:meth:`~accordion.cluster.scheduler.Scheduler.reserve_migration`); None otherwise."""
        return self.scheduler.reserve_migration(state)

    def receive_request(self, state: MigrationState, block_ids: list[int], src_rank: int) -> None:
        """Destination: receive the request's KV into ``block_ids`` (reserved by :meth:`reserve_slice`), then run
        it as a decoding request. On failure the blocks are freed and the error raised."""
        from accordion.workers.input_batch import CachedRequestState
        from accordion.workers.kv_transfer import recv_blocks

        try:
            recv_blocks(self.worker.kv_caches, block_ids, src_rank, self._pair_group(src_rank, self.rank))
            self.scheduler.import_request(state)
        except Exception:
            self.scheduler.release_slice(state.request_id)
            raise
        self.worker.batch.states[state.request_id] = CachedRequestState(
            state.request_id, list(state.prompt_token_ids), list(state.output_token_ids), state.sampling_params,
            list(block_ids), tuple(state.eos_token_ids))
        logger.info("request %s migrated in from rank %d (%d tokens of KV)", state.request_id, src_rank,
                    state.num_computed_tokens)

    def commit_migration(self, request_id: str, dst_instance: str) -> RequestMoved | None:
        """Source: the destination runs the request now; free it here. The returned marker goes out on this
        instance's output stream after the request's last tokens. None if the request ended here meanwhile."""
        if not self.scheduler.release_migrated(request_id):
            return None
        return RequestMoved(request_id, dst_instance)

    def _pair_group(self, src: int, dst: int):
        group = self.pair_groups.get((src, dst))
        if group is None:
            raise RuntimeError(f"rank {self.rank}: no pair group ({src}, {dst}); is the instance group formed?")
        return group

    def spill_failed(self, request_id: str) -> None:
        self.scheduler.spill_failed(request_id)

    def reserve_slice(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for a slice of a sequence-parallel prefill planned ahead of the job (multi-master placement)."""
        return self.scheduler.reserve_slice(request_id, num_tokens)

    def release_slice(self, request_id: str) -> None:
        self.scheduler.release_slice(request_id)

    def run_sp_prefill(self, batch: SPPrefillBatch, requests: list[Request] | None = None) -> list[EngineOutput]:
        """Run this instance's share of a sequence-parallel prefill of one or more prompts.

        A slice of a placement whose ``block_ids`` are empty is allocated here, from this instance's pool. The
        master (``batch.group[0]``), given the ``requests``, adopts each for decoding and returns their first
        outputs: it holds a prompt's whole KV (proactive scale-down), or, when its placement has several slices,
        the first one, and decodes with the others where they are (multi-master decoding; their holders register
        them with their :class:`~accordion.workers.multi_master.SliceServer`). An instance that cannot store its
        slice still serves the ring (the others would wait for it) and the master then fails that request.
        """
        from accordion.workers.sequence_parallel import SequenceParallelPrefill

        stored = {}
        for job in batch.jobs:
            mine = job.slice_of(self.rank)
            stored[job.request_id] = True
            if mine is not None and not mine.block_ids:
                blocks = self.scheduler.reserve_slice(job.request_id, mine.end - mine.start)
                if blocks is None:
                    stored[job.request_id] = False
                    job.placement = [s for s in job.placement if s.rank != self.rank]
                else:
                    mine.block_ids = blocks
        master = self.rank == batch.group[0]
        try:
            tokens = SequenceParallelPrefill(self.worker, self.rank).run(batch)
        except Exception as e:  # a failed collective: end the requests with a clear error, never leave them hanging
            logger.exception("sequence-parallel prefill %d failed on rank %s", batch.batch_id, self.rank)
            outs = []
            for job in batch.jobs:
                self.scheduler.release_slice(job.request_id)
                if master:
                    self._release_holders(job)
                    outs.append(EngineOutput(job.request_id, [], finish_reason=FinishReason.ERROR,
                                             num_prompt_tokens=len(job.prompt_token_ids),
                                             error=f"sequence-parallel prefill failed: {type(e).__name__}: {e}"))
            return outs
        if not master:
            for job in batch.jobs:
                mine = job.slice_of(self.rank)
                if len(job.placement) > 1 and stored[job.request_id] and mine is not None:
                    # serve this slice to the master's decode steps
                    self.slice_server.register(batch.group[0], job.job_id, job.request_id, mine.block_ids,
                                               mine.start, mine.end - mine.start)
            return []
        by_id = {r.request_id: r for r in requests or []}
        return [self._adopt(job, by_id[job.request_id], tokens[job.request_id], stored[job.request_id])
                for job in batch.jobs]

    def _adopt(self, job: SPPrefillJob, request: Request, token: int, stored: bool) -> EngineOutput:
        """The master takes a prefilled request over for decoding (its KV all here, or spread)."""
        from accordion.workers.input_batch import CachedRequestState
        from accordion.workers.multi_master import SpreadState

        mine, prompt_len = job.slice_of(self.rank), len(job.prompt_token_ids)
        spread = len(job.placement) > 1
        if not stored or mine is None or mine.start != 0 or (not spread and mine.end != prompt_len):
            self.scheduler.release_slice(job.request_id)
            self._release_holders(job)
            return EngineOutput(job.request_id, [], finish_reason=FinishReason.ERROR, num_prompt_tokens=prompt_len,
                                error="no room for the prompt's KV on the decoding instance; retry")
        state = CachedRequestState(job.request_id, list(job.prompt_token_ids), [token], job.sampling_params,
                                   list(mine.block_ids), tuple(job.eos_token_ids))
        if spread:  # multi-master decoding: the other slices stay where they are
            state.spread = SpreadState(job.job_id, mine.end, [s.rank for s in job.placement if s.rank != self.rank])
        self.worker.batch.states[job.request_id] = state
        return self.scheduler.adopt(request, token, mine.end if spread else None)
