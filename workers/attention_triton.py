"""Attention on CUDA through accordion's Triton kernels (``accordion.kernels.attention``).

Decode rows run the paged split-KV decode kernel; prefill chunks the paged prefill kernel; a hybrid step (both)
runs the POD-style fused kernel, one launch for both kinds of work, when its two halves are balanced enough for
fusing to pay (`pod_pays_off`), else the two kernels in sequence. Every path returns the log-sum-exp.
"""

from __future__ import annotations

import torch

from accordion.kernels.attention import (
    DecodeArgs,
    PrefillArgs,
    paged_decode_attention,
    paged_prefill_attention,
    pod_attention,
    pod_pays_off,
    write_kv_cache,
)
from accordion.workers.attention import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    stores_kv_with_rotary = True

    def __init__(self, *args, fuse_hybrid: bool | None = None, **kw):
        """fuse_hybrid: None = fuse a hybrid step when `pod_pays_off`; True / False = always / never."""
        super().__init__(*args, **kw)
        self.fuse_hybrid = fuse_hybrid
        self._fuse_step: tuple[AttentionMetadata | None, bool] = (None, False)

    def _fuse(self, meta: AttentionMetadata, elem_bytes: int) -> bool:
        """The fuse decision of a hybrid step, made once per step (every layer sees the same ``meta``)."""
        if self.fuse_hybrid is not None:
            return self.fuse_hybrid
        if self._fuse_step[0] is not meta:
            nd = meta.num_decodes
            self._fuse_step = (meta, pod_pays_off(meta.query_lens_cpu[nd:], meta.seq_lens_cpu[nd:],
                                                  meta.seq_lens_cpu[:nd], self.num_heads, self.num_kv_heads,
                                                  self.head_dim, elem_bytes))
        return self._fuse_step[1]

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if k is not None:
            write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        nd = meta.num_decodes
        has_prefill = meta.prefill_query_start_loc is not None
        if nd:
            decode = DecodeArgs(q[:nd], meta.block_table[:nd], meta.seq_lens[:nd], out=out[:nd], lse=lse[:nd],
                                max_seq_len=meta.max_seq_len)
        if has_prefill:
            prefill = PrefillArgs(q[nd:], meta.block_table[nd:], meta.prefill_query_start_loc, meta.seq_lens[nd:],
                                  meta.max_query_len, out=out[nd:], lse=lse[nd:])
        if nd and has_prefill and self._fuse(meta, q.element_size()):
            pod_attention(k_cache, v_cache, prefill, decode, scale=self.scale)
        else:
            if nd:
                paged_decode_attention(decode.q, k_cache, v_cache, decode.block_table, decode.seq_lens,
                                       scale=self.scale, out=decode.out, lse=decode.lse,
                                       max_seq_len=decode.max_seq_len)
            if has_prefill:
                paged_prefill_attention(prefill.q, k_cache, v_cache, prefill.block_table, prefill.cu_seqlens_q,
                                        prefill.seq_lens, scale=self.scale, max_seqlen_q=prefill.max_seqlen_q,
                                        out=prefill.out, lse=prefill.lse)
        return out, lse
