"""Result files (JSON + latency-vs-rate PNG), environment info and the human-readable table."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import pct_key

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULT_DIR = REPO / "bench" / "results"


def git_commit(repo: Path = REPO) -> str | None:
    """``git rev-parse HEAD`` (None outside a repository or before the first commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def env_info() -> dict[str, Any]:
    """Hostname, UTC date, git commit, Python and platform."""
    return {
        "hostname": socket.gethostname(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    return str(o)


def _finite(x: Any) -> Any:
    """inf/nan -> strings, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def write_results(
    result: dict[str, Any], label: str, result_dir: str | os.PathLike[str] | None = None, percentile: float = 99.0
) -> tuple[Path, Path | None]:
    """Write ``serve-<label>-<timestamp>.json`` and the plot PNG next to it; copy both under ``$OUT`` if set."""
    out_dir = Path(result_dir) if result_dir else DEFAULT_RESULT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    path = out_dir / f"serve-{safe}-{stamp}.json"
    path.write_text(json.dumps(_finite(result), indent=2, default=_json_default))
    png = plot_latency_vs_rate(
        result.get("points", []), path.with_suffix(".png"), percentile, title=f"accordion bench serve: {label}"
    )
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        for p in (path, png):
            if p is not None:
                shutil.copy2(p, dest / p.name)
    return path, png


def plot_latency_vs_rate(
    points: Sequence[dict[str, Any]], png: Path, percentile: float = 99.0, title: str = ""
) -> Path | None:
    """p50 and p``percentile`` TTFT and TPOT against the achieved request rate (completed requests / s)."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p["request_throughput"])
    x = [p["request_throughput"] for p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    pk = pct_key(percentile)
    for ax, metric in zip(axes, ("ttft", "tpot")):
        ax.plot(x, [p[f"median_{metric}_ms"] for p in pts], "o-", label="p50")
        ax.plot(x, [p[f"{pk}_{metric}_ms"] for p in pts], "s--", label=pk)
        ax.set_xlabel("achieved request rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(png)
    return png


def format_table(points: Sequence[dict[str, Any]], percentile: float = 99.0) -> str:
    """One line per point: rates, throughput, p50/pXX TTFT, TPOT, ITL, goodput and failures."""
    pk = pct_key(percentile)
    head = (
        f"{'rate':>7} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT ' + pk:>9} {'TPOT p50':>9} "
        f"{'TPOT ' + pk:>9} {'ITL ' + pk:>9} {'E2E p50':>9} {'good/s':>7} {'peak':>5} {'failed':>6}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        rate = "trace" if p.get("request_rate") is None else f"{p['request_rate']:g}"
        good = p.get("request_goodput")
        lines.append(
            f"{rate:>7} {p['request_throughput']:7.2f} {p['output_throughput']:10.1f} {p['median_ttft_ms']:9.1f} "
            f"{p[f'{pk}_ttft_ms']:9.1f} {p['median_tpot_ms']:9.2f} {p[f'{pk}_tpot_ms']:9.2f} "
            f"{p[f'{pk}_itl_ms']:9.2f} {p['median_e2el_ms']:9.1f} {'-' if good is None else f'{good:.2f}':>7} "
            f"{p['peak_concurrency']:5d} {p['failed']:6d}"
        )
    lines.append("(latencies in ms)")
    return "\n".join(lines)
