"""An :class:`EngineLoop` in a child process, behind the same interface (``submit``, ``abort``, ``call``, ``load``,
``failed``, ``wait_idle``, ``stop``).

Why a process: the engine thread's host work (scheduling, input preparation, CUDA launches) is Python, and in the
instance actor it shared the GIL with the actor's event loop and Ray's threads, which made every decode step's
host part ~1.4x slower than offline (``bench/serving_overhead.py``). In its own process the engine thread has
the GIL to itself; the parent only relays. vLLM's V1 engine core runs apart from its front end for the same reason.

Protocol: two one-way OS pipes (``multiprocessing`` connections, not network sockets) between this process and a
child it spawned; what crosses them is our own typed messages, pickled:

* parent -> child: ``("submit", seq, requests)``, ``("abort", ids)``, ``("call", seq, name, args)``,
  ``("wait_idle", seq, timeout)``, ``("stop",)``
* child -> parent: ``("ready", info)`` or ``("start_failed", message)``, ``("step", wire_outputs, load)``,
  ``("reply", seq, result, error)``, ``("failed", message)``

``call(name, *args)`` runs ``EngineInstance.<name>(*args)`` on the engine thread between steps, like
:meth:`EngineLoop.call`; ``name`` must be one of :data:`CALLS`. If the child dies, every request it held ends
with an ERROR output and later calls raise :class:`EngineUnavailableError`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from concurrent.futures import Future
from itertools import count

from accordion.cluster.config import EngineConfig
from accordion.cluster.errors import EngineUnavailableError
from accordion.cluster.load import LoadReport
from accordion.cluster.migration import MigrationState
from accordion.cluster.outputs import EngineOutput, RequestMoved, to_wire
from accordion.cluster.request import FinishReason, Request

logger = logging.getLogger(__name__)

CALLS = frozenset({"join_group", "leave_group", "run_sp_prefill", "reserve_slice", "release_slice", "register_slice",
                   "drop_slice", "attach_tail", "spill_failed", "held_slices", "check_idle",
                   "migration_candidates", "export_request", "resume_migration", "reserve_migration", "kv_room",
                   "hold_room", "send_kv", "receive_request", "commit_migration"})
"""EngineInstance methods the parent may run on the engine thread."""

PARENT_LOAD_INTERVAL_S = 0.05
"""With a front end on the socket, a step whose outputs all went there reaches the parent (its load report) only
this often, or when the engine goes idle."""

StepCallback = Callable[[list, LoadReport], None]
"""Receives each step's outputs in wire form (:func:`~accordion.cluster.outputs.to_wire`: they are passed on to
Ray as they came over the pipe, never decoded in between) and the load after it."""


class EngineProcess:
    """The parent's handle. Methods may be called from any thread; ``on_step`` runs on a reader thread and gets
    outputs in wire form."""

    def __init__(self, config: EngineConfig, worker_cls: str, instance_id: str, on_step: StepCallback,
                 cpu_threads: int | None = None, direct_host: str | None = None):
        self.instance_id = instance_id
        self._on_step = on_step
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or Ray state
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._events, evt_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, name=f"accordion-engine-{instance_id}", daemon=True,
                                 args=(config, worker_cls, instance_id, cpu_threads, direct_host, cmd_r, evt_w))
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._seq = count()
        self._pending: dict[int, Future] = {}
        self._inflight: set[str] = set()  # accepted request ids not finished: failed with ERROR if the child dies
        self._load = LoadReport(instance_id)
        self._failed: str | None = None
        self._reader: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, timeout_s: float | None = None) -> dict:
        """Spawn the child, wait until the engine is built; returns its info (device, dtype, num_blocks, ...)."""
        self._proc.start()
        if not self._events.poll(timeout_s):
            self._proc.kill()
            raise TimeoutError(f"engine process {self.instance_id} did not start in {timeout_s} s")
        try:
            kind, payload = self._events.recv()
        except EOFError:  # it died without a word (a signal, a native crash)
            self._proc.join(10)
            raise RuntimeError(f"engine process {self.instance_id} exited while starting "
                               f"(exit code {self._proc.exitcode})") from None
        if kind != "ready":
            self._proc.join(10)
            raise RuntimeError(f"engine process {self.instance_id} failed to start: {payload}")
        self._load = payload["load"]
        self._reader = threading.Thread(target=self._read, name=f"engine-events-{self.instance_id}", daemon=True)
        self._reader.start()
        return {**payload["info"], "engine_pid": self._proc.pid}

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the engine (it leaves the instances' group) and wait for the child to exit."""
        try:
            self._send(("stop",))
        except EngineUnavailableError:
            pass
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            logger.warning("engine process %s did not stop in %.0f s; killing it", self.instance_id, timeout_s)
            self._proc.kill()
            self._proc.join(5)

    @property
    def failed(self) -> str | None:
        return self._failed

    def load(self) -> LoadReport:
        """The latest load report (every step sends one)."""
        return self._load

    # ---- requests ----------------------------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> Future:
        """Future of the child's verdict: None (accepted) or the typed error (RequestTooLargeError,
        EngineOverloadedError, EngineUnavailableError) that refused all of them."""
        ids = [r.request_id for r in requests]
        with self._lock:  # before the child can see them: its outputs for them may come back at once
            self._inflight.update(ids)
        try:
            fut = self._request(lambda seq: ("submit", seq, requests))
        except EngineUnavailableError:
            self._forget(ids)
            raise
        fut.add_done_callback(lambda f: f.exception() is None or self._forget(ids))
        return fut

    def receive_request(self, state: MigrationState, block_ids: list[int], src_rank: int) -> Future:
        """Migration's destination side (``EngineInstance.receive_request``); from then on the request is this
        engine's like a submitted one (failed with ERROR if the child dies)."""
        with self._lock:
            self._inflight.add(state.request_id)
        try:
            fut = self.call("receive_request", state, block_ids, src_rank)
        except EngineUnavailableError:
            self._forget([state.request_id])
            raise
        fut.add_done_callback(lambda f: f.exception() is None or self._forget([state.request_id]))
        return fut

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and not self._failed:
            self._send(("abort", list(request_ids)))

    def refuse_direct(self, reason: str) -> None:
        """Refuse submissions on the engine's front-end socket from now on (draining, stopping)."""
        if not self._failed:
            try:
                self._send(("refuse", reason))
            except EngineUnavailableError:
                pass

    def call(self, name: str, *args) -> Future:
        """Run ``EngineInstance.<name>(*args)`` on the engine thread, in order with other calls; outputs it
        returns are emitted like a step's. Future of its result."""
        if name not in CALLS:
            raise ValueError(f"unknown engine call {name!r}")
        return self._request(lambda seq: ("call", seq, name, args))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (True) or ``timeout`` passes (False)."""
        return self._request(lambda seq: ("wait_idle", seq, timeout)).result()

    # ---- plumbing ----------------------------------------------------------------------------------------------

    def _request(self, make: Callable[[int], tuple]) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._failed:
                raise EngineUnavailableError(f"instance {self.instance_id}: {self._failed}")
            seq = next(self._seq)
            self._pending[seq] = fut
        self._send(make(seq))
        return fut

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._cmd.send(msg)
        except (OSError, ValueError) as e:  # the child is gone
            raise EngineUnavailableError(f"engine process {self.instance_id} is gone ({e})") from None

    def _forget(self, ids: list[str]) -> None:
        with self._lock:
            self._inflight.difference_update(ids)

    def _read(self) -> None:
        reason = "engine process exited"
        try:
            while True:
                msg = self._events.recv()
                kind = msg[0]
                if kind == "step":
                    wire, self._load = msg[1], msg[2]
                    # finished here, or moved to another instance (migration)
                    self._forget([o.request_id for o in wire
                                  if type(o) is not tuple and (type(o) is RequestMoved or o.finished)])
                    self._deliver(wire)
                elif kind == "reply":
                    _, seq, result, error = msg
                    with self._lock:
                        fut = self._pending.pop(seq, None)
                    if fut is not None:
                        fut.set_exception(error) if error is not None else fut.set_result(result)
                elif kind == "failed":  # the engine died in the child: refuse new work from now on
                    reason = msg[1]
                    with self._lock:
                        self._failed = self._failed or reason
                elif kind == "stopped":
                    reason = "stopped"
                    break
        except (EOFError, OSError):
            pass
        self._die(reason)

    def _die(self, reason: str) -> None:
        with self._lock:
            self._failed = self._failed or reason
            pending, self._pending = list(self._pending.values()), {}
            dead, self._inflight = sorted(self._inflight), set()
        for fut in pending:
            if not fut.done():
                fut.set_exception(EngineUnavailableError(f"instance {self.instance_id}: {reason}"))
        if dead and reason != "stopped":
            logger.error("instance %s: %s; failing %d request(s)", self.instance_id, reason, len(dead))
            message = f"engine instance {self.instance_id} failed ({reason})"
            self._deliver([EngineOutput(rid, [], finish_reason=FinishReason.ERROR, error=message) for rid in dead])

    def _deliver(self, wire: list) -> None:
        try:
            self._on_step(wire, self._load)
        except Exception:  # the owner's problem (e.g. its event loop is closing); keep reading
            logger.exception("instance %s: on_step callback failed", self.instance_id)


def log_to_stderr(tag: str = "") -> None:
    """INFO logs of the ``accordion`` loggers to stderr, once per process (Ray workers and the engine processes
    they spawn: Ray forwards their stderr to the driver's console)."""
    root = logging.getLogger("accordion")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s %(name)s{' ' + tag if tag else ''}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# --------------------------------------------------------------------------------------------------- the child
def _child_main(config: EngineConfig, worker_cls: str, instance_id: str, cpu_threads: int | None,
                direct_host: str | None, commands, events) -> None:
    """Entry point of the engine process: build the engine, then serve commands until told to stop. With
    ``direct_host``, front ends may also submit over a socket there (:mod:`.direct_server`)."""
    log_to_stderr(f"[{instance_id}]")
    from accordion.cluster.engine_loop import EngineLoop
    from accordion.cluster.instance import EngineInstance

    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            events.send(msg)

    try:
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        instance = EngineInstance(config, worker_cls)
        failure_sent = []
        direct = None
        last_sent = [0.0]

        def on_step(outputs: list[EngineOutput], load: LoadReport) -> None:
            wire = to_wire(outputs)
            if direct is not None:  # its connections' requests go to them; the parent hears of the rest
                wire = direct.route(wire, load)
            if wire or load.time - last_sent[0] >= PARENT_LOAD_INTERVAL_S or load.idle or loop.failed:
                last_sent[0] = load.time
                send(("step", wire, load))
            if loop.failed and not failure_sent:
                failure_sent.append(True)
                send(("failed", loop.failed))

        loop = EngineLoop(instance, on_step, instance_id)
        if direct_host:
            from accordion.cluster.direct_server import DirectServer

            direct = DirectServer(direct_host, loop.submit, loop.abort)
        loop.start()
    except Exception as e:
        logger.exception("engine %s failed to start", instance_id)
        send(("start_failed", f"{type(e).__name__}: {e}"))
        return
    w = instance.worker
    send(("ready", {"info": {"device": str(getattr(w, "device", "cpu")),
                             "dtype": str(getattr(w, "dtype", config.model.dtype)).removeprefix("torch."),
                             "num_blocks": instance.num_blocks, "max_model_len": instance.max_model_len,
                             "kv_bytes_per_token": (w.block_bytes() // config.cache.block_size
                                                    if hasattr(w, "block_bytes") else 0),
                             **({"direct": {"address": direct.address, "token": direct.token}} if direct else {})},
                    "load": loop.load()}))

    def reply(seq: int, fut: Future) -> None:
        err = fut.exception()
        try:
            send(("reply", seq, None if err is not None else fut.result(), err))
        except Exception as e:  # an unpicklable result or error: the caller still gets an answer
            send(("reply", seq, None, RuntimeError(f"{type(err or e).__name__}: {err or e}")))

    def check_idle(inst) -> LoadReport:
        ld = loop.load()
        assert ld.idle and not inst.scheduler.has_unfinished(), f"instance {instance_id} is busy: {ld}"
        inst.scheduler.check_invariants()
        assert ld.num_free_blocks == ld.num_blocks, (
            f"instance {instance_id} leaked KV blocks: {ld.num_free_blocks} of {ld.num_blocks} free")
        return ld

    while True:
        try:
            msg = commands.recv()
        except (EOFError, OSError):  # the parent is gone
            msg = ("stop",)
        kind = msg[0]
        if kind == "submit":
            try:
                loop.submit(msg[2])
                send(("reply", msg[1], None, None))
            except Exception as e:
                send(("reply", msg[1], None, e))
        elif kind == "abort":
            loop.abort(msg[1])
        elif kind == "refuse":
            if direct is not None:
                direct.refuse(msg[1])
        elif kind == "call":
            _, seq, name, args = msg
            fn = check_idle if name == "check_idle" else (lambda inst, n=name, a=args: getattr(inst, n)(*a))
            try:
                loop.call(fn).add_done_callback(lambda f, s=seq: reply(s, f))
            except Exception as e:
                send(("reply", seq, None, e))
        elif kind == "wait_idle":
            _, seq, timeout = msg
            threading.Thread(target=lambda s=seq, t=timeout: send(("reply", s, loop.wait_idle(t), None)),
                             daemon=True).start()
        elif kind == "stop":
            if direct is not None:
                direct.close()
            loop.stop()
            try:
                instance.leave_group()
            except Exception as e:  # a peer that is gone must not keep us here
                logger.warning("instance %s: leaving the instance group failed: %s", instance_id, e)
            try:
                send(("stopped",))
            except OSError:
                pass
            return
