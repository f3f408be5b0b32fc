"""Plain torch references (loops + einsum, fp32 math) for every kernel in accordion.kernels.attention.

They are slow and exist for tests and for readers: each mirrors the contract of its Triton launcher.
Shapes: B sequences, Hq query heads, Hkv kv heads (Hq = Hkv * group), D head_dim, P block_size (page).
"""

from __future__ import annotations

import torch


def gather_paged_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int):
    """K/V of one sequence, `[seq_len, Hkv, D]` each (fp32), read through one block-table row.

    k_cache/v_cache: `[num_blocks, P, Hkv, D]`; block_table_row: int `[max_blocks_per_seq]`.
    """
    P = k_cache.shape[1]
    pos = torch.arange(seq_len, device=k_cache.device)
    blocks = block_table_row.long()[pos // P]
    return k_cache[blocks, pos % P].float(), v_cache[blocks, pos % P].float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float):
    """q `[M, Hq, D]`, k/v `[N, Hkv, D]`, allowed bool `[M, N]` -> out `[M, Hq, D]` fp32, lse `[M, Hq]` fp32.

    Rows with no allowed key give out 0 and lse -inf.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hq, M]
    p = torch.exp(s - lse[..., None])
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows: exp(-inf - -inf)
    out = torch.einsum("hmn,nhd->mhd", p, v)
    return out, lse.transpose(0, 1).contiguous()


def ref_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale):
    """q `[B, Hq, D]` -> (out `[B, Hq, D]` fp32, lse `[B, Hq]` fp32); each query attends to all seq_lens[b] keys."""
    B, Hq, D = q.shape
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        k, v = gather_paged_kv(k_cache, v_cache, block_table[b], n)
        allowed = torch.ones(1, n, dtype=torch.bool, device=q.device)
        o, l_ = _attend(q[b : b + 1], k, v, allowed, scale)
        out[b], lse[b] = o[0], l_[0]
    return out, lse


def ref_paged_prefill_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, scale):
    """q packed `[Tq, Hq, D]`; query i of sequence b is at position seq_lens[b]-q_len_b+i and sees keys <= it.

    Returns (out `[Tq, Hq, D]` fp32, lse `[Tq, Hq]` fp32).
    """
    Tq, Hq, D = q.shape
    out = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Tq, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(seq_lens)):
        s0, s1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        n = int(seq_lens[b])
        if s1 == s0:
            continue
        k, v = gather_paged_kv(k_cache, v_cache, block_table[b], n)
        q_pos = torch.arange(n - (s1 - s0), n, device=q.device)
        allowed = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
        out[s0:s1], lse[s0:s1] = _attend(q[s0:s1], k, v, allowed, scale)
    return out, lse


def ref_merge_attention_states(o1, lse1, o2, lse2):
    """Combine attention over two disjoint key sets. o `[N, H, D]`, lse `[N, H]` -> (o fp32, lse fp32)."""
    lse1, lse2 = lse1.float(), lse2.float()
    m = torch.maximum(lse1, lse2)
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w1, w2 = torch.exp(lse1 - m_safe), torch.exp(lse2 - m_safe)
    tot = w1 + w2
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / torch.where(tot > 0, tot, 1.0)[..., None]
    lse = torch.where(tot > 0, m_safe + torch.log(tot), torch.full_like(tot, float("-inf")))
    return out, lse


def ref_varlen_attention_with_positions(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, *, scale):
    """Non-paged: q `[Tq, Hq, D]`, k/v `[Tk, Hkv, D]`; key allowed iff same sequence and k_pos <= q_pos.

    Returns (out `[Tq, Hq, D]` fp32, lse `[Tq, Hq]` fp32); rows with no allowed key: out 0, lse -inf.
    """
    Tq, Hq, D = q.shape
    out = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Tq, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if qe == qs or ke == ks:
            continue
        allowed = k_pos[ks:ke].long()[None, :] <= q_pos[qs:qe].long()[:, None]
        out[qs:qe], lse[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], allowed, scale)
    return out, lse


def ref_write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """In place: k_cache[slot // P, slot % P] = k[t] for every t with slot_mapping[t] >= 0 (same for v)."""
    P = k_cache.shape[1]
    for t in range(k.shape[0]):
        s = int(slot_mapping[t])
        if s < 0:
            continue
        k_cache[s // P, s % P] = k[t]
        v_cache[s // P, s % P] = v[t]
