"""Sequence-parallel (ring) prefill across real processes in a gloo group equals single-instance prefill.

Each process is one engine instance (tiny model, CPU). Checks: the master's greedy continuation after an SP
prefill equals the single-instance output; with the KV split over several instances (proactive scale-down), every
instance's cache holds exactly the reference K/V of its slice.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from accordion.cluster.block_manager import hash_block
from accordion.cluster.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig
from accordion.cluster.plan import KVSlice, SPPrefillBatch, SPPrefillJob
from accordion.cluster.request import Request, SamplingParams
from tests.workers.test_hf_equality import random_prompts

BLOCK = 4
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0)  # the same stop rule with or without EOS ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_config(ckpt: str, backend: str = "torch") -> EngineConfig:
    return EngineConfig(model=ModelConfig(model=ckpt, max_model_len=256), cache=CacheConfig(block_size=BLOCK, num_blocks=200),
                        device=DeviceConfig(device="cpu", attention_backend=backend))


def split_slices(length: int, world: int) -> list[tuple[int, int, int]]:
    """(rank, start, end): contiguous, block-aligned slices, the last instance taking the remainder."""
    per = -(-length // world // BLOCK) * BLOCK
    return [(r, r * per, min(length, (r + 1) * per)) for r in range(world) if r * per < length]


def _run(rank: int, world: int, port: int, ckpt: str, prompts: list[list[int]], split: bool, results,
         backend="torch"):
    torch.set_num_threads(1)
    from accordion.cluster.instance import EngineInstance

    inst = EngineInstance(engine_config(ckpt, backend))
    inst.join_group(f"tcp://127.0.0.1:{port}", world, rank)
    jobs = []
    for i, prompt in enumerate(prompts):
        rid = f"req{i}"
        spans = split_slices(len(prompt), world) if split else [(0, 0, len(prompt))]
        placement = []
        for r, a, b in spans:  # every rank only needs its own slice's block ids (empty: allocated by the job)
            blocks = inst.scheduler.reserve_slice(rid, b - a) if (split and r == rank) else []
            placement.append(KVSlice(r, a, b, blocks))
        jobs.append(SPPrefillJob(i, rid, prompt, PARAMS, (), placement))
    batch = SPPrefillBatch(0, list(range(world)), jobs)
    if split:
        inst.worker.batch.states.clear()
        from accordion.workers.sequence_parallel import SequenceParallelPrefill

        SequenceParallelPrefill(inst.worker, rank).run(batch)
        mine = jobs[0].slice_of(rank)
        kv = None if mine is None else [c[:, mine.block_ids].numpy().copy() for c in inst.worker.kv_caches]
        results.put((rank, mine and (mine.start, mine.end), kv))
        inst.leave_group()
        return
    requests = [Request(request_id=f"req{i}", prompt_token_ids=p, sampling_params=PARAMS)
                for i, p in enumerate(prompts)]
    outs = inst.run_sp_prefill(batch, requests if rank == 0 else None)
    if rank == 0:
        tokens = {o.request_id: list(o.new_token_ids) for o in outs}
        while inst.core.has_unfinished():
            for o in inst.core.step():
                tokens[o.request_id] += o.new_token_ids
        inst.scheduler.check_invariants()
        assert inst.scheduler.kv.num_free_blocks == inst.scheduler.kv.num_blocks
        results.put((rank, [tokens[f"req{i}"] for i in range(len(prompts))], None))
    inst.leave_group()


def run_group(world: int, ckpt: str, prompts: list[list[int]], split: bool, backend: str = "torch") -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, ckpt, prompts, split, results, backend), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    n_expected = world if split else 1
    got = [results.get(timeout=120) for _ in range(n_expected)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize("world,backend", [(1, "torch"), (2, "torch"), (4, "torch"), (2, "triton")])
def test_ring_prefill_then_local_decode_equals_single_instance(tiny_ckpt, world, backend):
    """``triton``: the ring's attention, merge and KV writes through the Triton kernels (the GPU path)."""
    from accordion import LLM

    ckpt = tiny_ckpt("tiny-llama")
    prompt = random_prompts(1, [37], 500, seed=21)[0]
    expected = LLM(ckpt, device="cpu", max_model_len=256, block_size=BLOCK).generate([prompt], PARAMS)
    [(_, tokens, _)] = run_group(world, ckpt, [prompt], split=False, backend=backend)
    assert tokens == [expected[0].outputs[0].token_ids]


@pytest.mark.parametrize("world,backend", [(2, "torch"), (3, "torch"), (2, "triton")])
def test_batched_ring_prefill_equals_single_instance(tiny_ckpt, world, backend):
    """Three prompts of different lengths in one ring pass (per-prompt zig-zag shares, varlen attention)."""
    from accordion import LLM

    ckpt = tiny_ckpt("tiny-llama")
    prompts = random_prompts(3, [37, 50, 23], 500, seed=24)
    expected = LLM(ckpt, device="cpu", max_model_len=256, block_size=BLOCK).generate(prompts, PARAMS)
    [(_, tokens, _)] = run_group(world, ckpt, prompts, split=False, backend=backend)
    assert tokens == [o.outputs[0].token_ids for o in expected]


def test_proactive_scale_down_stores_each_slice(tiny_ckpt):
    from accordion import LLM

    ckpt = tiny_ckpt("tiny-llama")
    prompt = random_prompts(1, [48], 500, seed=22)[0]  # 12 full blocks
    ref = LLM(ckpt, device="cpu", max_model_len=256, block_size=BLOCK)
    ref.generate([prompt], SamplingParams(max_tokens=1))
    pool, parent, ref_blocks = ref.scheduler.kv.pool, None, []
    for i in range(len(prompt) // BLOCK):
        parent = hash_block(parent, prompt[i * BLOCK:(i + 1) * BLOCK])
        ref_blocks.append(pool._cached[parent])
    ref_caches = ref.instance.worker.kv_caches
    for rank, span, kv in run_group(3, ckpt, [prompt], split=True):
        a, b = span
        want = ref_blocks[a // BLOCK:b // BLOCK]
        for layer, got in enumerate(kv):
            torch.testing.assert_close(torch.from_numpy(got), ref_caches[layer][:, want], rtol=1e-5, atol=1e-5)


def test_failed_ring_prefill_ends_the_request_with_an_error(tiny_ckpt, monkeypatch):
    """A collective that raises must not leave the request hanging: the master reports ERROR and frees its slice."""
    from accordion.cluster.instance import EngineInstance
    from accordion.workers import sequence_parallel

    inst = EngineInstance(engine_config(tiny_ckpt("tiny-llama")))
    inst.rank = 0

    def broken(self, batch):
        raise RuntimeError("peer went away")

    monkeypatch.setattr(sequence_parallel.SequenceParallelPrefill, "run", broken)
    prompt = random_prompts(1, [20], 500, seed=23)[0]
    job = SPPrefillJob(0, "req", prompt, PARAMS, (), [KVSlice(0, 0, len(prompt), [])])
    [out] = inst.run_sp_prefill(SPPrefillBatch(0, [0, 1], [job]),
                                [Request(request_id="req", prompt_token_ids=prompt, sampling_params=PARAMS)])
    assert str(out.finish_reason) == "error" and "peer went away" in out.error
    inst.scheduler.check_invariants()
    assert inst.scheduler.kv.num_free_blocks == inst.scheduler.kv.num_blocks
