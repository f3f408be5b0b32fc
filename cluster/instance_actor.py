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

from accordion.cluster.config import EngineConfig
from accordion.cluster.errors import EngineUnavailableError
from accordion.cluster.instance import DEFAULT_WORKER
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import EngineOutput
from accordion.cluster.request import Request

logger = logging.getLogger(__name__)

Batch = tuple[list[EngineOutput], LoadReport]


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
        self._subscribers: list[asyncio.Queue] = []
        self._accepting = False
        self._aloop: asyncio.AbstractEventLoop | None = None

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
        self._aloop = asyncio.get_running_loop()
        if self.cpu_threads:
            import torch

            torch.set_num_threads(self.cpu_threads)
        self._instance = await asyncio.to_thread(EngineInstance, self.config, self.worker_cls)
        self._engine_loop = EngineLoop(self._instance, self._from_thread, self.instance_id)
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

    def _from_thread(self, outputs: list[EngineOutput], load: LoadReport) -> None:
        self._aloop.call_soon_threadsafe(self._publish, (outputs, load))

    def _publish(self, batch: Batch | None) -> None:
        for q in self._subscribers:
            q.put_nowait(batch)

    async def outputs(self):
        """Streaming generator: first the current load (so the caller knows it is subscribed), then one
        ``(outputs, LoadReport)`` per engine step, until shutdown. Call with ``.options(num_returns="streaming")``."""
        loop = self._require()
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(q)
        try:
            yield [], loop.load()
            while True:
                batch = await q.get()
                if batch is None:
                    return
                # Under load the consumer lags: send every step that has piled up as one stream item (one Ray
                # object per round trip, not per step), with the newest load report.
                outputs, load = batch
                while not q.empty():
                    nxt = q.get_nowait()
                    if nxt is None:
                        yield outputs, load
                        return
                    outputs, load = outputs + nxt[0], nxt[1]
                yield outputs, load
        finally:
            self._subscribers.remove(q)

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
        self._publish(None)
        logger.info("instance %s shut down", self.instance_id)


def instance_actor_class(num_gpus: float, num_cpus: float):
    """The Ray actor class of :class:`InstanceActor` with these resources."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0)(InstanceActor)


def unwrap_ray_error(e: BaseException) -> BaseException:
    """The exception an actor method raised, out of Ray's ``RayTaskError`` wrapper (else ``e`` itself)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
