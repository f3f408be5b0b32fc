"""Per-request state the worker keeps between steps, and the flat tensors of one step.

Ownership: :class:`InputBatch` owns ``CachedRequestState`` for every request the worker has seen and not yet
been told to forget; it applies each :class:`~accordion.cluster.plan.StepPlan`'s diffs (new requests, new blocks,
sampled tokens) and lays the step out as flat arrays (see ``accordion.workers.attention`` for the layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from accordion.cluster.plan import StepPlan
from accordion.cluster.request import SamplingParams
from accordion.workers.multi_master import SpreadState
from accordion.workers.sampler import SampleRow


@dataclass
class CachedRequestState:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    eos_token_ids: tuple[int, ...]
    spread: SpreadState | None = None
    """Set when part of the request's KV lives on other instances (multi-master decoding): ``block_ids`` then
    hold positions ``[0, spread.local_len)`` and new tokens' K/V go to the tail holder."""

    def token(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]


@dataclass
class StepInputs:
    """Host-side arrays of one step (T tokens, B rows, S sampled rows)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_table: np.ndarray  # [B, max_blocks] int32
    seq_lens: np.ndarray  # [B] int32
    query_start_loc: np.ndarray  # [B + 1] int32
    logits_indices: np.ndarray  # [S] int64: token index whose logits are sampled
    sampled_ids: list[str]  # [S] request ids
    sample_rows: list[SampleRow]
    num_decodes: int
    prev_rows: np.ndarray | None = None
    """[T] int64 (async scheduling): for each token, the row of the previous step's sampled tokens that is its
    input (the token is not on the host yet), or -1 when ``input_ids`` holds it."""
    spread_rows: list[tuple[int, str, SpreadState, int]] = field(default_factory=list)
    """(token index, request id, spread state, position) of each decode row whose KV is partly elsewhere."""


class InputBatch:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.states: dict[str, CachedRequestState] = {}

    def apply(self, plan: StepPlan) -> list[SpreadState]:
        """Apply the plan's diffs; returns the spread states of the requests forgotten (their holders must free
        their slices)."""
        gone = []
        for rid in plan.finished_request_ids:
            st = self.states.pop(rid, None)
            if st is not None and st.spread is not None:
                gone.append(st.spread)
        for new in plan.new_requests:
            self.states[new.request_id] = CachedRequestState(
                new.request_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_params,
                list(new.block_ids), tuple(new.eos_token_ids))
        for chunk in plan.chunks:
            if chunk.new_block_ids:
                self.states[chunk.request_id].block_ids.extend(chunk.new_block_ids)
        return gone

    def record_sampled(self, sampled: dict[str, int]) -> None:
        for rid, tok in sampled.items():
            self.states[rid].output_token_ids.append(tok)

    def prepare(self, plan: StepPlan, pending: dict[str, int] | None = None) -> StepInputs:
        """Lay the step out flat. ``pending`` maps request id -> row of the previous step's sampled tokens that
        are not recorded yet (async scheduling); their positions take the token from the device.

        Host work per step is Python per row, so single-token rows (decodes) stay plain ints, gathered into one
        array per run of them; only multi-token chunks build numpy arrays."""
        bs = self.block_size
        ids, pos, slots = _Pieces(), _Pieces(), _Pieces()
        prev_rows: list[int] | None = [] if pending else None
        rows_blocks: list[list[int]] = []
        seq_lens, qsl = [], [0]
        logits_idx, sampled_ids, sample_rows = [], [], []
        spread_rows = []
        for chunk in plan.chunks:
            rid = chunk.request_id
            st = self.states[rid]
            start, n = chunk.start, chunk.num_tokens
            end = start + n
            if n == 1:
                known = len(st.prompt_token_ids) + len(st.output_token_ids)
                unknown = start == known
                if start > known or (unknown and (pending is None or rid not in pending)):
                    raise RuntimeError(f"request {rid}: input token at {start} is not known "
                                       f"({known} known, pending={pending is not None and rid in pending})")
                ids.add(0 if unknown else st.token(start))
                if prev_rows is not None:
                    prev_rows.append(pending[rid] if unknown else -1)
                pos.add(start)
                if st.spread is None:
                    slots.add(st.block_ids[start // bs] * bs + start % bs)
                else:  # attends to its local slice here; the tail holder stores the new K/V
                    spread_rows.append((qsl[-1], rid, st.spread, start))
                    slots.add(-1)
            else:
                p = np.arange(start, end, dtype=np.int64)
                ids.add_array(np.asarray(st.tokens(start, end), dtype=np.int64))
                if prev_rows is not None:
                    prev_rows.extend([-1] * n)
                pos.add_array(p)
                slots.add_array(np.asarray(st.block_ids, dtype=np.int64)[p // bs] * bs + p % bs)
            rows_blocks.append(st.block_ids)
            seq_lens.append(end if st.spread is None else st.spread.local_len)
            qsl.append(qsl[-1] + n)
            if chunk.sample:
                logits_idx.append(qsl[-1] - 1)
                sampled_ids.append(rid)
                sample_rows.append(SampleRow(st.sampling_params, st.prompt_token_ids, st.output_token_ids,
                                             st.eos_token_ids))
        return StepInputs(ids.array(), pos.array(), slots.array(), _block_table(rows_blocks),
                          np.asarray(seq_lens, dtype=np.int32), np.asarray(qsl, dtype=np.int32),
                          np.asarray(logits_idx, dtype=np.int64), sampled_ids, sample_rows, plan.num_decodes,
                          None if prev_rows is None else np.asarray(prev_rows, dtype=np.int64), spread_rows)


class _Pieces:
    """A flat int64 array built from single ints (kept in a list until an array piece follows) and arrays."""

    def __init__(self):
        self._done: list[np.ndarray] = []
        self._ints: list[int] = []

    def add(self, x: int) -> None:
        self._ints.append(x)

    def add_array(self, a: np.ndarray) -> None:
        if self._ints:
            self._done.append(np.asarray(self._ints, dtype=np.int64))
            self._ints = []
        self._done.append(a)

    def array(self) -> np.ndarray:
        if self._ints:
            self.add_array(np.zeros(0, dtype=np.int64))
        if len(self._done) == 1:
            return self._done[0]
        return np.concatenate(self._done) if self._done else np.zeros(0, dtype=np.int64)


def _block_table(rows: list[list[int]]) -> np.ndarray:
    """Ragged block lists -> int32 [B, max_len] (zero padded), in three numpy calls whatever B is."""
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = max(int(lens.max()) if len(rows) else 0, 1)
    table = np.zeros((len(rows), width), dtype=np.int32)
    table[np.arange(width) < lens[:, None]] = np.fromiter(chain.from_iterable(rows), dtype=np.int32,
                                                          count=int(lens.sum()))
    return table


class HostStager:
    """Moves a step's integer arrays to the device in ONE copy through reused pinned buffers.

    Two buffers alternate, each with the event recorded behind its last copy: before a buffer is rewritten the
    host waits for that event. The host may run ahead of the device by more than one step: a step that samples
    nothing (a prefill chunk alone) returns without waiting for the device, so without the event the next-but-one
    step could overwrite inputs the device has not copied yet (seen on H100 as out-of-range gathers and illegal
    addresses while one long prompt was chunked alone).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._hosts = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Each array (any int dtype, any shape) -> an int64 device tensor of the same shape."""
        sizes, starts, total = [a.size for a in arrays], [], 0
        for n in sizes:  # every array starts 16-byte aligned: kernels specialize on their pointers' alignment
            starts.append(total)
            total += n + n % 2
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in arrays]
        self._turn ^= 1
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # the device has taken this buffer's previous contents
        if self._hosts[self._turn].numel() < total:
            n = max(total, 2 * self._hosts[self._turn].numel(), 4096)
            self._hosts[self._turn] = torch.empty(n, dtype=torch.int64).pin_memory()
        buf = self._hosts[self._turn]
        host = buf[:total].numpy()
        for a, n, off in zip(arrays, sizes, starts):
            host[off:off + n] = a.reshape(-1)
        dev = buf[:total].to(self.device, non_blocking=True)
        self._copied[self._turn] = torch.cuda.Event()
        self._copied[self._turn].record()
        return [dev[off:off + n].view(a.shape) for a, n, off in zip(arrays, sizes, starts)]


def inject_prev_tokens(ids: torch.Tensor, prev_rows: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """ids [T] with the positions marked in prev_rows [T] (-1: keep) taken from prev_tokens [S], on the device."""
    take = prev_rows >= 0
    return torch.where(take, prev_tokens[prev_rows.clamp(min=0)], ids)
