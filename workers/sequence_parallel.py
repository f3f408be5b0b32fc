"""Sequence-parallel prefill across instances: ring attention with proactive scale-down (LoongServe).

A prompt of L tokens is split zig-zag over the k instances of a group (2k equal chunks; instance j computes
chunks j and 2k-1-j, which balances the causal cost). Every instance runs the whole model on its tokens. In each
attention layer the K/V chunks circulate around the ring (k-1 hops, the next hop posted before the current chunk
is attended to); partial attention over each chunk is merged by log-sum-exp. While the chunks pass by, each
instance stores into its paged cache only the positions its :class:`~accordion.cluster.plan.KVSlice` assigns
it, so decoding continues on fewer instances and no KV moves afterwards::

    L = 8, k = 2:   positions 0 1 | 2 3 | 4 5 | 6 7
                    chunk     0   | 1   | 2   | 3
                    instance  0   | 1   | 1   | 0      (instance 0 also holds the last token: it samples)

Ring attention is just another :class:`~accordion.workers.attention.AttentionBackend`, so the model code is
the same as for local steps.
"""

from __future__ import annotations

import numpy as np
import torch

from accordion.cluster.plan import KVSlice, SPPrefillJob
from accordion.kernels.attention.reference import ref_merge_attention_states, ref_varlen_attention_with_positions
from accordion.workers.attention import AttentionBackend, write_kv_torch
from accordion.workers.parallel import RingComm
from accordion.workers.sampler import SampleRow

PAD_POS = 2**31 - 1  # padding keys sit "after" every query: never attended to


def zigzag_positions(length: int, k: int, j: int) -> np.ndarray:
    """Positions instance j of k computes: chunks j and 2k-1-j of 2k near-equal chunks."""
    bounds = [round(i * length / (2 * k)) for i in range(2 * k + 1)]
    a, b = j, 2 * k - 1 - j
    return np.concatenate([np.arange(bounds[a], bounds[a + 1]), np.arange(bounds[b], bounds[b + 1])]).astype(np.int64)


def max_local_tokens(length: int, k: int) -> int:
    return max(len(zigzag_positions(length, k, j)) for j in range(k))


class RingAttentionBackend(AttentionBackend):
    """Attention of this instance's query tokens against the whole (causal) sequence, passed around a ring."""

    name = "ring"

    def __init__(self, base: AttentionBackend, comm: RingComm, positions: torch.Tensor, pad_to: int,
                 keep: KVSlice | None, block_size: int, use_triton: bool):
        super().__init__(base.num_heads, base.num_kv_heads, base.head_dim, base.scale)
        self.comm = comm
        self.positions = positions.to(torch.int32)  # [T]
        self.pad_to = pad_to
        self.keep = keep
        self.block_size = block_size
        dev = positions.device
        self.keep_blocks = torch.tensor(keep.block_ids if keep else [0], dtype=torch.long, device=dev)
        self.use_triton = use_triton
        # built once: a host list -> device tensor copy per call would synchronise the host every layer
        self.cu_q = torch.tensor([0, self.positions.shape[0]], dtype=torch.int32, device=dev)
        self.cu_k = torch.tensor([0, pad_to], dtype=torch.int32, device=dev)

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Cache slots of the positions this instance keeps; -1 elsewhere. pos: [N] int32."""
        if self.keep is None:
            return torch.full_like(pos, -1, dtype=torch.long)
        p = pos.long()
        rel = p - self.keep.start
        mine = (p >= self.keep.start) & (p < self.keep.end)
        rel = torch.where(mine, rel, torch.zeros_like(rel))
        slots = self.keep_blocks[rel // self.block_size] * self.block_size + rel % self.block_size
        return torch.where(mine, slots, torch.full_like(slots, -1))

    def _store(self, k, v, pos, kv_cache) -> None:
        slots = self._slots(pos)
        if self.use_triton:
            from accordion.kernels.attention import write_kv_cache

            write_kv_cache(k, v, kv_cache[0], kv_cache[1], slots)
            return
        sel = slots >= 0
        if bool(sel.any()):
            write_kv_torch(k[sel], v[sel], kv_cache, slots[sel])

    def _attend_triton(self, q, k, v, k_pos, out, lse, prev):
        """Triton: attention of q over one hop's chunk written into (out, lse), merged in-kernel with prev."""
        from accordion.kernels.attention import varlen_attention_with_positions

        prev_out, prev_lse = prev if prev is not None else (None, None)
        return varlen_attention_with_positions(q, k, v, self.positions, k_pos, self.cu_q, self.cu_k, scale=self.scale,
                                               max_seqlen_q=q.shape[0], max_seqlen_k=k.shape[0], out=out, lse=lse,
                                               prev_out=prev_out, prev_lse=prev_lse)

    def _attend_torch(self, q, k, v, k_pos, prev):
        tq, tk = q.shape[0], k.shape[0]
        cu_q = torch.tensor([0, tq], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, tk], dtype=torch.int32, device=q.device)
        o, s = ref_varlen_attention_with_positions(q, k, v, self.positions, k_pos, cu_q, cu_k, scale=self.scale)
        return (o, s) if prev is None else ref_merge_attention_states(prev[0], prev[1], o, s)

    def forward(self, q, k, v, kv_cache, meta):
        """q [T, Hq, D]; k, v [T, Hkv, D] of this instance's tokens -> (out [T, Hq, D], lse [T, Hq]).

        Triton: every hop's kernel merges its chunk into the running (out, lse) state itself (fp32 state between
        hops, the last hop writes q.dtype), so there is no separate merge launch or dtype conversion."""
        t = k.shape[0]
        cur_k = k.new_zeros(self.pad_to, *k.shape[1:])
        cur_v = v.new_zeros(self.pad_to, *v.shape[1:])
        cur_pos = torch.full((self.pad_to,), PAD_POS, dtype=torch.int32, device=k.device)
        cur_k[:t], cur_v[:t], cur_pos[:t] = k, v, self.positions
        self._store(k, v, self.positions, kv_cache)
        hops = self.comm.size
        state = None  # (out, lse) over the chunks seen so far
        if self.use_triton:
            lse_buf = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
            state_buf = torch.empty(q.shape, dtype=torch.float32, device=q.device) if hops > 1 else None
        for hop in range(hops):
            reqs, nxt = None, None
            if hop + 1 < hops:  # post the next hop before computing on this chunk
                nxt = [torch.empty_like(cur_k), torch.empty_like(cur_v), torch.empty_like(cur_pos)]
                reqs = self.comm.start([cur_k, cur_v, cur_pos], nxt)
            if self.use_triton:
                last = hop + 1 == hops
                out_buf = torch.empty_like(q) if last else state_buf  # fp32 in between, q.dtype at the end
                state = self._attend_triton(q, cur_k, cur_v, cur_pos, out_buf, lse_buf, state)
            else:
                state = self._attend_torch(q, cur_k, cur_v, cur_pos, state)
            if reqs is not None:
                self.comm.wait(reqs)
                cur_k, cur_v, cur_pos = nxt
                self._store(cur_k, cur_v, cur_pos, kv_cache)
        out, lse = state
        return out.to(q.dtype), lse


class SequenceParallelPrefill:
    """Runs :class:`SPPrefillJob` s on one instance's model runner."""

    def __init__(self, runner, rank: int):
        self.runner = runner
        self.rank = rank

    @torch.inference_mode()
    def run(self, job: SPPrefillJob) -> int | None:
        """Prefill this instance's share; returns the first sampled token on the master, else None."""
        r = self.runner
        length, k = len(job.prompt_token_ids), len(job.group)
        j = job.group.index(self.rank)
        pos_np = zigzag_positions(length, k, j)
        positions = torch.from_numpy(pos_np).to(r.device)
        ids = torch.tensor(job.prompt_token_ids, dtype=torch.long)[torch.from_numpy(pos_np)].to(r.device)
        backend = RingAttentionBackend(r.backend, RingComm(job.group, self.rank), positions,
                                       max_local_tokens(length, k), job.slice_of(self.rank), r.block_size,
                                       use_triton=r.backend.name == "triton")
        hidden = r.model(ids, positions, r.kv_caches, backend, None)
        if j != 0:
            return None
        last = int(np.nonzero(pos_np == length - 1)[0][0])
        logits = r.model.compute_logits(hidden[last:last + 1])
        tokens, _ = r.sampler(logits, [SampleRow(job.sampling_params, job.prompt_token_ids, [], job.eos_token_ids)])
        return tokens[0]
