"""Which sequence-parallel prefills the global manager starts next, and which go together in one batch.

Front ends choose each long prompt's instance group (:mod:`accordion.cluster.esp_planner`); the manager queues
them here and starts them in arrival order, with one batch in flight per instance: a prompt starts once every
instance of its group is free, and an earlier prompt still waiting claims its instances, so no later one passes
it there (FCFS per instance; later prompts on other instances go ahead). A prompt that starts takes along
later ones queued for the same group (one ring pass: LoongServe's batching) while that lowers LoongServe's
objective, the input-length-normalised latency ``sum_i T(batch) / l_i`` under the profiled cost model ``T``
(one pass for both, against the second waiting for the first: batching saves the second the fixed cost ``A``
and costs the first the second's prefill), up to ``max_batch_tokens`` prompt tokens. A prompt whose KV is to stay
spread over instances (multi-master placement) runs alone.

Pure Python, no Ray: tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PendingPrefill:
    request: Any
    """The :class:`~accordion.cluster.request.Request`."""
    group: list[str]
    """Instance ids in ring order, master first."""
    placement: list | None = None
    """Multi-master placement (see ``GlobalManager.run_sp_prefill``), or None: the master keeps the KV."""
    done: Any = None
    """Whatever the owner uses to report back (an asyncio future)."""

    @property
    def num_tokens(self) -> int:
        return self.request.num_prompt_tokens


@dataclass
class PrefillQueue:
    max_batch_tokens: int = 131072
    predict: Callable[[int, list[int]], float] | None = None
    """Prefill seconds of prompts of these lengths at a degree (``PrefillCostModel.predict``); None: batch up
    to the token cap alone."""
    pending: list[PendingPrefill] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)
    """Instances with a batch in flight."""

    def _worth_batching(self, degree: int, lengths: list[int], new: int) -> bool:
        """Whether prefilling ``new`` with the batch beats prefilling it right after, in normalised latency."""
        if self.predict is None:
            return True
        t_batch = self.predict(degree, lengths)
        t_both = self.predict(degree, lengths + [new])
        t_after = t_batch + self.predict(degree, [new])  # the new prompt's latency when it waits
        return (t_both - t_batch) * sum(1.0 / n for n in lengths) <= (t_after - t_both) / new

    def add(self, entry: PendingPrefill) -> None:
        self.pending.append(entry)

    def remove(self, request_ids: set[str]) -> list[PendingPrefill]:
        """Drop queued prompts (cancelled); returns them."""
        gone = [p for p in self.pending if p.request.request_id in request_ids]
        self.pending = [p for p in self.pending if p.request.request_id not in request_ids]
        return gone

    def take_ready(self) -> list[list[PendingPrefill]]:
        """The batches to start now (their instances become busy); the rest stay queued."""
        batches: list[list[PendingPrefill]] = []
        claimed: set[str] = set()
        taken: set[int] = set()
        for i, p in enumerate(self.pending):
            if i in taken:
                continue
            members = set(p.group)
            if members & (self.busy | claimed):
                claimed |= members
                continue
            batch, tokens = [p], p.num_tokens
            taken.add(i)
            if p.placement is None:
                for j in range(i + 1, len(self.pending)):
                    q = self.pending[j]
                    if (j not in taken and q.group == p.group and q.placement is None
                            and tokens + q.num_tokens <= self.max_batch_tokens
                            and self._worth_batching(len(p.group), [b.num_tokens for b in batch], q.num_tokens)):
                        batch.append(q)
                        taken.add(j)
                        tokens += q.num_tokens
            self.busy |= members
            batches.append(batch)
        self.pending = [p for i, p in enumerate(self.pending) if i not in taken]
        return batches

    def finished(self, group: list[str]) -> None:
        """A batch on ``group`` ran everywhere: its instances are free."""
        self.busy -= set(group)
