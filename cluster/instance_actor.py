"""The Ray actor that owns one engine instance (one device).

``__init__`` is cheap; :meth:`InstanceActor.start` builds the engine after Ray has set ``CUDA_VISIBLE_DEVICES``.
The engine runs in one :class:`EngineLoop` thread; the actor's event loop only validates and enqueues. Results
leave through :meth:`InstanceActor.outputs`, a Ray streaming generator yielding one ``(outputs, LoadReport)``
batch per engine step (never one object per token). Create it with :func:`instance_actor_class`.

Typed errors (RequestTooLargeError, EngineOverloadedError, EngineUnavailableError) raised by ``add_requests``
reach the caller wrapped in ``RayTaskError``; :func:`unwrap_ray_error` gives the original back.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from accordion.cluster.config import EngineConfig
from accordion.cluster.errors import EngineUnavailableError
from accordion.cluster.instance import DEFAULT_WORKER
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import EngineOutput, to_wire
from accordion.cluster.request import Request

logger = logging.getLogger(__name__)

Batch = tuple[list[EngineOutput], LoadReport]


class Outbox:
    """Engine steps on their way from the engine thread to the output streams' subscribers.

    The engine thread appends to a buffer and wakes the event loop only when no wake-up is pending, so a busy
    loop costs the engine one lock per step, not a callback; each wake-up hands everything buffered to every
    subscriber as one batch. (Plain class, not an actor method: no Ray wrappers on the engine's path.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._outputs: list[EngineOutput] = []
        self._load: LoadReport | None = None
        self._wake_pending = False
        self._subscribers: list[_Subscriber] = []

    def put(self, outputs: list[EngineOutput], load: LoadReport) -> None:
        """Any thread (the engine's)."""
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
        self._outputs: list[EngineOutput] = []
        self._load: LoadReport | None = None
        self._closed = False
        self._ready = asyncio.Event()

    def add(self, outputs: list[EngineOutput], load: LoadReport) -> None:
        self._outputs.extend(outputs)
        self._load = load
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> tuple[list[EngineOutput], LoadReport] | None:
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
                 cpu_threads: int | None = None):
        self.instance_id = instance_id
        self.config = config
        self.worker_cls = worker_cls
        self.cpu_threads = cpu_threads
        self._engine_loop = None  # EngineLoop once started
        self._instance = None
        self._outbox: Outbox | None = None
        self._accepting = False

    async def start(self) -> dict:
        """Load the model, size the KV cache and start the engine thread. Returns what the manager records."""
        from accordion.cluster.engine_loop import EngineLoop
        from accordion.cluster.instance import EngineInstance

        if self._engine_loop is not None:
            return self._info()
        if not logging.getLogger("accordion").handlers:  # a Ray worker: instance logs go to the driver's console
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logging.getLogger("accordion").addHandler(handler)
            logging.getLogger("accordion").setLevel(logging.INFO)
        self._outbox = Outbox(asyncio.get_running_loop())
        if self.cpu_threads:
            import torch

            torch.set_num_threads(self.cpu_threads)
        self._instance = await asyncio.to_thread(EngineInstance, self.config, self.worker_cls)
        self._engine_loop = EngineLoop(self._instance, self._outbox.put, self.instance_id)
        self._engine_loop.start()
        self._accepting = True
        logger.info("instance %s started: %s", self.instance_id, self._info())
        return self._info()

    def _info(self) -> dict:
        w = self._instance.worker
        return {"device": str(getattr(w, "device", "cpu")),
                "dtype": str(getattr(w, "dtype", self.config.model.dtype)).removeprefix("torch."),
                "num_blocks": self._instance.num_blocks, "max_model_len": self._instance.max_model_len}

    def _require(self):
        if self._engine_loop is None:
            raise EngineUnavailableError(f"instance {self.instance_id} is not started")
        return self._engine_loop

    # ---- requests ----------------------------------------------------------------------------------------------

    async def add_requests(self, requests: list[Request]) -> None:
        """Enqueue these engine requests (all or none); typed errors are raised at once."""
        loop = self._require()
        if not self._accepting:
            raise EngineUnavailableError(f"instance {self.instance_id} is draining")
        loop.submit(requests)
        logger.debug("instance %s accepted %s", self.instance_id, [r.request_id for r in requests])

    async def add_request(self, request: Request) -> None:
        await self.add_requests([request])

    async def add_request_groups(self, groups: list[list[Request]]) -> list[Exception | None]:
        """Enqueue several independent submissions in one call (each all or none, like ``add_requests``); the
        result says, per group, None (accepted) or the typed error that refused it."""
        results: list[Exception | None] = []
        for requests in groups:
            try:
                await self.add_requests(requests)
                results.append(None)
            except Exception as e:
                results.append(e)
        return results

    async def abort(self, request_ids: list[str]) -> None:
        if self._engine_loop is not None:
            self._engine_loop.abort(request_ids)

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
        fut = self._require().call(lambda inst: inst.join_group(init_method, world_size, rank))
        await asyncio.wrap_future(fut)

    async def submit_sp_job(self, job, request: Request | None) -> None:
        """Queue this instance's share of a sequence-parallel prefill (run in the manager's job order). The
        master, given the ``request``, emits its outputs on the normal output stream."""
        self._require().call(lambda inst: inst.run_sp_prefill(job, request))

    # ---- results -----------------------------------------------------------------------------------------------

    async def outputs(self):
        """Streaming generator: first the current load (so the caller knows it is subscribed), then one
        ``(wire outputs, LoadReport)`` item per round, until shutdown; :func:`~accordion.cluster.outputs.from_wire`
        decodes the outputs. A consumer that lags gets every step that piled up in one item (one Ray object per
        round trip, not per step). Call with ``.options(num_returns="streaming")``."""
        loop = self._require()
        sub = self._outbox.subscribe()
        try:
            yield [], loop.load()
            while True:
                batch = await sub.get()
                if batch is None:
                    return
                yield to_wire(batch[0]), batch[1]
        finally:
            self._outbox.unsubscribe(sub)

    # ---- state -------------------------------------------------------------------------------------------------

    async def load(self) -> LoadReport:
        """Current load; the manager's health ping."""
        loop = self._require()
        if loop.failed:
            raise RuntimeError(loop.failed)
        return loop.load()

    async def check_idle(self) -> LoadReport:
        """Assert that nothing runs and every KV block is free (the leak check tests use)."""
        loop = self._require()
        ld = loop.load()
        sched = self._instance.scheduler
        assert ld.idle and not sched.has_unfinished(), f"instance {self.instance_id} is busy: {ld}"
        sched.check_invariants()
        assert ld.num_free_blocks == ld.num_blocks, (
            f"instance {self.instance_id} leaked KV blocks: {ld.num_free_blocks} of {ld.num_blocks} free")
        return ld

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests, then wait until the running ones finish (True) or ``timeout_s`` passes (False)."""
        self._accepting = False
        if self._engine_loop is None:
            return True
        return await asyncio.to_thread(self._engine_loop.wait_idle, timeout_s)

    async def shutdown(self) -> None:
        """Stop the engine thread and end every output stream."""
        self._accepting = False
        if self._engine_loop is not None:
            await asyncio.to_thread(self._engine_loop.stop)
            try:  # leave the instances' group; a peer that is gone must not keep us here
                await asyncio.wait_for(asyncio.to_thread(self._instance.leave_group), 10.0)
            except Exception as e:
                logger.warning("instance %s: leaving the instance group failed: %s", self.instance_id, e)
        if self._outbox is not None:
            self._outbox.close()
        logger.info("instance %s shut down", self.instance_id)


def instance_actor_class(num_gpus: float, num_cpus: float):
    """The Ray actor class of :class:`InstanceActor` with these resources."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0)(InstanceActor)


def unwrap_ray_error(e: BaseException) -> BaseException:
    """The exception an actor method raised, out of Ray's ``RayTaskError`` wrapper (else ``e`` itself)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
