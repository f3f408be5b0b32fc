"""accordion's one typed configuration tree. Validated when built; every field documented.

``EngineConfig`` is what an engine instance needs (model, cache, scheduler, device); ``ServeConfig`` adds the
serving front end. This is the only module that reads environment variables (``ACCORDION_*``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
AttentionBackendName = Literal["auto", "torch", "triton"]
HybridAttention = Literal["separate", "fused", "auto"]


def cache_dir() -> Path:
    """Where accordion keeps prepared models (``ACCORDION_CACHE_DIR``, default ``~/.cache/accordion``)."""
    return Path(os.environ.get("ACCORDION_CACHE_DIR", Path.home() / ".cache" / "accordion"))


def _one_of(name: str, value: str, choices) -> None:
    """``value`` must be one of the Literal type ``choices``' arguments."""
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, get_args(choices)))}, got {value!r}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(kw_only=True)
class ModelConfig:
    model: str
    """Path to an HF checkpoint directory, or an alias of an embedded model (``smollm2``)."""
    dtype: Dtype = "auto"
    """Weights and activations dtype; ``auto`` = bfloat16 on CUDA, float32 on CPU."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the checkpoint's ``max_position_embeddings``."""
    seed: int = 0
    """Seed of the sampler for unseeded requests."""

    def __post_init__(self) -> None:
        _positive("max_model_len", self.max_model_len)

    def hf_config(self) -> dict:
        return json.loads((Path(self.model) / "config.json").read_text())

    def resolved_max_model_len(self) -> int:
        limit = int(self.hf_config().get("max_position_embeddings", 2048))
        if self.max_model_len is None:
            return limit
        return self.max_model_len


@dataclass(kw_only=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Force the KV pool size (blocks); otherwise sized from memory (``gpu_memory_utilization`` / ``cpu_kv_bytes``)."""
    gpu_memory_utilization: float = 0.90
    """Fraction of the GPU's memory the engine may use for weights, activations and KV."""
    cpu_kv_bytes: int = 1 << 30
    """KV pool size on CPU devices."""
    enable_prefix_caching: bool = True
    """Reuse the KV of identical full-block prompt prefixes (hash chain)."""

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        _positive("num_blocks", self.num_blocks)
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError(f"gpu_memory_utilization must be in [0.05, 0.99], got {self.gpu_memory_utilization}")


@dataclass(kw_only=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    """Token budget of one step (Sarathi-Serve's chunk size): decodes first, then prefill chunks."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    max_waiting: int = 4096
    """Most requests queued; beyond it new requests are refused (RESOURCE_EXHAUSTED)."""
    policy: Literal["fcfs", "priority"] = "fcfs"
    """Admission order: arrival, or (priority, arrival)."""
    max_out_of_order: int = 0
    """When the head of the queue cannot get its blocks, admit up to this many later requests that fit past it
    (LoongServe's bounded out-of-order admission; it uses 10). 0 is strict FCFS."""
    async_scheduling: bool = True
    """In steady-state greedy decoding, launch the next step before reading back the current step's tokens, so
    the host's bookkeeping (and a CUDA graph launch) overlaps the device's work. Token-identical to the
    synchronous loop; on an H100 it took the 1B offline benchmark from 14.6k to 19.3k tok/s."""

    engine_thread_switch_interval_us: float | None = 20.0
    """``sys.setswitchinterval`` of a process that runs an engine loop thread (an instance's engine process; the
    ``serve --no-ray`` server, where it sits beside the gRPC event loop); None leaves Python's 5 ms. With 5 ms,
    every GIL release of the engine thread (a CUDA sync, a copy) can cost it up to 5 ms behind a busy event-loop
    thread (a convoy): when the engine still ran inside the instance actor, the Ray serving path ran at 0.15x of
    offline throughput on an H100, with 20 us at 0.90x (bench/results/experiments/)."""

    def __post_init__(self) -> None:
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.engine_thread_switch_interval_us is not None and not self.engine_thread_switch_interval_us > 0:
            raise ValueError("engine_thread_switch_interval_us must be positive or None")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_waiting", self.max_waiting)
        if not isinstance(self.max_out_of_order, int) or self.max_out_of_order < 0:
            raise ValueError(f"max_out_of_order must be a non-negative int, got {self.max_out_of_order!r}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(kw_only=True)
class DeviceConfig:
    device: Device = "auto"
    """``auto`` picks CUDA when available."""
    attention_backend: AttentionBackendName = "auto"
    """``auto`` = Triton kernels on CUDA, torch on CPU."""
    hybrid_attention: HybridAttention = "auto"
    """Triton backend, a step holding prefill chunks and decodes: per step (``auto``): the POD-style fused kernel
    when its warp-specialized form serves (sm_90) and the step's halves are balanced (`pod_pays_off`), else the
    prefill kernel then the decode kernel; always the two in sequence (``separate``); or always the fused kernel,
    one launch for both (``fused``). On an H100 the fused kernel ran 1.05-1.35x the sequence on the kernel
    benchmark's balanced batches and 0.84-1.01x on prefill-dominated ones (bench/results/
    kernels-20261127-233146.json); on the engine stress run (prefill-dominated steps) ``auto`` matched ``separate``
    and ``fused`` took 38% longer (engine-stress-nvidia-h100-80gb-hbm3-20261127T230950Z.json, measured with the
    previous decode partition and a narrower rule)."""
    cuda_graphs: bool = True
    """Capture decode steps in CUDA graphs (CUDA only)."""
    cuda_graph_max_batch: int = 256
    """Largest decode batch captured in a graph."""

    def __post_init__(self) -> None:
        _one_of("device", self.device, Device)
        _one_of("attention_backend", self.attention_backend, AttentionBackendName)
        _one_of("hybrid_attention", self.hybrid_attention, HybridAttention)
        _positive("cuda_graph_max_batch", self.cuda_graph_max_batch)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(kw_only=True)
class EngineConfig:
    """Everything one engine instance needs."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        if self.model.max_model_len is not None and self.model.max_model_len < self.cache.block_size:
            raise ValueError("max_model_len must be at least one block")


@dataclass(kw_only=True)
class ESPConfig:
    """Elastic sequence parallelism (LoongServe) across the instances of a cluster."""

    enabled: bool = False
    """Form the instances' torch.distributed group and prefill long prompts on several instances."""
    min_prompt_tokens: int = 8192
    """Prompts shorter than this always run on one instance."""
    max_degree: int = 8
    """Most instances one prefill may span."""
    force_degree: int | None = None
    """Use exactly this degree for every eligible prompt (tests, benchmarks); else the cost model decides."""
    max_batch_tokens: int = 131072
    """Prompt tokens one sequence-parallel prefill batch may hold (prompts queued for the same instance group
    are prefilled together, up to this)."""
    multi_master: bool = True
    """A long request whose KV fits on no single instance keeps it spread over several and is decoded there
    (each holder computes partial attention every step); off, it waits for room on one instance."""
    cost_model_path: str | None = None
    """JSON written by ``accordion profile``; default: an analytic model."""
    backend: str | None = None
    """torch.distributed backend; default NCCL on GPU instances, gloo on CPU ones."""
    compaction: bool = True
    """Before a sequence-parallel prefill whose KV fits on no instance, migrate decoding requests off one to the
    others (LoongServe's compaction) when the estimated transfer time is under the prefill time it saves."""
    migration_bytes_per_s: float = 2e9
    """Estimated KV migration bandwidth (device -> host -> gloo -> host -> device), for the compaction rule."""
    migration_overhead_s: float = 0.02
    """Estimated fixed cost of one migration (engine calls, the request paused for a step or two)."""

    def __post_init__(self) -> None:
        _positive("min_prompt_tokens", self.min_prompt_tokens)
        _positive("max_degree", self.max_degree)
        _positive("max_batch_tokens", self.max_batch_tokens)
        _positive("force_degree", self.force_degree)


@dataclass(kw_only=True)
class ClusterConfig:
    """The Ray deployment: the global manager actor and the engine instance actors it creates."""

    engine: EngineConfig
    """What every instance runs."""
    esp: ESPConfig = field(default_factory=ESPConfig)
    """Elastic sequence parallelism."""
    manager_name: str = "accordion-global-manager"
    """Name of the global manager actor (one per namespace)."""
    namespace: str = "accordion"
    """Ray namespace of the manager and its instances."""
    gpus_per_instance: float = 0.0
    """Ray ``num_gpus`` of one instance actor: 1 on GPU machines, 0 for CPU instances."""
    cpus_per_instance: float = 1.0
    """Ray ``num_cpus`` of one instance actor."""
    cpu_threads_per_instance: int = 1
    """``torch.set_num_threads`` inside a CPU instance."""
    health_check_interval_s: float = 5.0
    """How often the manager pings every instance's ``load()``."""
    auto_grow: bool = False
    """Add an instance whenever the Ray cluster has free resources for one (GPU instances only): the pool grows
    as the Ray autoscaler (or KubeRay) adds GPU nodes."""
    health_check_timeout_s: float = 10.0
    """A ping slower than this marks the instance dead."""
    drain_timeout_s: float = 30.0
    """``remove_instance(drain=True)`` waits this long for the instance's requests before killing it."""
    start_timeout_s: float = 300.0
    """Loading the model on a new instance may take this long."""
    direct_channel: bool = True
    """Front ends submit requests and receive their tokens over a socket of each engine process
    (:mod:`~accordion.cluster.direct_server`: on the node's Ray address, token-authenticated, msgpack frames)
    instead of through the instance actor and a Ray streaming generator; Ray still runs everything else."""
    direct_host: str | None = None
    """Address the engine sockets bind: None for the node's IP as Ray sees it (the cluster network); ``accordion
    serve`` on a private local cluster uses 127.0.0.1."""
    actor_niceness: int | None = 0
    """Niceness of the manager's and the instances' worker processes (inherited by the engine processes). Ray
    renices every worker process to 15 (its ``worker_niceness``), so the engine's host loop, Python that launches
    the GPU's work, would yield the CPU to every nice-0 process on the node (the front end, the client, Ray's
    daemons). None keeps Ray's default."""

    def __post_init__(self) -> None:
        if self.gpus_per_instance < 0 or self.cpus_per_instance < 0:
            raise ValueError("gpus_per_instance and cpus_per_instance must be non-negative")
        _positive("cpu_threads_per_instance", self.cpu_threads_per_instance)
        if self.actor_niceness is not None and not 0 <= self.actor_niceness <= 19:
            raise ValueError(f"actor_niceness must be in [0, 19] or None, got {self.actor_niceness}")
        for name in ("health_check_interval_s", "health_check_timeout_s", "drain_timeout_s", "start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
