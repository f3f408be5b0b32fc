"""Attention on CUDA through accordion's Triton kernels (``accordion.kernels.attention``).

Decode rows run the paged decode kernels (split-KV, TMA pages or stream-K, as `decode_schedule` picks; the step's
host lengths tell it whether they are equal); prefill chunks the paged prefill kernel; a hybrid step (both)
runs the two in sequence, or with ``fuse_hybrid`` the POD-style fused kernel, one launch for both kinds of work
(or, per step, the fused kernel when its warp-specialized form serves and the step's halves are balanced)
(DeviceConfig.hybrid_attention says which is faster). Every path returns the log-sum-exp.
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
    pod_rule,
    write_kv_cache,
    ws_capable,
)
from accordion.kernels.attention.decode import MERGE_CHUNKS, merge_splits, split_partials
from accordion.kernels.attention.decode_schedule import LEAN_MIN_CONTEXT, decode_variants, tma_capable
from accordion.kernels.utils import is_interpreter
from accordion.workers.attention import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    stores_kv_with_rotary = True

    def __init__(self, *args, fuse_hybrid: bool | None = False, **kw):
        """fuse_hybrid: hybrid steps through the fused kernel (True), the two kernels in sequence (False), or per
        step (None: fused when the warp-specialized kernel serves and `pod_pays_off`)."""
        super().__init__(*args, **kw)
        self.fuse_hybrid = fuse_hybrid
        self._step_fuse: tuple[AttentionMetadata | None, bool] = (None, False)
        self._step_ws: tuple[AttentionMetadata | None, bool] = (None, False)

    def _ws(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether the warp-specialized fused kernel serves this step (`ws_capable`), asked once per step."""
        if self._step_ws[0] is not meta:
            self._step_ws = (meta, ws_capable(kv_cache[0], self.num_heads // self.num_kv_heads, kv_cache[1], q))
        return self._step_ws[1]

    def _fuse(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
        """A hybrid step's choice, made once per step (every layer sees the same ``meta``)."""
        if self.fuse_hybrid is not None:
            return self.fuse_hybrid
        if self._step_fuse[0] is not meta:
            nd = meta.num_decodes
            fuse = self._ws(q, kv_cache, meta) and pod_pays_off(
                meta.query_lens_cpu[nd:], meta.seq_lens_cpu[nd:], meta.seq_lens_cpu[:nd],
                self.num_heads, self.num_kv_heads, self.head_dim, q.element_size(), pod_rule(q.device))
            self._step_fuse = (meta, fuse)
        return self._step_fuse[1]

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        if k is not None:
            write_kv_cache(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        hybrid = meta.num_decodes > 0 and meta.prefill_query_start_loc is not None
        return self._attend(q, kv_cache, meta, fuse=hybrid and self._fuse(q, kv_cache, meta))

    def _attend(self, q, kv_cache, meta: AttentionMetadata, fuse: bool):
        """Attention of ``q`` [T, Hq, D] over the cache (this step's K/V stored); hybrid steps fused or not."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        nd = meta.num_decodes
        has_prefill = meta.prefill_query_start_loc is not None
        if nd:
            decode = DecodeArgs(q[:nd], meta.block_table[:nd], meta.seq_lens[:nd], out=out[:nd], lse=lse[:nd],
                                max_seq_len=meta.max_seq_len)
        if has_prefill:
            prefill = PrefillArgs(q[nd:], meta.block_table[nd:], meta.prefill_query_start_loc, meta.seq_lens[nd:],
                                  meta.max_query_len, out=out[nd:], lse=lse[nd:],
                                  max_seq_len=meta.prefill_max_len)
        if nd and has_prefill and fuse:
            if self._ws(q, kv_cache, meta):
                # the step's exact longest decode row (the host lengths are exact) sizes the warp-specialized
                # launch's decode split and its estimate of the two halves (`pod_schedule.ws_items_per_sm`); the
                # Triton POD kernel keeps the step's bound, whose split-or-not variants warm-up compiles
                decode.max_seq_len = meta.decode_max_len
            pod_attention(k_cache, v_cache, prefill, decode, scale=self.scale)
        else:
            if nd:
                equal = meta.decode_lengths_equal
                paged_decode_attention(decode.q, k_cache, v_cache, decode.block_table, decode.seq_lens,
                                       scale=self.scale, out=decode.out, lse=decode.lse, equal_lengths=equal,
                                       max_seq_len=meta.decode_max_len if equal else decode.max_seq_len)
            if has_prefill:
                paged_prefill_attention(prefill.q, k_cache, v_cache, prefill.block_table, prefill.cu_seqlens_q,
                                        prefill.seq_lens, scale=self.scale, max_seqlen_q=prefill.max_seqlen_q,
                                        out=prefill.out, lse=prefill.lse)
        return out, lse

    def decode_graph_bounds(self, max_model_len: int) -> list[int]:
        """Decode graphs for rows of up to LEAN_MIN_CONTEXT keys, where the decode runs split-KV unless the batch has
        rows for several program waves (stream-K's fixed costs lose on short rows), and for longer ones, where ragged
        batches take stream-K (`decode_schedule.lean_pays_off`)."""
        return sorted({min(LEAN_MIN_CONTEXT, max_model_len), max_model_len})

    def warm_up(self, kv_cache: torch.Tensor) -> None:
        """Compile every kernel variant a step can launch, so that no step waits on a compilation (one costs
        0.1-2 s: a stall of every running request). Variants differ only in what cannot change between steps
        (dtypes, head counts, tile sizes, decode schedule, whether a decode splits its keys); everything else is a
        runtime argument (`accordion.kernels.utils.jit_unspecialized`). The fused kernel is compiled only when
        hybrid steps may fuse (``fuse_hybrid`` True or None; set it before warm-up). Reads a few keys of
        ``kv_cache``, writes none.
        Under the Triton interpreter there is nothing to compile."""
        if is_interpreter():
            return
        dev = kv_cache.device
        # hybrid steps run the fused kernel, the two in sequence or (per step) either: warm those in use
        kinds = ("decode", "prefill") + ("fused",) * (self.fuse_hybrid is not False) \
            + ("hybrid",) * (self.fuse_hybrid is not True)
        steps = [(int(kind != "prefill"), kind != "decode", max_seq_len, 1, kind == "fused")
                 for max_seq_len in (16, 1 << 16)  # the decode keys split or not
                 for kind in kinds]
        # and a prefill grid of many query tiles (`prefill_config` picks its tiles by grid size); the tiles past its
        # one query return at once
        steps.append((0, True, 16, 1 << 15, False))
        for num_decodes, prefill, max_seq_len, max_query_len, fuse in steps:
            meta = _warm_up_meta(num_decodes, prefill, max_seq_len, dev, max_query_len)
            q = torch.zeros(meta.num_rows, self.num_heads, self.head_dim, dtype=kv_cache.dtype, device=dev)
            self._attend(q, kv_cache, meta, fuse=fuse)
        # every decode schedule the launcher can pick for some batch (stream-K, TMA, tile sizes by programs per
        # SM), each split or not, on a one-row batch
        meta = _warm_up_meta(1, False, 16, dev)
        q = torch.zeros(1, self.num_heads, self.head_dim, dtype=kv_cache.dtype, device=dev)
        for cfg in decode_variants(self.head_dim, kv_cache.dtype, dev, tma_capable(kv_cache[0], kv_cache[1])):
            for splits in (1,) if cfg.get("LEAN") else (1, 2):
                paged_decode_attention(q, kv_cache[0], kv_cache[1], meta.block_table, meta.seq_lens,
                                       scale=self.scale, num_splits=splits, config=cfg)
        # and the split merge's variants (`MERGE_CHUNKS`), on scratch partials
        out = torch.empty(1, self.num_heads, self.head_dim, dtype=kv_cache.dtype, device=dev)
        lse = torch.empty(1, self.num_heads, dtype=torch.float32, device=dev)
        for splits in MERGE_CHUNKS:
            merge_splits(*split_partials(1, self.num_heads, splits, self.head_dim, dev), out, lse)


def _warm_up_meta(num_decodes: int, prefill: bool, max_seq_len: int, device: torch.device,
                  max_query_len: int = 1) -> AttentionMetadata:
    """Metadata of a step of ``num_decodes`` decodes and (``prefill``) one one-token chunk, every row one key
    (block 0's first slot); ``max_query_len`` sizes the prefill grid."""
    rows = num_decodes + prefill
    i32 = {"dtype": torch.int32, "device": device}
    return AttentionMetadata(
        num_decodes=num_decodes, slot_mapping=torch.full((rows,), -1, dtype=torch.long, device=device),
        block_table=torch.zeros(rows, 1, **i32), seq_lens=torch.ones(rows, **i32),
        query_start_loc=torch.arange(rows + 1, **i32), max_query_len=max_query_len if prefill else 0,
        max_seq_len=max_seq_len,
        seq_lens_cpu=[1] * rows, query_lens_cpu=[1] * rows,
        prefill_query_start_loc=torch.tensor([0, 1], **i32) if prefill else None)
