"""Live migration of a decoding request between instances: the typed messages and the placement rules.

A request moves from a *source* instance to a *destination* (Llumnix-style; LoongServe compacts decoding KV onto
fewer instances this way before a sequence-parallel prefill). The global manager drives it
(:meth:`~accordion.cluster.global_manager.GlobalManager.migrate`, carried out by
:class:`~accordion.cluster.migration_runner.Migrator`); every step runs on an engine thread between steps, as an
engine call::

    source       export_request  -> MigrationState   (it stops scheduling the request; None while a step in
                                                      flight still computes it: ask again)
    destination  reserve_migration -> block ids       (no room for it and the requests there to finish: the
                                                      source resumes the request)
    both         send_kv / receive_request            (the KV of every layer, over the pair's gloo group,
                                                      :mod:`accordion.workers.kv_transfer`; the destination then
                                                      adds the request as running)
    source       commit_migration -> RequestMoved     (frees its blocks; the marker ends the request's outputs
                                                      on the source's stream, after its last tokens)

If the destination fails, the source resumes the request unchanged. If the request ended on the source meanwhile
(finished, aborted), the commit fails and the destination aborts its copy. The front end follows the request
from the source's stream to the destination's on the :class:`~accordion.cluster.outputs.RequestMoved` marker
(:meth:`~accordion.cluster.engine_frontend.EngineFrontend._on_route_outputs`).

Clock-independent: the state carries ages (seconds before the export), not another process's clock readings.
No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from accordion.cluster.request import SamplingParams


@dataclass(frozen=True)
class MigrationCandidate:
    """A request an instance could hand over now (decoding, its KV all local)."""

    request_id: str
    num_tokens: int
    """Prompt plus output tokens so far (the KV to move is one fewer: the last sampled token has none yet)."""
    final_tokens: int
    """Tokens it may reach (prompt + max_tokens, capped by max_model_len): the room a destination should have."""


@dataclass
class MigrationState:
    """Everything the destination needs to continue a decoding request exactly where the source stopped.

    The sampler needs nothing else: greedy and penalties depend on the tokens alone, and a seeded request's noise
    on ``(seed, number of output tokens)`` (:mod:`accordion.workers.sampler`). Unseeded random sampling draws from
    the destination's generator, so it continues with the same distribution, not the same draws.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    priority: int
    num_computed_tokens: int
    """Positions ``[0, num_computed_tokens)`` have KV (``num_tokens - 1``: the last sampled token has none)."""
    num_cached_tokens: int
    num_preemptions: int
    block_ids: list[int]
    """The source's blocks holding that KV, in position order (``ceil(num_computed_tokens / block_size)``)."""
    arrival_age_s: float
    """Seconds between the request's arrival and the export; likewise for the two below (None: not yet)."""
    scheduled_age_s: float | None
    first_token_age_s: float | None


@dataclass(frozen=True)
class NotMigratable:
    """The source's answer when the request cannot move (unknown, finished, prefilling, spread, ...)."""

    reason: str


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def choose_destination(candidate: MigrationCandidate, spare_blocks: dict[str, int], block_size: int) -> str | None:
    """The instance with the most spare blocks among those with room for the request to finish there
    (``final_tokens``), else None. Spare blocks are free blocks less those the requests already there still need
    to finish (:attr:`~accordion.cluster.load.LoadReport.num_spare_blocks`), so a migration never makes a resident
    request preempt or scale up."""
    need = blocks_for(candidate.final_tokens, block_size)
    fits = [i for i, f in spare_blocks.items() if f >= need]
    return max(fits, key=lambda i: spare_blocks[i]) if fits else None


def plan_compaction(candidates: list[MigrationCandidate], free_here: int, need_blocks: int,
                    spare_elsewhere: dict[str, int], block_size: int, seconds: Callable[[int], float],
                    budget_s: float) -> list[tuple[MigrationCandidate, str]] | None:
    """LoongServe's compaction of decoding KV, the rule kept simple: which requests to move off an instance so that
    it has ``need_blocks`` free for a new prompt's KV. Fewest tokens first (cheapest to move), each to the freest
    other instance with room for it, and for the requests already there, to finish (:func:`choose_destination`
    over ``spare_elsewhere``), while the estimated transfer time of all moves (``seconds(num_tokens)``) stays under
    ``budget_s`` (the prefill time the room saves). None unless the moves free enough (a request's blocks are
    counted as ``ceil((num_tokens - 1) / block_size)``)."""
    spare = dict(spare_elsewhere)
    moves: list[tuple[MigrationCandidate, str]] = []
    spent = 0.0
    for c in sorted(candidates, key=lambda c: c.num_tokens):
        if free_here >= need_blocks:
            break
        cost = seconds(c.num_tokens)
        if spent + cost >= budget_s:
            break  # the rest are larger: they cost more
        dst = choose_destination(c, spare, block_size)
        if dst is None:
            continue
        spare[dst] -= blocks_for(c.final_tokens, block_size)
        free_here += blocks_for(c.num_tokens - 1, block_size)
        spent += cost
        moves.append((c, dst))
    return moves if free_here >= need_blocks else None


def transfer_seconds(num_tokens: int, kv_bytes_per_token: int, bandwidth_bytes_per_s: float,
                     overhead_s: float) -> float:
    """Estimated time to move one request's KV: a fixed cost (engine calls, a pause of a step or two) plus the
    bytes over the staging link."""
    return overhead_s + num_tokens * kv_bytes_per_token / bandwidth_bytes_per_s
