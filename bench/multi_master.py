"""What multi-master decoding costs: decode speed of requests whose KV is spread over two instances, against the
same requests with their KV on one instance, side by side in one run.

Two processes (one GPU each), each an :class:`EngineInstance` (the code instance actors run) in one group. Both
phases prefill the same ``--batch`` prompts of ``--context`` tokens with one ring pass on both instances, then
rank 0 decodes ``--new-tokens`` tokens for each:

* ``local``: the placement keeps every prompt's KV on rank 0 (proactive scale-down);
* ``spread``: rank 0 keeps the first half of each prompt, rank 1 the rest and every new token (multi-master:
  each step, in every layer, rank 0 sends the rows' q/k/v to rank 1 and merges its partial attention; such steps
  run eagerly, local ones may replay CUDA graphs).

    python bench/multi_master.py --shape 8b --context 16384 --batch 8 --new-tokens 64
    python bench/multi_master.py --quick      # CPU smoke run: tiny model, gloo
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import free_port, print_table, write_result  # noqa: E402

PRESETS = {"8b": "llama-3.1-8b", "1b": "llama-3.2-1b", "tiny": "tiny-llama"}


def _worker(rank: int, port: int, path: str, args, results) -> None:
    import torch.distributed as dist

    from accordion.cluster.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
    from accordion.cluster.instance import EngineInstance
    from accordion.cluster.plan import KVSlice, SPPrefillBatch, SPPrefillJob
    from accordion.cluster.request import Request, SamplingParams

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    max_len = args.context + args.new_tokens + 16
    blocks = args.batch * (-(-max_len // 16)) + 64
    inst = EngineInstance(EngineConfig(
        model=ModelConfig(model=path, max_model_len=max_len),
        cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(args.batch, 8)),
        device=DeviceConfig(device="cuda" if cuda else "cpu")))
    inst.join_group(f"tcp://127.0.0.1:{port}", 2, rank)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, args.vocab) for _ in range(args.context)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.new_tokens + 1, ignore_eos=True, temperature=0)
    half = args.context // 2
    for it, mode in enumerate(["local", "spread"] * (args.reps + 1)):  # the first pair warms up
        jobs, requests = [], []
        for i, prompt in enumerate(prompts):
            rid = f"{mode}-{it}-{i}"
            spans = [(0, 0, args.context, args.new_tokens)] if mode == "local" else \
                [(0, 0, half, 0), (1, half, args.context, args.new_tokens)]
            slices = [KVSlice(r, a, b, inst.reserve_slice(rid, b - a + extra) if r == rank else [])
                      for r, a, b, extra in spans]
            jobs.append(SPPrefillJob(it * 1000 + i, rid, prompt, params, (), slices))
            requests.append(Request(request_id=rid, prompt_token_ids=prompt, sampling_params=params))
        dist.barrier()
        inst.run_sp_prefill(SPPrefillBatch(it, [0, 1], jobs), requests if rank == 0 else None)
        if rank == 0:
            if cuda:
                torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
            while inst.core.has_unfinished():
                tokens += sum(len(o.new_token_ids) for o in inst.core.step())
            dt = time.perf_counter() - t0
            if it >= 2:
                results.put((mode, tokens / dt))
        deadline = time.monotonic() + 600
        while rank == 1 and inst.slice_server.num_slices:  # until the master released the spread slices
            assert time.monotonic() < deadline
            inst.run_posted()
            time.sleep(0.001)
        inst.run_posted()
        for job in jobs:  # no-ops but for reservations nobody used
            inst.scheduler.release_slice(job.request_id)
        assert inst.scheduler.kv.num_free_blocks == inst.scheduler.kv.num_blocks
        dist.barrier()
    if rank == 0:
        results.put(None)
    inst.leave_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b", choices=list(PRESETS))
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model, CPU-sized")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.context, args.batch, args.new_tokens, args.reps = "tiny", 96, 2, 8, 1
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs")
    from accordion.checkpoints import make_checkpoint

    path = str(make_checkpoint(Path(tempfile.mkdtemp()) / args.shape, PRESETS[args.shape],
                               dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu"))
    args.vocab = 500 if args.shape == "tiny" else 120000
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, path, args, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    speeds: dict[str, list[float]] = {}
    while (item := results.get(timeout=3600)) is not None:
        speeds.setdefault(item[0], []).append(item[1])
    for p in procs:
        p.join(timeout=120)
    best = {mode: max(v) for mode, v in speeds.items()}
    ratio = best["spread"] / best["local"]
    write_result("multi-master", {"settings": vars(args), "decode_tok_s": best, "spread_over_local": ratio})
    print_table([[m, best[m]] for m in ("local", "spread")], ["KV placement", "decode tok/s (rank 0)"])
    print(f"spread / local decode speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
