"""Elastic sequence parallelism on a real local Ray cluster: CPU instance actors in a gloo group.

Long prompts are prefilled by ring attention across an instance group and decoded on the master (proactive
scale-down); instances are removed and added while serving, which re-forms the group. Greedy outputs must equal
the single-instance engine's token for token, and every instance must return to zero used KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from accordion import LLM, SamplingParams
from accordion.cluster.config import ClusterConfig, ESPConfig
from tests.integration.conftest import MAX_MODEL_LEN, NUM_BLOCKS, engine_config
from tests.workers.test_hf_equality import random_prompts

PARAMS = SamplingParams(max_tokens=8, min_tokens=8, temperature=0)
_names = itertools.count()


class ESPCluster:
    """A global manager with ``n`` CPU instances and a RayEngineClient routing long prompts to groups."""

    def __init__(self, path: str, n: int, cpus_per_instance: float, gpus_per_instance: float = 0.0,
                 num_blocks: int | None = None, max_model_len: int | None = None):
        import ray

        from accordion.cluster.global_manager import start_manager
        from accordion.cluster.ray_engine import RayEngineClient

        if not ray.is_initialized():
            ray.init(num_cpus=4, num_gpus=torch.cuda.device_count() if gpus_per_instance else 0,
                     include_dashboard=False, object_store_memory=80 << 20,
                     _node_ip_address="127.0.0.1", namespace="accordion-test", log_to_driver=False,
                     configure_logging=False)
        self.esp = ESPConfig(enabled=True, min_prompt_tokens=16, force_degree=n)
        engine = engine_config(path)
        if num_blocks is not None:
            engine.cache.num_blocks = num_blocks
        if max_model_len is not None:
            engine.model.max_model_len = max_model_len
        if gpus_per_instance:
            engine.device.device, engine.model.dtype = "cuda", "float32"
        self.config = ClusterConfig(engine=engine, esp=self.esp, namespace="accordion-test",
                                    gpus_per_instance=gpus_per_instance,
                                    manager_name=f"esp-manager-{next(_names)}", cpus_per_instance=cpus_per_instance,
                                    health_check_interval_s=2.0, health_check_timeout_s=30.0)
        self.manager = start_manager(self.config)
        self.loop = asyncio.new_event_loop()
        self.run(self.manager.start.remote(n), timeout=300)
        self.engine = self.run(RayEngineClient.create(self.manager, self.config.engine, esp=self.esp))
        self.run(self.engine.wait_for_instances(n, timeout_s=60))

    def run(self, coro, timeout: float = 300):
        async def wrap():
            return await coro

        return self.loop.run_until_complete(asyncio.wait_for(wrap(), timeout))

    def generate(self, prompts: list[list[int]], params: SamplingParams = PARAMS) -> list[list[int]]:
        async def one(i, p):
            toks = []
            async for d in self.engine.generate(f"r{next(_names)}-{i}", p, params):
                assert d.error is None, d.error
                toks += d.token_ids
            return toks

        async def all_():
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

        return self.run(all_())

    def check_idle(self) -> None:
        async def check():
            recs = await self.manager.list_instances.remote()
            for rec in recs:
                await rec.handle.check_idle.remote()
            return len(recs)

        for _ in range(50):  # finished streams free their blocks within a step
            try:
                self.run(check())
                return
            except Exception:
                self.run(asyncio.sleep(0.1))
        self.run(check())

    def close(self) -> None:
        import ray

        try:
            self.run(self.engine.close())
            self.run(self.manager.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.manager, no_restart=True)
            self.loop.close()


@pytest.fixture(scope="module")
def expected_and_prompts(tiny_ckpt):
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(3, [40, 57, 33], 500, seed=31) + random_prompts(1, [5], 500, seed=32)
    llm = LLM(path, device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    return path, prompts, [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]


def test_degrees_2_and_4_then_instances_removed_and_added(expected_and_prompts):
    path, prompts, expected = expected_and_prompts
    cluster = ESPCluster(path, 4, cpus_per_instance=0.5)
    try:
        for degree in (4, 2):
            cluster.esp.force_degree = degree
            cluster.engine.sp_prefills.clear()
            before = cluster.run(cluster.manager.sp_stats.remote())
            assert cluster.generate(prompts) == expected
            assert sorted(len(g) for g in cluster.engine.sp_prefills) == [degree] * 3  # the 5-token prompt ran alone
            after = cluster.run(cluster.manager.sp_stats.remote())
            assert after["prompts"] - before["prompts"] == 3 and after["queued"] == 0
            if degree == 4:  # one group: prompts that queue behind the first go in one ring pass together
                assert after["batches"] - before["batches"] < 3
            cluster.check_idle()

        victim = cluster.run(cluster.manager.list_instances.remote())[-1].instance_id
        cluster.run(cluster.manager.remove_instance.remote(victim, True, 30.0))
        assert len(cluster.run(cluster.manager.ranks.remote())) == 3
        cluster.esp.force_degree = 3
        cluster.engine.sp_prefills.clear()
        assert cluster.generate(prompts) == expected
        assert all(victim not in g and len(g) == 3 for g in cluster.engine.sp_prefills)

        cluster.run(cluster.manager.add_instance.remote())
        cluster.run(cluster.engine.wait_for_instances(4, timeout_s=60))
        assert len(cluster.run(cluster.manager.ranks.remote())) == 4
        cluster.esp.force_degree = 4
        cluster.engine.sp_prefills.clear()
        assert cluster.generate(prompts) == expected
        assert all(len(g) == 4 for g in cluster.engine.sp_prefills)
        cluster.check_idle()
    finally:
        cluster.close()


def test_multi_master_decoding_when_no_instance_has_room(tiny_ckpt):
    """Instances of 6 blocks (96 tokens): a 150-token prompt plus 8 new tokens fits on none, so its KV stays
    spread over several instances and is decoded in place (the tail holder stores the new tokens' KV); then two
    such requests at once, under different masters, alone and beside short requests. Outputs equal the
    single-instance engine's and every instance ends with all blocks free."""
    path = tiny_ckpt("tiny-llama")
    long = random_prompts(3, [150, 130, 170], 500, seed=33)
    short = random_prompts(2, [20, 9], 500, seed=34)
    llm = LLM(path, device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    expected = [o.outputs[0].token_ids for o in llm.generate(long + short, PARAMS)]
    cluster = ESPCluster(path, 4, cpus_per_instance=0.5, num_blocks=6)
    cluster.esp.force_degree = None  # the cost model would keep these short prompts local: room decides
    try:
        for prompt, want in zip(long, expected):  # one at a time: each sees every instance's blocks free
            assert cluster.generate([prompt]) == [want]
            cluster.check_idle()
        cluster.engine.sp_prefills.clear()
        assert cluster.generate(long[:2]) == expected[:2]  # placed together: the second avoids the first's blocks
        assert len({g[0] for g in cluster.engine.sp_prefills}) == 2  # two masters, each with its mini-batch
        # with short requests beside them, a slice may be taken between the plan and its reservation: the front
        # end plans again from fresh load reports
        assert cluster.generate(long[:2] + short) == expected[:2] + expected[3:]
        cluster.check_idle()
    finally:
        cluster.close()


def test_removing_a_holder_waits_for_the_spread_requests_it_serves(tiny_ckpt):
    """Draining an instance that keeps part of another master's request's KV waits until that request finishes;
    the request's output is unaffected and the instance then leaves cleanly."""
    path = tiny_ckpt("tiny-llama")
    prompt = random_prompts(1, [100], 500, seed=36)[0]
    # 900 tokens (57 blocks) fit on no 52-block instance: the 800 new tokens go to a tail instance, and decoding
    # them outlasts the holder's removal unless the drain waits for it
    params = SamplingParams(max_tokens=800, min_tokens=800, temperature=0)
    llm = LLM(path, device="cpu", max_model_len=1024, num_blocks=NUM_BLOCKS)
    expected = llm.generate([prompt], params)[0].outputs[0].token_ids
    cluster = ESPCluster(path, 3, cpus_per_instance=0.5, num_blocks=52, max_model_len=1024)
    cluster.esp.force_degree = None
    try:
        async def scenario():
            async def one():
                return [t async for d in cluster.engine.generate("spread-drain", prompt, params) for t in d.token_ids]

            task = asyncio.ensure_future(one())
            while not cluster.engine.sp_prefills:
                assert not task.done(), task.result()
                await asyncio.sleep(0.01)
            holder = cluster.engine.sp_prefills[0][1]  # a spread group lists the KV holders first
            clean = await cluster.manager.remove_instance.remote(holder, True, 60.0)
            finished_first = task.done()
            return await task, clean, finished_first

        tokens, clean, finished_first = cluster.run(scenario())
        assert tokens == expected and clean and finished_first
        cluster.check_idle()
    finally:
        cluster.close()


def test_a_holder_that_dies_fails_only_the_requests_it_served(tiny_ckpt):
    """Kill a KV holder while its master decodes a spread request: that request ends with an error, and the master
    (its engine still running) serves the next requests correctly."""
    import ray

    path = tiny_ckpt("tiny-llama")
    prompt = random_prompts(1, [100], 500, seed=37)[0]
    short = random_prompts(2, [20, 9], 500, seed=38)
    params = SamplingParams(max_tokens=800, min_tokens=800, temperature=0)
    llm = LLM(path, device="cpu", max_model_len=1024, num_blocks=NUM_BLOCKS)
    expected_short = [o.outputs[0].token_ids for o in llm.generate(short, PARAMS)]
    cluster = ESPCluster(path, 3, cpus_per_instance=0.5, num_blocks=52, max_model_len=1024)
    cluster.esp.force_degree = None
    try:
        async def scenario():
            deltas = []

            async def one():
                async for d in cluster.engine.generate("spread-kill", prompt, params):
                    deltas.append(d)

            task = asyncio.ensure_future(one())
            while sum(len(d.token_ids) for d in deltas) < 10:  # decoding, with its KV spread
                assert not task.done(), deltas
                await asyncio.sleep(0.01)
            master, holder = cluster.engine.sp_prefills[0][:2]
            recs = {r.instance_id: r for r in await cluster.manager.list_instances.remote()}
            ray.kill(recs[holder].handle, no_restart=True)
            await task
            return master, deltas

        master, deltas = cluster.run(scenario())
        assert deltas[-1].error is not None and "went away" in deltas[-1].error
        assert sum(len(d.token_ids) for d in deltas) < 800
        cluster.esp.min_prompt_tokens = 1000
        cluster.engine.router = _Only(master)
        assert cluster.generate(short) == expected_short  # the master's engine kept running
    finally:
        cluster.close()


class _Only:
    """A router that sends every request to one instance (to fill it up)."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id

    def choose(self, candidates):
        return self.instance_id


def test_scale_up_moves_new_kv_to_another_instance_instead_of_preempting(tiny_ckpt):
    """Two 40-token prompts decoding 40 tokens each on one 6-block instance (96 tokens): both fit at admission,
    then their decodes find no free block. Instead of preempting, each request's new tokens' KV goes to the
    other instance (multi-master scale-up) and decoding goes on; outputs equal the single-instance engine's."""
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(2, [40, 40], 500, seed=35)
    params = SamplingParams(max_tokens=40, min_tokens=40, temperature=0)
    llm = LLM(path, device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5, num_blocks=6)
    cluster.esp.min_prompt_tokens = 1000  # plain local prefills
    try:
        first = cluster.run(cluster.manager.list_instances.remote())[0].instance_id
        cluster.engine.router = _Only(first)
        assert cluster.generate(prompts, params) == expected
        info = cluster.run(cluster.engine.server_info())
        assert sum(i.num_preemptions for i in info.instances) == 0
        cluster.check_idle()
    finally:
        cluster.close()


@pytest.mark.slow
def test_degree_8_equals_single_instance(expected_and_prompts):
    """The 8-instance correctness run (issue 6 without an 8-GPU machine): degree 8 on 8 CPU instances."""
    path, prompts, expected = expected_and_prompts
    cluster = ESPCluster(path, 8, cpus_per_instance=0.25)
    try:
        assert cluster.generate(prompts) == expected
        assert sorted(len(g) for g in cluster.engine.sp_prefills) == [8] * 3
        cluster.check_idle()
    finally:
        cluster.close()


def test_profile_fits_cost_model_and_scale_resizes(expected_and_prompts, tmp_path):
    """`accordion profile`'s measurement on a live ESP cluster, then `accordion scale` down and up."""
    from accordion.cluster.esp_planner import PrefillCostModel
    from accordion.ops import profile_prefill, scale

    path, prompts, expected = expected_and_prompts
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5)
    try:
        samples = cluster.run(profile_prefill(cluster.engine, [32, 96, 160], [1, 2], reps=1, vocab=500))
        assert {d for d, _, _ in samples} == {1, 2} and all(t > 0 for _, _, t in samples)
        model = PrefillCostModel.fit(samples)
        model.save(tmp_path / "cost.json")
        assert set(PrefillCostModel.load(tmp_path / "cost.json").coeffs) == {1, 2}
        cluster.check_idle()

        assert scale(cluster.manager, 1, timeout_s=30) == (2, 1)
        assert len(cluster.run(cluster.manager.ranks.remote())) == 1
        assert scale(cluster.manager, 2, timeout_s=30) == (1, 2)
        cluster.run(cluster.engine.wait_for_instances(2, timeout_s=60))
        cluster.esp.force_degree, cluster.esp.min_prompt_tokens = 2, 16
        assert cluster.generate(prompts) == expected
    finally:
        cluster.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_degree_2_on_gpus_equals_single_instance(tiny_ckpt):
    """The GPU path end to end: engine processes under instance actors, an NCCL group, ring prefill over NVLink."""
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(3, [40, 57, 33], 500, seed=31) + random_prompts(1, [5], 500, seed=32)
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    del llm
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5, gpus_per_instance=1.0)
    try:
        assert cluster.generate(prompts) == expected
        assert len(cluster.engine.sp_prefills) == 3
        cluster.check_idle()
    finally:
        cluster.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_multi_master_and_scale_up_on_gpus_equal_single_instance(tiny_ckpt):
    """Multi-master decoding on GPUs through the whole serving path: 6-block instances (96 tokens), a 150-token
    prompt spread over both (then a 130-token one), then two 40-token prompts whose decodes run out of blocks and
    scale up onto the other GPU. Outputs equal the single-instance engine's."""
    path = tiny_ckpt("tiny-llama")
    long = random_prompts(2, [150, 130], 500, seed=33)
    short = random_prompts(2, [40, 40], 500, seed=35)
    grow = SamplingParams(max_tokens=40, min_tokens=40, temperature=0)
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    expected_long = [o.outputs[0].token_ids for o in llm.generate(long, PARAMS)]
    expected_short = [o.outputs[0].token_ids for o in llm.generate(short, grow)]
    del llm
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5, gpus_per_instance=1.0, num_blocks=6)
    cluster.esp.force_degree = None
    try:
        for prompt, want in zip(long, expected_long):
            assert cluster.generate([prompt]) == [want]
            cluster.check_idle()
        cluster.esp.min_prompt_tokens = 1000
        first = cluster.run(cluster.manager.list_instances.remote())[0].instance_id
        cluster.engine.router = _Only(first)
        assert cluster.generate(short, grow) == expected_short
        info = cluster.run(cluster.engine.server_info())
        assert sum(i.num_preemptions for i in info.instances) == 0
        cluster.check_idle()
    finally:
        cluster.close()
