"""Iteration-level scheduler with Sarathi-Serve stall-free batching.

Each step spends a token budget (``max_num_batched_tokens``) in this order:

1. every running request that is decoding (one token each); if its next token needs a block and none is free,
   the lowest-priority running request is preempted (its blocks freed, recomputed later);
2. running requests whose prefill is only partly done (the next chunk of their prompt);
3. new requests in admission order (FCFS, or priority then FCFS), while blocks for their whole prompt can be
   allocated up front and ``max_num_seqs`` allows; optionally a bounded number may pass a head that does not fit.

There is no prefill phase or decode phase: a step is whatever the budget buys. The scheduler imports no torch;
it is tested by constructing it (tests/cluster/test_scheduler.py).
"""

from __future__ import annotations

import bisect
import itertools
import time

from accordion.cluster.block_manager import KVCacheManager
from accordion.cluster.config import CacheConfig, SchedulerConfig
from accordion.cluster.errors import EngineOverloadedError, RequestTooLargeError
from accordion.cluster.migration import MigrationCandidate, MigrationState, NotMigratable
from accordion.cluster.outputs import EngineOutput, RequestTimings
from accordion.cluster.plan import NewRequestData, ScheduledChunk, StepPlan, StepResult
from accordion.cluster.request import Request, RequestStatus, SamplingParams


_SPILL: list[int] = []
"""Returned by ``Scheduler._grow`` (by identity) for a request that waits to scale up."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, *, num_blocks: int, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[tuple[tuple, Request]] = []  # sorted by admission key
        self.running: list[Request] = []  # in admission-key order: the tail is preempted first
        self._seq = itertools.count()
        self._keys: dict[str, tuple] = {}
        self._forget: list[str] = []  # request ids the worker may drop at the next step
        self._step_id = 0
        self.num_preemptions = 0
        self.spill_enabled = False
        """Multi-master scale-up: a decode that finds no free block asks for another instance to take its new
        tokens' KV (see :attr:`spill_requests`) instead of preempting. Set while the instance is in a group."""
        self._spilling: dict[str, tuple[int, int]] = {}  # request id -> (first position elsewhere, tokens)
        self._no_spill: set[str] = set()  # refused once: preempt as usual
        self._migrating: set[str] = set()  # paused for a live migration: not scheduled until resumed or released
        self._held: set[str] = set()  # blocks taken ahead for a request to be placed here (hold_room)

    # ------------------------------------------------------------------ requests in and out
    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Raise RequestTooLargeError if a request could never run here (instead of hanging in the queue)."""
        if num_prompt_tokens >= self.max_model_len:
            raise RequestTooLargeError(
                "prompt", f"prompt has {num_prompt_tokens} tokens; max_model_len is {self.max_model_len}")
        total = num_prompt_tokens + (max_tokens if max_tokens is not None else self.max_model_len)
        total = min(total, self.max_model_len)
        # The last sampled token's KV is never computed.
        if self.kv.blocks_for(total - 1) > self.kv.num_blocks:
            raise RequestTooLargeError(
                "max_tokens", f"prompt + max_tokens needs {self.kv.blocks_for(total - 1)} KV blocks; "
                f"the pool has {self.kv.num_blocks}")

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        self.check_fits(request.num_prompt_tokens, request.sampling_params.max_tokens)
        if len(self.waiting) >= self.config.max_waiting:
            raise EngineOverloadedError(f"{len(self.waiting)} requests are waiting; try again later")
        prio = request.priority if self.config.policy == "priority" else 0
        key = (prio, request.arrival_time, next(self._seq))
        self._keys[request.request_id] = key
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, (key, request), key=lambda kr: kr[0])

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        outputs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(req, []))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_forgotten(self) -> bool:
        """Requests ended since the last plan, which the worker has not been told to forget yet."""
        return bool(self._forget)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        new_reqs: list[NewRequestData] = []
        now = time.monotonic()

        # 1. Decodes: never stalled by prefills.
        scheduled: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.in_prefill or req.request_id in self._spilling or req.request_id in self._migrating:
                i += 1
                continue
            new_blocks = self._grow(req, req.num_tokens)
            if new_blocks is None:  # this request itself was preempted
                continue
            if new_blocks is _SPILL:  # it waits for another instance to take its new tokens
                i += 1
                continue
            chunks.append(ScheduledChunk(req.request_id, req.num_computed_tokens, 1, True, new_blocks))
            req.num_computed_tokens += 1
            scheduled.add(req.request_id)
            budget -= 1
            i += 1
        num_decodes = len(chunks)

        # 2. Partial prefills, continuing (their blocks were allocated at admission).
        for req in self.running:
            if budget <= 0:
                break
            if req.request_id in scheduled or not req.in_prefill:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            chunks.append(self._prefill_chunk(req, n, []))
            budget -= n

        # 3. New admissions in key order. A request that cannot get its blocks blocks the queue (FCFS), except that
        #    up to max_out_of_order later requests that fit may pass it (bounded out-of-order admission).
        i, passed = 0, 0  # passed: requests admitted ahead of a blocked one
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if i > 0 and passed >= self.config.max_out_of_order:
                break
            _, req = self.waiting[i]
            cached = self.kv.find_cached_prefix(req)
            blocks = self.kv.allocate(req, req.num_tokens, cached)
            if blocks is None:
                i += 1
                continue
            passed += i > 0
            self.waiting.pop(i)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = len(cached) * self.kv.block_size
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                req.num_cached_tokens = req.num_computed_tokens
            self._insert_running(req)
            new_reqs.append(NewRequestData(req.request_id, list(req.prompt_token_ids), list(req.output_token_ids),
                                           req.sampling_params, list(blocks), req.eos_token_ids))
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            chunks.append(self._prefill_chunk(req, n, []))
            budget -= n

        self._step_id += 1
        forget, self._forget = self._forget, []
        return StepPlan(self._step_id, new_reqs, chunks, forget, num_decodes)

    def _prefill_chunk(self, req: Request, n: int, new_blocks: list[int]) -> ScheduledChunk:
        start = req.num_computed_tokens
        req.num_computed_tokens += n
        return ScheduledChunk(req.request_id, start, n, start + n == req.num_tokens, new_blocks)

    def _grow(self, req: Request, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` tokens of a running request, preempting from the tail as needed.

        Returns the new block ids, None if ``req`` itself had to be preempted, or ``_SPILL`` when it waits to
        scale up instead (:attr:`spill_enabled`).
        """
        if req.spread_local_tokens is not None:  # its new KV goes to the tail holder
            return []
        while True:
            blocks = self.kv.allocate(req, num_tokens)
            if blocks is not None:
                return blocks
            if self.spill_enabled and req.request_id not in self._no_spill and not req.in_prefill:
                start = req.num_computed_tokens  # the KV of [0, start) stays here
                end = min(req.num_prompt_tokens + req.max_tokens, self.max_model_len) - 1  # the last has no KV
                self._spilling[req.request_id] = (start, end - start)
                return _SPILL
            # Spread requests are never victims: recomputing one locally is what their spread avoided.
            victim = next(r for r in reversed(self.running) if r.spread_local_tokens is None)
            self._preempt(victim)
            if victim is req:
                return None

    def _insert_running(self, req: Request) -> None:
        keys = [self._keys[r.request_id] for r in self.running]
        self.running.insert(bisect.bisect(keys, self._keys[req.request_id]), req)

    def _preempt(self, req: Request) -> None:
        self._spilling.pop(req.request_id, None)
        self._migrating.discard(req.request_id)
        self._no_spill.discard(req.request_id)
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._forget.append(req.request_id)
        bisect.insort(self.waiting, (self._keys[req.request_id], req), key=lambda kr: kr[0])

    # ------------------------------------------------------------------ results
    def update(self, plan: StepPlan, result: StepResult) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        now = time.monotonic()
        for rid, error in result.failed.items():
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                req.error = error
                self._finish(req, RequestStatus.FINISHED_ERROR)
                out = self._output(req, [])
                out.error = error
                outputs.append(out)
        for chunk in plan.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.is_finished or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            self.kv.cache_computed_blocks(req)
            if not chunk.sample:
                continue
            token = result.sampled[req.request_id]
            req.output_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            status, stop_token = self._check_stop(req, token)
            lp = result.logprobs.get(req.request_id)
            if status is not None:
                self._finish(req, status)
            outputs.append(self._output(req, [token], [lp] if lp else None, stop_token))
        return outputs

    def _check_stop(self, req: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        sp = req.sampling_params
        n_out = len(req.output_token_ids)
        if n_out > sp.min_tokens:  # the sampler masks stop tokens below min_tokens
            if (not sp.ignore_eos and token in req.eos_token_ids) or token in sp.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if n_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self._spilling.pop(req.request_id, None)
        self._migrating.discard(req.request_id)
        self._no_spill.discard(req.request_id)
        if req in self.running:
            self.running.remove(req)
        else:
            idx = next((i for i, (_, r) in enumerate(self.waiting) if r is req), None)
            if idx is not None:
                self.waiting.pop(idx)
        self.kv.free(req.request_id)
        req.status = status
        req.finish_time = time.monotonic()
        self._forget.append(req.request_id)
        del self.requests[req.request_id]
        del self._keys[req.request_id]

    def _output(self, req: Request, tokens: list[int], logprobs=None, stop_token: int | None = None) -> EngineOutput:
        out = EngineOutput(req.request_id, tokens, logprobs, req.finish_reason, stop_token,
                           req.num_prompt_tokens, req.num_cached_tokens)
        if req.is_finished:
            start = req.first_scheduled_time or req.finish_time
            first = req.first_token_time or req.finish_time
            out.timings = RequestTimings(start - req.arrival_time, first - start, req.finish_time - first)
        return out

    def schedule_lookahead(self, inflight: StepPlan) -> StepPlan | None:
        """The next decode step of the requests of ``inflight`` (a decode-only step whose sampled tokens are not
        known yet), assuming each continues; None when that is not the whole next step.

        Async scheduling: the runner launches this step from the in-flight step's tokens on the device, before
        they are read back. A request that then turns out finished has its row computed in vain (and ignored).
        Only the steady state qualifies: nothing waiting that the next step could admit (the batch is full at
        ``max_num_seqs``; a request that ends in ``inflight`` frees its seat one step later), every running request
        in ``inflight``, no request near its length limit, and blocks for every row without preempting anyone.
        """
        admissible = self.waiting and len(self.running) < self.config.max_num_seqs
        if admissible or self._migrating or inflight.num_decodes != len(inflight.chunks) or not inflight.chunks:
            return None
        rows = [self.requests.get(c.request_id) for c in inflight.chunks]
        if any(r is None or r.status != RequestStatus.RUNNING for r in rows) or len(rows) != len(self.running):
            return None
        if any(len(r.output_token_ids) + 2 > r.max_tokens or r.num_tokens + 2 > self.max_model_len for r in rows):
            return None
        bs = self.kv.block_size
        held = self.kv.req_blocks
        need = sum(1 for r in rows if r.spread_local_tokens is None
                   and r.num_computed_tokens + 1 > len(held.get(r.request_id, ())) * bs)
        if need > self.kv.num_free_blocks:  # all or nothing: a block taken here must reach the worker in a plan
            return None
        chunks = []
        for req in rows:
            new_blocks = self._grow(req, req.num_computed_tokens + 1)
            assert new_blocks is not None
            chunks.append(ScheduledChunk(req.request_id, req.num_computed_tokens, 1, True, new_blocks))
        for req in rows:
            req.num_computed_tokens += 1
        self._step_id += 1
        forget, self._forget = self._forget, []
        return StepPlan(self._step_id, [], chunks, forget, len(chunks))

    # ------------------------------------------------------------------ sequence parallelism
    def reserve_slice(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` of a request prefilled across instances; None if they do not fit. A request
        with blocks held for it (:meth:`hold_room`) gets those, grown to ``num_tokens`` if needed."""
        holder = Request(request_id=request_id, prompt_token_ids=[], sampling_params=SamplingParams())
        if request_id in self._held:
            self._held.discard(request_id)
            if self.kv.allocate(holder, num_tokens) is None:
                self.kv.free(request_id)
                return None
            return list(self.kv.req_blocks[request_id])
        if request_id in self.kv.req_blocks:
            raise ValueError(f"request id {request_id!r} already holds blocks here")
        return self.kv.allocate(holder, num_tokens)

    def hold_room(self, request_id: str, num_tokens: int) -> bool:
        """Take the blocks for ``num_tokens`` of a request about to be placed here (the room a compaction made),
        so that decoding requests cannot take them first; the request's :meth:`reserve_slice` gets them, and
        :meth:`release_slice` gives them back. False (nothing held) when they do not fit."""
        if self.reserve_slice(request_id, num_tokens) is None:
            return False
        self._held.add(request_id)
        return True

    def release_slice(self, request_id: str) -> None:
        self._held.discard(request_id)
        self.kv.free(request_id)

    def adopt(self, request: Request, first_token: int, local_tokens: int | None = None) -> EngineOutput:
        """Make a request whose prompt KV was written by a sequence-parallel prefill (into blocks from
        :meth:`reserve_slice`) a decoding request here with its first sampled token: the whole prompt's KV is
        here, or (multi-master decoding) only ``[0, local_tokens)``, the rest on other instances."""
        held = self.kv.req_blocks.get(request.request_id, [])
        here = request.num_prompt_tokens if local_tokens is None else local_tokens
        assert len(held) * self.kv.block_size >= here, "adopted request lacks KV blocks"
        request.spread_local_tokens = local_tokens
        now = time.monotonic()
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = request.num_prompt_tokens
        request.first_scheduled_time = request.first_scheduled_time or now
        request.first_token_time = now
        request.output_token_ids.append(first_token)
        key = (request.priority if self.config.policy == "priority" else 0, request.arrival_time, next(self._seq))
        self._keys[request.request_id] = key
        self.requests[request.request_id] = request
        self._insert_running(request)
        self.kv.cache_computed_blocks(request)
        status, stop_token = self._check_stop(request, first_token)
        if status is not None:
            self._finish(request, status)
        return self._output(request, [first_token], None, stop_token)

    # ------------------------------------------------------------------ multi-master scale-up
    @property
    def spill_requests(self) -> tuple[tuple[str, int, int], ...]:
        """``(request id, first position elsewhere, tokens)`` of the requests waiting to scale up."""
        return tuple((rid, start, n) for rid, (start, n) in self._spilling.items())

    def attach_tail(self, request_id: str, start: int) -> bool:
        """Another instance took the request's KV from ``start`` on: it decodes again, taking no blocks here.
        False if the request is no longer waiting for that (finished, aborted)."""
        req = self.requests.get(request_id)
        waiting = self._spilling.get(request_id)
        if req is None or waiting is None or waiting[0] != start or req.num_computed_tokens != start:
            return False
        del self._spilling[request_id]
        req.spread_local_tokens = start
        return True

    def spill_failed(self, request_id: str) -> None:
        """No instance could take the request's new KV: it competes for blocks here again (and may be
        preempted)."""
        if self._spilling.pop(request_id, None) is not None:
            self._no_spill.add(request_id)

    # ------------------------------------------------------------------ live migration
    def migration_candidates(self) -> list[MigrationCandidate]:
        """Running requests that could move to another instance now, fewest tokens first."""
        out = [MigrationCandidate(r.request_id, r.num_tokens, min(r.num_prompt_tokens + r.max_tokens,
                                                                  self.max_model_len))
               for r in self.running if self._why_not_migratable(r) is None]
        return sorted(out, key=lambda c: c.num_tokens)

    def _why_not_migratable(self, req: Request | None) -> str | None:
        if req is None or req.is_finished:
            return "not running here"
        if req.status != RequestStatus.RUNNING or req.in_prefill or not req.output_token_ids:
            return "not decoding"
        if req.spread_local_tokens is not None or req.request_id in self._spilling:
            return "its KV is spread over instances"
        if req.request_id in self._migrating:
            return "already migrating"
        return None

    def export_request(self, request_id: str, in_flight: set[str]) -> MigrationState | NotMigratable | None:
        """Stop scheduling a decoding request and describe it for another instance (its blocks stay held until
        :meth:`release_migrated` or :meth:`resume_migration`). None while a step in flight (``in_flight``: its
        request ids) still computes it: ask again after the next step."""
        req = self.requests.get(request_id)
        if request_id not in self._migrating:
            why = self._why_not_migratable(req)
            if why is not None:
                return NotMigratable(why)
            self._migrating.add(request_id)
        if request_id in in_flight:
            return None
        assert req.num_computed_tokens == req.num_tokens - 1, "a paused decode has all but its last token's KV"
        now = time.monotonic()
        held = self.kv.req_blocks.get(request_id, [])
        return MigrationState(
            request_id, list(req.prompt_token_ids), list(req.output_token_ids), req.sampling_params,
            tuple(req.eos_token_ids), req.priority, req.num_computed_tokens, req.num_cached_tokens,
            req.num_preemptions, list(held[:self.kv.blocks_for(req.num_computed_tokens)]), now - req.arrival_time,
            None if req.first_scheduled_time is None else now - req.first_scheduled_time,
            None if req.first_token_time is None else now - req.first_token_time)

    def blocks_to_finish(self) -> int:
        """KV blocks the requests here still need, beyond those they hold, to reach their final length (prompt +
        max_tokens, capped by max_model_len; the last token has no KV). Waiting requests count in full; spread
        requests not at all (their new KV goes to another instance)."""
        held, bs, cap = self.kv.req_blocks, self.kv.block_size, self.max_model_len
        total = 0
        for rid, req in self.requests.items():  # every step (the load report): kept to plain arithmetic
            if req.spread_local_tokens is not None or req.is_finished:
                continue
            need = -(-(min(req.num_prompt_tokens + req.max_tokens, cap) - 1) // bs) - len(held.get(rid, ()))
            if need > 0:
                total += need
        return total

    @property
    def num_spare_blocks(self) -> int:
        """Free blocks less :meth:`blocks_to_finish` (negative: the requests here may not all finish without
        preempting or scaling up)."""
        return self.kv.num_free_blocks - self.blocks_to_finish()

    def reserve_migration(self, state: MigrationState) -> list[int] | None:
        """Destination of a live migration: blocks for the request's KV so far, but only if the request can also
        finish here (prompt + max_tokens) with the requests already here still able to finish too
        (:attr:`num_spare_blocks`): taking a request in must not make anyone here preempt or scale up."""
        final = min(len(state.prompt_token_ids) + (state.sampling_params.max_tokens or self.max_model_len),
                    self.max_model_len) - 1
        if self.num_spare_blocks < self.kv.blocks_for(final):
            return None
        return self.reserve_slice(state.request_id, state.num_computed_tokens)

    def resume_migration(self, request_id: str) -> None:
        """The migration failed: schedule the request here again."""
        self._migrating.discard(request_id)

    def release_migrated(self, request_id: str) -> bool:
        """The destination runs the request now: forget it here and free its blocks, without an output. False if
        it is no longer paused for migration here (it finished, was aborted or preempted meanwhile)."""
        req = self.requests.get(request_id)
        if req is None or request_id not in self._migrating or req.status != RequestStatus.RUNNING:
            return False
        self._migrating.discard(request_id)
        self.running.remove(req)
        self.kv.free(request_id)
        self._forget.append(request_id)
        del self.requests[request_id]
        del self._keys[request_id]
        return True

    def import_request(self, state: MigrationState) -> Request:
        """Add a migrated request as running, its KV already in the blocks reserved for it
        (:meth:`reserve_slice` of ``state.num_computed_tokens`` tokens)."""
        rid = state.request_id
        held = self.kv.req_blocks.get(rid, [])
        assert len(held) * self.kv.block_size >= state.num_computed_tokens, "imported request lacks KV blocks"
        assert rid not in self.requests, f"request {rid!r} is already here"
        now = time.monotonic()
        req = Request(request_id=rid, prompt_token_ids=list(state.prompt_token_ids),
                      sampling_params=state.sampling_params, eos_token_ids=tuple(state.eos_token_ids),
                      priority=state.priority, arrival_time=now - state.arrival_age_s,
                      output_token_ids=list(state.output_token_ids), num_computed_tokens=state.num_computed_tokens,
                      num_cached_tokens=state.num_cached_tokens, num_preemptions=state.num_preemptions,
                      status=RequestStatus.RUNNING)
        req.first_scheduled_time = None if state.scheduled_age_s is None else now - state.scheduled_age_s
        req.first_token_time = None if state.first_token_age_s is None else now - state.first_token_age_s
        if rid in self._forget:  # it left this instance earlier: the worker's new state must not be dropped
            self._forget.remove(rid)
        prio = req.priority if self.config.policy == "priority" else 0
        self._keys[rid] = (prio, req.arrival_time, next(self._seq))
        self.requests[rid] = req
        self._insert_running(req)
        self.kv.cache_computed_blocks(req)
        return req

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        held = set(self.kv.req_blocks) - self._slices_in_flight()
        assert held <= {r.request_id for r in self.running}, "a request that is not running holds blocks"

    def _slices_in_flight(self) -> set[str]:
        return {rid for rid in self.kv.req_blocks if rid not in self.requests}
