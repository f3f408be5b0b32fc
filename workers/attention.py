"""Attention behind a small interface: metadata built once per step, ``forward`` once per layer.

A step's tokens are laid out flat, decodes first::

    tokens: | d0 | d1 | ... | d_{D-1} | p0 chunk ........ | p1 chunk .... |
    rows:   |<-- num_decodes (1 token each) -->|<-- prefill chunks -->|

Every row ``b`` (a request) has ``seq_lens[b]`` keys after this step: its cached context plus the tokens of its
chunk, whose K/V ``forward`` writes into the paged cache (``slot_mapping``) before attending. Query ``i`` of a
chunk of length ``q_len`` sits at position ``seq_lens[b] - q_len + i`` and sees keys at positions <= its own.

``forward`` returns the output and each query row's log-sum-exp, which sequence parallelism uses to merge
partial attention computed on different instances.

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

EQUAL_LENGTHS_SLACK = 1.05  # decode lengths count as equal when the longest is within 5% of the mean


@dataclass
class AttentionMetadata:
    num_decodes: int
    """Rows 0..num_decodes-1 are single-token decodes; their tokens are tokens 0..num_decodes-1."""
    slot_mapping: torch.Tensor
    """[T] int64: cache slot (block * block_size + offset) of each token's K/V; -1 skips."""
    block_table: torch.Tensor
    """[B, max_blocks] int32."""
    seq_lens: torch.Tensor
    """[B] int32: keys per row after this step."""
    query_start_loc: torch.Tensor
    """[B + 1] int32: row b's tokens are query_start_loc[b]:query_start_loc[b + 1]."""
    max_query_len: int
    """Longest prefill chunk of the step (host int; sizes kernel grids)."""
    max_seq_len: int
    """Upper bound of seq_lens (host int; picks the decode split factor)."""
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    prefill_query_start_loc: torch.Tensor | None = None
    """[P + 1] int32: query_start_loc of the prefill rows, rebased to 0 (None when there are none)."""

    @property
    def num_rows(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.query_lens_cpu[self.num_decodes:])

    @functools.cached_property
    def decode_lengths_equal(self) -> bool:
        """Whether the decode rows' key counts are (nearly) equal, from the host lengths (computed once per step; a
        decode kernel picks its schedule by it). False for CUDA-graph steps, whose host lengths are placeholders."""
        lens = self.seq_lens_cpu[:self.num_decodes]
        return bool(lens) and lens[0] > 0 and max(lens) * len(lens) <= EQUAL_LENGTHS_SLACK * sum(lens)

    @functools.cached_property
    def decode_max_len(self) -> int:
        """The longest decode row's key count from the host lengths, exact (`max_seq_len` is a power-of-two bound):
        what a decode of rows told equal spans (`decode_schedule.DEEP_DECODE` reads no key past it)."""
        return max(self.seq_lens_cpu[:self.num_decodes], default=0)

    @functools.cached_property
    def prefill_max_len(self) -> int | None:
        """The longest prefill row's key count (its prefix and chunk) from the host lengths; None without prefill
        rows."""
        return max(self.seq_lens_cpu[self.num_decodes:], default=None)


class AttentionBackend(ABC):
    """One instance per model runner; ``forward`` is called by every attention layer of a step."""

    name: str

    stores_kv_with_rotary: bool = False
    """The model may rotate k and store k, v in the cache in one kernel (``RotaryEmbedding.forward_into_cache``)
    and then call :meth:`forward` with ``k = v = None``: the backend reads this step's K/V from the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] (this step's new K/V), or both None when already stored (see
        ``stores_kv_with_rotary``); kv_cache: [2, N, bs, Hkv, D].

        Returns (out [T, Hq, D], lse [T, Hq] float32).
        """

    def warm_up(self, kv_cache: torch.Tensor) -> None:
        """Prepare everything :meth:`forward` may need (compiled kernels) before the first step; kv_cache as in
        ``forward``, only read. Nothing to do for eager backends."""

    def decode_graph_bounds(self, max_model_len: int) -> list[int]:
        """Context bounds (upper bounds of ``max_seq_len``) to capture decode CUDA graphs for, each <= max_model_len
        and the last = max_model_len; a step replays the graph of the smallest bound >= its longest row. More than
        one where ``forward`` picks its kernels by how long the rows may be."""
        return [max_model_len]


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V into the paged cache: k, v [T, Hkv, D]; slot_mapping [T] (-1: not stored here)."""
    _, n, bs, h, d = kv_cache.shape
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    kv_cache[0].view(n * bs, h, d).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(n * bs, h, d).index_copy_(0, slot_mapping, v)


class TorchAttentionBackend(AttentionBackend):
    """Plain torch: gathers each row's keys from the cache and computes attention in fp32. CPU and CUDA."""

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta):
        write_kv_torch(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        nd = meta.num_decodes
        if nd:
            o, s = self._decode(q[:nd], kv_cache, meta.block_table[:nd], meta.seq_lens_cpu[:nd])
            out[:nd], lse[:nd] = o, s
        starts = meta.query_start_loc.tolist() if meta.num_rows > nd else []
        for b in range(nd, meta.num_rows):
            lo, hi = starts[b], starts[b + 1]
            o, s = self._prefill(q[lo:hi], kv_cache, meta.block_table[b], meta.seq_lens_cpu[b])
            out[lo:hi], lse[lo:hi] = o, s
        return out, lse

    def _gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one row: [n, Hkv, D] each."""
        kv = kv_cache[:, blocks]  # [2, nb, bs, Hkv, D]
        kv = kv.reshape(2, -1, self.num_kv_heads, self.head_dim)[:, :n]
        return kv[0], kv[1]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """q [..., Hq, Lq, D], k/v [..., Hkv, Lk, D], mask broadcastable to scores (True = keep)."""
        group = self.num_heads // self.num_kv_heads
        k = k.float().repeat_interleave(group, dim=-3)
        v = v.float().repeat_interleave(group, dim=-3)
        scores = torch.matmul(q.float(), k.transpose(-1, -2)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [..., Hq, Lq]
        p = torch.exp(scores - lse.unsqueeze(-1))
        return torch.matmul(p, v), lse

    def _prefill(self, q, kv_cache, block_row, seq_len):
        n_q = q.shape[0]
        nb = -(-seq_len // kv_cache.shape[2])
        k, v = self._gather(kv_cache, block_row[:nb].long(), seq_len)
        q_pos = torch.arange(seq_len - n_q, seq_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(seq_len, device=q.device)[None, :]  # [Lq, Lk]
        o, lse = self._attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
        return o.transpose(0, 1).to(q.dtype), lse.transpose(0, 1)

    def _decode(self, q, kv_cache, block_table, seq_lens):
        bs = kv_cache.shape[2]
        max_len = max(seq_lens)
        nb = -(-max_len // bs)
        kv = kv_cache[:, block_table[:, :nb].long()]  # [2, B, nb, bs, Hkv, D]
        kv = kv.reshape(2, q.shape[0], nb * bs, self.num_kv_heads, self.head_dim).transpose(2, 3)
        lens = torch.tensor(seq_lens, device=q.device)
        mask = (torch.arange(nb * bs, device=q.device)[None, :] < lens[:, None])[:, None, None, :]  # [B,1,1,Lk]
        o, lse = self._attend(q[:, :, None, :], kv[0], kv[1], mask)  # o [B, Hq, 1, D]
        return o[:, :, 0].to(q.dtype), lse[:, :, 0]
