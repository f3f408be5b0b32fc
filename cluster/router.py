"""Dispatch policies: pick the engine instance for a new request. Pure Python, no Ray.

A policy sees one :class:`InstanceLoad` per routable instance: the instance's latest :class:`LoadReport` plus what
this front end sent it since that report (``outstanding``), so a burst of requests between two reports still
spreads out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from accordion.cluster.load import LoadReport


@dataclass(slots=True)
class InstanceLoad:
    instance_id: str
    report: LoadReport | None
    """Latest report from the instance's output stream (None before the first one)."""
    outstanding: int = 0
    """Engine requests sent to it that its latest report does not count yet."""


class Router(Protocol):
    def choose(self, candidates: Sequence[InstanceLoad]) -> str:
        """The id of the instance to send the next request to. ``candidates`` is non-empty."""
        ...


class RoundRobin:
    """Each instance in turn, ignoring load."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[InstanceLoad]) -> str:
        if not candidates:
            raise ValueError("no candidate instances")
        c = candidates[self._next % len(candidates)]
        self._next += 1
        return c.instance_id


class LeastLoaded:
    """Lowest ``waiting_weight * waiting + running_weight * running + kv_weight * kv_usage`` wins, where waiting
    includes ``outstanding``. Ties go round-robin, so equal instances share the load."""

    def __init__(self, waiting_weight: float = 1.0, running_weight: float = 1.0, kv_weight: float = 4.0):
        self.waiting_weight = waiting_weight
        self.running_weight = running_weight
        self.kv_weight = kv_weight
        self._rr = 0

    def score(self, c: InstanceLoad) -> float:
        r = c.report
        waiting = c.outstanding + (r.num_waiting if r else 0)
        running = r.num_running if r else 0
        kv = r.kv_usage if r else 0.0
        return self.waiting_weight * waiting + self.running_weight * running + self.kv_weight * kv

    def choose(self, candidates: Sequence[InstanceLoad]) -> str:
        if not candidates:
            raise ValueError("no candidate instances")
        n = len(candidates)
        start = self._rr % n
        self._rr += 1
        best, best_score = None, float("inf")
        for k in range(n):  # scan from a rotating start: the first minimum wins, so ties rotate
            c = candidates[(start + k) % n]
            s = self.score(c)
            if s < best_score:
                best, best_score = c, s
        return best.instance_id


POLICIES: dict[str, type] = {"least_loaded": LeastLoaded, "round_robin": RoundRobin}


def make_router(policy: str = "least_loaded") -> Router:
    """A router by policy name (``least_loaded``, ``round_robin``)."""
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown routing policy {policy!r}; choose from {sorted(POLICIES)}") from None
