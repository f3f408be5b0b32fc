"""Multi-master decoding across real processes in a gloo group equals single-instance decoding.

Each process is one engine instance (tiny model, CPU). Two long requests are prefilled with ring attention and
their KV is left spread: request A is mastered by rank 0 with slices on every rank, request B by rank 1 with a
slice on rank 0; the tail holder of each stores the new tokens. Each master also decodes a local request in the
same steps. Every request's greedy output must equal the single-instance engine's, and every instance must end
with all of its KV blocks free (the holders free their slices when the master lets go).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from accordion.cluster.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig
from accordion.cluster.plan import KVSlice, SPPrefillBatch, SPPrefillJob
from accordion.cluster.request import Request, SamplingParams
from tests.workers.test_hf_equality import random_prompts
from tests.workers.test_sequence_parallel import BLOCK, free_port

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0)  # the same stop rule with or without EOS ids
LEN_A, LEN_B, LEN_LOCAL = 45, 37, 11


def placements(world: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """(rank, start, end, extra) per spread request: A over every rank (rank 0 masters), B over ranks 1 and 0."""
    extra = PARAMS.max_tokens - 1
    if world == 2:
        a = [(0, 0, 20, 0), (1, 20, LEN_A, extra)]
    else:
        a = [(0, 0, 16, 0), (1, 16, 32, 0), (2, 32, LEN_A, extra)]
    return {"A": a, "B": [(1, 0, 24, 0), (0, 24, LEN_B, extra)]}


def _run(rank: int, world: int, port: int, ckpt: str, prompts: dict, backend: str, results) -> None:
    torch.set_num_threads(1)
    from accordion.cluster.instance import EngineInstance

    device = "cuda" if backend == "triton" else "cpu"  # NCCL and compiled kernels on GPUs, else gloo
    if device == "cuda":
        torch.cuda.set_device(rank)
    cfg = EngineConfig(model=ModelConfig(model=ckpt, max_model_len=256, dtype="float32"),
                       cache=CacheConfig(block_size=BLOCK, num_blocks=64),
                       device=DeviceConfig(device=device, attention_backend=backend))
    inst = EngineInstance(cfg)
    inst.join_group(f"tcp://127.0.0.1:{port}", world, rank)
    masters = {"A": 0, "B": 1}
    tokens: dict[str, list[int]] = {}
    for job_id, (rid, spans) in enumerate(placements(world).items()):
        slices = []
        for r, a, b, extra in spans:  # each rank reserves its own slice ahead of the job, as the manager does
            slices.append(KVSlice(r, a, b, inst.reserve_slice(rid, b - a + extra) if r == rank else []))
        ring = [masters[rid]] + [r for r in range(world) if r != masters[rid]]
        job = SPPrefillJob(job_id, rid, prompts[rid], PARAMS, (), slices)
        req = Request(request_id=rid, prompt_token_ids=prompts[rid], sampling_params=PARAMS)
        for out in inst.run_sp_prefill(SPPrefillBatch(job_id, ring, [job]), [req] if rank == masters[rid] else None):
            assert out.error is None, out.error
            tokens[rid] = list(out.new_token_ids)
    if rank in masters.values():  # a local request decodes in the same steps as the spread ones
        rid = f"local{rank}"
        inst.core.add_request(Request(request_id=rid, prompt_token_ids=prompts[rid], sampling_params=PARAMS))
        tokens[rid] = []
    deadline = time.monotonic() + 120
    while inst.core.has_unfinished() or inst.slice_server.num_slices:
        assert time.monotonic() < deadline, "multi-master decoding did not finish"
        for o in inst.core.step():
            tokens[o.request_id] += o.new_token_ids
        inst.run_posted()
        if not inst.core.has_unfinished():
            time.sleep(0.01)
    time.sleep(0.2)  # a release posted just now
    inst.run_posted()
    inst.scheduler.check_invariants()
    free = inst.scheduler.kv.num_free_blocks
    inst.leave_group()
    results.put((rank, tokens, free, inst.num_blocks))


@pytest.mark.parametrize("world,backend", [
    (2, "torch"), (3, "torch"),
    pytest.param(2, "triton", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                         reason="needs 2 GPUs")]),
])
def test_spread_requests_decode_like_a_single_instance(tiny_ckpt, world, backend):
    """``torch``: CPU instances, gloo. ``triton``: one GPU per instance, NCCL, the Triton kernels (the CPU
    interpreter is not thread-safe, and slice servers run beside the engine thread)."""
    from accordion import LLM

    ckpt = tiny_ckpt("tiny-llama")
    a, b, l0, l1 = random_prompts(4, [LEN_A, LEN_B, LEN_LOCAL, LEN_LOCAL + 3], 500, seed=41)
    prompts = {"A": a, "B": b, "local0": l0, "local1": l1}
    llm = LLM(ckpt, device="cuda" if backend == "triton" else "cpu", dtype="float32", max_model_len=256,
              block_size=BLOCK)
    expected = {rid: o.outputs[0].token_ids for rid, o in zip(prompts, llm.generate(list(prompts.values()), PARAMS))}
    del llm

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, ckpt, prompts, backend, results), daemon=True)
             for r in range(world)]  # daemon: a hung rank must not keep pytest from exiting
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    decoded = {}
    for rank, tokens, free, total in got:
        assert free == total, f"rank {rank} leaked KV blocks: {free} of {total} free"
        decoded.update(tokens)
    for rid in expected:
        assert decoded[rid] == expected[rid], rid
