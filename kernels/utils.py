"""Small helpers shared by the Triton kernels (no state, no accordion.cluster / accordion.workers imports)."""

from __future__ import annotations

import functools
import os

import torch
import triton


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_power_of_2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@functools.cache
def is_interpreter() -> bool:
    """True when Triton runs kernels in the numpy interpreter (TRITON_INTERPRET=1, e.g. CPU tests). Read once, as
    Triton does when it decorates the kernels (a launcher calls this several times per launch)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _cuda_available() -> bool:
    """torch.cuda.is_available(), asked once: it reads the environment and NVML on every call, microseconds that a
    launcher asking several times paid on every launch."""
    return torch.cuda.is_available()


@functools.cache
def _device_props(index: int):
    return torch.cuda.get_device_properties(index)


def _props(device: torch.device):
    """The properties of a CUDA device, None for other devices or without CUDA."""
    if device.type != "cuda" or not _cuda_available():
        return None
    return _device_props(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    """Streaming-multiprocessor count of a CUDA device (a nominal 132 off-GPU, so heuristics still run)."""
    p = _props(device)
    return 132 if p is None else p.multi_processor_count


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability, (0, 0) for non-CUDA devices."""
    p = _props(device)
    return (0, 0) if p is None else (p.major, p.minor)


def resident_programs(compiled, device: torch.device) -> int:
    """How many programs of a compiled Triton kernel fit on one SM at once (registers, shared memory, warps)."""
    p = _props(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = getattr(p, "regs_per_multiprocessor", 65536) // max(1, regs_per_warp * warps)
    smem = compiled.metadata.shared
    by_smem = getattr(p, "shared_memory_per_multiprocessor", 233472) // (smem + 1024) if smem else 32
    by_warps = getattr(p, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return max(1, min(by_regs, by_smem, by_warps, 32))


def register_cap(cfg: dict, device: torch.device) -> dict:
    """Launch options for a config's ``maxnreg`` (registers per thread): ``{"maxnreg": n}`` on CUDA, nothing
    under the interpreter or without the key."""
    if "maxnreg" in cfg and device.type == "cuda" and not is_interpreter():
        return {"maxnreg": cfg["maxnreg"]}
    return {}


def is_hopper(device: torch.device) -> bool:
    return cuda_capability(device)[0] == 9


def is_h200(device: torch.device) -> bool:
    """An H200 (or GH200 with HBM3e): Hopper's SMs with 1.4x the H100's memory bandwidth, which some memory-bound
    kernels tile for separately."""
    p = _props(device)
    return p is not None and "H200" in p.name


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """Raise ValueError unless `t` is a tensor with `ndim` dims, a unit last-dim stride and an allowed dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride(-1)==1), got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


def compiled_variants(*kernels) -> int:
    """How many compiled variants these ``@triton.jit`` kernels hold in this process, over all devices (0 under
    the interpreter). A count that grows while an engine serves means steps waited on compilations."""
    return sum(len(cache[0]) for k in kernels for cache in getattr(k, "device_caches", {}).values())


def jit_unspecialized(*names: str):
    """``@triton.jit`` with ``names`` as plain runtime arguments: no specialization on an int's value (== 1) or on
    an int's or a pointer's 16-byte divisibility. For what changes from launch to launch (token and tile counts,
    split counts, block-table strides, pointers into the middle of a batch's tensors), so that one compiled variant
    serves every step instead of a new compilation, mid-serving, whenever a value falls into another class."""
    return triton.jit(do_not_specialize=list(names), do_not_specialize_on_alignment=list(names))
