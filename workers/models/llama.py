"""The Llama-family decoder over a flat batch of tokens (no padding) and a paged KV cache.

Parameter names differ from HF's: q/k/v are fused into ``qkv`` and gate/up into ``mlp.gate_up``;
:mod:`accordion.workers.loader` maps checkpoint tensors onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from accordion.workers.arch import ArchConfig
from accordion.workers.attention import AttentionBackend, AttentionMetadata
from accordion.workers.layers import GatedMLP, RMSNorm, RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.arch = arch
        self.qkv = nn.Linear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.q_size, arch.hidden_size, bias=arch.o_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        a = self.arch
        q, k, v = self.qkv(x).split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)  # [T, Hq, D]
        k = k.view(-1, a.num_kv_heads, a.head_dim)  # [T, Hkv, D]
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        rotated_q = (rotary.forward_into_cache(positions, q, k, v, kv_cache, meta.slot_mapping)
                     if backend.stores_kv_with_rotary else None)
        if rotated_q is not None:  # k and v are in the cache already: one launch instead of two
            out, _lse = backend.forward(rotated_q, None, None, kv_cache, meta)
        else:
            q, k = rotary(positions, q, k)
            out, _lse = backend.forward(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(-1, a.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size)

    def forward(self, h, residual, positions, rotary, backend, kv_cache, meta):
        """h: the previous layer's MLP output (layer 0: the embeddings, residual None); residual: the residual
        stream before it. Returns (this layer's MLP output, residual stream before it).

        Each residual add is fused into the norm that follows it (``norm(h, residual)`` -> (normed, residual + h));
        the sums are the ones HF computes, ``h = residual + h``, in the same order and dtype.
        """
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, positions, rotary, backend, kv_cache, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 (flags in :class:`ArchConfig`)."""

    def __init__(self, arch: ArchConfig, max_positions: int):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_word_embeddings else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        h, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, self.rotary, backend, kv_cache, meta)
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, hidden] -> logits [S, vocab] in float32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()
