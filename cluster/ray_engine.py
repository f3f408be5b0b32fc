"""``RayEngineClient``: the :class:`EngineClient` of the gRPC front end over instance actors on a Ray cluster.

The request path is :class:`EngineFrontend`'s. This class adds where requests go: it follows the global manager's
membership (:meth:`GlobalManager.watch`, a long poll), keeps one pump task per instance that consumes the
instance's output stream (one ``(outputs, LoadReport)`` batch per engine step) and dispatches it, and routes each
new request with a :class:`Router` over the latest load reports. Where an instance offers one, requests go over a
direct connection to its engine process (:mod:`.direct_routes` over :mod:`.direct_server`), and their outputs come
back on it; the Ray stream then carries only the rest (migrated requests, sequence-parallel prefills). A broken
direct connection fails its requests (the engine aborts them) and is reopened. Submissions through Ray to one
instance are batched: one ``add_request_groups`` call is in flight per instance and whatever arrives meanwhile
rides the next one, so a burst of N requests costs a few actor calls, not N. An instance whose stream breaks (it
died) fails its requests with an ERROR delta.

With elastic sequence parallelism on, an :class:`~accordion.cluster.sp_placement.SPPlacement` places long prompts
(instance groups for sequence-parallel prefills, compaction before one, multi-master placements) and arranges the
scale-ups that load reports ask for: the client asks it before routing a request and before submitting one, and
passes it every load report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import accordion
from accordion.cluster.config import EngineConfig, ESPConfig
from accordion.cluster.direct_routes import DirectRoutes
from accordion.cluster.engine_client import InstanceInfo, ServerInfo
from accordion.cluster.engine_frontend import EngineFrontend, RetryElsewhere, model_info_for
from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError, RequestValidationError, short_error
from accordion.cluster.global_manager import InstanceRecord
from accordion.cluster.instance_actor import unwrap_ray_error
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import from_wire
from accordion.cluster.request import Request
from accordion.cluster.router import InstanceLoad, LeastLoaded, Router
from accordion.cluster.sp_placement import SPPlacement
from accordion.cluster.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_TYPED_ERRORS = (RequestValidationError, EngineOverloadedError, EngineUnavailableError)


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
        self.manager = manager
        self.config = config
        self.router: Router = router or LeastLoaded()
        self.watch_timeout_s = watch_timeout_s
        self._records: dict[str, InstanceRecord] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._loads: dict[str, LoadReport] = {}
        self._subscribed: set[str] = set()
        self._refused: set[str] = set()
        self._sent: dict[str, int] = {}
        self._batchers: dict[str, SubmitBatcher] = {}
        self.direct = DirectRoutes(self._take_load, self._on_route_outputs, lambda: self._changed.set(),
                                   self._reconnect_to, self._refused.add)
        """Connections to the instances' engine processes (:mod:`.direct_server`): requests go there when open."""
        self.routed: dict[str, int] = {}
        """Requests (not children) routed to each instance since start; for tests and debugging."""
        self._changed = asyncio.Event()
        self._version = -1
        self._watch_task: asyncio.Task | None = None
        self.sp_placement: SPPlacement | None = None
        """Placement of long prompts and scale-ups under elastic sequence parallelism; None when it is off."""
        if self.esp is not None:
            self.sp_placement = SPPlacement(
                self.esp, manager, block_size=config.cache.block_size, max_model_len=self._model_info.max_model_len,
                records=lambda: self._records, loads=self._loads, streaming=self._pumps, failed=self._failed_routes,
                routable=self._routable, outstanding=self._outstanding)

    @property
    def sp_prefills(self) -> list[list[str]]:
        """Instance groups of the sequence-parallel prefills sent from here (for tests and debugging)."""
        return self.sp_placement.prefills if self.sp_placement is not None else []

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
                logger.error("global manager watch failed: %s; retrying in 1s", short_error(e))
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
            if r.routable:
                self.direct.follow(r)
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
                if r.routable and i in self._subscribed and i not in self._refused
                and not self.direct.first_connection_pending(i)]

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
                self._take_load(rec, load)
                if iid not in self._subscribed:
                    self._subscribed.add(iid)
                    self._changed.set()
                    logger.info("subscribed to %s", iid)
                self._on_route_outputs(iid, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = short_error(unwrap_ray_error(e))
        finally:
            self._subscribed.discard(iid)
            self._pumps.pop(iid, None)
            if self.sp_placement is not None:
                self.sp_placement.stream_ended(iid)
            self._changed.set()
        self._fail_route(iid, f"engine instance {iid} failed ({reason}); request aborted")

    def _take_load(self, rec: InstanceRecord, load: LoadReport) -> None:
        """A load report from either channel; one already seen (or older) is ignored."""
        iid = rec.instance_id
        seen = self._loads.get(iid)
        if seen is not None and load.time <= seen.time:
            return
        self._loads[iid] = load
        if self.sp_placement is not None:
            self.sp_placement.on_load(iid, load)
        else:  # no one here arranges scale-ups: the spilling requests compete for blocks where they are
            for rid, _, _ in load.spills:
                rec.handle.engine_call.remote("spill_failed", rid)

    def _reconnect_to(self, iid: str) -> InstanceRecord | None:
        rec = self._records.get(iid)
        return rec if rec is not None and rec.routable and iid not in self._failed_routes else None

    # ---- EngineFrontend hooks ----------------------------------------------------------------------------------

    def _choose_route(self, requests: list[Request], exclude: set[str]) -> str:
        if self.sp_placement is not None:
            route = self.sp_placement.choose(requests, exclude)
            if route is not None:
                return route
        cands = [InstanceLoad(i, self._loads.get(i), self._outstanding(i))
                 for i in self._routable() if i not in exclude]
        if not cands:
            raise EngineUnavailableError("no engine instance is available; retry later")
        return self.router.choose(cands)

    def _outstanding(self, iid: str) -> int:
        ld = self._loads.get(iid)
        return max(0, self._sent.get(iid, 0) - (ld.num_added if ld else 0))

    async def _send(self, route: str, requests: list[Request]) -> None:
        if self.sp_placement is not None and await self.sp_placement.send(requests):
            self.routed[route] = self.routed.get(route, 0) + 1  # its prefill started; the route is its master
            return
        rec = self._records.get(route)
        if rec is None:
            raise RetryElsewhere("no longer a member")
        self._sent[route] = self._sent.get(route, 0) + len(requests)
        ok = False
        try:
            if self.direct.has(route):
                await self.direct.submit(route, requests)
            else:
                await self._submit_via_ray(rec, route, requests)
            ok = True
        finally:
            if not ok:
                self._sent[route] -= len(requests)
        self.routed[route] = self.routed.get(route, 0) + 1

    async def _submit_via_ray(self, rec: InstanceRecord, route: str, requests: list[Request]) -> None:
        batcher = self._batchers.get(route)
        if batcher is None:
            batcher = self._batchers[route] = SubmitBatcher(rec.handle.add_request_groups.remote)
        try:
            await batcher.submit(requests)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            cause = unwrap_ray_error(e)
            if isinstance(cause, EngineUnavailableError):
                self._refused.add(route)  # draining: stop routing there until membership says otherwise
                raise RetryElsewhere(str(cause)) from None
            if cause is e and not isinstance(e, _TYPED_ERRORS):  # not raised by the instance: the actor is gone
                raise EngineUnavailableError(f"engine instance {route} is unavailable ({short_error(e)})") from None
            raise cause from None

    async def _place(self, stream, requests: list[Request]) -> None:
        try:
            await super()._place(stream, requests)
        finally:  # placed or given up: forget its placement's state
            if self.sp_placement is not None:
                for r in requests:
                    self.sp_placement.forget(r.request_id)

    def _send_abort(self, route: str, request_ids: list[str]) -> None:
        if self.sp_placement is not None:  # prefills not started yet: the manager drops them from its queue
            self.sp_placement.abort(request_ids)
        request_ids = self.direct.abort(route, request_ids)  # those submitted there: after them on the socket
        rec = self._records.get(route)
        if request_ids and rec is not None and route not in self._failed_routes:
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
        await self.direct.close()
