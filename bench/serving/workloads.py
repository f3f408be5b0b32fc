"""Workload generators: prompt token ids and output lengths (and trace arrival offsets where a trace has them).

``random``            lengths ~U[len(1-r), len(1+r)], random ids (vLLM's ``random`` dataset).
``sharegpt-like``     lengths of the Azure LLM conversation trace (azure_conv_splitwise.csv). Substitution: the
                      ShareGPT json is not in the data dir and this is the closest real chat trace we have (its
                      prompts are longer: mean 1154 vs ~300 tokens); vLLM's ShareGPT filters (<=1024 prompt,
                      <=2048 total) are not applied, only the max_model_len clip.
``arxiv``             Sarathi-Serve's arxiv_summarization trace (long prompts, ~2.6k in / 291 out).
``azure-code``        the Azure code trace (azure_code_splitwise.csv), prefill-heavy.
``mooncake``          mooncake_synthetic.jsonl, in trace order; prompt ids derived from ``hash_ids`` (512-token
                      blocks), so requests sharing hash ids share prompt prefixes (prefix caching is exercised).
``long-context-mix``  sharegpt-like, with a fraction ``long_fraction`` of prompts log-uniform in [8k, 128k].

Every (prompt, output) pair is clipped to ``max_model_len``: output <= max_model_len-1, prompt+output <= it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .records import SampleRequest

WORKLOADS = ("random", "sharegpt-like", "arxiv", "azure-code", "mooncake", "long-context-mix")
TRACE_FILES = {
    "sharegpt-like": "azure_conv_splitwise.csv",
    "arxiv": "arxiv_summarization_llama2.csv",
    "azure-code": "azure_code_splitwise.csv",
    "mooncake": "mooncake_synthetic.jsonl",
}
MOONCAKE_BLOCK = 512
_REPO = Path(__file__).resolve().parents[2]


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else env ACCORDION_DATA_DIR, else ``<repo>/../shared/data``, else ``/work/shared/data``."""
    for cand in (override, os.environ.get("ACCORDION_DATA_DIR"), _REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return Path("/work/shared/data")


@dataclass(frozen=True)
class Trace:
    """Lengths (and arrival seconds, if any) of one trace file."""

    prompt_lens: np.ndarray
    output_lens: np.ndarray
    arrivals_s: np.ndarray | None = None
    hash_ids: tuple[tuple[int, ...], ...] | None = None


@lru_cache(maxsize=8)
def load_trace(path: str) -> Trace:
    """Read a CSV (``num_prefill_tokens``, ``num_decode_tokens``, optional ``arrived_at`` s) or the Mooncake JSONL
    (``input_length``, ``output_length``, ``timestamp`` ms, ``hash_ids``)."""
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return Trace(
            np.array([r["input_length"] for r in rows]),
            np.array([r["output_length"] for r in rows]),
            np.array([r["timestamp"] / 1000.0 for r in rows]),
            tuple(tuple(r["hash_ids"]) for r in rows),
        )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    arr = np.array([float(r["arrived_at"]) for r in rows]) if rows and "arrived_at" in rows[0] else None
    return Trace(
        np.array([int(r["num_prefill_tokens"]) for r in rows]),
        np.array([int(r["num_decode_tokens"]) for r in rows]),
        arr,
    )


@dataclass
class WorkloadConfig:
    """Everything a generator needs; the CLI fills it from flags and the server's model info."""

    name: str = "random"
    num_prompts: int = 1000
    seed: int = 0
    vocab_size: int = 32000
    special_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    long_fraction: float = 0.1
    long_min_len: int = 8192
    long_max_len: int = 131072
    output_len_override: int | None = None
    in_trace_order: bool = False
    """Take the first ``num_prompts`` rows in order (needed with trace timestamps) instead of a random sample."""
    data_dir: str | None = None


def clip_lengths(prompt_len: int, output_len: int, max_model_len: int | None) -> tuple[int, int]:
    """Output in [1, max_model_len-1], prompt in [1, max_model_len-output]."""
    output_len = max(1, int(output_len))
    prompt_len = max(1, int(prompt_len))
    if max_model_len:
        output_len = min(output_len, max_model_len - 1)
        prompt_len = min(prompt_len, max_model_len - output_len)
    return prompt_len, output_len


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized: a cheap deterministic hash of uint64 values."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _avoid_special(ids: np.ndarray, cfg: WorkloadConfig) -> np.ndarray:
    """Move special ids (EOS/BOS/...) to the next non-special id, so prompts never contain them."""
    if cfg.special_ids:
        specials = np.fromiter(cfg.special_ids, dtype=np.int64)
        for _ in range(len(specials) + 1):
            mask = np.isin(ids, specials)
            if not mask.any():
                break
            ids[mask] = (ids[mask] + 1) % cfg.vocab_size
    return ids


def random_ids(rng: np.random.Generator, n: int, cfg: WorkloadConfig) -> np.ndarray:
    return _avoid_special(rng.integers(0, cfg.vocab_size, size=n, dtype=np.int64), cfg)


def block_ids(hash_ids: tuple[int, ...], length: int, cfg: WorkloadConfig) -> np.ndarray:
    """Prompt ids from Mooncake prefix blocks: block ``h`` always maps to the same 512 ids (per seed)."""
    pos = np.arange(MOONCAKE_BLOCK, dtype=np.uint64)
    blocks = np.asarray(hash_ids, dtype=np.uint64)[:, None] * np.uint64(MOONCAKE_BLOCK) + pos[None, :]
    flat = blocks.reshape(-1)[:length] + np.uint64(cfg.seed) * np.uint64(0x9E3779B97F4A7C15)
    ids = (_mix64(flat) % np.uint64(cfg.vocab_size)).astype(np.int64)
    return _avoid_special(ids, cfg)


def _rows(rng: np.random.Generator, total: int, cfg: WorkloadConfig) -> np.ndarray:
    if cfg.in_trace_order or cfg.name == "mooncake":  # Mooncake's prefix reuse is temporal: keep its order
        return np.arange(cfg.num_prompts) % total
    return rng.choice(total, size=cfg.num_prompts, replace=cfg.num_prompts > total)


def _trace_path(name: str, cfg: WorkloadConfig) -> str:
    return str(data_dir(cfg.data_dir) / "traces" / TRACE_FILES[name])


def generate(cfg: WorkloadConfig) -> list[SampleRequest]:
    """Build ``cfg.num_prompts`` requests of workload ``cfg.name`` (deterministic in ``cfg.seed``)."""
    if cfg.name not in WORKLOADS:
        raise ValueError(f"unknown workload {cfg.name!r}; choose from {WORKLOADS}")
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_prompts
    arrivals: list[float | None] = [None] * n
    hashes: list[tuple[int, ...] | None] = [None] * n
    if cfg.name == "random":
        lo_i, hi_i = int(cfg.input_len * (1 - cfg.range_ratio)), int(cfg.input_len * (1 + cfg.range_ratio))
        lo_o, hi_o = int(cfg.output_len * (1 - cfg.range_ratio)), int(cfg.output_len * (1 + cfg.range_ratio))
        plens = rng.integers(max(lo_i, 1), max(hi_i, 1) + 1, size=n)
        olens = rng.integers(max(lo_o, 1), max(hi_o, 1) + 1, size=n)
    else:
        trace = load_trace(_trace_path("sharegpt-like" if cfg.name == "long-context-mix" else cfg.name, cfg))
        rows = _rows(rng, len(trace.prompt_lens), cfg)
        plens, olens = trace.prompt_lens[rows].copy(), trace.output_lens[rows].copy()
        if trace.arrivals_s is not None:
            arrivals = [float(t) for t in trace.arrivals_s[rows]]
        if trace.hash_ids is not None:
            hashes = [trace.hash_ids[r] for r in rows]
        if cfg.name == "long-context-mix":
            plens = _long_mix(rng, plens, olens, cfg)
    if cfg.output_len_override:
        olens = np.full(n, cfg.output_len_override)
    out: list[SampleRequest] = []
    for i in range(n):
        p, o = clip_lengths(int(plens[i]), int(olens[i]), cfg.max_model_len)
        h = hashes[i]
        ids = block_ids(h, p, cfg) if h is not None and p <= len(h) * MOONCAKE_BLOCK else random_ids(rng, p, cfg)
        out.append(SampleRequest(f"{cfg.name}-{cfg.seed}-{i}", ids, o, arrivals[i]))
    return out


def _long_mix(rng: np.random.Generator, plens: np.ndarray, olens: np.ndarray, cfg: WorkloadConfig) -> np.ndarray:
    """Replace ``round(long_fraction*n)`` random prompts with log-uniform lengths in [long_min, long_max]."""
    n = len(plens)
    k = round(cfg.long_fraction * n)
    idx = rng.permutation(n)[:k]
    for i in idx:
        hi = cfg.long_max_len
        if cfg.max_model_len:
            hi = min(hi, cfg.max_model_len - min(int(olens[i]), cfg.max_model_len - 1))
        lo = min(cfg.long_min_len, hi)
        plens[i] = round(math.exp(rng.uniform(math.log(max(lo, 1)), math.log(max(hi, 1)))))
    return plens
