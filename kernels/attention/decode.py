"""Launcher: paged decode attention (one query token per sequence): split-KV, TMA pages or stream-K, as
`decode_schedule` picks."""

from __future__ import annotations

import threading

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ..utils import cdiv, check_same_device, check_tensor, is_interpreter, is_power_of_2, next_power_of_2, num_sms
from .decode_kernel import merge_splits_kernel, paged_decode_kernel
from .decode_lean_kernel import paged_decode_lean_kernel
from .decode_schedule import (
    DEEP_DECODE,
    LEAN_MAX_SEQS,
    MAX_SPLITS,
    MAX_TICKETS,
    choose_num_splits,
    decode_config,
    deep_config,
    deep_splits,
    lean_config,
    lean_pays_off,
    tma_capable,
    tma_layout,
    waves_of_rows,
)
from .decode_tma_kernel import paged_decode_tma_kernel
from .paged_common import fast_offsets

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The in-kernel merge reads a row's splits one after another: a win up to 8 splits (one launch fewer), slower than
# the merge kernel's parallel read at 64 (1xH100, bench/tune_attention.py --merge)
FUSED_MERGE_MAX_SPLITS = 8
# The merge kernel reads a row's splits in chunks of 8 where there are at most 8 (1.2-1.4x faster than a padded
# chunk of 64 at 2-8 splits: 7.4 against 9.8 us at 64 sequences x 32 heads), else of 64 (a loop of 8-split chunks ran
# 0.4-0.9x the padded read at 16-64 splits) (1xH200, CUDA graphs, bench/results/experiments/merge-chunks-*.json)
MERGE_CHUNKS = (8, MAX_SPLITS)
_tickets: dict[tuple[str, int, int], torch.Tensor] = {}  # (device, thread, stream) -> split_tickets buffer


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 inputs, irrelevant for 16-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor) -> list:
    """Descriptors of the [num_blocks * block_size, Hkv * D] views of the caches, box one page of one kv head."""
    nb, page, hkv, d = k_cache.shape
    return [TensorDescriptor(c, [nb * page, hkv * d], [hkv * d, 1], [page, d]) for c in (k_cache, v_cache)]


def validate_paged_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int, dtype: torch.dtype) -> None:
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} shapes differ")
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise ValueError(f"k_cache/v_cache dtype ({k_cache.dtype}) must equal q dtype ({dtype})")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if not is_power_of_2(k_cache.shape[1]):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two, got {k_cache.shape[1]}")
    if not (is_power_of_2(head_dim) and 16 <= head_dim <= 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    equal_lengths: bool = False,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query token per sequence over a paged KV cache.

    q:           [B, Hq, D]                          (fp16 / bf16 / fp32; last dim contiguous)
    k_cache:     [num_blocks, block_size, Hkv, D]    same dtype as q; any strides, last dim contiguous
    v_cache:     [num_blocks, block_size, Hkv, D]
    block_table: int32 [B, max_blocks_per_seq]       entries past a sequence's last block never read
    seq_lens:    int32 [B]                           KV length per sequence (current token included); 0 -> out 0
    out:         optional [B, Hq, D] (q.dtype)       written in place
    lse:         optional fp32 [B, Hq]               natural-log LSE of the scaled scores (-inf when seq_len 0)
    num_splits:  split-KV factor; None = automatic: stream-K (`lean_pays_off`), else split-KV from B * Hkv vs SM
                 count and the maximum context. The splits of a row are merged by the last of them to finish
                 (<= FUSED_MERGE_MAX_SPLITS) or by a merge kernel.
    max_seq_len: optional host-side upper bound of seq_lens (refines the automatic split; a config with HOST_BOUND
                 reads no key past it); default block_table.shape[1] * block_size.
    equal_lengths: the caller knows the seq_lens to be (nearly) equal, e.g. from a host copy; the automatic choice
                 then prefers one deep program per SM (`deep_splits`) or split-KV (`lean_pays_off`). Default: unequal
                 or unknown, as in serving.
    config:      tile-size override (keys of `decode_config`; HOST_BOUND as in `decode_kernel.decode_work`),
                 for tuning.
    Returns (out, lse). No host syncs; scratch sizes depend on shapes only (CUDA-graph capturable).
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    B, Hq, D = q.shape
    validate_paged_kv(k_cache, v_cache, D, q.dtype)
    check_tensor("block_table", block_table, 2, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(f"block_table {tuple(block_table.shape)} / seq_lens {tuple(seq_lens.shape)} must have "
                         f"B={B} rows")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    if lse is None:
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    elif lse.shape != (B, Hq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [{B}, {Hq}]")
    if B == 0:
        return out, lse
    group = Hq // Hkv
    max_ctx = max_seq_len if max_seq_len is not None else block_table.shape[1] * page
    num_splits, cfg = decode_plan(B, Hkv, D, q.dtype, q.device, max_ctx, equal_lengths=equal_lengths,
                                  tma=tma_capable(k_cache, v_cache), num_splits=num_splits, config=config)
    if cfg.get("TMA") and not (tma_layout(k_cache, v_cache) and cfg["BLOCK_N"] in (page, 2 * page)):
        raise ValueError("a TMA decode config needs caches in `tma_layout` and BLOCK_N of one or two pages")
    qk_scale = float(scale) * 1.4426950408889634
    fused = merges_in_kernel(num_splits, B * Hkv, cfg.get("FUSED_MERGE", True))
    meta = dict(
        GROUP=group, BLOCK_H=max(16, next_power_of_2(group)), HEAD_DIM=D, PAGE_SIZE=page,
        BLOCK_N=cfg["BLOCK_N"], DOT_PRECISION=dot_precision(q.dtype),
        HEADS_FASTEST=bool(cfg.get("HEADS_FASTEST", True)), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not cfg.get("TMA"):  # the pointer kernels' address arithmetic (`paged_common.paged_attn_loop`)
        meta.update(FAST_OFFSETS=fast_offsets(k_cache, v_cache))
    if cfg.get("LEAN"):
        return _launch_lean(q, k_cache, v_cache, block_table, seq_lens, out, lse, qk_scale, cfg, meta)
    if cfg.get("TMA"):
        kernel, kv, bound = paged_decode_tma_kernel, tma_descriptors(k_cache, v_cache), ()
    else:  # HOST_BOUND: splits and key loops span the host's bound of the lengths (`decode_work`)
        kernel, kv = paged_decode_kernel, (k_cache, v_cache)
        bound = (min(max_ctx, block_table.shape[1] * page),)
        meta.update(HOST_BOUND=bool(cfg.get("HOST_BOUND", False)))
    # Strides read once per tensor (a launch's host time is mostly Python: eager hybrid steps pay it every layer)
    so, sl = out.stride()[:2], lse.stride()
    common = (*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0))
    grid = (Hkv, B, num_splits) if meta["HEADS_FASTEST"] else (B, Hkv, num_splits)
    if num_splits == 1:
        kernel[grid](
            q, *kv, block_table, seq_lens, out, lse, out, lse, seq_lens, 1, 0, *bound, *common,
            *so, 0, *sl, 0, *so, *sl, qk_scale, **meta,
        )
        return out, lse
    mid_o, mid_lse = split_partials(B, Hq, num_splits, D, q.device)
    kernel[grid](
        q, *kv, block_table, seq_lens, mid_o, mid_lse, out, lse, split_tickets(q.device), num_splits,
        int(fused), *bound, *common, *mid_o.stride()[:3], *mid_lse.stride(), *so, *sl, qk_scale, **meta,
    )
    if not fused:
        merge_splits(mid_o, mid_lse, out, lse)
    return out, lse


def decode_plan(batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                max_context: int, *, equal_lengths: bool = False, tma: bool = False, num_splits: int | None = None,
                config: dict | None = None) -> tuple[int, dict]:
    """(num_splits, config) of a `paged_decode_attention` launch, from shapes alone; config["LEAN"] marks stream-K.

    Automatic where num_splits and config are None: one deep program per SM for equal lengths that fill the SMs
    once (`deep_splits`), on an H200 one per row for equal lengths of many rows (`waves_of_rows`), stream-K where it
    pays (`lean_pays_off`), else split-KV (`choose_num_splits`) with `decode_config`'s tiles (TMA pages where
    ``tma``, the caches' `tma_capable`)."""
    lean = False
    auto = num_splits is None and config is None
    deep = deep_splits(batch, num_kv_heads, max_context, head_dim, dtype, device) if auto and equal_lengths else 0
    if deep:
        num_splits, config = deep, deep_config(device)
    elif auto and equal_lengths and waves_of_rows(batch, num_kv_heads, max_context, head_dim, dtype, device):
        num_splits, config = 1, DEEP_DECODE
    elif num_splits is None:
        block_n = config["BLOCK_N"] if config is not None else decode_config(head_dim, dtype)["BLOCK_N"]
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, device, block_n)
        lean = auto and lean_pays_off(batch, num_kv_heads, num_splits, device, equal_lengths, max_context)
    if not (1 <= num_splits <= 1024):
        raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")
    if lean:
        return num_splits, lean_config(head_dim, dtype, device)
    cfg = config or decode_config(head_dim, dtype, num_splits > 1, batch * num_kv_heads * num_splits, tma, device)
    return num_splits, dict(cfg)


def _launch_lean(q, k_cache, v_cache, block_table, seq_lens, out, lse, qk_scale, cfg, meta):
    """Stream-K launch (`paged_decode_lean_kernel`): cfg["PER_SM"] programs per SM (default two) of equal key
    tile ranges over every (sequence, kv head) row."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if B > LEAN_MAX_SEQS or B * Hkv > MAX_TICKETS:
        raise ValueError(f"a stream-K decode takes at most {LEAN_MAX_SEQS} sequences, got {B}")
    programs = cfg.get("PROGRAMS") or (3 if is_interpreter() else cfg.get("PER_SM", 2) * num_sms(q.device))
    programs = cdiv(programs, Hkv) * Hkv  # the same number per kv head
    part_o = torch.empty(programs, 2, meta["BLOCK_H"], D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(programs, 2, meta["BLOCK_H"], dtype=torch.float32, device=q.device)
    meta = {k: v for k, v in meta.items() if k != "HEADS_FASTEST"}
    paged_decode_lean_kernel[(programs,)](
        q, k_cache, v_cache, block_table, seq_lens, out, lse, part_o, part_lse, split_tickets(q.device),
        B, Hkv, *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        *out.stride()[:2], *lse.stride(), qk_scale, MAX_SEQS=LEAN_MAX_SEQS, **meta,
    )
    return out, lse


def merges_in_kernel(num_splits: int, rows: int, allowed: bool = True) -> bool:
    """Whether a launch of `num_splits` splits over `rows` (sequence, kv head) pairs merges them itself."""
    return bool(allowed) and 1 < num_splits <= FUSED_MERGE_MAX_SPLITS and rows <= MAX_TICKETS


def split_tickets(device: torch.device) -> torch.Tensor:
    """Zeroed int32 [MAX_TICKETS] split-ticket counters of the fused merge (kernels leave them zeroed), one buffer
    per (device, calling thread, current stream): launches that share one are ordered on one stream.

    Keyed by thread as well because streams are pooled (two threads' streams can be the same handle) and a CUDA
    graph replays, on the engine thread's stream, the buffer of its capture stream: an engine thread replaying
    decode graphs while a slice-server thread decodes on a side stream must not share counters."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), threading.get_ident(), stream)
    buf = _tickets.get(key)
    if buf is None:
        buf = _tickets[key] = torch.zeros(MAX_TICKETS, dtype=torch.int32, device=device)
    return buf


def split_partials(B: int, Hq: int, S: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for S split partials: fp32 [B, Hq, S, D] and [B, Hq, S], views of buffers whose split dim is padded to
    >= 16, so that their strides fall in the same divisibility class whatever S is (one compiled variant)."""
    pad = max(16, S)
    mid_o = torch.empty(B, Hq, pad, D, dtype=torch.float32, device=device)
    mid_lse = torch.empty(B, Hq, pad, dtype=torch.float32, device=device)
    return mid_o[:, :, :S], mid_lse[:, :, :S]


def merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Combine split partials mid_o fp32 [B, Hq, S, D], mid_lse fp32 [B, Hq, S] into out [B, Hq, D], lse [B, Hq].
    Two compiled variants, by the chunk of splits read at once (`MERGE_CHUNKS`: the smallest that holds S); any S
    is correct (a chunk at a time, the last masked)."""
    B, Hq, S, D = mid_o.shape
    chunk = next((c for c in MERGE_CHUNKS if S <= c), MERGE_CHUNKS[-1])
    merge_splits_kernel[(B, Hq)](
        mid_o, mid_lse, out, lse,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        S, CHUNK=chunk, HEAD_DIM=D, num_warps=1 if is_interpreter() else 4,
    )
