"""``RayEngineClient``: the :class:`EngineClient` of the gRPC front end over instance actors on a Ray cluster.

The request path is :class:`EngineFrontend`'s. This class adds where requests go: it follows the global manager's
membership (:meth:`GlobalManager.watch`, a long poll), keeps one pump task per instance that consumes the
instance's output stream (one ``(outputs, LoadReport)`` batch per engine step) and dispatches it, and routes each
new request with a :class:`Router` over the latest load reports. Submissions to one instance are batched: one
``add_request_groups`` call is in flight per instance and whatever arrives meanwhile rides the next one, so a burst
of N requests costs a few actor calls, not N. An instance whose stream breaks (it died) fails its requests with an
ERROR delta.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import accordion
from accordion.cluster.config import EngineConfig, ESPConfig
from accordion.cluster.engine_client import InstanceInfo, ServerInfo
from accordion.cluster.engine_frontend import EngineFrontend, RetryElsewhere, model_info_for
from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError, RequestValidationError
from accordion.cluster.esp_planner import PrefillCostModel, choose_degree, plan_placement
from accordion.cluster.global_manager import InstanceRecord
from accordion.cluster.instance_actor import unwrap_ray_error
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import from_wire
from accordion.cluster.request import Request
from accordion.cluster.router import InstanceLoad, LeastLoaded, Router
from accordion.cluster.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_TYPED_ERRORS = (RequestValidationError, EngineOverloadedError, EngineUnavailableError)


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:limit]


class SubmitBatcher:
    """Submissions to one instance: one call in flight; submissions that arrive meanwhile go in the next call.

    ``send(groups)`` returns one ``None`` or exception per group, or raises (then every group of the call fails).
    """

    def __init__(self, send: Callable[[list[list[Request]]], Awaitable[list[Exception | None]]]):
        self._send = send
        self._pending: list[tuple[list[Request], asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def submit(self, requests: list[Request]) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((requests, fut))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._send([r for r, _ in batch])
                except Exception as e:
                    results = [e] * len(batch)
                for (_, fut), res in zip(batch, results):
                    if fut.done():  # the submitter was cancelled; its request is aborted by the front end
                        continue
                    if res is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(res)
        finally:
            self._task = None


class RayEngineClient(EngineFrontend):
    """Front end over the instances of one global manager. Build with :meth:`create` on the serving loop."""

    def __init__(self, manager, config: EngineConfig, tokenizer: Tokenizer, *, router: Router | None = None,
                 watch_timeout_s: float = 30.0, esp: ESPConfig | None = None):
        super().__init__(tokenizer, model_info_for(config, tokenizer))
        self.esp = esp if esp is not None and esp.enabled else None
        self._cost: PrefillCostModel | None = None
        if self.esp is not None:
            self._cost = PrefillCostModel.for_config(self.esp)
        self._sp_groups: dict[str, tuple[list[str], list[tuple[str, int, int, int]] | None]] = {}
        self.sp_prefills: list[list[str]] = []
        """Instance groups of the sequence-parallel prefills sent from here (for tests and debugging)."""
        self.manager = manager
        self.config = config
        self.router: Router = router or LeastLoaded()
        self.watch_timeout_s = watch_timeout_s
        self._records: dict[str, InstanceRecord] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._loads: dict[str, LoadReport] = {}
        self._planned: dict[str, int] = {}
        """KV blocks of multi-master placements planned since each instance's last load report."""
        self._spills_seen: dict[str, set[tuple[str, int]]] = {}
        """Instance -> (engine request id, first position) of the scale-ups asked for in its load reports and
        arranged from here: one arrangement per spill, however many reports (later ones may predate its end) list
        it (:meth:`_on_spills`)."""
        self._sp_waiting: set[str] = set()  # engine request ids queued at the manager for a prefill
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
        self._subscribed: set[str] = set()
        self._refused: set[str] = set()
        self._sent: dict[str, int] = {}
        self._batchers: dict[str, SubmitBatcher] = {}
        self.routed: dict[str, int] = {}
        """Requests (not children) routed to each instance since start; for tests and debugging."""
        self._changed = asyncio.Event()
        self._version = -1
        self._watch_task: asyncio.Task | None = None

    @classmethod
    async def create(cls, manager, config: EngineConfig, *, router: Router | None = None,
                     esp: ESPConfig | None = None) -> RayEngineClient:
        """Load the tokenizer, take the manager's current membership and start following it."""
        tokenizer = await asyncio.to_thread(Tokenizer, config.model.model)
        self = cls(manager, config, tokenizer, router=router, esp=esp)
        version, records = await manager.watch.remote(-1, 0.0)
        self._apply(version, records)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_loop())
        return self

    # ---- membership --------------------------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            try:
                version, records = await self.manager.watch.remote(self._version, self.watch_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # manager gone: keep serving on the instances we know
                logger.error("global manager watch failed: %s; retrying in 1s", _short(e))
                await asyncio.sleep(1.0)
                continue
            self._apply(version, records)

    def _apply(self, version: int, records: list[InstanceRecord]) -> None:
        if version == self._version:
            return
        self._version = version
        self._records = {r.instance_id: r for r in records}
        if self._records and self._model_info.dtype == "auto":
            dtype = next((r.dtype for r in records if r.dtype), None)
            if dtype:
                self._model_info.dtype = dtype
        for r in records:
            if r.routable and r.instance_id not in self._pumps:
                self._pumps[r.instance_id] = asyncio.get_running_loop().create_task(self._pump(r))
        logger.info("membership v%d: %s", version, {r.instance_id: r.state.value for r in records})
        self._changed.set()

    async def wait_for_instances(self, n: int, timeout_s: float = 60.0) -> None:
        """Wait until ``n`` instances are routable from here (subscribed to their output streams)."""
        async def _wait():
            while len(self._routable()) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout_s)

    def _routable(self) -> list[str]:
        return [i for i, r in self._records.items()
                if r.routable and i in self._subscribed and i not in self._refused]

    # ---- output streams ----------------------------------------------------------------------------------------

    async def _pump(self, rec: InstanceRecord) -> None:
        iid = rec.instance_id
        reason = "its output stream ended"
        try:
            # Backpressure of one item: while this loop is busy (the front end lags), the instance merges the steps
            # that pile up into its next item, and the per-stream deltas merge too (one message per stream per
            # round, not per step), so the front end's per-message cost never caps the engine.
            gen = rec.handle.outputs.options(num_returns="streaming", _generator_backpressure_num_objects=1).remote()
            async for ref in gen:
                wire, load = await ref
                outputs = from_wire(wire)
                self._loads[iid] = load
                self._planned.pop(iid, None)
                self._on_spills(iid, load.spills)
                if iid not in self._subscribed:
                    self._subscribed.add(iid)
                    self._changed.set()
                    logger.info("subscribed to %s", iid)
                self._on_route_outputs(iid, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = _short(unwrap_ray_error(e))
        finally:
            self._subscribed.discard(iid)
            self._pumps.pop(iid, None)
            self._spills_seen.pop(iid, None)
            self._changed.set()
        self._fail_route(iid, f"engine instance {iid} failed ({reason}); request aborted")

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

    # ---- EngineFrontend hooks ----------------------------------------------------------------------------------

    def _choose_route(self, requests: list[Request], exclude: set[str]) -> str:
        plan = self._sp_group(requests, exclude)
        if plan is not None:
            self._sp_groups[requests[0].request_id] = plan
            return plan[0][0]
        cands = [InstanceLoad(i, self._loads.get(i), self._outstanding(i))
                 for i in self._routable() if i not in exclude]
        if not cands:
            raise EngineUnavailableError("no engine instance is available; retry later")
        return self.router.choose(cands)

    def _outstanding(self, iid: str) -> int:
        ld = self._loads.get(iid)
        return max(0, self._sent.get(iid, 0) - (ld.num_added if ld else 0))

    def _sp_group(self, requests: list[Request], exclude: set[str]
                  ) -> tuple[list[str], list[tuple[str, int, int, int]] | None] | None:
        """Instances to prefill a long prompt together (master first) and, when its KV is to stay spread, the
        placement; None for a one-instance request.

        The degree comes from the cost model over the routable instances; the master is the least busy one with
        room for the whole request's KV (decoding continues there alone: proactive scale-down). When no instance
        has room for it, decoding requests first migrate off one to make room (compaction, :meth:`_compaction`;
        the request is then placed again); failing that, the KV is spread over the freest instances and decoded
        in place (multi-master).
        """
        esp = self.esp
        if esp is None or len(requests) != 1 or requests[0].num_prompt_tokens < esp.min_prompt_tokens:
            return None
        req = requests[0]
        cands = [i for i in self._routable() if i not in exclude]
        limit = min(len(cands), esp.max_degree)
        degree = min(esp.force_degree, limit) if esp.force_degree else choose_degree(self._cost, req.num_prompt_tokens,
                                                                                      limit)

        def busy(i: str) -> int:
            ld = self._loads.get(i)
            return (ld.num_running + ld.num_waiting if ld else 0) + self._outstanding(i)

        block = self.config.cache.block_size
        new_tokens = min(req.max_tokens, self._model_info.max_model_len - req.num_prompt_tokens)
        need = -(-(req.num_prompt_tokens + new_tokens) // block)
        room = self._rooms.pop(req.request_id, None)
        if room is not None:
            if room in cands and degree >= 2:
                self._holds[req.request_id] = room
                return [room] + sorted((i for i in cands if i != room), key=busy)[: degree - 1], None
            self._release_room(room, req.request_id)
        masters = [i for i in cands if self._free_blocks(i) >= need]
        if not masters and degree >= 2 and self._compaction(req, cands, need, degree):
            return cands[:degree], None  # a placeholder: _send compacts, then the request is placed again
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

    def _compaction(self, req: Request, cands: list[str], need: int, degree: int) -> bool:
        """Whether to make room for ``req``'s KV by migrating decoding requests away first (once per request).

        The rule: the room lets the prompt be prefilled at ``degree`` instead of alone, which saves
        ``T(1, l) - T(degree, l)`` by the cost model; the manager moves requests (fewest tokens first) only while
        their estimated transfer time stays under that (:func:`~accordion.cluster.migration.plan_compaction`). Here
        only the cheap checks: compaction is on, it saves time, and the instances have the room between them."""
        esp = self.esp
        if not esp.compaction or req.request_id in self._compacted:
            return False
        saved = self._cost.predict(1, [req.num_prompt_tokens]) - self._cost.predict(degree, [req.num_prompt_tokens])
        if saved <= 0 or sum(self._free_blocks(i) for i in self._routable()) < need:
            return False
        self._compacted.add(req.request_id)
        self._compactions[req.request_id] = (list(cands), need, saved, req.num_prompt_tokens)
        return True

    def _release_room(self, iid: str, request_id: str) -> None:
        """Give back the room a compaction holds for a request on ``iid`` (it was not placed there). Sent before
        anything else this front end sends that instance about the request, so it runs first there."""
        rec = self._records.get(iid)
        if rec is not None and iid not in self._failed_routes:
            rec.handle.release_slice.remote(request_id)

    async def _compact(self, request_id: str) -> None:
        """Run the compaction planned for a request, then have it placed again: with the instance the manager made
        room on as its master, the other instances by load reports sent after the moves."""
        instances, need, saved, prompt_tokens = self._compactions.pop(request_id)
        try:
            master = await self.manager.compact.remote(instances, need, saved, request_id, prompt_tokens)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("compaction for %s failed: %s", request_id, _short(unwrap_ray_error(e)))
            master = None
        logger.info("request %s: compaction %s", request_id, f"made room on {master}" if master else "found no room")
        if master is not None:
            self._rooms[request_id] = master
        await self._fresh_reports(instances)
        raise RetryElsewhere("placing it again after compaction", replan=True)

    def _free_blocks(self, iid: str) -> int:
        """Free KV blocks by the instance's last load report, less the placements planned since."""
        ld = self._loads.get(iid)
        return ld.num_free_blocks - self._planned.get(iid, 0) if ld is not None else 0

    async def _fresh_reports(self, instance_ids: list[str], timeout_s: float = 0.5) -> None:
        """Wait until each instance has sent a load report newer than the current one (or ``timeout_s``)."""
        seen = {i: self._loads.get(i) for i in instance_ids}
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(self._loads.get(i) is seen[i] for i in instance_ids if i in self._pumps):
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.01)

    async def _scale_up(self, master: str, request_id: str, start: int, num_tokens: int) -> None:
        """A decoding request on ``master`` found no free block: the freest other instance with room takes its
        new tokens' KV (multi-master scale-up), else the master preempts as usual."""
        try:
            need = -(-num_tokens // self.config.cache.block_size)
            free = {i: self._free_blocks(i) for i in self._routable() if i != master}
            holders = [i for i, f in free.items() if f >= need]
            if self.esp is None or not self.esp.multi_master or not holders:
                await self._records[master].handle.engine_call.remote("spill_failed", request_id)
                return
            holder = max(holders, key=free.get)
            self._planned[holder] = self._planned.get(holder, 0) + need
            if not await self.manager.scale_up.remote(master, request_id, holder, start, num_tokens):
                # refused, or the request moved on: either way the master must not wait for it any more
                await self._records[master].handle.engine_call.remote("spill_failed", request_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the master must not wait forever: it preempts instead
            logger.warning("scale-up of %s failed: %s", request_id, _short(unwrap_ray_error(e)))
            rec = self._records.get(master)
            if rec is not None:
                rec.handle.engine_call.remote("spill_failed", request_id)

    async def _send_sp(self, group: list[str], request: Request,
                       placement: list[tuple[str, int, int, int]] | None) -> None:
        self._sp_waiting.add(request.request_id)
        try:  # returns once the prefill started (the manager may queue it behind others on these instances)
            await self.manager.run_sp_prefill.remote(request, group, placement)
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
        self.sp_prefills.append(group)
        self.routed[group[0]] = self.routed.get(group[0], 0) + 1

    async def _send(self, route: str, requests: list[Request]) -> None:
        rid = requests[0].request_id
        if rid in self._compactions:
            self._sp_groups.pop(rid, None)
            return await self._compact(rid)
        plan = self._sp_groups.pop(rid, None)
        if plan is not None:
            return await self._send_sp(plan[0], requests[0], plan[1])
        rec = self._records.get(route)
        if rec is None:
            raise RetryElsewhere("no longer a member")
        self._sent[route] = self._sent.get(route, 0) + len(requests)
        batcher = self._batchers.get(route)
        if batcher is None:
            batcher = self._batchers[route] = SubmitBatcher(rec.handle.add_request_groups.remote)
        ok = False
        try:
            await batcher.submit(requests)
            ok = True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            cause = unwrap_ray_error(e)
            if isinstance(cause, EngineUnavailableError):
                self._refused.add(route)  # draining: stop routing there until membership says otherwise
                raise RetryElsewhere(str(cause)) from None
            if cause is e and not isinstance(e, _TYPED_ERRORS):  # not raised by the instance: the actor is gone
                raise EngineUnavailableError(f"engine instance {route} is unavailable ({_short(e)})") from None
            raise cause from None
        finally:
            if not ok:
                self._sent[route] -= len(requests)
        self.routed[route] = self.routed.get(route, 0) + 1

    async def _place(self, stream, requests: list[Request]) -> None:
        try:
            await super()._place(stream, requests)
        finally:  # placed or given up: forget its placement's state
            for r in requests:
                rid = r.request_id
                self._compacted.discard(rid)
                room = self._rooms.pop(rid, None)
                if room is not None:  # cancelled or failed between the compaction and placing it again
                    self._release_room(room, rid)
                self._holds.pop(rid, None)  # cancelled while its prefill was queued: the manager releases it
                self._compactions.pop(rid, None)
                self._sp_groups.pop(rid, None)

    def _send_abort(self, route: str, request_ids: list[str]) -> None:
        queued = [i for i in request_ids if i in self._sp_waiting]
        if queued:  # not started yet: the manager drops them from its prefill queue
            self.manager.cancel_sp_prefill.remote(queued)
        rec = self._records.get(route)
        if rec is not None and route not in self._failed_routes:
            rec.handle.abort.remote(request_ids)  # fire and forget; ordered after add_requests from this caller

    # ---- EngineClient ------------------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return not self.draining and bool(self._routable())

    async def server_info(self) -> ServerInfo:
        insts = []
        for iid, rec in sorted(self._records.items()):
            ld = self._loads.get(iid) or LoadReport(iid)
            insts.append(InstanceInfo(iid, rec.device, ld.num_running, ld.num_waiting, ld.kv_usage,
                                      ld.num_preemptions, healthy=rec.routable and iid in self._subscribed))
        loads = [self._loads[i] for i in self._records if i in self._loads]
        total_blocks = sum(ld.num_blocks for ld in loads)
        used = sum(ld.kv_usage * ld.num_blocks for ld in loads)
        return ServerInfo(
            version=accordion.__version__,
            num_running=sum(i.num_running for i in insts),
            num_waiting=sum(i.num_waiting for i in insts),
            kv_usage=used / total_blocks if total_blocks else 0.0,
            num_preemptions=sum(i.num_preemptions for i in insts),
            instances=insts,
            draining=self.draining,
        )

    async def close(self) -> None:
        """Stop following the manager and the output streams (in-flight requests end with an error)."""
        tasks = [t for t in [self._watch_task, *self._pumps.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
