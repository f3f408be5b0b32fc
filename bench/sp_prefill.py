"""Sequence-parallel prefill of one long prompt on 1, 2, 4 (, 8) GPUs, side by side in one run.

One process per GPU, each an :class:`EngineInstance` (the code instance actors run) in one NCCL group. For every
prompt length: the single-instance baseline (the engine's own chunked prefill, ``max_num_batched_tokens``
chunks) and ring-attention prefill at each degree (``EngineInstance.run_sp_prefill``; the master keeps the whole
KV, as proactive scale-down to one decoding instance). Time = prompt submitted -> first token sampled. With
``--batch N`` every run prefills N prompts: in one ring pass ("batched") against one pass each ("one by one").

    python bench/sp_prefill.py --shape 8b --lengths 32768,131072 --degrees 1,2,4
    python bench/sp_prefill.py --shape 8b --lengths 8192 --degrees 2,4 --batch 4
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_result  # noqa: E402

PRESETS = {"8b": "llama-3.1-8b", "1b": "llama-3.2-1b", "tiny": "tiny-llama"}


def _engine_config(path: str, args):
    from accordion.cluster.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig

    max_len = max(args.lengths) + 64
    blocks = args.batch * -(-max_len // 16) + 64
    return EngineConfig(model=ModelConfig(model=path, max_model_len=max_len),
                        cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
                        scheduler=SchedulerConfig(max_num_batched_tokens=args.chunk, max_num_seqs=4),
                        device=DeviceConfig(device="cuda" if torch.cuda.is_available() else "cpu", cuda_graphs=False))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _worker(rank: int, world: int, port: int, path: str, args, results) -> None:
    from accordion.cluster.instance import EngineInstance
    from accordion.cluster.plan import KVSlice, SPPrefillBatch, SPPrefillJob
    from accordion.cluster.request import Request, SamplingParams

    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    inst = EngineInstance(_engine_config(path, args))
    inst.join_group(f"tcp://127.0.0.1:{port}", world, rank)
    params = SamplingParams(max_tokens=1, temperature=0)
    rng = random.Random(0)
    job_ids = iter(range(1 << 30))
    modes = ["single"] if args.batch == 1 else ["one by one", "batched"]
    for length in args.lengths:
        prompt = [rng.randrange(10, args.vocab) for _ in range(length)]
        runs = [(d, m) for d in args.degrees for m in modes] + [(0, "chunked")]  # 0: the baseline on rank 0
        for degree, mode in runs:
            for rep in range(args.reps + 1):  # rep 0 warms up (Triton compilation)
                dist.barrier()
                _sync()
                t0 = time.perf_counter()
                rids = [f"{length}-{degree}-{mode}-{rep}-{i}" for i in range(args.batch)]
                reqs = [Request(request_id=rid, prompt_token_ids=prompt, sampling_params=params) for rid in rids]
                if degree == 0 and rank == 0:  # the engine's own chunked prefill of all the prompts
                    core = inst.core
                    for req in reqs:
                        core.add_request(req)
                    while core.has_unfinished():
                        core.step()
                elif 0 < degree:
                    jobs = [SPPrefillJob(next(job_ids), rid, prompt, params, (), [KVSlice(0, 0, length, [])])
                            for rid in rids]
                    batches = [jobs] if mode == "batched" else [[job] for job in jobs]
                    for i, batch in enumerate(batches):
                        if rank >= degree:
                            continue
                        mine = [r for r in reqs if r.request_id in {j.request_id for j in batch}]
                        outs = inst.run_sp_prefill(SPPrefillBatch(i, list(range(degree)), batch),
                                                   mine if rank == 0 else None)
                        if rank == 0:
                            assert len(outs) == len(batch) and all(o.finished and o.error is None for o in outs)
                _sync()
                dt = time.perf_counter() - t0
                dist.barrier()
                if rank == 0 and rep > 0:
                    results.put((length, degree, mode, dt))
                if rank == 0:
                    inst.scheduler.check_invariants()
                    assert inst.scheduler.kv.num_free_blocks == inst.scheduler.kv.num_blocks
    dist.barrier()
    if rank == 0:
        results.put(None)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=list(PRESETS))
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--degrees", default="1,2,4")
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens of the chunked baseline")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1,
                    help="prompts per run: >1 compares one ring pass over all of them with one pass each")
    ap.add_argument("--ckpt-dir", default=None)
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.degrees = [int(x) for x in args.degrees.split(",")]
    cuda = torch.cuda.is_available()
    world = max(args.degrees)
    if cuda and torch.cuda.device_count() < world:
        raise SystemExit(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    from accordion.checkpoints import make_checkpoint

    root = Path(args.ckpt_dir or tempfile.mkdtemp())
    path = str(make_checkpoint(root / args.shape, PRESETS[args.shape], dtype="bfloat16" if cuda else "float32",
                               device="cuda" if cuda else "cpu"))
    args.vocab = 500 if args.shape == "tiny" else 120000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    procs = [ctx.Process(target=_worker, args=(r, world, port, path, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    times: dict[tuple[int, int, str], list[float]] = {}
    while (item := results.get(timeout=3600)) is not None:
        length, degree, mode, dt = item
        times.setdefault((length, degree, mode), []).append(dt)
    for p in procs:
        p.join(timeout=120)
    rows, out = [], []
    modes = ["single"] if args.batch == 1 else ["one by one", "batched"]
    for length in args.lengths:
        base = min(times[(length, 0, "chunked")])
        rows.append([length, "chunked (1 GPU)", f"{base:.3f}", "1.00x", "-"])
        for mode in modes:
            one = min(times[(length, 1, mode)]) if (length, 1, mode) in times else None
            for degree in args.degrees:
                t = min(times[(length, degree, mode)])
                name = f"ring SP x{degree}" + ("" if mode == "single" else f", {mode}")
                rows.append([length, name, f"{t:.3f}", f"{base / t:.2f}x", f"{one / t:.2f}x" if one else "-"])
                out.append({"length": length, "degree": degree, "mode": mode, "seconds": t,
                            "speedup_vs_chunked": base / t, "speedup_vs_sp1": (one / t) if one else None})
        out.append({"length": length, "degree": 0, "mode": "chunked", "seconds": base})
    write_result("sp-prefill", {"settings": {k: v for k, v in vars(args).items()}, "results": out})
    print_table(rows, ["prompt tokens", "mode", "seconds", "vs chunked 1 GPU", "vs SP x1"])


if __name__ == "__main__":
    main()
