"""The global manager's dispatch of sequence-parallel prefills onto instance groups.

Front ends choose each long prompt's instance group (:mod:`accordion.cluster.sp_placement` over
:mod:`accordion.cluster.esp_planner`) and hand the prompt to the manager
(:meth:`~accordion.cluster.global_manager.GlobalManager.run_sp_prefill`), which queues it here. The
:class:`PrefillDispatcher` starts what the pure queue (:mod:`accordion.cluster.sp_queue`) says can start, one batch
in flight per instance: it reserves each prompt's KV blocks (on the master, or the slices of a multi-master
placement) and sends the batch to every member of the group, under the manager's group lock, so batches reach every
instance in one global order (no deadlock between overlapping groups).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from accordion.cluster.config import ESPConfig
from accordion.cluster.errors import EngineUnavailableError
from accordion.cluster.instance_record import InstanceRecord
from accordion.cluster.request import Request
from accordion.cluster.sp_queue import PendingPrefill, PrefillQueue

if TYPE_CHECKING:
    from accordion.cluster.plan import KVSlice

logger = logging.getLogger(__name__)

Placement = list[tuple[str, int, int, int]]
"""``(instance, start, end, extra_tokens)`` slices of a prompt's KV, the master's first."""


class PrefillDispatcher:
    """Queues sequence-parallel prefills and starts them on their instance groups.

    Constructed by the global manager with what it needs of the manager's state: ``instances`` returns the live
    registry (instance id -> record), ``ranks`` the current ranks in the instances' process group, ``lock`` the
    group lock (held while a batch is sent, as while the group is re-formed or a request migrates), and ``job_ids``
    the counter of job ids, shared with multi-master scale-up since a job's id is also its request's spread id on
    the instances (:mod:`accordion.workers.multi_master`). Use from the manager's event loop only.
    """

    def __init__(self, esp: ESPConfig, instances: Callable[[], Mapping[str, InstanceRecord]],
                 ranks: Callable[[], Mapping[str, int]], lock: Callable[[], asyncio.Lock], job_ids: Iterator[int]):
        self._esp = esp
        self._instances = instances
        self._ranks = ranks
        self._lock = lock
        self._job_ids = job_ids
        self._batch_ids = itertools.count()
        self._prefills: PrefillQueue | None = None
        self._dispatcher: asyncio.Task | None = None
        self._redispatch = False
        self.num_sp_batches = 0
        self.num_sp_prompts = 0
        """Sequence-parallel prefill batches started, and the prompts in them."""

    def _sp_queue(self) -> PrefillQueue:
        if self._prefills is None:
            from accordion.cluster.esp_planner import PrefillCostModel

            esp = self._esp
            self._prefills = PrefillQueue(esp.max_batch_tokens, PrefillCostModel.for_config(esp).predict)
        return self._prefills

    async def run(self, request: Request, group: list[str], placement: Placement | None = None) -> None:
        """Queue the prefill of ``request`` across ``group`` (``group[0]`` decodes it afterwards) and return once it
        has started (see :meth:`~accordion.cluster.global_manager.GlobalManager.run_sp_prefill`).
        EngineUnavailableError when it cannot start: an instance of the group left, or the KV blocks (the master's,
        or a slice) could not be reserved."""
        done = asyncio.get_running_loop().create_future()
        self._sp_queue().add(PendingPrefill(request, list(group), placement, done))
        self._kick()
        await done

    def stats(self) -> dict[str, int]:
        """Sequence-parallel prefills so far: batches started, prompts in them, prompts queued."""
        return {"batches": self.num_sp_batches, "prompts": self.num_sp_prompts,
                "queued": len(self._sp_queue().pending)}

    def cancel(self, request_ids: list[str]) -> None:
        """Drop queued prefills whose requests were cancelled before they started, giving back the room a
        compaction may hold for them on their master."""
        instances = self._instances()
        for p in self._sp_queue().remove(set(request_ids)):
            master = instances.get(p.group[0])
            if master is not None:
                master.handle.release_slice.remote(p.request.request_id)
            if not p.done.done():
                p.done.set_result(None)

    def _kick(self) -> None:
        """Start what can start now (on a task of its own: callers never wait for other requests' dispatch)."""
        self._redispatch = True
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def _dispatch(self) -> None:
        while self._redispatch:
            self._redispatch = False
            async with self._lock():
                for batch in self._sp_queue().take_ready():
                    try:
                        await self._start_batch(batch)
                    except Exception as e:  # never leave a caller waiting, nor an instance marked busy
                        self._sp_queue().finished(batch[0].group)
                        for p in batch:
                            if not p.done.done():
                                p.done.set_exception(e)

    async def _start_batch(self, entries: list[PendingPrefill]) -> None:
        """Reserve each prompt's KV blocks (on the master, or the slices of a spread placement), then send the batch
        to every member (in the manager's one order)."""
        from accordion.cluster.plan import SPPrefillBatch, SPPrefillJob

        group = entries[0].group
        ranks_now = self._ranks()
        missing = [i for i in group if i not in ranks_now]
        if missing:
            raise EngineUnavailableError(f"instances {missing} are not in the instance group")
        ranks = [ranks_now[i] for i in group]
        started: list[tuple[PendingPrefill, SPPrefillJob]] = []
        for p in entries:
            req = p.request
            whole = [(group[0], 0, req.num_prompt_tokens, 0)]  # the master keeps it all
            try:  # reserved before the batch goes out: no room now fails it here, cleanly, not at the master
                slices = await self._reserve(req.request_id, whole if not p.placement or len(p.placement) < 2
                                             else p.placement)
            except EngineUnavailableError as e:
                p.done.set_exception(e)
                continue
            started.append((p, SPPrefillJob(next(self._job_ids), req.request_id, list(req.prompt_token_ids),
                                            req.sampling_params, tuple(req.eos_token_ids), slices)))
        if not started:
            self._sp_queue().finished(group)
            return
        batch = SPPrefillBatch(next(self._batch_ids), ranks, [job for _, job in started])
        self.num_sp_batches += 1
        self.num_sp_prompts += len(started)
        requests = [p.request for p, _ in started]
        instances = self._instances()
        refs = [instances[iid].handle.run_sp_batch.remote(batch, requests if iid == group[0] else None)
                for iid in group]
        for p, job in started:
            p.done.set_result(None)
            logger.info("request %s: sequence-parallel prefill (batch %d of %d) on %s, KV on %s",
                        p.request.request_id, batch.batch_id, len(started), group,
                        [(s.rank, s.start, s.end) for s in job.placement])
        asyncio.get_running_loop().create_task(self._await_batch(group, refs))

    async def _await_batch(self, group: list[str], refs: list) -> None:
        try:
            await asyncio.gather(*refs, return_exceptions=True)
        finally:
            self._sp_queue().finished(group)
            self._kick()

    async def _reserve(self, request_id: str, placement: Placement) -> list[KVSlice]:
        from accordion.cluster.plan import KVSlice

        instances = self._instances()
        handles = [instances[iid].handle for iid, *_ in placement]
        blocks = await asyncio.gather(*(h.reserve_slice.remote(request_id, end - start + extra)
                                        for h, (_, start, end, extra) in zip(handles, placement)),
                                      return_exceptions=True)
        if any(b is None or isinstance(b, BaseException) for b in blocks):
            errors = [b for b in blocks if isinstance(b, BaseException)]
            logger.warning("request %s: reserving KV slices %s failed: %s", request_id, placement,
                           errors[0] if errors else "no room")
            await asyncio.gather(*(h.release_slice.remote(request_id) for h, b in zip(handles, blocks)
                                   if isinstance(b, list)), return_exceptions=True)
            raise EngineUnavailableError(f"request {request_id}: KV slices could not be reserved "
                                         f"({errors[0] if errors else 'no room'}); retry")
        ranks = self._ranks()
        return [KVSlice(ranks[iid], start, end, b) for (iid, start, end, _), b in zip(placement, blocks)]
