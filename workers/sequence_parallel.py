"""Sequence-parallel prefill across instances: ring attention with proactive scale-down (LoongServe).

Each prompt of a batch (L tokens) is split zig-zag over the k instances of a group (2k equal chunks; instance j
computes chunks j and 2k-1-j, which balances the causal cost). Every instance runs the whole model on its tokens
of every prompt, packed one prompt after the other. In each attention layer the packed K/V circulate around the
ring (k-1 hops, the next hop posted before the current one is attended to); partial attention over each hop's
keys (same prompt only: varlen) is merged by log-sum-exp. While the K/V pass by, each instance stores into its
paged cache only the positions its :class:`~accordion.cluster.plan.KVSlice` s assign it, so decoding continues
on fewer instances and no KV moves afterwards::

    L = 8, k = 2:   positions 0 1 | 2 3 | 4 5 | 6 7
                    chunk     0   | 1   | 2   | 3
                    instance  0   | 1   | 1   | 0      (instance 0 also holds the last token: it samples)

Ring attention is just another :class:`~accordion.workers.attention.AttentionBackend`, so the model code is
the same as for local steps.
"""

from __future__ import annotations

import numpy as np
import torch

from accordion.cluster.plan import SPPrefillBatch, SPPrefillJob
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


class _Layout:
    """The packed tokens one instance computes for a batch: its zig-zag positions of each prompt in turn."""

    def __init__(self, jobs: list[SPPrefillJob], k: int, j: int):
        per = [zigzag_positions(len(job.prompt_token_ids), k, j) for job in jobs]
        self.positions = np.concatenate(per) if per else np.zeros(0, dtype=np.int64)  # [T]
        self.counts = [len(p) for p in per]
        self.cu = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int32)  # [R + 1]
        self.request = np.repeat(np.arange(len(jobs)), self.counts)  # [T] index of each token's prompt

    @property
    def num_tokens(self) -> int:
        return int(self.cu[-1])

    def slots(self, jobs: list[SPPrefillJob], rank: int, block_size: int) -> np.ndarray:
        """[T] cache slots on ``rank`` of the tokens whose K/V it keeps; -1 elsewhere."""
        out = np.full(self.num_tokens, -1, dtype=np.int64)
        for r, job in enumerate(jobs):
            keep = job.slice_of(rank)
            if keep is None or not keep.block_ids:
                continue
            lo, hi = int(self.cu[r]), int(self.cu[r + 1])
            pos = self.positions[lo:hi]
            mine = (pos >= keep.start) & (pos < keep.end)
            rel = pos[mine] - keep.start
            blocks = np.asarray(keep.block_ids, dtype=np.int64)
            out[lo:hi][mine] = blocks[rel // block_size] * block_size + rel % block_size
        return out


class RingAttentionBackend(AttentionBackend):
    """Attention of this instance's query tokens against the whole (causal) sequences, passed around a ring.

    ``layouts[s]`` is the packing of ring member ``s`` (this one is ``me``); at hop h the K/V of member
    ``(me - h) % k`` are here. Their positions, per-prompt boundaries and the cache slots this instance stores them
    in are known from the layouts, so only K/V travel.
    """

    name = "ring"

    def __init__(self, base: AttentionBackend, comm: RingComm, layouts: list[_Layout], me: int,
                 slots: list[np.ndarray], device: torch.device, use_triton: bool):
        super().__init__(base.num_heads, base.num_kv_heads, base.head_dim, base.scale)
        self.comm = comm
        self.me = me
        self.pad_to = max(lay.num_tokens for lay in layouts)
        self.use_triton = use_triton
        k = len(layouts)

        def pad(a: np.ndarray, fill: int, dtype) -> torch.Tensor:
            t = torch.full((self.pad_to,), fill, dtype=dtype)
            t[:len(a)] = torch.from_numpy(np.asarray(a)).to(dtype)
            return t.to(device)

        mine = layouts[me]
        self.q_pos = torch.from_numpy(mine.positions).to(torch.int32).to(device)  # [T]
        self.cu_q = torch.from_numpy(mine.cu).to(device)
        self.max_q = max(mine.counts, default=0)
        # built once per prefill: a host list -> device tensor copy per layer would synchronise the host
        self.hops = []
        for h in range(k):
            lay = layouts[(me - h) % k]
            self.hops.append((pad(lay.positions, PAD_POS, torch.int32), torch.from_numpy(lay.cu).to(device),
                              max(lay.counts, default=0), pad(slots[(me - h) % k], -1, torch.long)))

    def _store(self, k, v, slots, kv_cache) -> None:
        if self.use_triton:
            from accordion.kernels.attention import write_kv_cache

            write_kv_cache(k, v, kv_cache[0], kv_cache[1], slots)
            return
        write_kv_torch(k, v, kv_cache, slots)

    def _attend(self, q, k, v, hop, out, lse, prev):
        """Attention of q over one hop's keys (same prompt, causal by position), merged with ``prev``."""
        k_pos, cu_k, max_k, _ = self.hops[hop]
        if self.use_triton:
            from accordion.kernels.attention import varlen_attention_with_positions

            prev_out, prev_lse = prev if prev is not None else (None, None)
            return varlen_attention_with_positions(q, k, v, self.q_pos, k_pos, self.cu_q, cu_k, scale=self.scale,
                                                   max_seqlen_q=self.max_q, max_seqlen_k=max(max_k, 1), out=out,
                                                   lse=lse, prev_out=prev_out, prev_lse=prev_lse)
        o, s = ref_varlen_attention_with_positions(q, k, v, self.q_pos, k_pos, self.cu_q, cu_k, scale=self.scale)
        return (o, s) if prev is None else ref_merge_attention_states(prev[0], prev[1], o, s)

    def forward(self, q, k, v, kv_cache, meta):
        """q [T, Hq, D]; k, v [T, Hkv, D] of this instance's tokens -> (out [T, Hq, D], lse [T, Hq]).

        Triton: every hop's kernel merges its keys into the running (out, lse) state itself (fp32 state between
        hops, the last hop writes q.dtype), so there is no separate merge launch or dtype conversion."""
        t = k.shape[0]
        cur_k = k.new_zeros(self.pad_to, *k.shape[1:])
        cur_v = v.new_zeros(self.pad_to, *v.shape[1:])
        cur_k[:t], cur_v[:t] = k, v
        self._store(cur_k, cur_v, self.hops[0][3], kv_cache)
        hops = self.comm.size
        state = None  # (out, lse) over the keys seen so far
        if self.use_triton:
            lse_buf = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
            state_buf = torch.empty(q.shape, dtype=torch.float32, device=q.device) if hops > 1 else None
        for hop in range(hops):
            reqs, nxt = None, None
            if hop + 1 < hops:  # post the next hop before computing on this one
                nxt = [torch.empty_like(cur_k), torch.empty_like(cur_v)]
                reqs = self.comm.start([cur_k, cur_v], nxt)
            if self.use_triton:
                last = hop + 1 == hops
                out_buf = torch.empty_like(q) if last else state_buf  # fp32 in between, q.dtype at the end
                state = self._attend(q, cur_k, cur_v, hop, out_buf, lse_buf, state)
            else:
                state = self._attend(q, cur_k, cur_v, hop, None, None, state)
            if reqs is not None:
                self.comm.wait(reqs)
                cur_k, cur_v = nxt
                self._store(cur_k, cur_v, self.hops[hop + 1][3], kv_cache)
        out, lse = state
        return out.to(q.dtype), lse


class SequenceParallelPrefill:
    """Runs :class:`SPPrefillBatch` es on one instance's model runner."""

    def __init__(self, runner, rank: int):
        self.runner = runner
        self.rank = rank

    @torch.inference_mode()
    def run(self, batch: SPPrefillBatch) -> dict[str, int]:
        """Prefill this instance's share of every prompt; on the master, the first sampled token of each."""
        r, jobs, k = self.runner, batch.jobs, len(batch.group)
        layouts = [_Layout(jobs, k, j) for j in range(k)]
        j = batch.group.index(self.rank)
        mine = layouts[j]
        slots = [lay.slots(jobs, self.rank, r.block_size) for lay in layouts]
        positions = torch.from_numpy(mine.positions).to(r.device)
        ids = torch.from_numpy(np.concatenate([np.asarray(job.prompt_token_ids, dtype=np.int64)[
            zigzag_positions(len(job.prompt_token_ids), k, j)] for job in jobs])).to(r.device)
        backend = RingAttentionBackend(r.backend, RingComm(batch.group, self.rank), layouts, j, slots, r.device,
                                       use_triton=r.backend.name == "triton")
        hidden = r.model(ids, positions, r.kv_caches, backend, None)
        if j != 0:
            return {}
        last = [int(mine.cu[i]) + int(np.nonzero(mine.positions[mine.cu[i]:mine.cu[i + 1]]
                                                 == len(job.prompt_token_ids) - 1)[0][0])
                for i, job in enumerate(jobs)]  # the master computes every prompt's last chunk
        logits = r.model.compute_logits(hidden[last])
        tokens, _ = r.sampler(logits, [SampleRow(job.sampling_params, job.prompt_token_ids, [], job.eos_token_ids)
                                       for job in jobs])
        return {job.request_id: tok for job, tok in zip(jobs, tokens)}
