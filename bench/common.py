"""Helpers shared by every benchmark: environment facts, result files, a copy-bandwidth probe, a text table."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import statistics
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: a benchmark still runs
        return None


def git_commit() -> str | None:
    """``$ACCORDION_COMMIT`` when set (the device machine's copy may carry stale git metadata), else ``git
    rev-parse HEAD`` of the repository, else None."""
    if os.environ.get("ACCORDION_COMMIT"):
        return os.environ["ACCORDION_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def gpu_name() -> str | None:
    """``torch.cuda.get_device_name()`` of the current device, or None without CUDA."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def gpu_card() -> dict:
    """Driver version, UUID and maximum SM / memory clocks of the current GPU from nvidia-smi ({} without it): which
    physical card a run had (the same kernel ran 0.94x on one H100 lease and 1.00x on another)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    fields = ("driver_version", "uuid", "clocks.max.sm", "clocks.max.memory")
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
             "-i", str(torch.cuda.current_device())], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in out.strip().split(",")]
    keys = ("gpu_driver", "gpu_uuid", "gpu_max_sm_mhz", "gpu_max_mem_mhz")
    return dict(zip(keys, values)) if len(values) == len(keys) else {}


def env_info() -> dict:
    """GPU, library versions, CUDA version, git commit, host and UTC date, for the header of a result file."""
    import torch

    info = {
        "gpu": gpu_name(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "commit": git_commit(),
        "hostname": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_sms"] = props.multi_processor_count
        info.update(gpu_card())
    return info


def gpu_slug(name: str | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; ``"cpu"`` without a GPU."""
    name = gpu_name() if name is None else name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if name else "cpu"


def write_result(name: str, payload: dict) -> Path:
    """Write ``{"name", "env", **payload}`` as JSON to ``bench/results/<name>-<gpu-slug>-<utc>.json``; return it.

    A copy also goes to ``$OUT/`` when the OUT environment variable is set (the device machine's return folder).
    """
    env = payload.get("env") or env_info()
    doc = {"name": name, **payload, "env": env}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    fname = f"{name}-{gpu_slug(env.get('gpu'))}-{stamp}.json"
    text = json.dumps(doc, indent=2, default=str) + "\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / fname
    path.write_text(text)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / fname).write_text(text)
    return path


def measure_copy_bandwidth(device="cuda", nbytes: int = 2 << 30, reps: int = 10, warmup: int = 3) -> float:
    """Device-memory bandwidth in GB/s (1e9 B/s) of a ``dst.copy_(src)`` of ``nbytes``, counting read + write bytes.

    Median over ``reps`` timings (CUDA events on a GPU, ``perf_counter`` on CPU). On an H100 80GB HBM3 this reads
    about 3000 GB/s; use it as the denominator of memory-bandwidth utilisation.
    """
    import torch

    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return moved / statistics.median(times) / 1e9


def print_table(rows: list, headers: list[str]) -> str:
    """Print (and return) an aligned text table; ``rows`` are sequences or dicts keyed by ``headers``."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(h) if isinstance(r, dict) else r[i]) for i, h in enumerate(headers)] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _numeric(s: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?x?", s))


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, log_path: str | Path, timeout_s: float = 900.0):
    """Start ``accordion serve`` (``cmd``) with its output in ``log_path``; return the process once its gRPC
    health check says SERVING (raises if it exits or times out first)."""
    from accordion.client import Client

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"accordion serve exited with {proc.returncode}; see {log_path}")
        try:
            with Client(f"127.0.0.1:{port}", timeout=2, max_retries=0) as c:
                if c.health("accordion.v1.LLMService") == "SERVING":
                    return proc
        except Exception:  # not listening yet
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError(f"server did not become ready in {timeout_s:.0f} s; see {log_path}")


def stop_server(proc, timeout_s: float = 120.0) -> None:
    """SIGTERM (drain), then kill if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
