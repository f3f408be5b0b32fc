"""Live migration of decoding requests between CPU instance actors on a real local Ray cluster (gloo pair groups).

A request's KV moves from one instance to another mid-decode and its stream continues from the destination:
greedy (and seeded) outputs must equal the single-instance engine's token for token, and every instance must end
with all KV blocks free. Removing an instance migrates its decodes instead of waiting for them.
"""

from __future__ import annotations

import asyncio
import time

from accordion import LLM, SamplingParams
from accordion.cluster.migration import NotMigratable
from tests.integration.conftest import MAX_MODEL_LEN, NUM_BLOCKS
from tests.integration.test_elastic_sp import ESPCluster, _Only
from tests.workers.test_hf_equality import random_prompts

PARAMS_8 = SamplingParams(max_tokens=8, min_tokens=8, temperature=0)


class Follow:
    """One streaming request on the cluster's loop, its tokens collected as they come."""

    def __init__(self, cluster: ESPCluster, request_id: str, prompt: list[int], params: SamplingParams):
        self.child = f"{request_id}-0"  # the engine request id of a single completion
        self.tokens: list[int] = []
        self.errors: list[str] = []

        async def run():
            async for d in cluster.engine.generate(request_id, prompt, params):
                if d.error:
                    self.errors.append(d.error)
                self.tokens += d.token_ids
            return self.tokens

        self.task = asyncio.ensure_future(run())

    async def reach(self, n: int) -> None:
        while len(self.tokens) < n:
            assert not self.task.done(), (self.tokens, self.errors)
            await asyncio.sleep(0.005)


def _instances(cluster: ESPCluster) -> list[str]:
    return [r.instance_id for r in cluster.run(cluster.manager.list_instances.remote())]


def _local_only(cluster: ESPCluster) -> None:
    cluster.esp.min_prompt_tokens = 10**6  # plain one-instance prefills; the group exists for migration


def test_migrating_back_and_forth_mid_decode_equals_single_instance(tiny_ckpt):
    """A greedy and a seeded (temperature, repetition penalty) request move A -> B -> A -> B while decoding; their
    outputs equal the single-instance engine's and both instances end idle."""
    path = tiny_ckpt("tiny-llama")
    prompts = random_prompts(2, [40, 23], 500, seed=41)
    greedy = SamplingParams(max_tokens=150, min_tokens=150, temperature=0)
    seeded = SamplingParams(max_tokens=150, min_tokens=150, temperature=0.8, seed=7, repetition_penalty=1.2)
    llm = LLM(path, device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    expected = [llm.generate([prompts[0]], greedy)[0].outputs[0].token_ids,
                llm.generate([prompts[1]], seeded)[0].outputs[0].token_ids]
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5)
    _local_only(cluster)
    try:
        a, b = _instances(cluster)
        cluster.engine.router = _Only(a)

        async def scenario():
            follows = [Follow(cluster, "mig-greedy", prompts[0], greedy), Follow(cluster, "mig-seeded", prompts[1], seeded)]
            src, dst = a, b
            for n in (5, 30, 60, 90):
                for f in follows:
                    await f.reach(n)
                moved = await asyncio.gather(*(cluster.manager.migrate.remote(f.child, src, dst) for f in follows))
                assert moved == [True, True]
                src, dst = dst, src
            return [await f.task for f in follows], [f.errors for f in follows]

        outputs, errors = cluster.run(scenario(), timeout=120)
        assert errors == [[], []]
        assert outputs == expected
        cluster.check_idle()
    finally:
        cluster.close()


def _handle(cluster: ESPCluster, iid: str):
    return next(r.handle for r in cluster.run(cluster.manager.list_instances.remote()) if r.instance_id == iid)


async def _pause(handle, request_id: str) -> None:
    """Stop scheduling a decoding request, its blocks kept (a migration's first step, taken alone): it cannot
    finish until resumed (``resume_migration``) or migrated, so the test does not race its decoding."""
    while (state := await handle.engine_call.remote("export_request", request_id)) is None:
        await asyncio.sleep(0.002)  # a step in flight still computes it; it is paused from now on
    assert not isinstance(state, NotMigratable), state.reason


def test_migration_without_room_keeps_the_request_running(tiny_ckpt):
    """16-block instances: B holds a request that may grow to 250 tokens (all 16 blocks), so A's decoding request
    (it may grow to 240 tokens, 15 blocks) has room to finish there only after B's request finishes, although its
    KV so far would fit in B's free blocks. Migrating before fails (it keeps decoding on A), after succeeds; the
    outputs are unaffected. The test pauses the requests between the steps (as a migration does), so no step
    depends on how fast they decode."""
    path = tiny_ckpt("tiny-llama")
    filling, short = random_prompts(2, [130, 20], 500, seed=42)
    fill = SamplingParams(max_tokens=120, min_tokens=120, temperature=0)
    params = SamplingParams(max_tokens=220, min_tokens=220, temperature=0)
    llm = LLM(path, device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    expected_fill = llm.generate([filling], fill)[0].outputs[0].token_ids
    expected = llm.generate([short], params)[0].outputs[0].token_ids
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5, num_blocks=16)
    _local_only(cluster)
    try:
        a, b = _instances(cluster)
        on_a, on_b = _handle(cluster, a), _handle(cluster, b)

        async def scenario():
            cluster.engine.router = _Only(b)
            filler = Follow(cluster, "fill", filling, fill)
            await filler.reach(1)
            await _pause(on_b, filler.child)  # it holds its claim on B's blocks, and cannot finish meanwhile
            cluster.engine.router = _Only(a)
            mover = Follow(cluster, "mover", short, params)
            await mover.reach(5)
            refused = await cluster.manager.migrate.remote(mover.child, a, b)  # refused: it decodes on A again
            at_refusal = len(mover.tokens)
            assert len(filler.tokens) < len(expected_fill), "the filler finished before the refusal"
            await mover.reach(at_refusal + 2)
            await _pause(on_a, mover.child)  # so that it cannot finish before B has room
            await on_b.engine_call.remote("resume_migration", filler.child)
            filled = await filler.task
            moved = await cluster.manager.migrate.remote(mover.child, a, b)
            return refused, at_refusal, filled, moved, await mover.task

        refused, at_refusal, filled, moved, tokens = cluster.run(scenario(), timeout=120)
        assert not refused and at_refusal < len(expected)
        assert moved
        assert filled == expected_fill and tokens == expected
        cluster.check_idle()
    finally:
        cluster.close()


def test_removal_migrates_a_long_decode_instead_of_waiting_for_it(tiny_ckpt):
    """Removing the instance that decodes a 1900-token request moves the request to the other instance instead of
    waiting for it: the drain ends cleanly with the request migrated (a request that ended first cannot migrate),
    and the output equals the single-instance one. Whether it is still decoding on B when the removal returns is
    not asserted: re-forming the group after the removal may outlast B's last ~1890 tiny-model steps (CI)."""
    path = tiny_ckpt("tiny-llama")
    prompt = random_prompts(1, [40], 500, seed=43)[0]
    params = SamplingParams(max_tokens=1900, min_tokens=1900, temperature=0)
    llm = LLM(path, device="cpu", max_model_len=2048, num_blocks=NUM_BLOCKS)
    expected = llm.generate([prompt], params)[0].outputs[0].token_ids
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5, max_model_len=2048)
    _local_only(cluster)
    try:
        a, b = _instances(cluster)
        cluster.engine.router = _Only(a)

        async def scenario():
            f = Follow(cluster, "drained", prompt, params)
            await f.reach(10)
            t0 = time.monotonic()
            clean = await cluster.manager.remove_instance.remote(a, True, 60.0)
            return clean, time.monotonic() - t0, await f.task, f.errors

        clean, removal_s, tokens, errors = cluster.run(scenario(), timeout=120)
        assert clean, removal_s
        assert errors == [] and tokens == expected
        assert list(cluster.run(cluster.manager.ranks.remote())) == [b]
        assert cluster.run(cluster.manager.migration_stats.remote()) == {"migrated": 1, "failed": 0}
        cluster.check_idle()
    finally:
        cluster.close()


def test_compaction_moves_a_decode_away_to_place_a_long_prompt(tiny_ckpt):
    """48-block instances. A holds W (140-token prompt) and decodes Y (160), B holds Z (280): a 480-token prompt
    (31 blocks with its new tokens) fits on neither, but moving Y (it can finish on B) to B makes room on A. The
    front end asks the manager to compact, then prefills the prompt on A and B with A as master; every output
    equals the single-instance engine's. W and Z are paused meanwhile (as a migration's first step pauses a
    request), so that what fits where does not depend on how fast they decode."""
    from accordion.cluster.esp_planner import PrefillCostModel

    path = tiny_ckpt("tiny-llama")
    w, y, z, long = random_prompts(4, [140, 160, 280, 480], 500, seed=44)
    decode = SamplingParams(max_tokens=400, min_tokens=400, temperature=0)
    y_params = SamplingParams(max_tokens=220, min_tokens=220, temperature=0)  # 24 blocks: Y and Z can both
    z_params = SamplingParams(max_tokens=100, min_tokens=100, temperature=0)  # (24 blocks) finish on B
    llm = LLM(path, device="cpu", max_model_len=1024, num_blocks=NUM_BLOCKS)
    expected = [llm.generate([p], sp)[0].outputs[0].token_ids
                for p, sp in [(w, decode), (z, z_params), (y, y_params), (long, PARAMS_8)]]
    cluster = ESPCluster(path, 2, cpus_per_instance=0.5, num_blocks=48, max_model_len=1024)
    cluster.esp.min_prompt_tokens, cluster.esp.force_degree = 400, 2
    # a cost model under which degree 2 saves 2.4 s on this prompt: far more than moving Y costs
    cluster.engine.sp_placement.cost = PrefillCostModel({1: (0.0, 1e-2, 0.0), 2: (0.0, 5e-3, 0.0)})
    try:
        a, b = _instances(cluster)
        on = {a: _handle(cluster, a), b: _handle(cluster, b)}

        async def scenario():
            follows, paused = [], []
            for name, prompt, params, at in [("w", w, decode, a), ("z", z, z_params, b), ("y", y, y_params, a)]:
                cluster.engine.router = _Only(at)
                follows.append(Follow(cluster, name, prompt, params))
                await follows[-1].reach(1)
                if name != "y":
                    await _pause(on[at], follows[-1].child)
                    paused.append((on[at], follows[-1].child))
            follows.append(Follow(cluster, "long", long, PARAMS_8))
            await follows[-1].task
            for handle, child in paused:
                await handle.engine_call.remote("resume_migration", child)
            outs = [await f.task for f in follows]
            return outs, [f.errors for f in follows]

        outputs, errors = cluster.run(scenario(), timeout=120)
        assert errors == [[]] * 4
        assert outputs == expected
        assert cluster.run(cluster.manager.migration_stats.remote()) == {"migrated": 1, "failed": 0}
        assert cluster.engine.sp_prefills == [[a, b]]
        cluster.check_idle()
    finally:
        cluster.close()
