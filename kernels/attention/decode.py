"""Launcher: paged decode attention (one query token per sequence), split-KV for long contexts."""

from __future__ import annotations

import math
import threading

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ..utils import (
    cdiv,
    check_same_device,
    check_tensor,
    is_hopper,
    is_interpreter,
    is_power_of_2,
    next_power_of_2,
    num_sms,
)
from .decode_kernel import merge_splits_kernel, paged_decode_kernel
from .decode_lean_kernel import paged_decode_lean_kernel
from .decode_tma_kernel import paged_decode_tma_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 256
MAX_TICKETS = 1 << 14  # (sequence, kv head) pairs a fused-merge launch can count; larger batches merge separately
# The in-kernel merge reads a row's splits one after another: a win up to 8 splits (one launch fewer), slower than
# the merge kernel's parallel read at 64 (1xH100, bench/tune_attention.py --merge)
FUSED_MERGE_MAX_SPLITS = 8
LEAN_MAX_SEQS = 1024  # sequences a stream-K launch takes (its programs hold every sequence's tile offset)
_tickets: dict[tuple[str, int, int], torch.Tensor] = {}  # (device, thread, stream) -> split_tickets buffer


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 inputs, irrelevant for 16-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_config(head_dim: int, dtype: torch.dtype, split: bool = False, programs: int = 0, tma: bool = False,
                  device: torch.device | None = None) -> dict:
    """BLOCK_N / num_warps / num_stages (and TMA) of the decode kernel (one small config under the interpreter).

    split: a launch whose keys are split (num_splits > 1); programs: its (sequence, kv head, split) work items;
    tma: the cache can be read by descriptors (`tma_capable`), on ``device``."""
    if is_interpreter():
        return dict(BLOCK_N=16, num_warps=1, num_stages=1, HEADS_FASTEST=True)
    if head_dim == 128 and dtype != torch.float32:
        slots = num_sms(device) if device is not None else 132
        # By programs per SM, on an H100 (bench/tune_attention.py --tma, 20261127T151205Z and T151715Z, batch
        # 16-256 over 8k-128k keys, CUDA graphs):
        if tma and programs > 4 * slots:
            # many waves: two TMA pages a tile, 6 stages. 1.000-1.001x SDPA at 256 x 8k (pointer tiles 0.993-0.996)
            return dict(BLOCK_N=32, num_warps=4, num_stages=6, TMA=True, HEADS_FASTEST=True)
        if tma and programs > 2 * slots:
            # up to four programs per SM: one TMA page a tile, 2 warps, 6 stages (48 KiB). 1.007-1.014x SDPA at
            # 64 x 8k / 32k (pointer tiles 0.981-0.988)
            return dict(BLOCK_N=16, num_warps=2, num_stages=6, TMA=True, HEADS_FASTEST=True)
        if split or 0 < programs <= 2 * slots:
            # up to two programs per SM: 32-key tiles, 5 stages (80 KiB). At 16 x 8k / 32k / 128k split in two:
            # 0.969 / 1.001 / 1.002x SDPA (TMA tiles at best 0.970 / 1.003 / 1.008)
            return dict(BLOCK_N=32, num_warps=4, num_stages=5, HEADS_FASTEST=True)
    block_n = 64 if head_dim <= 128 else 32
    if dtype == torch.float32:
        block_n //= 2
    # HEADS_FASTEST: 0-1.2% faster on an H100 at batch 16-256, 8k-32k keys (bench/tune_attention.py --orders)
    return dict(BLOCK_N=block_n, num_warps=4, num_stages=3 if head_dim <= 128 else 2, HEADS_FASTEST=True)


def decode_variants(head_dim: int, dtype: torch.dtype, device: torch.device, tma: bool) -> list[dict]:
    """Every config the automatic choice of `paged_decode_attention` can pick for these shapes (split or not, each
    programs-per-SM range, TMA or not, stream-K or not): what a warm-up compiles."""
    slots = num_sms(device)
    out: list[dict] = []
    for split in (False, True):
        for programs in (slots, 3 * slots, 5 * slots):  # <= 2, <= 4, > 4 programs per SM
            for cfg in (decode_config(head_dim, dtype, split, programs, tma, device),
                        {**decode_config(head_dim, dtype, split, programs, False, device), "LEAN": True}):
                if cfg not in out:
                    out.append(cfg)
    return out


def tma_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the caches are contiguous [num_blocks, block_size, Hkv, D] rows (the engine's layout), 16-byte
    aligned: what `tma_descriptors` needs."""
    nb, page, hkv, d = k_cache.shape
    return all(c.stride() == (page * hkv * d, hkv * d, d, 1) and c.data_ptr() % 16 == 0 for c in (k_cache, v_cache))


def tma_capable(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether decode reads these caches by TMA by default: Hopper, 16-bit, 16-token pages of head_dim 128 (the
    tuned case) in `tma_layout`."""
    return (k_cache.is_cuda and not is_interpreter() and is_hopper(k_cache.device) and k_cache.shape[1] == 16
            and k_cache.shape[3] == 128 and k_cache.dtype in (torch.float16, torch.bfloat16)
            and tma_layout(k_cache, v_cache))


def tma_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor) -> list:
    """Descriptors of the [num_blocks * block_size, Hkv * D] views of the caches, box one page of one kv head."""
    nb, page, hkv, d = k_cache.shape
    return [TensorDescriptor(c, [nb * page, hkv * d], [hkv * d, 1], [page, d]) for c in (k_cache, v_cache)]


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device, block_n: int) -> int:
    """Split-KV factor from shapes only (no host sync): the fewest splits (powers of two, each >= 256 keys) that
    fill two resident programs per SM (one wave if that is well quantised, else as few as it takes).

    Fewer splits win ties: at batch 16 (128 (sequence, kv head) pairs) two splits, one wave, ran 2-4% faster than
    four, two waves (1xH100, bench/tune_attention.py --merge 20261127T122147Z, T123025Z, --tma T151715Z)."""
    work = batch * num_kv_heads
    cap = max(1, min(MAX_SPLITS, cdiv(max_context, max(MIN_TOKENS_PER_SPLIT, block_n))))
    slots = 2 * num_sms(device)
    if work >= slots:
        return 1
    best, best_eff, s = 1, 0.0, 1
    while s <= cap:
        progs = work * s
        eff = progs / (math.ceil(progs / slots) * slots)
        if eff > best_eff + 0.02:
            best, best_eff = s, eff
        if progs >= slots and eff >= 0.85:  # a full wave or more, well quantised: more splits only add waves
            break
        s *= 2
    return best


def lean_pays_off(batch: int, num_kv_heads: int, num_splits: int, device: torch.device, uniform: bool) -> bool:
    """Whether a decode runs stream-K (`decode_lean_kernel`) instead of split-KV by ``num_splits``.

    Never for fewer rows (sequence, kv head) than a tenth of the two-per-SM program slots: a row would be cut into
    many pieces, merged one by one. Otherwise always for batches of unequal or unknown lengths, the serving case: on
    1xH100, 8 kv heads, lengths uniform in [512, 32k], stream-K ran 1.17-1.49x faster than split-KV from 4 to 128
    sequences (0.87x at 2). For lengths known equal, only where the split launch fills its wave of programs badly
    (under 90%) or needs more than one, and the rows number at least a quarter of the slots: there stream-K ran
    1.02-1.05x SDPA against split-KV's 0.86-0.88x (24 sequences over 8k / 32k keys), while split-KV stays ahead where
    it fills one wave (16 x 8k: 0.98x SDPA against 0.93x). bench/tune_attention.py --lean, 20261127T154957Z and
    T155223Z."""
    rows, slots = batch * num_kv_heads, 2 * num_sms(device)
    if 10 * rows < slots or batch > LEAN_MAX_SEQS or rows > MAX_TICKETS:
        return False
    if not uniform:
        return True
    programs = rows * num_splits
    return rows < slots and (programs > slots or programs < 0.9 * slots) and 4 * rows >= slots


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
    max_seq_len: optional host-side upper bound of seq_lens (refines the automatic split); default
                 block_table.shape[1] * block_size.
    equal_lengths: the caller knows the seq_lens to be (nearly) equal, e.g. from a host copy; the automatic choice
                 then prefers split-KV (`lean_pays_off`). Default: unequal or unknown, as in serving.
    config:      tile-size override (keys of `decode_config`), for tuning.
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
    lean = False
    if num_splits is None:
        block_n = config["BLOCK_N"] if config is not None else decode_config(D, q.dtype)["BLOCK_N"]
        num_splits = choose_num_splits(B, Hkv, max_ctx, q.device, block_n)
        lean = config is None and lean_pays_off(B, Hkv, num_splits, q.device, equal_lengths)
    if not (1 <= num_splits <= 1024):
        raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")
    tma = tma_capable(k_cache, v_cache)
    cfg = config or decode_config(D, q.dtype, num_splits > 1, B * Hkv * num_splits, tma and not lean, q.device)
    if lean:
        cfg = {**cfg, "LEAN": True}
    if cfg.get("TMA") and not (tma_layout(k_cache, v_cache) and cfg["BLOCK_N"] in (page, 2 * page)):
        raise ValueError("a TMA decode config needs caches in `tma_layout` and BLOCK_N of one or two pages")
    qk_scale = float(scale) * 1.4426950408889634
    fused = merges_in_kernel(num_splits, B * Hkv, cfg.get("FUSED_MERGE", True))
    meta = dict(
        GROUP=group, BLOCK_H=max(16, next_power_of_2(group)), HEAD_DIM=D, PAGE_SIZE=page,
        BLOCK_N=cfg["BLOCK_N"], DOT_PRECISION=dot_precision(q.dtype),
        HEADS_FASTEST=bool(cfg.get("HEADS_FASTEST", True)), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if cfg.get("LEAN"):
        return _launch_lean(q, k_cache, v_cache, block_table, seq_lens, out, lse, qk_scale, cfg, meta)
    kernel, kv = ((paged_decode_tma_kernel, tma_descriptors(k_cache, v_cache)) if cfg.get("TMA")
                  else (paged_decode_kernel, (k_cache, v_cache)))
    # Strides read once per tensor (a launch's host time is mostly Python: eager hybrid steps pay it every layer)
    so, sl = out.stride()[:2], lse.stride()
    common = (*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0))
    grid = (Hkv, B, num_splits) if meta["HEADS_FASTEST"] else (B, Hkv, num_splits)
    if num_splits == 1:
        kernel[grid](
            q, *kv, block_table, seq_lens, out, lse, out, lse, seq_lens, 1, 0, *common,
            *so, 0, *sl, 0, *so, *sl, qk_scale, **meta,
        )
        return out, lse
    mid_o, mid_lse = split_partials(B, Hq, num_splits, D, q.device)
    kernel[grid](
        q, *kv, block_table, seq_lens, mid_o, mid_lse, out, lse, split_tickets(q.device), num_splits,
        int(fused), *common, *mid_o.stride()[:3], *mid_lse.stride(), *so, *sl, qk_scale, **meta,
    )
    if not fused:
        merge_splits(mid_o, mid_lse, out, lse)
    return out, lse


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
    One compiled variant serves every S <= MAX_SPLITS (the split rows are masked)."""
    B, Hq, S, D = mid_o.shape
    merge_splits_kernel[(B, Hq)](
        mid_o, mid_lse, out, lse,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        S, SPLITS_PAD=max(MAX_SPLITS, next_power_of_2(S)), HEAD_DIM=D, num_warps=1 if is_interpreter() else 4,
    )
