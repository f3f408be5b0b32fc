"""The engine loop: schedule, execute, update.

``EngineCore`` runs one instance's steps; the executor (a model runner in this process, or a remote worker) is
injected, so tests can plug in a fake. Thread-safety is the caller's job: the async wrappers (``local_engine``,
the instance actor) feed requests and aborts through a queue drained between steps.

Async scheduling (executors with ``launch``/``wait``): in steady-state decoding the next step is scheduled and
launched before the current step's tokens are read back, so the host's bookkeeping overlaps the device's work::

    step k:   launch(k+1 from k's device tokens) | wait(k) | update(k) -> outputs of k
"""

from __future__ import annotations

import time
from typing import Protocol

from accordion.cluster.outputs import EngineOutput
from accordion.cluster.plan import StepPlan, StepResult
from accordion.cluster.request import Request
from accordion.cluster.scheduler import Scheduler


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, *, async_scheduling: bool = False):
        self.scheduler = scheduler
        self.executor = executor
        self.async_scheduling = async_scheduling and hasattr(executor, "launch")
        self._inflight: tuple[StepPlan, object] | None = None  # launched, tokens not read back yet
        self.num_lookahead_steps = 0
        self.num_steps = 0
        self.step_s = 0.0
        self.step_cpu_s = 0.0
        """Steps run, the wall time spent in :meth:`step` and the CPU time of the thread running them (cumulative;
        wall minus CPU is time the thread waited: on the device, the GIL, locks)."""

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        return self.scheduler.abort(request_ids)

    def has_unfinished(self) -> bool:
        """Work left: a step in flight, requests, or ended requests the worker has not been told to forget (a
        multi-master request's holders free its slices only then)."""
        return self._inflight is not None or self.scheduler.has_unfinished() or self.scheduler.has_forgotten

    def inflight_request_ids(self) -> set[str]:
        """Requests computed by the step launched ahead and not read back yet (async scheduling)."""
        return set() if self._inflight is None else {c.request_id for c in self._inflight[0].chunks}

    def step(self) -> list[EngineOutput]:
        """Schedule, execute, and make output."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._step_async() if self.async_scheduling else self._step_sync()
        finally:
            self.num_steps += 1
            self.step_s += time.perf_counter() - t0
            self.step_cpu_s += time.thread_time() - c0

    def counters(self) -> tuple[int, int, float, float, float]:
        """(steps, steps launched ahead, seconds in steps, seconds of it waiting on the device, CPU seconds of the
        stepping thread), cumulative."""
        return (self.num_steps, self.num_lookahead_steps, self.step_s, getattr(self.executor, "device_wait_s", 0.0),
                self.step_cpu_s)

    def stats(self, since: tuple[int, int, float, float, float] = (0, 0, 0.0, 0.0, 0.0)) -> str:
        """One line: steps, time in them, how much of it the host spent waiting on the device, and the stepping
        thread's CPU time (since an earlier :meth:`counters`)."""
        steps, ahead, step_s, wait, cpu = (a - b for a, b in zip(self.counters(), since))
        return (f"{steps} steps ({ahead} launched ahead), {step_s:.3f} s in steps "
                f"({1e3 * step_s / max(steps, 1):.2f} ms each, {1e3 * cpu / max(steps, 1):.2f} ms of it on the CPU), "
                f"{wait:.3f} s of it waiting on the device")

    def _step_sync(self) -> list[EngineOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if plan.finished_request_ids:  # let the worker forget aborted requests even when idle
                self.executor.execute(plan)
            return []
        result = self.executor.execute(plan)
        return self.scheduler.update(plan, result)

    def _step_async(self) -> list[EngineOutput]:
        ex = self.executor
        if self._inflight is None:
            plan = self.scheduler.schedule()
            if plan.is_empty:
                if plan.finished_request_ids:
                    ex.execute(plan)
                return []
            self._inflight = (plan, ex.launch(plan))
        plan, pending = self._inflight
        self._inflight = None
        if ex.can_lookahead(pending):
            nxt = self.scheduler.schedule_lookahead(plan)
            if nxt is not None:
                self._inflight = (nxt, ex.launch(nxt, prev=pending))
                self.num_lookahead_steps += 1
        return self.scheduler.update(plan, ex.wait(pending))
