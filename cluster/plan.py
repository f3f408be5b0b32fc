"""The typed messages of one engine step: scheduler -> model runner -> scheduler.

``StepPlan`` is built by :class:`~accordion.cluster.scheduler.Scheduler` and consumed by the worker's model
runner; ``StepResult`` flows back. New requests travel in full (prompt, sampling parameters); running ones as
diffs (new tokens to compute and new blocks), since the worker keeps per-request state between steps
(``accordion.workers.input_batch``). No torch here: plans are plain data that can cross a process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from accordion.cluster.outputs import TokenLogprobs
from accordion.cluster.request import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """First sight of a request on the worker (also after preemption: it starts over)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Tokens generated before a preemption; recomputed as part of the prefill."""
    sampling_params: SamplingParams
    block_ids: list[int]
    eos_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens of one request computed in this step.

    Positions ``[start, start + num_tokens)`` of the request's token sequence are computed; their K/V go to the
    request's blocks. When ``sample`` is set the step samples the token at position ``start + num_tokens``.
    """

    request_id: str
    start: int
    num_tokens: int
    sample: bool
    new_block_ids: list[int] = field(default_factory=list)
    """Blocks appended to the request's block table in this step."""


@dataclass(slots=True)
class StepPlan:
    step_id: int
    new_requests: list[NewRequestData]
    chunks: list[ScheduledChunk]
    """Decodes first, then prefill chunks, in the order the runner lays them out."""
    finished_request_ids: list[str]
    """Requests the worker may forget (finished, aborted or preempted since the last step)."""
    num_decodes: int = 0
    """The first ``num_decodes`` chunks are single-token decodes."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class StepResult:
    step_id: int
    sampled: dict[str, int]
    """Request id -> sampled token id, for chunks with ``sample`` set."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Request id -> error, for requests the worker could not compute (a multi-master holder went away): they end
    with an error; the rest of the step ran without them."""


# ---------------------------------------------------------------------- elastic sequence parallelism
@dataclass(slots=True)
class KVSlice:
    """Token positions ``[start, end)`` of one request whose K/V one instance keeps, in ``block_ids``."""

    rank: int
    start: int
    end: int
    block_ids: list[int]


@dataclass(slots=True)
class SPPrefillJob:
    """One prompt of a sequence-parallel prefill (LoongServe's scalable prefill).

    ``placement`` says which instance keeps which positions' K/V (proactive scale-down: the slices are stored while
    the K/V circulate, so nothing moves afterwards); slices are contiguous, disjoint and cover the prompt. One
    slice: the master keeps it all; several: the master keeps the first and decodes with the others in place
    (multi-master decoding; ``job_id`` is then the request's spread id).
    """

    job_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    placement: list[KVSlice]

    def slice_of(self, rank: int) -> KVSlice | None:
        return next((s for s in self.placement if s.rank == rank), None)


@dataclass(slots=True)
class SPPrefillBatch:
    """Prompts prefilled together across an instance group with ring attention: each layer's K/V of every prompt
    circulate in one ring pass. ``group`` lists instance ranks in ring order; ``group[0]`` is the master: it
    samples each prompt's first token and then owns its decoding."""

    batch_id: int
    group: list[int]
    jobs: list[SPPrefillJob]
