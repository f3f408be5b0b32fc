"""The global manager's live-migration procedures: moving a decoding request between instances, compaction before a
long prefill, and evacuation of a draining instance.

The steps and messages are described in :mod:`accordion.cluster.migration`, which also holds the pure planning
rules (:func:`~accordion.cluster.migration.choose_destination`, :func:`~accordion.cluster.migration.plan_compaction`);
the :class:`Migrator` here runs them against the instance actors, as engine calls, under the manager's group lock
(:meth:`~accordion.cluster.global_manager.GlobalManager.migrate`, ``compact``, and ``remove_instance`` with drain).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from accordion.cluster.config import ESPConfig
from accordion.cluster.instance_record import InstanceRecord, InstanceState
from accordion.cluster.migration import (MigrationState, NotMigratable, blocks_for, choose_destination,
                                         plan_compaction, transfer_seconds)

logger = logging.getLogger(__name__)


class Migrator:
    """Moves decoding requests, with their KV, between instances of the instances' group (elastic SP).

    Constructed by the global manager with what it needs of the manager's state: ``instances`` returns the live
    registry (instance id -> record), ``ranks`` the current ranks in the instances' process group, ``lock`` the
    group lock (one global order of engine calls across instances, as for sequence-parallel batches); ``esp`` gives
    the transfer-time estimate's parameters and ``block_size`` the KV block size. Use from the manager's event loop
    only.
    """

    def __init__(self, esp: ESPConfig, block_size: int, instances: Callable[[], Mapping[str, InstanceRecord]],
                 ranks: Callable[[], Mapping[str, int]], lock: Callable[[], asyncio.Lock]):
        self._esp = esp
        self._block_size = block_size
        self._instances = instances
        self._ranks = ranks
        self._lock = lock
        self.num_migrations = 0
        self.num_failed_migrations = 0
        """Requests moved between instances (:meth:`migrate`), and attempts that left them where they were."""

    async def migrate(self, request_id: str, src_id: str, dst_id: str) -> bool:
        """Move a decoding request, with its KV, from instance ``src_id`` to ``dst_id``
        (:mod:`accordion.cluster.migration`); its output stream continues from the destination.

        False, with the request running on the source as before, when it cannot move (not decoding there, its KV
        spread, no room on the destination, a peer failed), and when it ended on the source meanwhile (then the
        destination's copy is aborted). Needs the instances' group (elastic SP)."""
        instances = self._instances()
        dst = instances.get(dst_id)
        if src_id == dst_id or dst is None or dst.state != InstanceState.SERVING:
            return False
        async with self._lock():  # one global order of engine calls across instances, as for SP batches
            ranks = self._ranks()
            if src_id not in ranks or dst_id not in ranks or src_id not in self._instances():
                return False
            moved = await self._migrate(request_id, src_id, dst_id)
        if moved:
            self.num_migrations += 1
        else:
            self.num_failed_migrations += 1
        return moved

    def stats(self) -> dict[str, int]:
        """Migrations so far: requests moved, attempts that left the request where it was."""
        return {"migrated": self.num_migrations, "failed": self.num_failed_migrations}

    async def _migrate(self, request_id: str, src_id: str, dst_id: str) -> bool:
        instances = self._instances()
        src, dst = instances[src_id].handle, instances[dst_id].handle
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
        ranks = self._ranks()
        sent, received = await asyncio.gather(
            src.engine_call.remote("send_kv", state.block_ids, ranks[dst_id]),
            dst.receive_request.remote(state, blocks, ranks[src_id]), return_exceptions=True)
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

    async def _export(self, src: Any, request_id: str, timeout_s: float = 10.0) -> MigrationState | None:
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
    async def _resume(src: Any, request_id: str) -> None:
        try:
            await src.engine_call.remote("resume_migration", request_id)
        except Exception as e:  # the source is gone: its requests fail with it
            logger.warning("request %s: resuming it on its source failed: %s", request_id, e)

    async def _kv_room(self, exclude: str = "") -> dict[str, tuple[int, int]]:
        """``(free blocks, spare blocks)`` of each serving instance in the group but ``exclude``, asked of their
        engine threads (a load report would not show the migrations just made yet)."""
        ranks = self._ranks()
        recs = [r for r in self._instances().values()
                if r.state == InstanceState.SERVING and r.instance_id in ranks and r.instance_id != exclude]
        rooms = await asyncio.gather(*(r.handle.engine_call.remote("kv_room") for r in recs), return_exceptions=True)
        return {r.instance_id: tuple(room) for r, room in zip(recs, rooms) if not isinstance(room, BaseException)}

    async def compact(self, instance_ids: list[str], need_blocks: int, budget_s: float, request_id: str,
                      hold_tokens: int) -> str | None:
        """Make room for a new prompt's KV (``need_blocks``) on one of ``instance_ids`` by migrating decoding
        requests off it (:func:`~accordion.cluster.migration.plan_compaction`: fewest tokens first, each to another
        serving instance with room for it and its residents to finish, while the estimated transfer time stays
        under ``budget_s``), then hold the blocks for the prompt's ``hold_tokens`` there under ``request_id``
        (:meth:`~accordion.cluster.scheduler.Scheduler.hold_room`: its sequence-parallel prefill takes them;
        decoding requests cannot take them first). Tries the freest first; returns the instance holding the room
        (one with room already, without moving anything), or None when no plan within the budget frees enough
        (then nothing moved), a migration of the plan failed, or the room was taken meanwhile."""
        esp, block = self._esp, self._block_size
        rooms = await self._kv_room()
        free_all = {i: room[0] for i, room in rooms.items()}
        for iid in sorted((i for i in instance_ids if i in free_all), key=lambda i: -free_all[i]):
            rec = self._instances()[iid]
            if free_all[iid] >= need_blocks:
                return await self._hold(rec, request_id, hold_tokens)
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
            return await self._hold(rec, request_id, hold_tokens)
        return None

    @staticmethod
    async def _hold(rec: InstanceRecord, request_id: str, num_tokens: int) -> str | None:
        """Hold the room for ``num_tokens`` of ``request_id`` on the instance; its id, or None if it has no room."""
        try:
            held = await rec.handle.engine_call.remote("hold_room", request_id, num_tokens)
        except Exception as e:
            logger.warning("instance %s: holding room for %s failed: %s", rec.instance_id, request_id, e)
            return None
        if not held:
            logger.info("instance %s: the room for %s was taken meanwhile", rec.instance_id, request_id)
            return None
        return rec.instance_id

    async def evacuate(self, instance_id: str, drained: asyncio.Future, poll_s: float = 0.2) -> None:
        """While ``instance_id`` drains, migrate its decoding requests to the serving instances with room for
        them, and for the requests already there, to finish (the most spare room first), until the drain completes.
        Requests still prefilling move once they decode; those that fit nowhere finish where they are."""
        block = self._block_size
        while not drained.done():
            rec = self._instances().get(instance_id)
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
