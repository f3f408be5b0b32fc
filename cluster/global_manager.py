"""The global manager: a named Ray actor that owns the registry of engine instance actors.

It creates instances from a :class:`ClusterConfig` (resources per instance from the config), adds and removes
them at run time (removal drains first), pings every instance's ``load()`` periodically and marks one that fails
or times out dead (removed from routing, killed). Front ends (``RayEngineClient``) learn the membership through
:meth:`GlobalManager.watch`, a long poll that returns when it changes. The manager is not on the token path.

Elastic sequence parallelism: with ``esp.enabled`` the manager forms the instances' torch.distributed group
(re-formed whenever membership changes) and starts sequence-parallel prefills on instance groups, batching those
for the same group, one batch in flight per instance, in one global order (:meth:`GlobalManager.run_sp_prefill`,
:mod:`accordion.cluster.sp_dispatch` over the queue of :mod:`accordion.cluster.sp_queue`); front ends choose the
groups (:mod:`accordion.cluster.sp_placement` over :mod:`accordion.cluster.esp_planner`). It also arranges
multi-master scale-up (:meth:`GlobalManager.scale_up`) and live migration of decoding requests
(:meth:`GlobalManager.migrate`, :mod:`accordion.cluster.migration_runner` over the rules of
:mod:`accordion.cluster.migration`), which draining uses to empty an instance.

This module keeps the actor, the registry (:mod:`accordion.cluster.instance_record`), health checks and the
instances' group; the prefill dispatch (:class:`~accordion.cluster.sp_dispatch.PrefillDispatcher`) and the migration
procedures (:class:`~accordion.cluster.migration_runner.Migrator`) are helpers it constructs with the state they
need (the live registry, the ranks, the group lock), its remote methods delegating to them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from accordion.cluster.config import ClusterConfig
from accordion.cluster.instance_record import InstanceRecord, InstanceState
from accordion.cluster.migration_runner import Migrator
from accordion.cluster.request import Request
from accordion.cluster.sp_dispatch import PrefillDispatcher

__all__ = ["GlobalManager", "InstanceRecord", "InstanceState", "get_manager", "start_manager"]

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
        """Ids of sequence-parallel prefill jobs and of scale-up slices: one namespace, since a job's id is also its
        request's spread id on the instances (:mod:`accordion.workers.multi_master`)."""
        self._group_lock: asyncio.Lock | None = None
        self._prefill = PrefillDispatcher(config.esp, self._registry, self._current_ranks, self._lock, self._job_ids)
        self._migrator = Migrator(config.esp, config.engine.cache.block_size, self._registry, self._current_ranks,
                                  self._lock)

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self._changed

    async def _bump(self) -> None:
        async with self._cond():
            self._version += 1
            self._cond().notify_all()

    def _registry(self) -> dict[str, InstanceRecord]:
        """The live registry (the helpers read it through this)."""
        return self._instances

    def _current_ranks(self) -> dict[str, int]:
        """The current ranks in the instances' group (re-assigned whenever the group is re-formed)."""
        return self._ranks

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
        cls = instance_actor_class(c.gpus_per_instance, c.cpus_per_instance, c.actor_niceness)
        handle = cls.options(name=f"{c.manager_name}.{iid}", namespace=c.namespace).remote(
            iid, c.engine, self.worker_cls or DEFAULT_WORKER,
            c.cpu_threads_per_instance if c.gpus_per_instance == 0 else None, c.direct_channel, c.direct_host)
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
        serving instances that have room for them (:meth:`~accordion.cluster.migration_runner.Migrator.evacuate`),
        so the drain waits only for what could not move (prefills, spread requests, no room elsewhere)."""
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
                await self._migrator.evacuate(instance_id, drained)
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

    async def run_sp_prefill(self, request: Request, group: list[str],
                             placement: list[tuple[str, int, int, int]] | None = None) -> None:
        """Prefill ``request`` across the instances ``group``; ``group[0]`` decodes it afterwards. Returns once
        the prefill has started (queued behind earlier ones on the same instances, possibly batched with others
        for the same group: :mod:`accordion.cluster.sp_queue`, dispatched by
        :class:`~accordion.cluster.sp_dispatch.PrefillDispatcher`).

        Without ``placement`` the master keeps the whole KV (proactive scale-down to one instance). With one,
        ``(instance, start, end, extra_tokens)`` slices (the master's first, the tail's last with room for the new
        tokens) are reserved on their instances first, and the request is decoded with its KV where the slices
        are (multi-master decoding). EngineUnavailableError when it cannot start: an instance of the group left,
        or the KV blocks (the master's, or a slice) could not be reserved."""
        await self._prefill.run(request, group, placement)

    async def sp_stats(self) -> dict[str, int]:
        """Sequence-parallel prefills so far: batches started, prompts in them, prompts queued."""
        return self._prefill.stats()

    async def cancel_sp_prefill(self, request_ids: list[str]) -> None:
        """Drop queued prefills whose requests were cancelled before they started."""
        self._prefill.cancel(request_ids)

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
        (:meth:`Migrator.migrate <accordion.cluster.migration_runner.Migrator.migrate>`); its output stream continues
        from the destination.

        False, with the request running on the source as before, when it cannot move (not decoding there, its KV
        spread, no room on the destination, a peer failed), and when it ended on the source meanwhile (then the
        destination's copy is aborted). Needs the instances' group (elastic SP)."""
        return await self._migrator.migrate(request_id, src_id, dst_id)

    async def migration_stats(self) -> dict[str, int]:
        """Migrations so far: requests moved, attempts that left the request where it was."""
        return self._migrator.stats()

    async def compact(self, instance_ids: list[str], need_blocks: int, budget_s: float, request_id: str,
                      hold_tokens: int) -> str | None:
        """Make room for a new prompt's KV (``need_blocks``) on one of ``instance_ids`` by migrating decoding
        requests off it, while the estimated transfer time stays under ``budget_s``, and hold the blocks for its
        ``hold_tokens`` prompt tokens there under ``request_id`` until its prefill takes them
        (:meth:`Migrator.compact <accordion.cluster.migration_runner.Migrator.compact>`). Returns the instance
        holding the room (the caller releases it, ``release_slice``, if the request goes elsewhere), or None when no
        plan within the budget frees enough (then nothing moved), a migration of the plan failed, or the room was
        taken meanwhile."""
        return await self._migrator.compact(instance_ids, need_blocks, budget_s, request_id, hold_tokens)

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

    from accordion.cluster.instance_actor import niceness_options

    cls = ray.remote(num_cpus=0, max_restarts=0, **niceness_options(config.actor_niceness))(GlobalManager)
    return cls.options(name=config.manager_name, namespace=config.namespace).remote(config, worker_cls)


def get_manager(config: ClusterConfig):
    """The handle of the running manager named by ``config``."""
    import ray

    return ray.get_actor(config.manager_name, namespace=config.namespace)
