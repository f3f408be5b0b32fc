"""Launcher: POD-Attention style fused attention of a hybrid batch (prefill chunks + decodes, one launch); its tiles
and the rule for when a hybrid batch fuses are in `pod_schedule`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from ..utils import (
    cdiv,
    check_tensor,
    cuda_capability,
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
from .decode_schedule import choose_num_splits, tma_layout
from .paged_common import fast_offsets
from .pod_kernel import pod_attention_kernel
from .pod_schedule import (
    POD_DECODE_TOKENS_PER_SPLIT,
    WS_CONFIG,
    WS_CP_ASYNC,
    WS_MIN_SPLIT_KEYS,
    pod_config,
    pod_rule,
    ws_items_per_sm,
    ws_serves_shape,
)
from .prefill import paged_prefill_attention, validate_prefill_inputs

SMID_SLOTS = 1024

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
    max_seqlen_q host int; out optional [Tq, Hq, D]; lse optional fp32 [Tq, Hq]; max_seq_len optional host upper
    bound of seq_lens (prefix + chunk), which lets the fused launch size its decode split (`ws_items_per_sm`).
    """

    q: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    max_seqlen_q: int
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    max_seq_len: int | None = None


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
    decode split's target, else `ws_items_per_sm`) for the warp-specialized kernel, which must serve the inputs
    (`ws_capable`), for tuning.
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
    if prefill.max_seq_len is not None and not (isinstance(prefill.max_seq_len, int) and prefill.max_seq_len >= 1):
        raise ValueError(f"prefill.max_seq_len must be a positive int or None, got {prefill.max_seq_len!r}")
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
    # the descriptor reads only the base's pointer and dtype: no 2-D view needed
    return [TensorDescriptor(c, [nb * page, hkv * d], [hkv * d, 1], [page, d], layout) for c in (k_cache, v_cache)]


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
    ITEMS_PER_SM): one CTA per SM, decode split so that there are about `ws_items_per_sm` items per SM, partials
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
        items_per_sm = ws_items_per_sm(pq.shape[0], prefill.max_seq_len, prefill.max_seqlen_q, Bd, max_ctx, Hq, Hkv,
                                       D, pq.element_size(), pod_rule(pq.device))
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
