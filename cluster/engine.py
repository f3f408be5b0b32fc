"""The engine loop: schedule, execute, update.

``EngineCore`` runs one instance's steps synchronously; the executor (a model runner in this process, or a
remote worker) is injected, so tests can plug in a fake. Thread-safety is the caller's job: the async wrappers
(``local_engine``, the instance actor) feed requests and aborts through a queue drained between steps.
"""

from __future__ import annotations

from typing import Protocol

from accordion.cluster.outputs import EngineOutput
from accordion.cluster.plan import StepPlan, StepResult
from accordion.cluster.request import Request
from accordion.cluster.scheduler import Scheduler


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor):
        self.scheduler = scheduler
        self.executor = executor

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        return self.scheduler.abort(request_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineOutput]:
        """Schedule, execute, and make output."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if plan.finished_request_ids:  # let the worker forget aborted requests even when idle
                self.executor.execute(plan)
            return []
        result = self.executor.execute(plan)
        return self.scheduler.update(plan, result)
