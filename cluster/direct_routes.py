"""The front end's direct connections to the instances' engine processes (:mod:`.direct_server`), beside
:class:`~accordion.cluster.ray_engine.RayEngineClient`: opening and reopening them, which engine requests travel
on each, and submissions and aborts over them.

An instance that offers a socket is not routable until the first connection attempt ends (its first requests
should not take the slow path); when the attempt fails, its requests go through Ray. A connection that breaks
fails the requests that travelled on it (the engine aborted them when it closed) and is reopened while the
instance stays routable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from accordion.cluster.direct_client import DirectClient
from accordion.cluster.engine_frontend import RetryElsewhere
from accordion.cluster.errors import EngineUnavailableError, short_error
from accordion.cluster.instance_record import InstanceRecord
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import EngineOutput, RequestMoved
from accordion.cluster.request import FinishReason, Request

logger = logging.getLogger(__name__)

RECONNECT_DELAY_S = 0.2


class DirectRoutes:
    """Callbacks (all on the event loop): ``on_load(rec, load)`` and ``on_outputs(instance_id, outputs)`` for
    what arrives; ``on_changed()`` when routability may have changed; ``reconnect_to(instance_id)`` the record to
    reconnect to after a break (None: let it go); ``on_refused(instance_id)`` when an engine refuses because it
    drains."""

    def __init__(self, on_load: Callable[[InstanceRecord, LoadReport], None],
                 on_outputs: Callable[[str, list], None], on_changed: Callable[[], None],
                 reconnect_to: Callable[[str], InstanceRecord | None], on_refused: Callable[[str], None]):
        self._on_load, self._on_outputs, self._on_changed = on_load, on_outputs, on_changed
        self._reconnect_to, self._on_refused = reconnect_to, on_refused
        self._clients: dict[str, DirectClient] = {}
        self._connecting: dict[str, asyncio.Task] = {}
        self._first: set[str] = set()
        self._ids: dict[str, set[str]] = {}
        """Per instance, the engine requests submitted over its connection and not finished there."""
        self.sent = 0
        """Submissions that went over a direct connection (for tests and debugging)."""
        self._closing = False

    @property
    def connected(self) -> list[str]:
        return sorted(self._clients)

    def unfinished(self, instance_id: str) -> set[str]:
        return set(self._ids.get(instance_id, ()))

    def follow(self, rec: InstanceRecord) -> None:
        """A routable instance: connect to its socket if it offers one and no connection is open or opening."""
        iid = rec.instance_id
        if rec.info.get("direct") and iid not in self._clients and iid not in self._connecting:
            self._first.add(iid)
            self._connecting[iid] = asyncio.get_running_loop().create_task(self._connect(rec))

    def first_connection_pending(self, instance_id: str) -> bool:
        return instance_id in self._first

    def has(self, instance_id: str) -> bool:
        return instance_id in self._clients

    async def submit(self, instance_id: str, requests: list[Request]) -> None:
        """Enqueue one group (all or none) over the instance's connection. Raises the engine's typed refusal, or
        RetryElsewhere when the connection went away or the engine drains."""
        ids = self._ids.setdefault(instance_id, set())
        ids.update(r.request_id for r in requests)  # before the reply: outputs may come first
        try:
            (refused,) = await self._clients[instance_id].submit_groups([requests])
        except (KeyError, EngineUnavailableError) as e:  # the connection went away: Ray may still take it
            ids.difference_update(r.request_id for r in requests)
            raise RetryElsewhere(f"{instance_id}: direct connection gone ({e})") from None
        if refused is not None:
            ids.difference_update(r.request_id for r in requests)
            if isinstance(refused, EngineUnavailableError):
                self._on_refused(instance_id)
                raise RetryElsewhere(str(refused))
            raise refused
        self.sent += 1

    def abort(self, instance_id: str, request_ids: list[str]) -> list[str]:
        """Abort those of ``request_ids`` that travelled on the instance's connection (ordered after their
        submission on the same socket); returns the others."""
        client, ids = self._clients.get(instance_id), self._ids.get(instance_id, ())
        if client is None or not ids:
            return request_ids
        client.abort([rid for rid in request_ids if rid in ids])
        return [rid for rid in request_ids if rid not in ids]

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._connecting.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in list(self._clients.values()):
            await client.close()

    # ---- connections -------------------------------------------------------------------------------------------

    async def _connect(self, rec: InstanceRecord, delay_s: float = 0.0) -> None:
        iid, d = rec.instance_id, rec.info["direct"]
        try:
            await asyncio.sleep(delay_s)
            self._clients[iid] = await DirectClient.connect(
                iid, d["address"], d["token"], lambda outputs, load: self._step(rec, outputs, load),
                lambda reason: self._lost(iid, reason))
            logger.info("direct connection to %s at %s", iid, d["address"])
        except (OSError, asyncio.TimeoutError) as e:
            logger.warning("no direct connection to %s at %s (%s); its requests go through Ray", iid, d["address"],
                           short_error(e))
        finally:
            self._connecting.pop(iid, None)
            self._first.discard(iid)
            self._on_changed()

    def _step(self, rec: InstanceRecord, outputs: list, load: LoadReport) -> None:
        self._on_load(rec, load)
        ids = self._ids.get(rec.instance_id)
        if ids:
            ids.difference_update(o.request_id for o in outputs if type(o) is RequestMoved or o.finished)
        self._on_outputs(rec.instance_id, outputs)

    def _lost(self, iid: str, reason: str) -> None:
        """The engine aborted this connection's requests when it closed: end them here too; reconnect."""
        self._clients.pop(iid, None)
        lost = sorted(self._ids.pop(iid, set()))
        logger.warning("direct connection to %s lost (%s); %d request(s) failed", iid, reason, len(lost))
        msg = f"engine instance {iid}: {reason}; request aborted"
        self._on_outputs(iid, [EngineOutput(rid, [], finish_reason=FinishReason.ERROR, error=msg) for rid in lost])
        rec = None if self._closing else self._reconnect_to(iid)
        if rec is not None:
            self._connecting[iid] = asyncio.get_running_loop().create_task(self._connect(rec, RECONNECT_DELAY_S))
