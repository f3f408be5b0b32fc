"""The Ray actor that owns one engine instance (one device).

``__init__`` is cheap; :meth:`InstanceActor.start` spawns the engine process (:mod:`.engine_process`: an
:class:`EngineLoop` with the GIL to itself) after Ray has set ``CUDA_VISIBLE_DEVICES``; the actor relays requests
to it and its steps to the output streams. Results leave through :meth:`InstanceActor.outputs`, a Ray streaming
generator yielding ``(outputs, LoadReport)`` batches (never one object per token). Create it with
:func:`instance_actor_class`.

Typed errors (RequestTooLargeError, EngineOverloadedError, EngineUnavailableError) raised by ``add_requests``
reach the caller wrapped in ``RayTaskError``; :func:`unwrap_ray_error` gives the original back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from accordion.cluster.config import EngineConfig
from accordion.cluster.errors import EngineUnavailableError
from accordion.cluster.instance import DEFAULT_WORKER
from accordion.cluster.load import LoadReport
from accordion.cluster.request import Request

logger = logging.getLogger(__name__)

Batch = tuple[list, LoadReport]
"""Engine outputs in wire form (:func:`~accordion.cluster.outputs.to_wire`) and the newest load report."""


class Outbox:
    """Engine steps (outputs in wire form) on their way from the engine process's reader thread to the output
    streams' subscribers.

    The reader thread appends to a buffer and wakes the event loop only when no wake-up is pending, so a busy
    loop costs one lock per step, not a callback; each wake-up hands everything buffered to every
    subscriber as one batch. (Plain class, not an actor method: no Ray wrappers on the engine's path.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._outputs: list = []
        self._load: LoadReport | None = None
        self._wake_pending = False
        self._subscribers: list[_Subscriber] = []

    def put(self, outputs: list, load: LoadReport) -> None:
        """Any thread (the engine process's reader)."""
        with self._lock:
            self._outputs.extend(outputs)
            self._load = load
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            outputs, self._outputs = self._outputs, []
            load, self._wake_pending = self._load, False
        for sub in self._subscribers:
            sub.add(outputs, load)

    def subscribe(self) -> _Subscriber:
        sub = _Subscriber()
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subscribers.remove(sub)

    def close(self) -> None:
        """End every subscription (after what is buffered)."""
        self._flush()
        for sub in self._subscribers:
            sub.close()


class _Subscriber:
    """One output stream's pending steps, merged until it takes them."""

    def __init__(self):
        self._outputs: list = []
        self._load: LoadReport | None = None
        self._closed = False
        self._ready = asyncio.Event()

    def add(self, outputs: list, load: LoadReport) -> None:
        self._outputs.extend(outputs)
        self._load = load
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> Batch | None:
        """Everything since the last call, or None once closed and drained."""
        while self._load is None:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        batch = (self._outputs, self._load)
        self._outputs, self._load = [], None
        return batch


class InstanceActor:
    """One engine instance as an async Ray actor. Methods run on the actor's event loop."""

    def __init__(self, instance_id: str, config: EngineConfig, worker_cls: str = DEFAULT_WORKER,
                 cpu_threads: int | None = None, direct_channel: bool = True, direct_host: str | None = None):
        self.instance_id = instance_id
        self.config = config
        self.worker_cls = worker_cls
        self.cpu_threads = cpu_threads
        self.direct_channel = direct_channel
        self.direct_host = direct_host
        self._engine = None  # EngineProcess once started
        self._info: dict = {}
        self._outbox: Outbox | None = None
        self._accepting = False

    async def start(self) -> dict:
        """Spawn the engine process (it loads the model and sizes the KV cache). Returns what the manager records."""
        from accordion.cluster.engine_process import EngineProcess, log_to_stderr

        if self._engine is not None:
            return self._info
        log_to_stderr()
        self._outbox = Outbox(asyncio.get_running_loop())
        direct_host = None
        if self.direct_channel:  # front ends submit on a socket of the engine process (.direct_server)
            import ray

            direct_host = self.direct_host or ray.util.get_node_ip_address()
        engine = EngineProcess(self.config, self.worker_cls, self.instance_id, self._outbox.put, self.cpu_threads,
                               direct_host)
        self._info = await asyncio.to_thread(engine.start)
        self._engine = engine
        self._accepting = True
        shown = ({**self._info, "direct": self._info["direct"]["address"]} if "direct" in self._info
                 else self._info)  # never the token
        logger.info("instance %s started: %s", self.instance_id, shown)
        return self._info

    def _require(self):
        if self._engine is None:
            raise EngineUnavailableError(f"instance {self.instance_id} is not started")
        return self._engine

    # ---- requests ----------------------------------------------------------------------------------------------

    async def add_requests(self, requests: list[Request]) -> None:
        """Enqueue these engine requests (all or none); typed errors are raised at once."""
        engine = self._require()
        if not self._accepting:
            raise EngineUnavailableError(f"instance {self.instance_id} is draining")
        await asyncio.wrap_future(engine.submit(requests))
        logger.debug("instance %s accepted %s", self.instance_id, [r.request_id for r in requests])

    async def add_request(self, request: Request) -> None:
        await self.add_requests([request])

    async def add_request_groups(self, groups: list[list[Request]]) -> list[Exception | None]:
        """Enqueue several independent submissions in one call (each all or none, like ``add_requests``); the
        result says, per group, None (accepted) or the typed error that refused it."""
        results = await asyncio.gather(*(self.add_requests(g) for g in groups), return_exceptions=True)
        return [r if isinstance(r, Exception) else None for r in results]

    async def abort(self, request_ids: list[str]) -> None:
        if self._engine is not None:
            self._engine.abort(request_ids)

    # ---- elastic sequence parallelism ---------------------------------------------------------------------------

    async def rendezvous_address(self) -> str:
        """A ``tcp://ip:port`` on this node for the instances' process group (rank 0 hosts the store)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((ip, 0))
            port = sock.getsockname()[1]
        return f"tcp://{ip}:{port}"

    async def join_group(self, init_method: str, world_size: int, rank: int) -> None:
        """(Re-)join the instances' torch.distributed group, on the engine thread after any queued jobs."""
        await asyncio.wrap_future(self._require().call("join_group", init_method, world_size, rank))

    async def engine_call(self, name: str, *args):
        """Run one of :data:`~accordion.cluster.engine_process.CALLS` on the engine thread (the manager's
        multi-master scale-up steps)."""
        return await asyncio.wrap_future(self._require().call(name, *args))

    async def reserve_slice(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for this instance's slice of a multi-master placement, reserved before the prefill job."""
        return await asyncio.wrap_future(self._require().call("reserve_slice", request_id, num_tokens))

    async def release_slice(self, request_id: str) -> None:
        await asyncio.wrap_future(self._require().call("release_slice", request_id))

    async def receive_request(self, state, block_ids: list[int], src_rank: int) -> None:
        """Live migration's destination side: receive a request's KV from ``src_rank`` into the reserved
        ``block_ids`` and run it here (:mod:`accordion.cluster.migration`)."""
        await asyncio.wrap_future(self._require().receive_request(state, block_ids, src_rank))

    async def run_sp_batch(self, batch, requests: list[Request] | None) -> None:
        """Run this instance's share of a sequence-parallel prefill batch on the engine thread (in the manager's
        order); returns when it ran. The master, given the ``requests``, emits their outputs on the normal output
        stream."""
        await asyncio.wrap_future(self._require().call("run_sp_prefill", batch, requests))

    # ---- results -----------------------------------------------------------------------------------------------

    async def outputs(self):
        """Streaming generator: first the current load (so the caller knows it is subscribed), then one
        ``(wire outputs, LoadReport)`` item per round, until shutdown; :func:`~accordion.cluster.outputs.from_wire`
        decodes the outputs. A consumer that lags gets every step that piled up in one item (one Ray object per
        round trip, not per step). Call with ``.options(num_returns="streaming")``."""
        engine = self._require()
        sub = self._outbox.subscribe()
        try:
            yield [], engine.load()
            while True:
                batch = await sub.get()
                if batch is None:
                    return
                yield batch
        finally:
            self._outbox.unsubscribe(sub)

    # ---- state -------------------------------------------------------------------------------------------------

    async def load(self) -> LoadReport:
        """Current load; the manager's health ping."""
        engine = self._require()
        if engine.failed:
            raise RuntimeError(engine.failed)
        return engine.load()

    async def check_idle(self) -> LoadReport:
        """Assert that nothing runs and every KV block is free (the leak check tests use)."""
        return await asyncio.wrap_future(self._require().call("check_idle"))

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests, then wait until the running ones finish and no other master's request keeps KV
        here any more (multi-master decoding) (True), or ``timeout_s`` passes (False)."""
        self._accepting = False
        if self._engine is None:
            return True
        self._engine.refuse_direct("draining")
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
        if not await asyncio.to_thread(self._engine.wait_idle, timeout_s):
            return False
        while await asyncio.wrap_future(self._engine.call("held_slices")):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def shutdown(self) -> None:
        """Stop the engine process (it leaves the instances' group) and end every output stream."""
        self._accepting = False
        if self._engine is not None:
            self._engine.refuse_direct("stopping")
            await asyncio.to_thread(self._engine.stop)
        if self._outbox is not None:
            self._outbox.close()
        logger.info("instance %s shut down", self.instance_id)


def instance_actor_class(num_gpus: float, num_cpus: float, niceness: int | None = 0):
    """The Ray actor class of :class:`InstanceActor` with these resources and process niceness."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0,
                      **niceness_options(niceness))(InstanceActor)


def niceness_options(niceness: int | None) -> dict:
    """``ray.remote`` options that give an actor's worker process this niceness instead of Ray's 15
    (``ClusterConfig.actor_niceness``; Ray reads ``RAY_worker_niceness`` when the worker starts)."""
    return {} if niceness is None else {"runtime_env": {"env_vars": {"RAY_worker_niceness": str(niceness)}}}


def unwrap_ray_error(e: BaseException) -> BaseException:
    """The exception an actor method raised, out of Ray's ``RayTaskError`` wrapper (else ``e`` itself)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
