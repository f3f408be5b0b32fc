"""What the global manager knows of one engine instance: its lifecycle state and its record.

The manager keeps these in its registry (:mod:`accordion.cluster.global_manager`), front ends receive them from
:meth:`~accordion.cluster.global_manager.GlobalManager.watch`, and the manager's helpers
(:mod:`accordion.cluster.sp_dispatch`, :mod:`accordion.cluster.migration_runner`) read them. A module of its own so
that those helpers need not import the manager.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class InstanceState(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    """Routable."""
    DRAINING = "draining"
    """Finishing its requests; gets no new ones."""
    DEAD = "dead"
    """Failed a health check or crashed; its requests were failed by the front end."""


@dataclass
class InstanceRecord:
    """One instance as the manager (and a front end, from :meth:`GlobalManager.watch`) sees it."""

    instance_id: str
    handle: Any  # ray.actor.ActorHandle of an InstanceActor
    state: InstanceState = InstanceState.STARTING
    device: str = ""
    dtype: str = ""
    num_blocks: int = 0
    max_model_len: int = 0
    error: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def routable(self) -> bool:
        return self.state == InstanceState.SERVING
