"""The front-end half of an :class:`~accordion.cluster.engine_client.EngineClient`, shared by every backend.

:class:`EngineFrontend` validates a prompt, fans ``n > 1`` out into child engine requests (``f"{rid}-{i}"``),
keeps one asyncio queue per request, runs engine outputs through one :class:`OutputProcessor` (text, stop
strings), aborts children that hit a stop string, and aborts every unfinished child when the ``generate``
iterator is closed or cancelled. A backend subclass only says how to submit, abort and report load:

* ``_choose_route(requests, exclude) -> route`` picks where the children of one request go, and
  ``await _send(route, requests)`` puts them there (typed errors at once; :class:`RetryElsewhere` to try another
  route);
* ``_send_abort(route, ids)``: fire-and-forget abort of engine request ids on that route;
* feed results back, on the event loop, with ``_on_outputs(outputs)``, and ``_fail_route(route, message)`` when a
  route died (its requests end with an ERROR delta instead of hanging). A backend whose requests can migrate
  between routes feeds each route's outputs through ``_on_route_outputs(route, outputs)`` instead: a
  :class:`RequestMoved` marker moves one engine request to another route, and outputs that the new route sends
  before the old route's marker arrives wait for it, so a request's tokens stay in order.

Implementations: ``local_engine.LocalEngineClient`` (a thread in this process) and ``ray_engine.RayEngineClient``
(instance actors behind the global manager). Methods run on one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from accordion.cluster.config import EngineConfig
from accordion.cluster.engine_client import ModelInfo
from accordion.cluster.errors import EngineUnavailableError, RequestValidationError
from accordion.cluster.output_processor import OutputProcessor
from accordion.cluster.outputs import EngineOutput, RequestMoved, StreamDelta
from accordion.cluster.request import FinishReason, Request, SamplingParams
from accordion.cluster.tokenizer import Tokenizer
from accordion.cluster.validation import validate_prompt

logger = logging.getLogger(__name__)


def model_info_for(config: EngineConfig, tokenizer: Tokenizer, dtype: str | None = None) -> ModelInfo:
    """The :class:`ModelInfo` of the model ``config`` serves (name = the checkpoint directory's name)."""
    from pathlib import Path

    return ModelInfo(
        model_name=Path(config.model.model).name,
        max_model_len=config.model.resolved_max_model_len(),
        vocab_size=tokenizer.vocab_size,
        eos_token_ids=list(tokenizer.eos_token_ids),
        bos_token_id=tokenizer.bos_token_id,
        dtype=dtype or config.model.dtype,
        block_size=config.cache.block_size,
    )


def child_request_id(request_id: str, index: int) -> str:
    """Engine request id of completion ``index`` (unambiguous: the index never contains '-')."""
    return f"{request_id}-{index}"


def _coalesce(first: StreamDelta, queue: asyncio.Queue) -> list[StreamDelta]:
    """``first`` plus whatever else is already queued, consecutive deltas of one completion merged into one.

    Under load the consumer (a gRPC stream) falls behind the engine; merging then sends one message per completion
    instead of one per engine step, which keeps the front end's per-message cost from capping throughput."""
    out = [first]
    while not queue.empty():
        d = queue.get_nowait()
        last = next((x for x in reversed(out) if x.index == d.index), None)
        if last is not None and not last.finished:
            last.absorb(d)
        else:
            out.append(d)
    return out


class RetryElsewhere(Exception):
    """Raised by ``_send``: this route refused the request without running it (draining, gone); try another.

    ``replan``: the refusal was about a plan made from stale load reports (a multi-master placement whose slices
    were taken meanwhile), not about the route: choose again, the route included (a few times at most)."""

    def __init__(self, message: str, *, replan: bool = False):
        super().__init__(message)
        self.replan = replan


MAX_REPLANS = 3


@dataclass
class _Stream:
    """One in-flight ``generate`` call."""

    request_id: str
    child_ids: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    route: str | None = None
    placed: bool = False
    """The route accepted the children (set after ``_send`` returns)."""
    unfinished: set[str] = field(default_factory=set)
    moved: dict[str, str] = field(default_factory=dict)
    """Child id -> its route, for children that migrated away from ``route``."""

    def route_of(self, child_id: str) -> str | None:
        return self.moved.get(child_id, self.route)

    def by_route(self, child_ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for cid in child_ids:
            route = self.route_of(cid)
            if route is not None:
                out.setdefault(route, []).append(cid)
        return out


class EngineFrontend:
    """Everything of an :class:`EngineClient` except where requests run. See the module docstring."""

    def __init__(self, tokenizer: Tokenizer, model_info: ModelInfo):
        self._tokenizer = tokenizer
        self._model_info = model_info
        self._processor = OutputProcessor(tokenizer)
        self._streams: dict[str, _Stream] = {}
        self._by_child: dict[str, _Stream] = {}
        self._failed_routes: set[str] = set()
        self._held: dict[str, list[tuple[str, EngineOutput | RequestMoved]]] = {}
        """(route, output or marker) of migrated engine requests, from a route they have not reached yet as far as
        this front end knows (it came before the previous route's marker); replayed in order when it arrives."""
        self.draining = False
        """When set, new requests raise EngineUnavailableError; in-flight ones run to the end."""

    # ---- backend hooks -----------------------------------------------------------------------------------------

    def _choose_route(self, requests: list[Request], exclude: set[str]) -> str:
        """Where to send these engine requests (the children of one request), avoiding ``exclude``. Raises
        EngineUnavailableError when nothing is left."""
        raise NotImplementedError

    async def _send(self, route: str, requests: list[Request]) -> None:
        """Enqueue the requests on ``route``; raise typed errors, or :class:`RetryElsewhere`."""
        raise NotImplementedError

    def _send_abort(self, route: str, request_ids: list[str]) -> None:
        """Abort engine requests on ``route`` without waiting (fire and forget)."""
        raise NotImplementedError

    # ---- EngineClient ------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 priority: int = 0) -> AsyncIterator[StreamDelta]:
        return self._generate(request_id, list(prompt_token_ids), params, priority)

    async def abort(self, request_ids: list[str]) -> list[str]:
        found = []
        for rid in request_ids:
            s = self._streams.get(rid)
            if s is None:
                continue
            found.append(rid)
            for route, ids in s.by_route(sorted(s.unfinished)).items():
                self._send_abort(route, ids)
        if found:
            logger.info("abort requested for %s", found)
        return found

    # ---- the request path --------------------------------------------------------------------------------------

    def _requests_for(self, request_id: str, prompt: list[int], params: SamplingParams,
                      priority: int) -> list[Request]:
        mi = self._model_info
        validate_prompt(prompt, mi.vocab_size, mi.max_model_len, params.max_tokens)
        eos = tuple(mi.eos_token_ids)
        now = time.monotonic()
        return [
            Request(request_id=child_request_id(request_id, i), prompt_token_ids=prompt,
                    sampling_params=params.child(i) if params.n > 1 else params, eos_token_ids=eos,
                    priority=priority, arrival_time=now)
            for i in range(params.n)
        ]

    async def _generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                        priority: int) -> AsyncIterator[StreamDelta]:
        if self.draining:
            raise EngineUnavailableError("server is draining; retry on another replica")
        if request_id in self._streams:
            raise RequestValidationError("request_id", f"request_id {request_id!r} is already in flight")
        requests = self._requests_for(request_id, prompt, params, priority)
        stream = _Stream(request_id, [r.request_id for r in requests])
        stream.unfinished = set(stream.child_ids)
        self._streams[request_id] = stream
        for i, r in enumerate(requests):
            self._by_child[r.request_id] = stream
            self._processor.add(r.request_id, request_id, i, prompt, r.sampling_params)
        try:
            await self._place(stream, requests)
            logger.debug("request %s (n=%d) placed on %s", request_id, len(requests), stream.route)
            while stream.unfinished:
                for delta in _coalesce(await stream.queue.get(), stream.queue):
                    if delta.finished:
                        stream.unfinished.discard(child_request_id(request_id, delta.index))
                    yield delta
        finally:
            self._close(stream)

    async def _place(self, stream: _Stream, requests: list[Request]) -> None:
        tried: set[str] = set()
        replans = 0
        while True:
            stream.route = self._choose_route(requests, tried)
            try:
                await self._send(stream.route, requests)
            except RetryElsewhere as e:
                logger.info("request %s: %s refused it (%s); trying again", stream.request_id, stream.route, e)
                if e.replan and replans < MAX_REPLANS:
                    replans += 1
                else:
                    tried.add(stream.route)
                stream.route = None
                continue
            if stream.route in self._failed_routes:  # it died between accepting and our reply: never hang
                raise EngineUnavailableError(f"{stream.route} failed while accepting the request; retry")
            stream.placed = True
            return

    def _close(self, stream: _Stream) -> None:
        """Forget a request; abort what of it is still running (closed or cancelled iterator)."""
        self._streams.pop(stream.request_id, None)
        for cid in stream.child_ids:
            self._by_child.pop(cid, None)
            self._processor.discard(cid)
            self._held.pop(cid, None)
        for route, ids in stream.by_route(sorted(stream.unfinished)).items():
            logger.info("request %s closed early; aborting %d completion(s) on %s", stream.request_id, len(ids), route)
            self._send_abort(route, ids)

    # ---- results from the backend (on the event loop) ----------------------------------------------------------

    def _on_outputs(self, outputs: list[EngineOutput]) -> None:
        """Dispatch one engine step's outputs to their streams; abort children that matched a stop string."""
        if not outputs:
            return
        deltas, to_abort = self._processor.process(outputs)
        for d in deltas:
            s = self._streams.get(d.request_id)
            if s is not None:
                s.queue.put_nowait(d)
        by_route: dict[str, list[str]] = {}
        for cid in to_abort:
            s = self._by_child.get(cid)
            route = None if s is None else s.route_of(cid)
            if route is not None:
                by_route.setdefault(route, []).append(cid)
        for route, ids in by_route.items():
            self._send_abort(route, ids)

    def _on_route_outputs(self, route: str, outputs: list[EngineOutput | RequestMoved]) -> None:
        """One step's outputs from ``route``, which may hold migration markers (see the module docstring)."""
        mine, moves = [], []
        for o in outputs:
            s = self._by_child.get(o.request_id)
            if s is not None and s.route_of(o.request_id) != route:  # ahead of its previous route's marker
                self._held.setdefault(o.request_id, []).append((route, o))
            elif type(o) is RequestMoved:
                moves.append(o)
            else:
                mine.append(o)
        self._on_outputs(mine)
        for m in moves:
            self._on_moved(route, m)

    def _on_moved(self, route: str, m: RequestMoved) -> None:
        """Engine request ``m.request_id`` left ``route`` for ``m.to_instance`` after its last outputs there."""
        cid = m.request_id
        s = self._by_child.get(cid)
        if s is None or cid not in self._processor:
            self._held.pop(cid, None)  # nobody waits for it any more (ended, aborted): stop it at its new home
            self._send_abort(m.to_instance, [cid])
            return
        if m.to_instance == s.route:
            s.moved.pop(cid, None)
        else:
            s.moved[cid] = m.to_instance
        logger.info("request %s continues on %s (migrated from %s)", cid, m.to_instance, route)
        for r, o in self._held.pop(cid, []):
            self._on_route_outputs(r, [o])

    def _fail_route(self, route: str, message: str) -> None:
        """End every request placed on ``route`` with an ERROR delta (the instance died or its stream broke)."""
        self._failed_routes.add(route)
        dead = [cid for s in self._streams.values() if s.placed for cid in s.unfinished if s.route_of(cid) == route]
        if dead:
            logger.error("%s: failing %d request(s): %s", route, len(dead), message)
            self._on_outputs([EngineOutput(cid, [], finish_reason=FinishReason.ERROR, error=message) for cid in dead])
