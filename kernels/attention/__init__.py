"""Triton attention kernels over the paged KV cache, each beside a plain torch reference (reference.py).

Cache layout: k_cache / v_cache `[num_blocks, block_size, Hkv, D]` (views of one `[2, ...]` tensor are fine).
"""

from .decode import paged_decode_attention
from .kv_cache import write_kv_cache
from .merge import merge_attention_states
from .pod import DecodeArgs, PrefillArgs, pod_attention, ws_capable
from .pod_schedule import POD_RULE_H100, POD_RULE_H200, PodRule, pod_pays_off, pod_rule
from .prefill import paged_prefill_attention
from .varlen import varlen_attention_with_positions

__all__ = [
    "POD_RULE_H100",
    "POD_RULE_H200",
    "DecodeArgs",
    "PodRule",
    "PrefillArgs",
    "merge_attention_states",
    "paged_decode_attention",
    "paged_prefill_attention",
    "pod_attention",
    "pod_pays_off",
    "pod_rule",
    "varlen_attention_with_positions",
    "write_kv_cache",
    "ws_capable",
]
