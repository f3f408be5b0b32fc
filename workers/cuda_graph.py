"""Decode-only steps replayed from CUDA graphs, so small batches are not bound by kernel launches.

Graphs are captured once per batch size in ``sizes`` and context bound in ``bounds`` over static input buffers; a
decode step of B rows pads to the next captured size (padding rows have ``seq_len = 0`` and slot -1: they read and
write nothing) and replays the graph of the smallest bound that holds its longest row. The bounds come from the
attention backend (`AttentionBackend.decode_graph_bounds`): a kernel that picks its schedule by how long the rows
may be (the Triton decode: split-KV for short batches, stream-K for long ones) then gets the one that fits, though a
graph cannot see the lengths. The block table buffer is as wide as ``max_model_len`` needs, so any running request
fits. Mixed steps (prefill chunks) run eagerly.
"""

from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from accordion.cluster.plan import StepPlan
from accordion.workers.attention import AttentionMetadata
from accordion.workers.input_batch import StepInputs, inject_prev_tokens

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s <= max_batch] or [1]


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        cfg = runner.config
        self.sizes = capture_sizes(min(cfg.device.cuda_graph_max_batch, cfg.scheduler.max_num_seqs))
        self.bounds = sorted(set(runner.backend.decode_graph_bounds(runner.max_model_len)))
        max_bs = self.sizes[-1]
        dev = runner.device
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch size, context bound) -> graph
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _meta(self, bs: int, bound: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_decodes=bs, slot_mapping=self.slots[:bs], block_table=self.block_table[:bs],
            seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1], max_query_len=1,
            max_seq_len=bound, seq_lens_cpu=[0] * bs, query_lens_cpu=[1] * bs)

    def _forward(self, bs: int, bound: int) -> torch.Tensor:
        r = self.runner
        return r.model(self.input_ids[:bs], self.positions[:bs], r.kv_caches, r.backend, self._meta(bs, bound))

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first: later graphs reuse its memory pool
                for bound in self.bounds:
                    for _ in range(2):  # warm-up: Triton compilation and autotuning outside the capture
                        self._forward(bs, bound)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, stream=stream):
                        self.outputs[bs, bound] = self._forward(bs, bound)
                    pool = g.pool()
                    self.graphs[bs, bound] = g
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured decode CUDA graphs for batch sizes %s, context bounds %s", self.sizes, self.bounds)

    def can_run(self, plan: StepPlan, inp: StepInputs) -> bool:
        n = len(plan.chunks)
        return (plan.num_decodes == n and 0 < n <= self.sizes[-1] and inp.block_table.shape[1] <= self.max_blocks
                and len(inp.sampled_ids) == n)

    def run(self, inp: StepInputs, inject=None) -> torch.Tensor:
        """Replay the graph for a decode step of B rows; returns hidden states [B, hidden].

        ``inject`` = (prev_rows [B] host int64, prev_tokens device tensor): input tokens taken on the device from
        the previous step's samples (async scheduling)."""
        b = len(inp.input_ids)
        bs = self.sizes[bisect.bisect_left(self.sizes, b)]
        bound = self.bounds[bisect.bisect_left(self.bounds, int(inp.seq_lens.max()))]
        w = inp.block_table.shape[1]
        pad = bs - b

        def padded(src: np.ndarray, fill: int) -> np.ndarray:
            return np.concatenate([src, np.full(pad, fill, dtype=src.dtype)]) if pad else src

        arrays = [padded(inp.input_ids, 0), padded(inp.positions, 0), padded(inp.slot_mapping, -1),
                  padded(inp.seq_lens, 0), inp.block_table]
        if inject is not None:
            arrays.append(padded(inject[0], -1))
        ids, pos, slots, lens, table, *rows = self.runner.stager.stage(arrays)
        if inject is not None:  # input tokens sampled by the previous step, still on the device
            ids = inject_prev_tokens(ids, rows[0], inject[1])
        self.input_ids[:bs].copy_(ids)
        self.positions[:bs].copy_(pos)
        self.slots[:bs].copy_(slots)
        self.seq_lens[:bs].copy_(lens)
        self.block_table[:b, :w].copy_(table)
        self.graphs[bs, bound].replay()
        return self.outputs[bs, bound][:b]
