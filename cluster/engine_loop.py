"""Runs one :class:`EngineInstance` in a dedicated thread, fed through a thread-safe inbox.

``EngineCore`` is synchronous and not thread-safe, so exactly one thread touches it: it drains the inbox (new
requests, aborts) between steps, steps while there is work, and sleeps on a condition variable when idle (no
polling). Every pass that did something hands ``(outputs, LoadReport)`` to the ``on_step`` callback, from the loop
thread; the owner (instance actor, local engine client) moves it to its event loop.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future

from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError
from accordion.cluster.instance import EngineInstance
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import EngineOutput, RequestMoved
from accordion.cluster.request import FinishReason, Request

logger = logging.getLogger(__name__)

StepCallback = Callable[[list[EngineOutput | RequestMoved], LoadReport], None]


class EngineLoop:
    """The engine thread of one instance. ``submit``/``abort``/``load`` may be called from any thread."""

    log_busy_steps = 64
    """A busy period (work until idle) of at least this many steps is logged with its step timings."""

    def __init__(self, instance: EngineInstance, on_step: StepCallback, instance_id: str = "local"):
        self.instance = instance
        self.instance_id = instance_id
        self._on_step = on_step
        self._cond = threading.Condition()
        self._adds: list[Request] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable, Future]] = []
        self._stopping = False
        self._failed: str | None = None
        self._num_added = 0
        self._num_pending = 0  # accepted by submit, not yet handed to the scheduler
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name=f"engine-loop-{instance_id}", daemon=True)
        instance.post = self._post  # other threads of the instance (multi-master slice servers) reach it here

    def _post(self, fn: Callable[[EngineInstance], object]) -> None:
        try:
            self.call(fn)
        except EngineUnavailableError:  # stopping: nothing left to update
            pass

    # ---- any thread --------------------------------------------------------------------------------------------

    def start(self) -> None:
        us = self.instance.config.scheduler.engine_thread_switch_interval_us
        if us is not None:  # process-wide: this thread is the process's reason to exist (see the config field)
            sys.setswitchinterval(us * 1e-6)
        self._thread.start()

    @property
    def failed(self) -> str | None:
        """Why the loop died (a step raised), or None."""
        return self._failed

    def submit(self, requests: list[Request]) -> None:
        """Validate and enqueue requests (all or none). Raises RequestTooLargeError (can never fit),
        EngineOverloadedError (waiting queue full) or EngineUnavailableError (stopped or failed) at once."""
        sched = self.instance.scheduler
        for r in requests:
            sched.check_fits(r.num_prompt_tokens, r.sampling_params.max_tokens)
        with self._cond:
            if self._stopping or self._failed:
                raise EngineUnavailableError(f"instance {self.instance_id} is {self._failed or 'stopping'}")
            queued = sched.num_waiting + self._num_pending
            if queued + len(requests) > sched.config.max_waiting:
                raise EngineOverloadedError(f"{queued} requests are waiting on instance {self.instance_id}; "
                                            "try again later")
            self._adds.extend(requests)
            self._num_pending += len(requests)
            self._num_added += len(requests)
            self._idle.clear()
            self._cond.notify()

    def abort(self, request_ids: list[str]) -> None:
        """Abort these engine requests at the next step boundary (unknown or finished ids are ignored)."""
        if not request_ids:
            return
        with self._cond:
            self._aborts.extend(request_ids)
            self._cond.notify()

    def call(self, fn: Callable[[EngineInstance], object]) -> Future:
        """Run ``fn(instance)`` on the engine thread between steps, in submission order with other calls
        (group formation, sequence-parallel jobs, migration). Engine outputs and :class:`RequestMoved` markers it
        returns (one, or in a list) are emitted like a step's; any result reaches the caller through the future."""
        fut: Future = Future()
        with self._cond:
            if self._stopping or self._failed:
                raise EngineUnavailableError(f"instance {self.instance_id} is {self._failed or 'stopping'}")
            self._calls.append((fn, fut))
            self._idle.clear()
            self._cond.notify()
        return fut

    def load(self) -> LoadReport:
        """A snapshot of the scheduler's counters (plain int reads; consistent enough for routing)."""
        s = self.instance.scheduler
        return LoadReport(
            instance_id=self.instance_id,
            num_running=s.num_running,
            num_waiting=s.num_waiting + self._num_pending,
            kv_usage=s.kv.usage,
            num_free_blocks=s.kv.num_free_blocks,
            num_spare_blocks=s.num_spare_blocks,
            num_blocks=s.kv.num_blocks,
            num_preemptions=s.num_preemptions,
            num_added=self._num_added,
            spills=s.spill_requests,
            num_unfinished=len(s.running) + len(s.waiting) + self._num_pending,
        )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is queued or running (True) or ``timeout`` passes (False)."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread after the current step; requests still in flight are dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        logger.info("instance %s engine loop stopped: %s", self.instance_id, self.instance.core.stats())

    # ---- the loop thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        core = self.instance.core
        busy_since = core.counters()
        while True:
            with self._cond:
                while not (self._adds or self._aborts or self._calls or self._stopping or core.has_unfinished()):
                    if core.num_steps - busy_since[0] >= self.log_busy_steps:
                        logger.info("instance %s busy period: %s", self.instance_id, core.stats(busy_since))
                    busy_since = core.counters()
                    self._idle.set()
                    self._cond.wait()
                if self._stopping:
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
            outputs: list[EngineOutput | RequestMoved] = []
            for fn, fut in calls:
                try:
                    result = fn(self.instance)
                except Exception as e:  # the caller gets the error; the engine's own state is untouched
                    logger.exception("instance %s: call failed", self.instance_id)
                    fut.set_exception(e)
                    continue
                items = result if isinstance(result, list) else [result]  # engine outputs; other results only reply
                outputs.extend(o for o in items if isinstance(o, (EngineOutput, RequestMoved)))
                fut.set_result(result)
            try:
                for r in adds:
                    try:
                        core.add_request(r)
                    except Exception as e:  # duplicate id, or a race with the queue limit: fail just this one
                        logger.warning("instance %s refused request %s: %s", self.instance_id, r.request_id, e)
                        outputs.append(EngineOutput(r.request_id, [], finish_reason=FinishReason.ERROR,
                                                    num_prompt_tokens=r.num_prompt_tokens, error=str(e)))
                    finally:
                        with self._cond:
                            self._num_pending -= 1
                if aborts:
                    outputs.extend(core.abort(aborts))
                    logger.debug("instance %s aborted %s", self.instance_id, aborts)
                if core.has_unfinished():
                    outputs.extend(core.step())
            except Exception as e:  # a failed step leaves the engine in an unknown state: fail everything, stop
                logger.exception("instance %s: engine step failed; failing its requests", self.instance_id)
                self._fail(f"engine step failed on instance {self.instance_id}: {type(e).__name__}: {e}", outputs)
                return
            self._emit(outputs)

    def _fail(self, message: str, outputs: list[EngineOutput]) -> None:
        with self._cond:
            self._failed = message
            pending, self._adds = self._adds, []
            self._num_pending = 0
        ids = list(self.instance.scheduler.requests) + [r.request_id for r in pending]
        done = {o.request_id for o in outputs if isinstance(o, RequestMoved) or o.finished}
        outputs.extend(EngineOutput(rid, [], finish_reason=FinishReason.ERROR, error=message)
                       for rid in dict.fromkeys(ids) if rid not in done)
        self._emit(outputs)
        self._idle.set()

    def _emit(self, outputs: list[EngineOutput]) -> None:
        try:
            self._on_step(outputs, self.load())
        except Exception:  # the owner's problem, but the engine must keep running
            logger.exception("instance %s: on_step callback failed", self.instance_id)
