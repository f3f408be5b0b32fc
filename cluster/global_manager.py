"""The global manager: a named Ray actor that owns the registry of engine instance actors.

It creates instances from a :class:`ClusterConfig` (resources per instance from the config), adds and removes
them at run time (removal drains first), pings every instance's ``load()`` periodically and marks one that fails
or times out dead (removed from routing, killed). Front ends (``RayEngineClient``) learn the membership through
:meth:`GlobalManager.watch`, a long poll that returns when it changes. The manager is not on the token path.

Elastic sequence parallelism: with ``esp.enabled`` the manager forms the instances' torch.distributed group
(re-formed whenever membership changes) and starts sequence-parallel prefills on instance groups, batching those
for the same group, one batch in flight per instance, in one global order (:meth:`GlobalManager.run_sp_prefill`,
:mod:`accordion.cluster.sp_queue`); front ends choose the groups with :mod:`accordion.cluster.esp_planner`. It also
arranges multi-master scale-up (:meth:`GlobalManager.scale_up`) and live migration of decoding requests
(:meth:`GlobalManager.migrate`, :mod:`accordion.cluster.migration`), which draining uses to empty an instance.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from accordion.cluster.config import ClusterConfig
from accordion.cluster.errors import EngineUnavailableError
from accordion.cluster.instance_record import InstanceRecord, InstanceState
from accordion.cluster.migration import (MigrationState, NotMigratable, blocks_for, choose_destination,
                                         plan_compaction, transfer_seconds)
from accordion.cluster.request import Request
from accordion.cluster.sp_queue import PendingPrefill, PrefillQueue

logger = logging.getLogger(__name__)


class GlobalManager:
    """Registry and lifecycle of instance actors. Use as a Ray async actor, see :func:`start_manager`."""

    def __init__(self, config: ClusterConfig, worker_cls: str | None = None):
        self.config = config
        self.worker_cls = worker_cls
        self._instances: dict[str, InstanceRecord] = {}
        self._ids = itertools.count()
        self._version = 0
        self._changed: asyncio.Condition | None = None
        self._health_task: asyncio.Task | None = None
        self._ranks: dict[str, int] = {}  # instance id -> rank in the instances' process group
        self._job_ids = itertools.count()
        self._batch_ids = itertools.count()
        self._group_lock: asyncio.Lock | None = None
        self._prefills: PrefillQueue | None = None
        self._dispatcher: asyncio.Task | None = None
        self._redispatch = False
        self.num_sp_batches = 0
        self.num_sp_prompts = 0
        """Sequence-parallel prefill batches started, and the prompts in them."""
        self.num_migrations = 0
        self.num_failed_migrations = 0
        """Requests moved between instances (:meth:`migrate`), and attempts that left them where they were."""

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self._changed

    async def _bump(self) -> None:
        async with self._cond():
            self._version += 1
            self._cond().notify_all()

    # ---- membership --------------------------------------------------------------------------------------------

    async def start(self, num_instances: int) -> list[InstanceRecord]:
        """Create ``num_instances`` instances concurrently; returns the registry."""
        self._cond()
        await asyncio.gather(*(self._create_instance() for _ in range(num_instances)))
        await self._form_group()
        return await self.list_instances()

    async def add_instance(self) -> InstanceRecord:
        """Add an instance at run time; with elastic SP the instances' group is re-formed to include it."""
        rec = await self._create_instance()
        await self._form_group()
        return rec

    async def _create_instance(self) -> InstanceRecord:
        """Create one instance actor with the configured resources, load its model, make it routable."""
        from accordion.cluster.instance import DEFAULT_WORKER
        from accordion.cluster.instance_actor import instance_actor_class

        c = self.config
        iid = f"instance-{next(self._ids)}"
        cls = instance_actor_class(c.gpus_per_instance, c.cpus_per_instance)
        handle = cls.options(name=f"{c.manager_name}.{iid}", namespace=c.namespace).remote(
            iid, c.engine, self.worker_cls or DEFAULT_WORKER,
            c.cpu_threads_per_instance if c.gpus_per_instance == 0 else None)
        rec = InstanceRecord(iid, handle)
        self._instances[iid] = rec
        await self._bump()
        try:
            info = await asyncio.wait_for(handle.start.remote(), c.start_timeout_s)
        except BaseException as e:
            await self._mark_dead(rec, f"failed to start: {type(e).__name__}: {e}")
            raise
        rec.info, rec.device, rec.dtype = info, info["device"], info["dtype"]
        rec.num_blocks, rec.max_model_len = info["num_blocks"], info["max_model_len"]
        rec.state = InstanceState.SERVING
        await self._bump()
        logger.info("instance %s serving on %s (%d KV blocks)", iid, rec.device, rec.num_blocks)
        return rec

    async def remove_instance(self, instance_id: str, drain: bool = True, timeout_s: float | None = None) -> bool:
        """Stop routing to the instance; with ``drain``, wait (up to ``timeout_s``, default
        ``drain_timeout_s``) for its requests to finish; then shut it down and kill it. Returns whether it drained
        cleanly (False: timed out, or it was not drained).

        With elastic SP (the instances' group exists) its decoding requests meanwhile migrate to the other
        serving instances that have room for them (:meth:`_evacuate`), so the drain waits only for what could
        not move (prefills, spread requests, no room elsewhere)."""
        import ray

        rec = self._instances.get(instance_id)
        if rec is None:
            raise KeyError(f"no instance {instance_id!r}")
        rec.state = InstanceState.DRAINING
        await self._bump()
        clean = False
        if drain:
            timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
            drained = asyncio.ensure_future(asyncio.wait_for(rec.handle.drain.remote(timeout), timeout + 5.0))
            if self.config.esp.enabled:
                await self._evacuate(instance_id, drained)
            try:
                clean = await drained
            except Exception as e:
                logger.warning("instance %s: drain failed: %s", instance_id, e)
            if not clean:
                logger.warning("instance %s did not drain within %.1fs; killing it", instance_id, timeout)
        try:
            await asyncio.wait_for(rec.handle.shutdown.remote(), 10.0)
        except Exception as e:
            logger.warning("instance %s: shutdown failed: %s", instance_id, e)
        ray.kill(rec.handle, no_restart=True)
        self._instances.pop(instance_id, None)
        await self._bump()
        logger.info("instance %s removed (drained cleanly: %s)", instance_id, clean)
        if self._ranks.pop(instance_id, None) is not None:
            await self._form_group()
        return clean

    # ---- elastic sequence parallelism --------------------------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        if self._group_lock is None:
            self._group_lock = asyncio.Lock()
        return self._group_lock

    async def _form_group(self) -> None:
        """(Re-)create the instances' torch.distributed group over the serving instances. Each instance joins
        on its engine thread after the jobs already queued there, so no job straddles two groups."""
        if not self.config.esp.enabled:
            return
        async with self._lock():
            members = [r for r in self._instances.values() if r.state == InstanceState.SERVING]
            self._ranks = {r.instance_id: i for i, r in enumerate(members)}
            if not members:
                return
            init = await members[0].handle.rendezvous_address.remote()
            await asyncio.gather(*(r.handle.join_group.remote(init, len(members), i) for i, r in enumerate(members)))
            logger.info("instance group formed: %s via %s", list(self._ranks), init)

    async def ranks(self) -> dict[str, int]:
        return dict(self._ranks)

    def _sp_queue(self) -> PrefillQueue:
        if self._prefills is None:
            from accordion.cluster.esp_planner import PrefillCostModel

            esp = self.config.esp
            self._prefills = PrefillQueue(esp.max_batch_tokens, PrefillCostModel.for_config(esp).predict)
        return self._prefills

    async def run_sp_prefill(self, request: Request, group: list[str],
                             placement: list[tuple[str, int, int, int]] | None = None) -> None:
        """Prefill ``request`` across the instances ``group``; ``group[0]`` decodes it afterwards. Returns once
        the prefill has started (queued behind earlier ones on the same instances, possibly batched with others
        for the same group: :mod:`accordion.cluster.sp_queue`).

        Without ``placement`` the master keeps the whole KV (proactive scale-down to one instance). With one,
        ``(instance, start, end, extra_tokens)`` slices (the master's first, the tail's last with room for the new
        tokens) are reserved on their instances first, and the request is decoded with its KV where the slices
        are (multi-master decoding). EngineUnavailableError when it cannot start: an instance of the group left,
        or the KV blocks (the master's, or a slice) could not be reserved."""
        done = asyncio.get_running_loop().create_future()
        self._sp_queue().add(PendingPrefill(request, list(group), placement, done))
        self._kick()
        await done

    async def sp_stats(self) -> dict[str, int]:
        """Sequence-parallel prefills so far: batches started, prompts in them, prompts queued."""
        return {"batches": self.num_sp_batches, "prompts": self.num_sp_prompts,
                "queued": len(self._sp_queue().pending)}

    async def cancel_sp_prefill(self, request_ids: list[str]) -> None:
        """Drop queued prefills whose requests were cancelled before they started."""
        for p in self._sp_queue().remove(set(request_ids)):
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
        missing = [i for i in group if i not in self._ranks]
        if missing:
            raise EngineUnavailableError(f"instances {missing} are not in the instance group")
        ranks = [self._ranks[i] for i in group]
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
        refs = [self._instances[iid].handle.run_sp_batch.remote(batch, requests if iid == group[0] else None)
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

    async def _reserve(self, request_id: str, placement: list[tuple[str, int, int, int]]) -> list:
        from accordion.cluster.plan import KVSlice

        handles = [self._instances[iid].handle for iid, *_ in placement]
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
        return [KVSlice(self._ranks[iid], start, end, b) for (iid, start, end, _), b in zip(placement, blocks)]

    async def scale_up(self, master_id: str, request_id: str, holder_id: str, start: int, num_tokens: int) -> bool:
        """Multi-master scale-up: ``holder_id`` takes the KV of ``request_id``'s tokens from ``start`` on (room for
        ``num_tokens``), so its master decodes on instead of preempting. False (and the master told so, to preempt
        as usual) if the holder has no room or the request moved on."""
        async with self._lock():
            if master_id not in self._ranks or holder_id not in self._ranks:
                return False
            master = self._instances[master_id].handle
            holder = self._instances[holder_id].handle
            blocks = await holder.reserve_slice.remote(request_id, num_tokens)
            if blocks is None:
                await master.engine_call.remote("spill_failed", request_id)
                return False
            sid = next(self._job_ids)
            await holder.engine_call.remote("register_slice", self._ranks[master_id], sid, request_id, blocks, start)
            if not await master.engine_call.remote("attach_tail", request_id, sid, self._ranks[holder_id], start):
                await holder.engine_call.remote("drop_slice", sid)
                return False
        logger.info("request %s scaled up: %s holds its KV from position %d", request_id, holder_id, start)
        return True

    # ---- live migration ----------------------------------------------------------------------------------------

    async def migrate(self, request_id: str, src_id: str, dst_id: str) -> bool:
        """Move a decoding request, with its KV, from instance ``src_id`` to ``dst_id``
        (:mod:`accordion.cluster.migration`); its output stream continues from the destination.

        False, with the request running on the source as before, when it cannot move (not decoding there, its KV
        spread, no room on the destination, a peer failed), and when it ended on the source meanwhile (then the
        destination's copy is aborted). Needs the instances' group (elastic SP)."""
        dst = self._instances.get(dst_id)
        if src_id == dst_id or dst is None or dst.state != InstanceState.SERVING:
            return False
        async with self._lock():  # one global order of engine calls across instances, as for SP batches
            if src_id not in self._ranks or dst_id not in self._ranks or src_id not in self._instances:
                return False
            moved = await self._migrate(request_id, src_id, dst_id)
        if moved:
            self.num_migrations += 1
        else:
            self.num_failed_migrations += 1
        return moved

    async def migration_stats(self) -> dict[str, int]:
        """Migrations so far: requests moved, attempts that left the request where it was."""
        return {"migrated": self.num_migrations, "failed": self.num_failed_migrations}

    async def _migrate(self, request_id: str, src_id: str, dst_id: str) -> bool:
        src, dst = self._instances[src_id].handle, self._instances[dst_id].handle
        state = await self._export(src, request_id)
        if state is None:
            return False
        try:  # room for it to finish there, the requests already there still able to finish too
            blocks = await dst.engine_call.remote("reserve_migration", state)
        except Exception as e:
            logger.warning("request %s: reserving blocks on %s failed: %s", request_id, dst_id, e)
            blocks = None
        if blocks is None:
            logger.info("request %s stays on %s: no room to finish on %s", request_id, src_id, dst_id)
            await self._resume(src, request_id)
            return False
        sent, received = await asyncio.gather(
            src.engine_call.remote("send_kv", state.block_ids, self._ranks[dst_id]),
            dst.receive_request.remote(state, blocks, self._ranks[src_id]), return_exceptions=True)
        if isinstance(received, BaseException):  # the destination freed its blocks (or is gone)
            logger.warning("request %s stays on %s: moving its KV to %s failed: %s / %s", request_id, src_id,
                           dst_id, sent if isinstance(sent, BaseException) else "sent", received)
            await self._resume(src, request_id)
            return False
        try:
            moved = await src.engine_call.remote("commit_migration", request_id, dst_id)
        except Exception as e:
            logger.warning("request %s: committing its migration on %s failed: %s", request_id, src_id, e)
            moved = None
        if moved is None:  # it ended on the source meanwhile (or the source is gone): nobody wants this copy
            logger.info("request %s ended on %s during its migration; aborting it on %s", request_id, src_id, dst_id)
            await dst.abort.remote([request_id])
            return False
        logger.info("request %s migrated %s -> %s (%d tokens of KV)", request_id, src_id, dst_id,
                    state.num_computed_tokens)
        return True

    async def _export(self, src, request_id: str, timeout_s: float = 10.0) -> MigrationState | None:
        """Pause the request on the source and take its state, asking again while a step in flight computes it."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                state = await src.engine_call.remote("export_request", request_id)
            except Exception as e:
                logger.warning("request %s: export failed: %s", request_id, e)
                await self._resume(src, request_id)
                return None
            if isinstance(state, NotMigratable):
                logger.info("request %s cannot migrate: %s", request_id, state.reason)
                return None
            if state is not None:
                return state
            if asyncio.get_running_loop().time() >= deadline:
                await self._resume(src, request_id)
                return None
            await asyncio.sleep(0.002)

    @staticmethod
    async def _resume(src, request_id: str) -> None:
        try:
            await src.engine_call.remote("resume_migration", request_id)
        except Exception as e:  # the source is gone: its requests fail with it
            logger.warning("request %s: resuming it on its source failed: %s", request_id, e)

    async def _kv_room(self, exclude: str = "") -> dict[str, tuple[int, int]]:
        """``(free blocks, spare blocks)`` of each serving instance in the group but ``exclude``, asked of their
        engine threads (a load report would not show the migrations just made yet)."""
        recs = [r for r in self._instances.values()
                if r.state == InstanceState.SERVING and r.instance_id in self._ranks and r.instance_id != exclude]
        rooms = await asyncio.gather(*(r.handle.engine_call.remote("kv_room") for r in recs), return_exceptions=True)
        return {r.instance_id: tuple(room) for r, room in zip(recs, rooms) if not isinstance(room, BaseException)}

    async def compact(self, instance_ids: list[str], need_blocks: int, budget_s: float) -> str | None:
        """Make room for a new prompt's KV (``need_blocks``) on one of ``instance_ids`` by migrating decoding
        requests off it (:func:`~accordion.cluster.migration.plan_compaction`: fewest tokens first, each to another
        serving instance with room for it and its residents to finish, while the estimated transfer time stays
        under ``budget_s``). Tries the freest first; returns the instance that has room now, as its engine says
        after the moves (one with room already, without moving anything), or None when no plan within the budget frees
        enough (then nothing moved), a migration of the plan failed, or the room was taken meanwhile."""
        esp, block = self.config.esp, self.config.engine.cache.block_size
        rooms = await self._kv_room()
        free_all = {i: room[0] for i, room in rooms.items()}
        for iid in sorted((i for i in instance_ids if i in free_all), key=lambda i: -free_all[i]):
            if free_all[iid] >= need_blocks:
                return iid
            rec = self._instances[iid]
            per_token = rec.info.get("kv_bytes_per_token", 0)
            try:
                candidates = await rec.handle.engine_call.remote("migration_candidates")
            except Exception as e:
                logger.warning("instance %s: listing requests to migrate failed: %s", iid, e)
                continue
            plan = plan_compaction(
                candidates, free_all[iid], need_blocks,
                {i: room[1] for i, room in rooms.items() if i != iid}, block,
                lambda n: transfer_seconds(n, per_token, esp.migration_bytes_per_s, esp.migration_overhead_s),
                budget_s)
            if plan is None:
                continue
            logger.info("compacting %s for %d blocks: moving %s", iid, need_blocks,
                        [(c.request_id, dst) for c, dst in plan])
            for c, dst in plan:
                if not await self.migrate(c.request_id, iid, dst):
                    return None
            try:
                free, _ = await rec.handle.engine_call.remote("kv_room")
            except Exception as e:
                logger.warning("instance %s: its room after compaction is unknown: %s", iid, e)
                return None
            if free < need_blocks:
                logger.info("compacted %s, but only %d of %d blocks are free now", iid, free, need_blocks)
                return None
            return iid
        return None

    async def _evacuate(self, instance_id: str, drained: asyncio.Future, poll_s: float = 0.2) -> None:
        """While ``instance_id`` drains, migrate its decoding requests to the serving instances with room for
        them, and for the requests already there, to finish (the most spare room first), until the drain completes. Requests still prefilling move once they
        decode; those that fit nowhere finish where they are."""
        block = self.config.engine.cache.block_size
        while not drained.done():
            rec = self._instances.get(instance_id)
            if rec is None:
                return
            try:
                candidates = await rec.handle.engine_call.remote("migration_candidates")
            except Exception as e:
                logger.warning("instance %s: listing requests to migrate failed: %s", instance_id, e)
                return
            rooms = await self._kv_room(exclude=instance_id) if candidates else {}
            spare = {i: room[1] for i, room in rooms.items()}
            for c in candidates:
                dst = choose_destination(c, spare, block)
                if dst is not None and await self.migrate(c.request_id, instance_id, dst):
                    spare[dst] -= blocks_for(c.final_tokens, block)
            await asyncio.wait({drained}, timeout=poll_s)

    async def list_instances(self) -> list[InstanceRecord]:
        return list(self._instances.values())

    async def watch(self, known_version: int = -1, timeout_s: float = 30.0) -> tuple[int, list[InstanceRecord]]:
        """Long poll: return ``(version, instances)`` as soon as the version differs from ``known_version`` (or
        after ``timeout_s``)."""
        cond = self._cond()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self._version != known_version), timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            return self._version, list(self._instances.values())

    async def shutdown(self) -> None:
        """Remove every instance without draining (the front end drained already) and stop health checks."""
        if self._health_task is not None:
            self._health_task.cancel()
        await asyncio.gather(*(self.remove_instance(i, drain=False) for i in list(self._instances)),
                             return_exceptions=True)

    # ---- health ------------------------------------------------------------------------------------------------

    async def _mark_dead(self, rec: InstanceRecord, reason: str) -> None:
        import ray

        if rec.state == InstanceState.DEAD:
            return
        logger.error("instance %s is dead: %s", rec.instance_id, reason)
        rec.state, rec.error = InstanceState.DEAD, reason
        try:
            ray.kill(rec.handle, no_restart=True)  # ends its output stream: the front end fails its requests
        except Exception:
            pass
        self._instances.pop(rec.instance_id, None)
        await self._bump()

    async def _ping(self, rec: InstanceRecord) -> None:
        try:
            await asyncio.wait_for(rec.handle.load.remote(), self.config.health_check_timeout_s)
        except Exception as e:
            if rec.state in (InstanceState.SERVING, InstanceState.DRAINING):
                await self._mark_dead(rec, f"health check failed: {type(e).__name__}: {e}")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_s)
            live = [r for r in self._instances.values() if r.state in (InstanceState.SERVING,)]
            await asyncio.gather(*(self._ping(r) for r in live))
            if self.config.auto_grow:
                await self._grow()

    async def _grow(self) -> None:
        """Turn free cluster capacity (new GPU nodes) into instances, one at a time."""
        import ray

        need = self.config.gpus_per_instance
        if need <= 0 or any(r.state == InstanceState.STARTING for r in self._instances.values()):
            return
        if ray.available_resources().get("GPU", 0.0) + 1e-9 >= need:
            logger.info("free GPU capacity found: adding an instance")
            try:
                await self.add_instance()
            except Exception as e:  # a failed start is logged and retried at the next check
                logger.warning("auto-grow failed: %s", e)


def start_manager(config: ClusterConfig, worker_cls: str | None = None):
    """Create the named manager actor (detached from nothing: it lives as long as the driver). Returns its
    handle. Raises if one with that name already exists in the namespace."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=0)(GlobalManager)
    return cls.options(name=config.manager_name, namespace=config.namespace).remote(config, worker_cls)


def get_manager(config: ClusterConfig):
    """The handle of the running manager named by ``config``."""
    import ray

    return ray.get_actor(config.manager_name, namespace=config.namespace)
