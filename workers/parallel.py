"""The instances' communication group (torch.distributed: NCCL on GPU, gloo on CPU) and ring exchange.

The global manager chooses the rendezvous address and every instance's rank; this module never invents ports
or names. All instances of a cluster form one world group; sequence-parallel work uses point-to-point
operations inside it, so no sub-groups have to be created per request.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def init_instance_group(init_method: str, world_size: int, rank: int, *, backend: str,
                        timeout_s: float = 300.0) -> None:
    """Join the world group (re-created by the manager whenever instances join or leave)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave_instance_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class RingComm:
    """Send to the next member of a ring and receive from the previous one, asynchronously."""

    def __init__(self, ranks: list[int], me: int):
        self.ranks = ranks
        self.index = ranks.index(me)
        self.size = len(ranks)
        self.next = ranks[(self.index + 1) % self.size]
        self.prev = ranks[(self.index - 1) % self.size]

    def start(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list:
        """Post the sends of ``send`` to next and receives into ``recv`` from prev; returns the requests."""
        ops = [dist.P2POp(dist.isend, t, self.next, tag=i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, tag=i) for i, t in enumerate(recv)]
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(reqs: list) -> None:
        for r in reqs:
            r.wait()
