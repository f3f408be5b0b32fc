"""Where does an offline run's time go? Per step kind (decode-only, hybrid, prefill-only): count, GPU+CPU time,
and the scheduler's own time. Runs the workload twice and reports the second (compilation excluded).

    python bench/profile_steps.py [--shape 1b] [--num-prompts 64 --input-len 512 --output-len 128] [--max-num-seqs N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accordion import LLM  # noqa: E402
from accordion.checkpoints import make_checkpoint  # noqa: E402
from accordion.cluster.request import Request, SamplingParams  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402

PRESETS = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b", "tiny": "tiny-llama"}


def run(llm: LLM, prompts: list[list[int]], output_len: int, tag: str) -> dict:
    core, sched, worker = llm.instance.core, llm.instance.scheduler, llm.instance.worker
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(Request(request_id=f"{tag}-{i}", prompt_token_ids=p, sampling_params=params))
    stats = defaultdict(lambda: [0, 0.0])
    sched_s = update_s = 0.0
    sync = torch.cuda.synchronize if worker.device.type == "cuda" else (lambda: None)
    t_start = time.perf_counter()
    n_tokens = 0
    while core.has_unfinished():
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        result = worker.execute(plan)
        sync()
        t2 = time.perf_counter()
        n_tokens += len(sched.update(plan, result))
        t3 = time.perf_counter()
        nd, n = plan.num_decodes, len(plan.chunks)
        kind = "decode" if nd == n else ("prefill" if nd == 0 else "hybrid")
        stats[kind][0] += 1
        stats[kind][1] += t2 - t1
        sched_s += t1 - t0
        update_s += t3 - t2
    wall = time.perf_counter() - t_start
    return {"wall_s": wall, "tok_s": len(prompts) * output_len / wall, "schedule_s": sched_s, "update_s": update_s,
            "steps": {k: {"count": c, "execute_s": s, "ms_per_step": 1e3 * s / max(c, 1)} for k, (c, s) in stats.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=list(PRESETS))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: --num-prompts (one wave)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    root = Path(tempfile.mkdtemp())
    path = make_checkpoint(root / args.shape, PRESETS[args.shape], dtype="bfloat16" if cuda else "float32",
                           device="cuda" if cuda else "cpu")
    rng = random.Random(0)
    vocab = 500 if args.shape == "tiny" else 120000

    def prompts():
        return [[rng.randrange(10, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]

    rows, results = [], {}
    for fuse in (True, False):
        llm = LLM(str(path), max_model_len=2048, max_num_seqs=args.max_num_seqs or args.num_prompts,
                  gpu_memory_utilization=0.4,
                  max_num_batched_tokens=args.max_num_batched_tokens, hybrid_attention="fused" if fuse else "separate")
        run(llm, prompts(), args.output_len, "warm")
        r = run(llm, prompts(), args.output_len, "timed")
        results[f"fuse={fuse}"] = r
        for kind, st in sorted(r["steps"].items()):
            rows.append([f"fuse={fuse}", kind, st["count"], f"{st['execute_s']:.3f}", f"{st['ms_per_step']:.2f}"])
        rows.append([f"fuse={fuse}", "TOTAL", "-", f"{r['wall_s']:.3f}", f"{r['tok_s']:.0f} tok/s; sched "
                     f"{r['schedule_s']:.3f}s update {r['update_s']:.3f}s"])
        llm.instance.worker.graphs = None
        del llm
        if cuda:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    write_result("profile-steps", {"settings": vars(args), "results": results})
    print_table(rows, ["variant", "step kind", "count", "execute s", "ms/step"])


if __name__ == "__main__":
    main()
