"""Per-program timeline of a decode launch (a diagnostic, not a test): `python bench/decode_timeline.py` on a GPU.

The launcher's own kernel (`decode_kernel.decode_work`) runs inside a twin that reads the GPU's global timer before
and after each program's work item and records its SM, so that one launch shows how far its programs' starts lie
apart (launch), how long each streams, and how far their ends lie apart (tail). For the schedules whose time sits
a few microseconds from SDPA's (issue 4's 16 x 8k cell): the deep schedule with and without HOST_BOUND, on
bench/kernels.py's identity cache, against the whole launch's CUDA-graph time. Writes
bench/results/decode-timeline-<gpu>-<time>.json.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_result  # noqa: E402
from bench.kernels import DecodeCase, graph_ms  # noqa: E402

from accordion.kernels.attention import decode as decode_launcher  # noqa: E402
from accordion.kernels.attention.decode_kernel import decode_work  # noqa: E402
from accordion.kernels.attention.decode_schedule import deep_config  # noqa: E402
from accordion.kernels.utils import jit_unspecialized  # noqa: E402

SHAPES = [(16, 8192), (16, 32768)]


@triton.jit
def _special_register(x, ASM: tl.constexpr):
    """A special register's value (``ASM`` moves it into $0); ``x`` only gives the result its shape."""
    return tl.inline_asm_elementwise(ASM, "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1)


@jit_unspecialized("stride_btb", "num_splits", "fused_merge", "len_bound")
def timed_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr,
    num_splits, fused_merge, len_bound,
    stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_btb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    stride_fob, stride_foh, stride_flb, stride_flh,
    qk_scale,
    ts_ptr,  # int64 [programs, 3]: start ns, end ns, SM
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, HEADS_FASTEST: tl.constexpr, HOST_BOUND: tl.constexpr,
    FAST_OFFSETS: tl.constexpr,
):
    """`decode_kernel.paged_decode_kernel` (heads fastest) between two reads of %globaltimer."""
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    t0 = _special_register(pid, "mov.u64 $0, %globaltimer;")
    decode_work(
        q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr, fo_ptr, flse_ptr, ticket_ptr,
        tl.program_id(1), tl.program_id(0), tl.program_id(2), num_splits, fused_merge, len_bound,
        stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_btb,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        stride_fob, stride_foh, stride_flb, stride_flh, tl.num_programs(0), qk_scale,
        GROUP, BLOCK_H, HEAD_DIM, PAGE_SIZE, BLOCK_N, DOT_PRECISION, HOST_BOUND, FAST_OFFSETS,
    )
    t1 = _special_register(pid, "mov.u64 $0, %globaltimer;")
    sm = _special_register(pid, "{ .reg .u32 s; mov.u32 s, %smid; cvt.u64.u32 $0, s; }")
    tl.store(ts_ptr + pid * 3, t0)
    tl.store(ts_ptr + pid * 3 + 1, t1)
    tl.store(ts_ptr + pid * 3 + 2, sm)


class _Timed:
    """Stands in for `paged_decode_kernel` in the launcher: the same launch, plus the timestamp buffer."""

    def __init__(self, ts: torch.Tensor):
        self.ts = ts

    def __getitem__(self, grid):
        assert grid[2] == 1, "timelines of unsplit launches only"
        return lambda *args, **meta: timed_decode_kernel[grid](*args, self.ts, **meta)


def timeline(case: DecodeCase, config: dict, calls: int = 20) -> dict:
    """Launch ``calls`` times with ``config`` (one split); per launch: program start spread, end spread, span,
    per-program stream time (min / median / max), all in microseconds; medians over launches."""
    ts = torch.zeros(case.B * 8, 3, dtype=torch.int64, device=case.q.device)
    real = decode_launcher.paged_decode_kernel
    decode_launcher.paged_decode_kernel = _Timed(ts)
    stats, ends = [], []
    try:
        for _ in range(calls):
            case.ours(num_splits=1, config=config)
            torch.cuda.synchronize()
            t = ts.cpu()
            ends.append(((t[:, 1] - t[:, 0].min()).double() / 1e3).tolist())
            start, end = t[:, 0].double() / 1e3, t[:, 1].double() / 1e3
            dur = (end - start).tolist()
            stats.append(dict(start_spread=float(start.max() - start.min()), end_spread=float(end.max() - end.min()),
                              span=float(end.max() - start.min()), stream_min=min(dur),
                              stream_median=statistics.median(dur), stream_max=max(dur),
                              sms=len(set(t[:, 2].tolist()))))
    finally:
        decode_launcher.paged_decode_kernel = real
    last = ts.cpu()  # the last launch, per program (kv head fastest): start and end in us from its first start, SM
    t_min = int(last[:, 0].min())
    raw = dict(start_us=((last[:, 0] - t_min).double() / 1e3).tolist(),
               end_us=((last[:, 1] - t_min).double() / 1e3).tolist(), sm=last[:, 2].tolist())
    # whether the same programs are the slow ones launch after launch: correlation of the ends of launch 0 and 1
    same = float(torch.corrcoef(torch.tensor([ends[0], ends[1]]))[0, 1]) if calls > 1 else float("nan")
    return {**{k: statistics.median(s[k] for s in stats) for k in stats[0]}, "end_corr_launches": same,
            "last_launch": raw}


def main() -> None:
    dev = torch.device("cuda")
    rows = []
    deep = deep_config(dev)  # this GPU's tiles of the deep schedule
    variants = {"deep": deep, "deep_no_host_bound": {**deep, "HOST_BOUND": False}}
    for B, ctx in SHAPES:
        case = DecodeCase(B, ctx, torch.bfloat16, dev)
        sdpa_us = graph_ms([case.theirs], dev) * 1e3
        for name, cfg in variants.items():
            graph_us = graph_ms([lambda cfg=cfg: case.ours(num_splits=1, config=cfg)], dev) * 1e3
            rows.append(dict(batch=B, context=ctx, variant=name, graph_us=graph_us, sdpa_graph_us=sdpa_us,
                             **timeline(case, cfg)))
            print({k: v for k, v in rows[-1].items() if k != "last_launch"}, flush=True)
        case = None
    print_table([[f"{r['batch']}x{r['context']}", r["variant"], f"{r['graph_us']:.1f}", f"{r['sdpa_graph_us']:.1f}",
                  f"{r['span']:.1f}", f"{r['start_spread']:.2f}", f"{r['end_spread']:.2f}",
                  f"{r['stream_min']:.1f} / {r['stream_median']:.1f} / {r['stream_max']:.1f}", r["sms"]] for r in rows],
                ["shape", "variant", "graph us", "SDPA us", "span us", "start spread", "end spread",
                 "stream min / med / max", "SMs"])
    for r in rows:  # the slowest programs of the last launch: which rows, which SMs
        raw = r["last_launch"]
        order = sorted(range(len(raw["end_us"])), key=raw["end_us"].__getitem__)
        print(r["batch"], r["context"], r["variant"], "last to end (seq, kv head, SM, end us):",
              [(i // 8, i % 8, raw["sm"][i], round(raw["end_us"][i], 1)) for i in order[-8:]])
    print("wrote", write_result("decode-timeline", dict(rows=rows)))


if __name__ == "__main__":
    main()
