"""What an engine instance reports about its load after each step; the router's only input."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class LoadReport:
    """A snapshot of one instance's scheduler, taken by its engine loop thread between steps."""

    instance_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    """Fraction of KV blocks in use (0..1)."""
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_spare_blocks: int = 0
    """Free blocks less those the requests here still need to finish (may be negative): the room a migrated
    request can take without making anyone here preempt or scale up."""
    num_preemptions: int = 0
    num_added: int = 0
    """Engine requests accepted since start (cumulative): lets a front end count what it sent but the instance
    has not reported yet."""
    num_unfinished: int = 0
    """Requests accepted and not finished, including those still in the loop's inbox."""
    spills: tuple[tuple[str, int, int], ...] = ()
    """Multi-master scale-up: ``(request id, first position, tokens)`` of decoding requests that found no free
    block here and wait for another instance to take their new tokens' KV (or for a refusal: then preemption)."""
    time: float = field(default_factory=time.monotonic)

    @property
    def idle(self) -> bool:
        return self.num_unfinished == 0
