"""Whether and how a hybrid batch runs fused (`pod.pod_attention`), from shapes alone: the fusing rule per GPU
(`PodRule`, `pod_rule`, `pod_pays_off`), the warp-specialized kernel's tiles (`WS_CONFIG`) and the shapes it serves,
and the Triton POD kernel's tiles (`pod_config`). The numbers behind each are in the comments (bench/kernels.py,
bench/tune_attention.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils import is_h200, is_interpreter
from .decode_schedule import decode_config
from .prefill import prefill_config

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
# `pod.ws_tma_serves` accepts; the kernel copies by cp.async where it does not. D_STAGES 4 with D_TMA needs 240 KB of
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
# ... and twice as many where the card's rule has a decode-heavy band (`PodRule.decode_heavy`) and the halves'
# estimated time ratio, prefill / decode, lies in it: the last items, which the prefill warps take beside the decode
# warps once their tiles are done, are then shorter.
WS_ITEMS_PER_SM_DECODE_HEAVY = 16


@dataclass(frozen=True)
class PodRule:
    """When a hybrid batch fuses (`pod_pays_off`): the ratio of its prefill half's estimated time (causal FLOPs at
    ``prefill_flops_per_s``) to its decode half's (K/V bytes at ``decode_bytes_per_s``) lies in [low, high].
    ``decode_heavy``: the band of that ratio where the warp-specialized kernel splits its decodes finer
    (`ws_items_per_sm`); None where none was measured."""

    low: float
    high: float
    prefill_flops_per_s: float
    decode_bytes_per_s: float
    decode_heavy: tuple[float, float] | None = None


# From the kernel benchmark's hybrid table (1xH100, 77c5718, bench/results/kernels-20261128-032707.json, CUDA
# graphs): with the estimated ratio in [0.1, 30] the warp-specialized kernel ran 1.08-1.61x the two kernels in
# sequence (23 of 27 batches; 1.30-1.61x at 0.4-1.7); below 0.06, decode-dominated, 0.99-1.04x (even: left to the
# two kernels).
POD_RULE_H100 = PodRule(0.1, 30.0, 440e12, 3.0e12)
# On an H200 (HBM3e: decode bytes at its 4.3 TB/s copy bandwidth) the kernel at 721c196 ran 1.03-1.73x the two
# kernels on 26 of the same 27 batches, estimated ratios 0.037-38.8, and 1.001x on the last, at 0.018
# (bench/results/kernels-20261129-022402.json). The H100 rule, applied there, left out four of them: three that ran
# 1.03-1.12x and the 1.001x one.
# Its decode-heavy band, from four H200 leases (`bench/tune_attention.py --ws`-style sweeps, CUDA graphs, 16 decode
# items per SM against 8; bench/results/experiments/pod-items-per-sm-h200-20261129.json and
# tune-attention-nvidia-h200-20261129T102722Z.json): at estimated ratios 0.29-0.61 16 items ran 0.6-3.5% faster on
# four batches in all 12 timings (1024 @ 16k + 64 x 32k: 1.231 -> 1.265x the sequence, 1.189 -> 1.231x, 1.202 ->
# 1.222x; + 128 x 16k, + 64 x 16k, 512 @ 4k + 64 x 4k), 0.4-0.9% slower on 512 @ 4k + 16 x 16k (three timings) and
# 0.7% on 2048 @ 32k + 128 x 32k (one); outside the band (0.07, 1.2, 2.4) mostly slower, by up to 2.2%. Two identical
# launches differed by up to 2.2% on one of those leases.
POD_RULE_H200 = PodRule(0.03, 50.0, 440e12, 4.3e12, decode_heavy=(0.2, 0.7))


def pod_rule(device: torch.device) -> PodRule:
    """The fusing rule measured on this GPU's kind (`POD_RULE_H200` on an H200, else `POD_RULE_H100`)."""
    return POD_RULE_H200 if is_h200(device) else POD_RULE_H100


def pod_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the fused kernel: prefill and decode CTAs of similar size so >= 2 co-reside per SM."""
    if is_interpreter():
        p, d = prefill_config(head_dim, dtype, torch.device("cpu")), decode_config(head_dim, dtype)
        return dict(P_BLOCK_M=p["BLOCK_M"], P_BLOCK_N=p["BLOCK_N"], D_BLOCK_N=d["BLOCK_N"], num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return dict(P_BLOCK_M=64, P_BLOCK_N=32, D_BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(P_BLOCK_M=64, P_BLOCK_N=64, D_BLOCK_N=64, num_warps=4, num_stages=3)  # bench/tune_attention.py


def halves_ratio(prefill_query_keys: float, decode_keys: float, num_heads: int, num_kv_heads: int, head_dim: int,
                 elem_bytes: int, rule: PodRule) -> float | None:
    """A hybrid batch's estimated prefill time over its decode time: ``prefill_query_keys`` = sum over the chunks of
    q * (s - q / 2) (the causal query-key pairs of a q-token chunk over s keys) at ``rule.prefill_flops_per_s``,
    ``decode_keys`` = the decode rows' keys, their K/V bytes at ``rule.decode_bytes_per_s``; None without decode
    keys."""
    t_p = 4 * num_heads * head_dim * prefill_query_keys / rule.prefill_flops_per_s
    t_d = decode_keys * 2 * num_kv_heads * head_dim * elem_bytes / rule.decode_bytes_per_s
    return t_p / t_d if t_d > 0 else None


def pod_pays_off(prefill_q_lens: list[int], prefill_seq_lens: list[int], decode_seq_lens: list[int],
                 num_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int,
                 rule: PodRule = POD_RULE_H100) -> bool:
    """Whether a hybrid batch should run fused: its `halves_ratio` (causal FLOPs of each chunk over its cached prefix
    against the decodes' K/V bytes) lies in ``rule``'s band (the GPU's: `pod_rule`)."""
    ratio = halves_ratio(sum(q * (s - q / 2) for q, s in zip(prefill_q_lens, prefill_seq_lens)),
                         sum(decode_seq_lens), num_heads, num_kv_heads, head_dim, elem_bytes, rule)
    return ratio is not None and rule.low <= ratio <= rule.high


def ws_items_per_sm(prefill_tokens: int, prefill_max_seq_len: int | None, max_query_len: int, decode_rows: int,
                    decode_max_seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int,
                    rule: PodRule) -> int:
    """The warp-specialized kernel's decode items per SM (`WS_ITEMS_PER_SM`, or `WS_ITEMS_PER_SM_DECODE_HEAVY` where
    the `halves_ratio` lies in ``rule.decode_heavy``), from host bounds: ``prefill_tokens`` query rows of chunks of
    at most ``max_query_len`` over at most ``prefill_max_seq_len`` keys (None: unknown, the default count),
    ``decode_rows`` decodes over at most ``decode_max_seq_len`` keys."""
    if prefill_max_seq_len is None or rule.decode_heavy is None:
        return WS_ITEMS_PER_SM
    ratio = halves_ratio(prefill_tokens * max(prefill_max_seq_len - max_query_len / 2, 1),
                         decode_rows * decode_max_seq_len, num_heads, num_kv_heads, head_dim, elem_bytes, rule)
    low, high = rule.decode_heavy
    return WS_ITEMS_PER_SM_DECODE_HEAVY if ratio is not None and low <= ratio <= high else WS_ITEMS_PER_SM


def ws_serves_shape(group: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the warp-specialized kernel is built and tested for this shape: 16-bit, head_dim 64 or 128, GQA groups
    (query heads per kv head) of at most WS_MAX_GROUP."""
    return dtype in (torch.bfloat16, torch.float16) and head_dim in (64, 128) and 1 <= group <= WS_MAX_GROUP
