"""The Ray front end's placement of long prompts under elastic sequence parallelism (LoongServe): instance groups
for sequence-parallel prefills, compaction before a long prefill, and multi-master scale-up while decoding.

:class:`~accordion.cluster.ray_engine.RayEngineClient` routes and submits requests; with ESP on it asks its
:class:`SPPlacement` first. :meth:`SPPlacement.choose` plans a long prompt's instance group: the degree from the
cost model (:mod:`accordion.cluster.esp_planner`), the master the least busy instance with room for the request's
KV. When no instance has room, decoding requests first migrate off one to make room (compaction, run by the manager:
:meth:`~accordion.cluster.global_manager.GlobalManager.compact`; the request is then placed again), failing that its
KV stays spread over the freest instances (a multi-master placement). :meth:`SPPlacement.send` carries the plan out:
it runs the compaction, or hands the prefill to the manager
(:meth:`~accordion.cluster.global_manager.GlobalManager.run_sp_prefill`, queued by
:mod:`accordion.cluster.sp_dispatch`). Each load report goes through :meth:`SPPlacement.on_load`, which arranges
the scale-ups it asks for (a decode with no free block on its instance: the manager moves its new tokens' KV to the
freest other instance with room, :meth:`~accordion.cluster.global_manager.GlobalManager.scale_up`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container, Mapping
from typing import NoReturn

from accordion.cluster.config import ESPConfig
from accordion.cluster.engine_frontend import RetryElsewhere
from accordion.cluster.errors import EngineUnavailableError, short_error
from accordion.cluster.esp_planner import PrefillCostModel, choose_degree, plan_placement
from accordion.cluster.instance_actor import unwrap_ray_error
from accordion.cluster.instance_record import InstanceRecord
from accordion.cluster.load import LoadReport
from accordion.cluster.request import Request
from accordion.cluster.sp_dispatch import Placement

logger = logging.getLogger(__name__)


class SPPlacement:
    """Where long prompts go under elastic sequence parallelism, and the scale-ups decoding requests ask for.

    Constructed by the client with the global manager's handle and what it needs of the client's state:
    ``records`` returns the current membership (instance id -> record), ``loads`` is the live map of each
    instance's last load report, ``streaming`` the live set of instances whose output stream is consumed (their
    reports still come), ``failed`` the live set of instances whose stream broke, ``routable`` returns the
    instances the client routes to, and ``outstanding`` the requests sent to an instance that its last load
    report does not show yet. ``block_size`` is the KV block size, ``max_model_len`` the model's. Use from the
    client's event loop only.
    """

    def __init__(self, esp: ESPConfig, manager, *, block_size: int, max_model_len: int,
                 records: Callable[[], Mapping[str, InstanceRecord]], loads: Mapping[str, LoadReport],
                 streaming: Container[str], failed: Container[str], routable: Callable[[], list[str]],
                 outstanding: Callable[[str], int]):
        self.esp = esp
        self.cost = PrefillCostModel.for_config(esp)
        """The prefill cost model the degree and compaction's savings come from."""
        self._manager = manager
        self._block_size = block_size
        self._max_model_len = max_model_len
        self._records = records
        self._loads = loads
        self._streaming = streaming
        self._failed = failed
        self._routable = routable
        self._outstanding = outstanding
        self.prefills: list[list[str]] = []
        """Instance groups of the sequence-parallel prefills sent from here (for tests and debugging)."""
        self._sp_groups: dict[str, tuple[list[str], Placement | None]] = {}
        """Engine request id -> the group (master first) and placement :meth:`choose` planned for it."""
        self._sp_waiting: set[str] = set()  # engine request ids queued at the manager for a prefill
        self._planned: dict[str, int] = {}
        """KV blocks of multi-master placements planned since each instance's last load report."""
        self._spills_seen: dict[str, set[tuple[str, int]]] = {}
        """Instance -> (engine request id, first position) of the scale-ups asked for in its load reports and
        arranged from here: one arrangement per spill, however many reports (later ones may predate its end) list
        it (:meth:`_on_spills`)."""
        self._compactions: dict[str, tuple[list[str], int, float, int]] = {}
        """Engine request id -> (instances, KV blocks it needs, prefill seconds saved, prompt tokens) of a compaction
        to run before placing it again (:meth:`_compaction`)."""
        self._compacted: set[str] = set()
        """Engine request ids whose compaction was tried (once per request: kept until it is placed)."""
        self._rooms: dict[str, str] = {}
        """Engine request id -> the instance its compaction made room on, holding the blocks for its prompt there
        (``hold_room``): its master when it is placed again; released if it goes elsewhere (:meth:`_release_room`)."""
        self._holds: dict[str, str] = {}
        """Engine request id -> the instance holding its room, while its sequence-parallel prefill is being started
        there (the manager's reservation takes the held blocks)."""

    # ---- the client's hooks ------------------------------------------------------------------------------------

    def choose(self, requests: list[Request], exclude: set[str]) -> str | None:
        """The route of a long prompt (its group's master; a placeholder when a compaction is to run first), avoiding
        ``exclude``, with the plan kept for :meth:`send`; None when it is not placed here (one-instance request)."""
        plan = self._group(requests, exclude)
        if plan is None:
            return None
        self._sp_groups[requests[0].request_id] = plan
        return plan[0][0]

    async def send(self, requests: list[Request]) -> bool:
        """Carry out what :meth:`choose` planned for ``requests``: run the compaction (then raise
        :class:`RetryElsewhere` to have the request placed again), or start its sequence-parallel prefill and return
        True once it started. False when nothing was planned for them: the client submits them to their route."""
        rid = requests[0].request_id
        if rid in self._compactions:
            self._sp_groups.pop(rid, None)
            await self._compact(rid)  # raises RetryElsewhere: the request is placed again
        plan = self._sp_groups.pop(rid, None)
        if plan is None:
            return False
        await self._prefill(plan[0], requests[0], plan[1])
        return True

    def forget(self, request_id: str) -> None:
        """The request was placed, or given up on: drop its placement's state (give back a room held for it)."""
        self._compacted.discard(request_id)
        room = self._rooms.pop(request_id, None)
        if room is not None:  # cancelled or failed between the compaction and placing it again
            self._release_room(room, request_id)
        self._holds.pop(request_id, None)  # cancelled while its prefill was queued: the manager releases it
        self._compactions.pop(request_id, None)
        self._sp_groups.pop(request_id, None)

    def abort(self, request_ids: list[str]) -> None:
        """Requests are being aborted: those whose prefill is queued at the manager, not started yet, are dropped
        from its queue."""
        queued = [i for i in request_ids if i in self._sp_waiting]
        if queued:
            self._manager.cancel_sp_prefill.remote(queued)

    def on_load(self, iid: str, load: LoadReport) -> None:
        """A new load report of ``iid`` (already in ``loads``): it shows the placements planned there so far; arrange
        the scale-ups it asks for."""
        self._planned.pop(iid, None)
        self._on_spills(iid, load.spills)

    def stream_ended(self, iid: str) -> None:
        """``iid``'s output stream ended: its spills are forgotten (they end with it)."""
        self._spills_seen.pop(iid, None)

    # ---- sequence-parallel prefills ----------------------------------------------------------------------------

    def _group(self, requests: list[Request], exclude: set[str]) -> tuple[list[str], Placement | None] | None:
        """Instances to prefill a long prompt together (master first) and, when its KV is to stay spread, the
        placement; None for a one-instance request.

        The degree comes from the cost model over the routable instances; the master is the least busy one with
        room for the whole request's KV (decoding continues there alone: proactive scale-down). When no instance
        has room for it, decoding requests first migrate off one to make room (compaction, :meth:`_compaction`;
        the request is then placed again); failing that, the KV is spread over the freest instances and decoded
        in place (multi-master).
        """
        esp = self.esp
        if len(requests) != 1 or requests[0].num_prompt_tokens < esp.min_prompt_tokens:
            return None
        req = requests[0]
        cands = [i for i in self._routable() if i not in exclude]
        limit = min(len(cands), esp.max_degree)
        degree = min(esp.force_degree, limit) if esp.force_degree else choose_degree(self.cost, req.num_prompt_tokens,
                                                                                      limit)

        def busy(i: str) -> int:
            ld = self._loads.get(i)
            return (ld.num_running + ld.num_waiting if ld else 0) + self._outstanding(i)

        block = self._block_size
        new_tokens = min(req.max_tokens, self._max_model_len - req.num_prompt_tokens)
        need = -(-(req.num_prompt_tokens + new_tokens) // block)
        room = self._rooms.pop(req.request_id, None)
        if room is not None:
            if room in cands and degree >= 2:
                self._holds[req.request_id] = room
                return [room] + sorted((i for i in cands if i != room), key=busy)[: degree - 1], None
            self._release_room(room, req.request_id)
        masters = [i for i in cands if self._free_blocks(i) >= need]
        if not masters and degree >= 2 and self._compaction(req, cands, need, degree):
            return cands[:degree], None  # a placeholder: send() compacts, then the request is placed again
        if not masters:
            if not esp.multi_master or len(cands) < 2:
                return None
            by_free = sorted(cands, key=lambda i: (-self._free_blocks(i), busy(i)))[:limit]
            placement = plan_placement(req.num_prompt_tokens, max(0, new_tokens - 1), block, by_free,
                                       {i: self._free_blocks(i) for i in by_free})
            if placement is None:
                return None
            holders = [i for i, *_ in placement]
            for i, start, end, extra in placement:  # until the instance's next load report shows them taken
                self._planned[i] = self._planned.get(i, 0) + -(-(end - start + extra) // block)
            rest = sorted((i for i in cands if i not in holders), key=busy)
            return holders + rest[:max(0, degree - len(holders))], placement
        if degree < 2:
            return None
        master = min(masters, key=busy)
        return [master] + sorted((i for i in cands if i != master), key=busy)[: degree - 1], None

    async def _prefill(self, group: list[str], request: Request, placement: Placement | None) -> None:
        self._sp_waiting.add(request.request_id)
        try:  # returns once the prefill started (the manager may queue it behind others on these instances)
            await self._manager.run_sp_prefill.remote(request, group, placement)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            held = self._holds.pop(request.request_id, None)
            if held is not None:  # the reservation took the held room and gave it back, or never got to it
                self._release_room(held, request.request_id)
            cause = unwrap_ray_error(e)
            if isinstance(cause, EngineUnavailableError):
                if placement is not None:  # slices taken since the load reports: plan again from fresh ones
                    await self._fresh_reports([i for i, *_ in placement])
                    raise RetryElsewhere(str(cause), replan=True) from None
                # the group is re-forming, or the master had no room after all: not there, then
                raise RetryElsewhere(str(cause)) from None
            raise cause from None
        finally:
            self._sp_waiting.discard(request.request_id)
        self._holds.pop(request.request_id, None)
        self.prefills.append(group)

    # ---- compaction --------------------------------------------------------------------------------------------

    def _compaction(self, req: Request, cands: list[str], need: int, degree: int) -> bool:
        """Whether to make room for ``req``'s KV by migrating decoding requests away first (once per request).

        The rule: the room lets the prompt be prefilled at ``degree`` instead of alone, which saves
        ``T(1, l) - T(degree, l)`` by the cost model; the manager moves requests (fewest tokens first) only while
        their estimated transfer time stays under that (:func:`~accordion.cluster.migration.plan_compaction`). Here
        only the cheap checks: compaction is on, it saves time, and the instances have the room between them."""
        esp = self.esp
        if not esp.compaction or req.request_id in self._compacted:
            return False
        saved = self.cost.predict(1, [req.num_prompt_tokens]) - self.cost.predict(degree, [req.num_prompt_tokens])
        if saved <= 0 or sum(self._free_blocks(i) for i in self._routable()) < need:
            return False
        self._compacted.add(req.request_id)
        self._compactions[req.request_id] = (list(cands), need, saved, req.num_prompt_tokens)
        return True

    def _release_room(self, iid: str, request_id: str) -> None:
        """Give back the room a compaction holds for a request on ``iid`` (it was not placed there). Sent before
        anything else the client sends that instance about the request, so it runs first there."""
        rec = self._records().get(iid)
        if rec is not None and iid not in self._failed:
            rec.handle.release_slice.remote(request_id)

    async def _compact(self, request_id: str) -> NoReturn:
        """Run the compaction planned for a request, then have it placed again: with the instance the manager made
        room on as its master, the other instances by load reports sent after the moves."""
        instances, need, saved, prompt_tokens = self._compactions.pop(request_id)
        try:
            master = await self._manager.compact.remote(instances, need, saved, request_id, prompt_tokens)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("compaction for %s failed: %s", request_id, short_error(unwrap_ray_error(e)))
            master = None
        logger.info("request %s: compaction %s", request_id, f"made room on {master}" if master else "found no room")
        if master is not None:
            self._rooms[request_id] = master
        await self._fresh_reports(instances)
        raise RetryElsewhere("placing it again after compaction", replan=True)

    # ---- load reports ------------------------------------------------------------------------------------------

    def _free_blocks(self, iid: str) -> int:
        """Free KV blocks by the instance's last load report, less the placements planned since."""
        ld = self._loads.get(iid)
        return ld.num_free_blocks - self._planned.get(iid, 0) if ld is not None else 0

    async def _fresh_reports(self, instance_ids: list[str], timeout_s: float = 0.5) -> None:
        """Wait until each instance has sent a load report newer than the current one (or ``timeout_s``)."""
        seen = {i: self._loads.get(i) for i in instance_ids}
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(self._loads.get(i) is seen[i] for i in instance_ids if i in self._streaming):
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.01)

    # ---- multi-master scale-up ---------------------------------------------------------------------------------

    def _on_spills(self, iid: str, spills: tuple[tuple[str, int, int], ...]) -> None:
        """Arrange the scale-ups an instance's load report asks for, each once: a report made before the
        arrangement ended (the stream runs a report or two behind the engine) lists it again, and arranging it
        twice would reserve a second slice for the same request on its holder. A spill that a report no longer
        lists has ended; if it is listed again later, that is a new one."""
        seen = self._spills_seen.setdefault(iid, set())
        seen.intersection_update((rid, start) for rid, start, _ in spills)
        for rid, start, num_tokens in spills:
            if (rid, start) not in seen:
                seen.add((rid, start))
                asyncio.get_running_loop().create_task(self._scale_up(iid, rid, start, num_tokens))

    async def _scale_up(self, master: str, request_id: str, start: int, num_tokens: int) -> None:
        """A decoding request on ``master`` found no free block: the freest other instance with room takes its
        new tokens' KV (multi-master scale-up), else the master preempts as usual."""
        try:
            need = -(-num_tokens // self._block_size)
            free = {i: self._free_blocks(i) for i in self._routable() if i != master}
            holders = [i for i, f in free.items() if f >= need]
            if not self.esp.multi_master or not holders:
                await self._records()[master].handle.engine_call.remote("spill_failed", request_id)
                return
            holder = max(holders, key=free.get)
            self._planned[holder] = self._planned.get(holder, 0) + need
            if not await self._manager.scale_up.remote(master, request_id, holder, start, num_tokens):
                # refused, or the request moved on: either way the master must not wait for it any more
                await self._records()[master].handle.engine_call.remote("spill_failed", request_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the master must not wait forever: it preempts instead
            logger.warning("scale-up of %s failed: %s", request_id, short_error(unwrap_ray_error(e)))
            rec = self._records().get(master)
            if rec is not None:
                rec.handle.engine_call.remote("spill_failed", request_id)
