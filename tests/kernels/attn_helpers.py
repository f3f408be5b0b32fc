"""Input builders shared by the kernel tests (paged caches with shuffled block tables, packed batches)."""

from __future__ import annotations

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, dev, gen, extra_blocks=3):
    """Random `[2, num_blocks, P, Hkv, D]` cache + int32 block table with shuffled ids (holes) and -1 padding.

    Returns (kv, block_table [B, max_blocks], seq_lens int32 [B]).
    """
    need = [max(1, -(-n // block_size)) for n in seq_lens]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + extra_blocks
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(dev)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[i : i + n].int()
        i += n
    return kv, table.to(dev), torch.tensor(seq_lens, dtype=torch.int32, device=dev)


def make_prefill_batch(q_lens, seq_lens, num_heads, head_dim, dtype, dev, gen):
    """Packed queries q [Tq, Hq, D] + cu_seqlens_q int32 [B + 1]."""
    assert all(q <= s for q, s in zip(q_lens, seq_lens))
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype).to(dev)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    return q, cu.to(dev)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def poisoned(shape, dtype, dev) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=dev)
