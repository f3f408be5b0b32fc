"""Launcher: POD-Attention style fused attention of a hybrid batch (prefill chunks + decodes, one launch)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from ..utils import (
    cdiv,
    check_tensor,
    cuda_capability,
    is_h200,
    is_interpreter,
    next_power_of_2,
    num_sms,
    register_cap,
    resident_programs,
)
from .decode import (
    dot_precision,
    merge_splits,
    merges_in_kernel,
    paged_decode_attention,
    split_partials,
    split_tickets,
)
from .decode_schedule import choose_num_splits, decode_config, tma_layout
from .paged_common import fast_offsets
from .pod_kernel import pod_attention_kernel
from .prefill import paged_prefill_attention, prefill_config, validate_prefill_inputs

SMID_SLOTS = 1024
POD_DECODE_TOKENS_PER_SPLIT = 4096  # keeps a decode work item about as long as a prefill tile

# Warp-specialized Gluon kernel (Hopper): per CTA (one per SM) 8 prefill warps fed by a one-warp cp.async loader,
# and three one-warp decode partitions; three 64-key prefill stages, two 32-key stages per decode warp. Against the
# design before (four decode warps, prefill warps copying their own K/V), the loader made the prefill warps alone
# 1.11-1.19x faster and overlapping their softmax with the next Q K^T wgmma a further 1.03x, 0.95-0.96x the prefill
# kernel (1xH100, bench/results/experiments/pod-ws-loader-20261128.json, pod-ws-loader-overlap-20261128.json).
# P_TMA: the loader copies pages by TMA (16 instructions a 64-key tile instead of 64 cp.async a thread): the prefill
# warps alone went from 0.94-0.99x the prefill kernel to 1.00-1.07x. D_TMA: each decode warp copies its pages by TMA
# too (one page a tile; 4 instructions instead of 16 cp.async a thread): fused 1.00-1.65x the two kernels against
# 0.97-1.37x without (8 hybrid batches; a third decode stage or twice the decode splits did not add). 1xH100, one
# lease, bench/results/tune-attention-nvidia-h100-80gb-hbm3-20261128T031847Z.json. Both need caches
# `ws_tma_serves` accepts; the kernel copies by cp.async where it does not. D_STAGES 4 with D_TMA needs 240 KB of
# shared memory, more than an H100 has.
# Then Q in the prefill warps' registers instead of a 32 KB shared tile, which made room for 32-key decode tiles (two
# pages by TMA: each tile's 32 MMAs run in independent chains and its softmax, barrier and wait come once per 32 keys)
# and, the decode warpgroup at 120 registers, left the prefill warps 192 (no spills): fused 1.09-1.71x the two kernels
# against 0.99-1.59x on the same 8 hybrid batches, 3-19% faster on each, the prefill warps alone 1.06-1.15x the
# prefill kernel against 1.03-1.11x (1xH200, one lease, tune-attention-nvidia-h200-20261129T021411Z.json). 32-key
# tiles with Q in shared memory need 240 KB; with two prefill stages they fit but the prefill warps ran 0.63-0.83x
# (...T020237Z.json). Not measured on an H100.
WS_CONFIG = dict(P_BLOCK_M=128, P_BLOCK_N=64, P_STAGES=3, P_TMA=True, D_BLOCK_H=16, D_BLOCK_N=32, D_STAGES=2,
                 D_TMA=True, D_REGS=120, num_warps=8)
# Caches TMA cannot serve are copied by cp.async, with these tiles: a 32-key cp.async decode tile spills 876 bytes a
# thread at 120 registers, a 16-key one 112 at 128 (sm_90 build under Triton 3.6; not timed).
WS_CP_ASYNC = dict(P_TMA=False, D_TMA=False, D_BLOCK_N=16, D_REGS=128)
# GQA groups up to 8 (the GPU tests cover 1, 4 and 8): a group of 16 at head_dim 128 spills in the decode warps (528
# bytes, sm_90 build), and no GPU test covers it; the Triton POD kernel or the two kernels serve it.
WS_MAX_GROUP = 8
WS_ITEMS_PER_SM = 8  # decode splits: about this many (sequence, kv head, split) items per SM ...
WS_MIN_SPLIT_KEYS = 512  # ... while each split keeps at least this many keys


@dataclass(frozen=True)
class PodRule:
    """When a hybrid batch fuses (`pod_pays_off`): the ratio of its prefill half's estimated time (causal FLOPs at
    ``prefill_flops_per_s``) to its decode half's (K/V bytes at ``decode_bytes_per_s``) lies in [low, high]."""

    low: float
    high: float
    prefill_flops_per_s: float
    decode_bytes_per_s: float


# From the kernel benchmark's hybrid table (1xH100, 77c5718, bench/results/kernels-20261128-032707.json, CUDA
# graphs): with the estimated ratio in [0.1, 30] the warp-specialized kernel ran 1.08-1.61x the two kernels in
# sequence (23 of 27 batches; 1.30-1.61x at 0.4-1.7); below 0.06, decode-dominated, 0.99-1.04x (even: left to the
# two kernels).
POD_RULE_H100 = PodRule(0.1, 30.0, 440e12, 3.0e12)
# On an H200 (HBM3e: decode bytes at its 4.3 TB/s copy bandwidth) the kernel at 721c196 ran 1.03-1.73x the two
# kernels on 26 of the same 27 batches, estimated ratios 0.037-38.8, and 1.001x on the last, at 0.018
# (bench/results/kernels-20261129-022402.json). The H100 rule, applied there, left out four of them: three that ran
# 1.03-1.12x and the 1.001x one.
POD_RULE_H200 = PodRule(0.03, 50.0, 440e12, 4.3e12)


def pod_rule(device: torch.device) -> PodRule:
    """The fusing rule measured on this GPU's kind (`POD_RULE_H200` on an H200, else `POD_RULE_H100`)."""
    return POD_RULE_H200 if is_h200(device) else POD_RULE_H100


# Gluon (triton.experimental) renames its API between releases (Triton 3.9: thread_barrier -> barrier,
# async_copy_global_to_shared -> async_load), so the warp-specialized kernel runs only under the Triton it is written
# for and was validated with on an H100; under any other the Triton POD kernel serves every launch.
WS_TRITON = "3.6."


def ws_supported_triton(version: str) -> bool:
    """Whether the warp-specialized kernel's Gluon API is that of Triton ``version``."""
    return version.startswith(WS_TRITON)


try:
    from .pod_ws_kernel import pod_ws_kernel
    _GLUON = ws_supported_triton(triton.__version__)
except Exception:  # noqa: BLE001 -- any import or API mismatch means "not available"
    pod_ws_kernel, _GLUON = None, False


@dataclass
class PrefillArgs:
    """Prefill half of a hybrid batch (same meaning as `paged_prefill_attention`).

    q [Tq, Hq, D]; block_table int32 [Bp, *]; cu_seqlens_q int32 [Bp + 1]; seq_lens int32 [Bp];
    max_seqlen_q host int; out optional [Tq, Hq, D]; lse optional fp32 [Tq, Hq].
    """

    q: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    max_seqlen_q: int
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None


@dataclass
class DecodeArgs:
    """Decode half of a hybrid batch (same meaning as `paged_decode_attention`).

    q [Bd, Hq, D]; block_table int32 [Bd, *]; seq_lens int32 [Bd]; out optional [Bd, Hq, D]; lse optional
    fp32 [Bd, Hq]; num_splits None = automatic; max_seq_len optional host upper bound of seq_lens.
    """

    q: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    num_splits: int | None = None
    max_seq_len: int | None = None


_resident: dict[tuple, int] = {}  # (device, compile-time parameters) -> programs resident per SM (persistent grid)


def pod_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the fused kernel: prefill and decode CTAs of similar size so >= 2 co-reside per SM."""
    if is_interpreter():
        p, d = prefill_config(head_dim, dtype, torch.device("cpu")), decode_config(head_dim, dtype)
        return dict(P_BLOCK_M=p["BLOCK_M"], P_BLOCK_N=p["BLOCK_N"], D_BLOCK_N=d["BLOCK_N"], num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return dict(P_BLOCK_M=64, P_BLOCK_N=32, D_BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(P_BLOCK_M=64, P_BLOCK_N=64, D_BLOCK_N=64, num_warps=4, num_stages=3)  # bench/tune_attention.py


def pod_pays_off(prefill_q_lens: list[int], prefill_seq_lens: list[int], decode_seq_lens: list[int],
                 num_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int,
                 rule: PodRule = POD_RULE_H100) -> bool:
    """Whether a hybrid batch should run fused: the ratio of its prefill half's estimated time (causal FLOPs of
    each chunk over its cached prefix) to its decode half's (K/V bytes read) lies in ``rule``'s band (the
    GPU's: `pod_rule`)."""
    flops = 4 * num_heads * head_dim * sum(q * (s - q / 2) for q, s in zip(prefill_q_lens, prefill_seq_lens))
    t_p = flops / rule.prefill_flops_per_s
    t_d = sum(decode_seq_lens) * 2 * num_kv_heads * head_dim * elem_bytes / rule.decode_bytes_per_s
    return t_d > 0 and rule.low <= t_p / t_d <= rule.high


def ws_serves_shape(group: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the warp-specialized kernel is built and tested for this shape: 16-bit, head_dim 64 or 128, GQA groups
    (query heads per kv head) of at most WS_MAX_GROUP."""
    return dtype in (torch.bfloat16, torch.float16) and head_dim in (64, 128) and 1 <= group <= WS_MAX_GROUP


def ws_capable(k_cache: torch.Tensor, group: int, *tensors: torch.Tensor) -> bool:
    """Whether the warp-specialized kernel serves these inputs: the Triton it is written for (`ws_supported_triton`),
    an sm_90 GPU, a shape `ws_serves_shape` accepts, and the cache and ``tensors`` (v cache, the prefill / decode q
    and out) 16-byte aligned: pointers and strides in multiples of 16 elements, for cp.async."""
    if not _GLUON or is_interpreter() or not k_cache.is_cuda or cuda_capability(k_cache.device) != (9, 0):
        return False
    if not ws_serves_shape(group, k_cache.shape[-1], k_cache.dtype):
        return False
    return all(t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride()[:-1]) for t in (k_cache, *tensors))


def pod_attention(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefill: PrefillArgs,
    decode: DecodeArgs,
    *,
    scale: float,
    config: dict | None = None,
    ws_config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused prefill + decode attention over one layer's paged KV cache in a single kernel launch.

    k_cache, v_cache: [num_blocks, block_size, Hkv, D] shared by both halves (one layer).
    prefill: PrefillArgs (q [Tq, Hq, D] ...);  decode: DecodeArgs (q [Bd, Hq, D] ...).
    One persistent program per resident slot of every SM: the first on each SM takes prefill tiles, the others
    decode tiles, each moving to the other kind when its own runs out (%smid on CUDA, program ids under the
    interpreter, where 3 programs run so that each takes both kinds).
    On an sm_90 GPU (`ws_capable`) the launch is the warp-specialized Gluon kernel (`pod_ws_kernel`): per CTA, 8
    warps of prefill tiles fed by a one-warp K/V loader, beside three one-warp decode partitions with their own
    K/V rings, pages copied by TMA (`ws_tma_serves`) or cp.async; elsewhere, or with ``config``, the Triton kernel
    below.
    config: tile-size override of the Triton kernel (keys of `pod_config`; `maxnreg` caps registers), for tuning.
    ws_config: overrides of `WS_CONFIG` (tiles, stages, TMA or cp.async copies, decode registers; ITEMS_PER_SM, the
    decode split's target) for the warp-specialized kernel, which must serve the inputs (`ws_capable`), for tuning.
    Returns (prefill_out [Tq, Hq, D], prefill_lse [Tq, Hq], decode_out [Bd, Hq, D], decode_lse [Bd, Hq]);
    the math is that of `paged_prefill_attention` / `paged_decode_attention` (only tile sizes differ on GPU).
    Split-KV decode partials are merged in the same launch when `merges_in_kernel` says so, else by a second one.
    No host syncs; scratch sizes depend on shapes only.
    """
    pq, dq = prefill.q, decode.q
    Tq, Hq, D, Bp = validate_prefill_inputs(
        pq, k_cache, v_cache, prefill.block_table, prefill.cu_seqlens_q, prefill.seq_lens, prefill.max_seqlen_q
    )
    check_tensor("decode.q", dq, 3, (pq.dtype,))
    check_tensor("decode.block_table", decode.block_table, 2, (torch.int32,))
    check_tensor("decode.seq_lens", decode.seq_lens, 1, (torch.int32,))
    Bd = dq.shape[0]
    if dq.shape[1:] != (Hq, D):
        raise ValueError(f"decode.q must be [Bd, {Hq}, {D}], got {tuple(dq.shape)}")
    if decode.block_table.shape[0] != Bd or decode.seq_lens.shape[0] != Bd:
        raise ValueError(f"decode.block_table / decode.seq_lens must have Bd={Bd} rows")
    if dq.device != pq.device or decode.block_table.device != pq.device or decode.seq_lens.device != pq.device:
        raise ValueError("prefill and decode tensors must be on one device")
    cfg = pod_config(D, pq.dtype) if config is None else config
    num_m = cdiv(prefill.max_seqlen_q, cfg["P_BLOCK_M"])
    if Bp == 0 or Tq == 0 or num_m == 0 or Bd == 0:
        po, plse = paged_prefill_attention(
            pq, k_cache, v_cache, prefill.block_table, prefill.cu_seqlens_q, prefill.seq_lens, scale=scale,
            max_seqlen_q=prefill.max_seqlen_q, out=prefill.out, lse=prefill.lse,
        )
        do, dlse = paged_decode_attention(
            dq, k_cache, v_cache, decode.block_table, decode.seq_lens, scale=scale, out=decode.out,
            lse=decode.lse, num_splits=decode.num_splits, max_seq_len=decode.max_seq_len,
        )
        return po, plse, do, dlse

    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    po = torch.empty_like(pq) if prefill.out is None else prefill.out
    plse = torch.empty(Tq, Hq, dtype=torch.float32, device=pq.device) if prefill.lse is None else prefill.lse
    do = torch.empty_like(dq) if decode.out is None else decode.out
    dlse = torch.empty(Bd, Hq, dtype=torch.float32, device=pq.device) if decode.lse is None else decode.lse
    for name, t, shape in (("prefill.out", po, pq.shape), ("decode.out", do, dq.shape)):
        if t.shape != shape or t.dtype != pq.dtype or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {tuple(shape)} {pq.dtype} with a contiguous last dim")
    for name, t, shape in (("prefill.lse", plse, (Tq, Hq)), ("decode.lse", dlse, (Bd, Hq))):
        if t.shape != shape or t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 {list(shape)}")

    max_ctx = decode.max_seq_len if decode.max_seq_len is not None else decode.block_table.shape[1] * page
    ws = config is None and ws_capable(k_cache, Hq // Hkv, v_cache, pq, dq, po, do)
    if ws_config is not None and not ws:
        raise ValueError("ws_config needs the warp-specialized kernel (ws_capable inputs on sm_90, no config)")
    if ws:
        _launch_ws(k_cache, v_cache, prefill, decode, po, plse, do, dlse, max_ctx, scale,
                   WS_CONFIG if ws_config is None else {**WS_CONFIG, **ws_config})
        return po, plse, do, dlse
    splits = decode.num_splits
    if splits is None:
        splits = max(choose_num_splits(Bd, Hkv, max_ctx, pq.device, cfg["D_BLOCK_N"]),
                     min(64, cdiv(max_ctx, POD_DECODE_TOKENS_PER_SPLIT)))
    if not (1 <= splits <= 1024):
        raise ValueError(f"num_splits must be in [1, 1024], got {splits}")
    fused_merge = merges_in_kernel(splits, Bd * Hkv, cfg.get("D_FUSED_MERGE", True))
    if splits == 1:
        d_o, d_l, d_strides = do, dlse, (*do.stride()[:2], 0, *dlse.stride(), 0)
    else:
        d_o, d_l = split_partials(Bd, Hq, splits, D, pq.device)
        d_strides = (*d_o.stride()[:3], *d_l.stride())

    use_smid = pq.is_cuda and not is_interpreter()
    counters = torch.zeros(2 + SMID_SLOTS, dtype=torch.int32, device=pq.device)
    n_prefill = num_m * Hq * Bp
    n_decode = Bd * Hkv * splits
    constants = dict(
        GROUP=Hq // Hkv, HEAD_DIM=D, PAGE_SIZE=page,
        P_BLOCK_M=cfg["P_BLOCK_M"], P_BLOCK_N=cfg["P_BLOCK_N"],
        D_BLOCK_H=max(16, next_power_of_2(Hq // Hkv)), D_BLOCK_N=cfg["D_BLOCK_N"],
        USE_SMID=use_smid, SMID_SLOTS=SMID_SLOTS, DOT_PRECISION=dot_precision(pq.dtype),
        FAST_OFFSETS=fast_offsets(k_cache, v_cache),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    constants.update(register_cap(cfg, pq.device))
    key = (pq.device, pq.dtype, tuple(sorted(constants.items())))
    slots_per_sm = _resident.get(key, 2)
    grid = min(n_prefill + n_decode, slots_per_sm * num_sms(pq.device) if use_smid else 3)
    compiled = pod_attention_kernel[(grid,)](
        pq, dq, k_cache, v_cache,
        prefill.block_table, prefill.cu_seqlens_q, prefill.seq_lens, decode.block_table, decode.seq_lens,
        po, plse, d_o, d_l, do, dlse, split_tickets(pq.device), counters,
        n_prefill, n_decode, Hq, num_m, Bp, Hkv, slots_per_sm, splits, int(fused_merge),
        *pq.stride()[:2], *dq.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
        prefill.block_table.stride(0), decode.block_table.stride(0), *po.stride()[:2], *plse.stride(),
        *d_strides, *do.stride()[:2], *dlse.stride(),
        float(scale) * 1.4426950408889634, **constants,
    )
    if use_smid and key not in _resident and compiled is not None:
        _resident[key] = resident_programs(compiled, pq.device)
    if splits > 1 and not fused_merge:
        merge_splits(d_o, d_l, do, dlse)
    return po, plse, do, dlse


def ws_tma_serves(k_cache: torch.Tensor, v_cache: torch.Tensor, cfg: dict) -> str | None:
    """Why the warp-specialized kernel's TMA copies (``cfg``'s P_TMA / D_TMA) cannot serve these caches, or None:
    they need caches in `tma_layout`, pages of at least 8 keys that divide P_BLOCK_N, and for D_TMA pages that
    divide D_BLOCK_N."""
    page = k_cache.shape[1]
    if not tma_layout(k_cache, v_cache):
        return "TMA needs the caches in `tma_layout` (contiguous [num_blocks, block_size, Hkv, D])"
    if cfg["P_TMA"] and (page < 8 or cfg["P_BLOCK_N"] % page):
        return f"P_TMA needs pages of >= 8 keys that divide P_BLOCK_N={cfg['P_BLOCK_N']}, got {page}"
    if cfg["D_TMA"] and cfg["D_BLOCK_N"] % page:
        return f"D_TMA needs pages that divide D_BLOCK_N={cfg['D_BLOCK_N']}, got {page}"
    return None


def _ws_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, cfg: dict) -> list:
    """Gluon TMA descriptors of the [num_blocks * block_size, Hkv * D] views of the caches, box one page of one kv
    head, for the warp-specialized kernel's TMA copies (``cfg``: `WS_CONFIG`'s P_TMA / D_TMA); ValueError where
    `ws_tma_serves` says they cannot serve."""
    why = ws_tma_serves(k_cache, v_cache, cfg)
    if why:
        raise ValueError(why)
    return _tma_page_descriptors(k_cache, v_cache)


def _tma_page_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor) -> list:
    """`_ws_descriptors` without the check, for a launch that has made it."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    nb, page, hkv, d = k_cache.shape
    layout = _page_layout(page, d, k_cache.dtype)
    return [TensorDescriptor(c.view(nb * page, hkv * d), [nb * page, hkv * d], [hkv * d, 1], [page, d], layout)
            for c in (k_cache, v_cache)]


@functools.cache
def _page_layout(page: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout of a [page, head_dim] TMA box, built once per shape: building it on every launch
    took a third of the descriptors' host time (15 us against 9 us a launch on a 2-core CPU, in Python)."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for([page, head_dim], gl.bfloat16 if dtype == torch.bfloat16
                                                else gl.float16)


def _launch_ws(k_cache, v_cache, prefill: PrefillArgs, decode: DecodeArgs, po, plse, do, dlse, max_ctx: int,
               scale: float, cfg: dict) -> None:
    """The warp-specialized launch (inputs validated, outputs allocated; ``cfg`` as `WS_CONFIG`, plus for tuning
    ITEMS_PER_SM): one CTA per SM, decode split so that there are about WS_ITEMS_PER_SM items per SM, partials
    merged by a second launch; TMA copies only where `ws_tma_serves`, else cp.async."""
    pq, dq = prefill.q, decode.q
    _, Hq, D = pq.shape
    Bp, Bd = prefill.seq_lens.shape[0], dq.shape[0]
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    sms = num_sms(pq.device)
    splits = decode.num_splits
    if "ITEMS_PER_SM" in cfg:
        cfg = dict(cfg)
        items_per_sm = cfg.pop("ITEMS_PER_SM")
    else:
        items_per_sm = WS_ITEMS_PER_SM
    if splits is None:
        splits = max(1, min(cdiv(items_per_sm * sms, Bd * Hkv), cdiv(max_ctx, WS_MIN_SPLIT_KEYS), 64))
    if not (1 <= splits <= 1024):
        raise ValueError(f"num_splits must be in [1, 1024], got {splits}")
    tma = cfg["P_TMA"] or cfg["D_TMA"]
    if tma and ws_tma_serves(k_cache, v_cache, cfg):
        cfg, tma = {**cfg, **WS_CP_ASYNC}, False
    if splits == 1:
        d_o, d_l, d_strides = do, dlse, (*do.stride()[:2], 0, *dlse.stride(), 0)
    else:
        d_o, d_l = split_partials(Bd, Hq, splits, D, pq.device)
        d_strides = (*d_o.stride()[:3], *d_l.stride())
    num_m = cdiv(prefill.max_seqlen_q, cfg["P_BLOCK_M"])
    counters = torch.zeros(1, dtype=torch.int32, device=pq.device)
    descs = _tma_page_descriptors(k_cache, v_cache) if tma else (k_cache, v_cache)  # checked above
    pod_ws_kernel[(sms,)](
        pq, dq, k_cache, v_cache, *descs, prefill.block_table, prefill.cu_seqlens_q, prefill.seq_lens,
        decode.block_table, decode.seq_lens, po, plse, d_o, d_l, counters,
        num_m * Hq * Bp, Bd * Hkv * splits, Hq, num_m, Bp, Hkv, splits,
        *pq.stride()[:2], *dq.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
        prefill.block_table.stride(0), decode.block_table.stride(0), *po.stride()[:2], *plse.stride(),
        *d_strides, float(scale) * 1.4426950408889634,
        GROUP=Hq // Hkv, HEAD_DIM=D, PAGE_SIZE=page, D_NH=max(8, next_power_of_2(Hq // Hkv)), **cfg,
    )
    if splits > 1:
        merge_splits(d_o, d_l, do, dlse)
