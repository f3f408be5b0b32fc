"""The scheduler on its own: no torch, no model. A fake executor samples token 7 for every sampled chunk."""

from __future__ import annotations

import pytest

from accordion.cluster.config import CacheConfig, SchedulerConfig
from accordion.cluster.engine import EngineCore
from accordion.cluster.errors import EngineOverloadedError, RequestTooLargeError
from accordion.cluster.plan import StepPlan, StepResult
from accordion.cluster.request import Request, RequestStatus, SamplingParams
from accordion.cluster.scheduler import Scheduler


class FakeExecutor:
    def __init__(self):
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        return StepResult(plan.step_id, {c.request_id: 7 for c in plan.chunks if c.sample})


def make_scheduler(budget=16, num_blocks=64, block_size=4, max_seqs=8, policy="fcfs", max_model_len=512, **kw):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy, **kw),
                     CacheConfig(block_size=block_size), num_blocks=num_blocks, max_model_len=max_model_len)


def make_request(rid, n_prompt, max_tokens=4, prio=0, t=0.0, first=1):
    return Request(request_id=rid, prompt_token_ids=list(range(first, first + n_prompt)),
                   sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0), priority=prio,
                   arrival_time=t)


def run_to_idle(core: EngineCore, limit=1000):
    for _ in range(limit):
        if not core.has_unfinished():
            return
        core.step()
    raise AssertionError("engine did not reach idle")


def test_decodes_first_then_partial_prefills_then_new_within_budget():
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", 3, t=0))
    plan = s.schedule()  # a: whole 3-token prompt
    s.update(plan, StepResult(plan.step_id, {"a": 7}))
    s.add_request(make_request("b", 20, t=1))
    s.add_request(make_request("c", 5, t=2, first=200))
    plan = s.schedule()
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 9)]
    assert plan.num_decodes == 1 and plan.num_tokens == 10
    s.update(plan, StepResult(plan.step_id, {"a": 7}))
    plan = s.schedule()
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 9)]
    s.update(plan, StepResult(plan.step_id, {"a": 7}))
    plan = s.schedule()  # b finishes its prompt (2 left) and samples; c is admitted with the rest
    assert [(c.request_id, c.num_tokens, c.sample) for c in plan.chunks] == [
        ("a", 1, True), ("b", 2, True), ("c", 5, True)]


def test_preemption_recomputes_and_every_block_returns():
    s = make_scheduler(budget=64, num_blocks=12, block_size=4)
    core = EngineCore(s, FakeExecutor())
    for i in range(4):
        core.add_request(make_request(f"r{i}", 8, max_tokens=12, t=i))
    outs = []
    for _ in range(200):
        if not core.has_unfinished():
            break
        outs += core.step()
        s.check_invariants()
    assert s.num_preemptions > 0
    done = {o.request_id for o in outs if o.finished}
    assert done == {"r0", "r1", "r2", "r3"}
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_prefix_cache_hits_full_blocks_only():
    s = make_scheduler(budget=64, block_size=4)
    core = EngineCore(s, FakeExecutor())
    core.add_request(make_request("a", 10))
    run_to_idle(core)
    b = make_request("b", 10)
    core.add_request(b)
    core.step()
    assert b.num_cached_tokens == 8  # two full blocks of the shared 10-token prompt
    run_to_idle(core)
    s.check_invariants()
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_abort_frees_blocks_in_every_state():
    s = make_scheduler(budget=4, max_seqs=2)
    core = EngineCore(s, FakeExecutor())
    for i in range(4):
        core.add_request(make_request(f"r{i}", 10, max_tokens=50, t=i))
    core.step()
    core.step()
    aborted = core.abort(["r0", "r3", "missing"])
    assert {o.request_id for o in aborted} == {"r0", "r3"}
    assert all(str(o.finish_reason) == "abort" for o in aborted)
    core.abort(["r1", "r2"])
    assert not s.has_unfinished() and core.has_unfinished()  # one more (empty) step tells the worker to forget
    assert core.step() == [] and not core.has_unfinished()
    s.check_invariants()
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_priority_policy_admits_lowest_value_first():
    s = make_scheduler(budget=64, max_seqs=1, policy="priority")
    for rid, prio, t in [("low", 5, 0), ("high", 0, 1), ("mid", 2, 2)]:
        s.add_request(make_request(rid, 3, max_tokens=1, prio=prio, t=t))
    order = []
    core = EngineCore(s, FakeExecutor())
    for _ in range(20):
        if not core.has_unfinished():
            break
        order += [o.request_id for o in core.step() if o.finished]
    assert order == ["high", "mid", "low"]


def test_never_fitting_and_overload_are_refused():
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=64, max_waiting=2)
    with pytest.raises(RequestTooLargeError):
        s.add_request(make_request("big", 10, max_tokens=10))  # 19 tokens of KV > 16 slots
    with pytest.raises(RequestTooLargeError):
        s.add_request(make_request("long", 64))
    s.add_request(make_request("a", 2))
    s.add_request(make_request("b", 2))
    with pytest.raises(EngineOverloadedError):
        s.add_request(make_request("c", 2))


def test_resumed_request_keeps_its_outputs():
    s = make_scheduler(budget=64, num_blocks=6, block_size=4)
    core = EngineCore(s, FakeExecutor())
    core.add_request(make_request("a", 8, max_tokens=8, t=0))
    core.add_request(make_request("b", 8, max_tokens=8, t=1, first=100))
    outs = []
    for _ in range(100):
        if not core.has_unfinished():
            break
        outs += core.step()
    per = {}
    for o in outs:
        per.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert per == {"a": [7] * 8, "b": [7] * 8}
    assert s.num_preemptions > 0
    assert RequestStatus.FINISHED_LENGTH.finished


def test_lookahead_is_all_or_nothing_when_blocks_run_out():
    """A lookahead step that cannot get a block for every row takes none (its blocks would never reach the worker)."""
    s = make_scheduler(budget=64, num_blocks=5, block_size=4)
    s.add_request(make_request("a", 4, max_tokens=16, t=0))
    s.add_request(make_request("b", 4, max_tokens=16, t=1, first=100))
    plan = s.schedule()  # both prompts: one block each, full
    s.update(plan, StepResult(plan.step_id, {"a": 7, "b": 7}))
    plan = s.schedule()  # decodes at position 4: a second block each (4 of 5 used)
    s.update(plan, StepResult(plan.step_id, {"a": 7, "b": 7}))
    for _ in range(3):  # positions 5..7 fit in the second blocks
        plan = s.schedule_lookahead(plan)
        assert plan is not None
        s.update(plan, StepResult(plan.step_id, {"a": 7, "b": 7}))
    free = s.kv.num_free_blocks
    assert s.schedule_lookahead(plan) is None  # position 8 needs 2 blocks, 1 is free
    assert s.kv.num_free_blocks == free
    s.check_invariants()


def test_lookahead_continues_while_waiting_requests_cannot_be_seated():
    """With the batch full at max_num_seqs, a waiting request cannot be admitted by the next step, so decoding
    keeps launching ahead; once a seat is free, the next step is a normal one that admits it."""
    s = make_scheduler(budget=64, max_seqs=2)
    for i, rid in enumerate(["a", "b", "c"]):
        s.add_request(make_request(rid, 4, max_tokens=8 if rid != "a" else 3, t=i, first=10 * i + 1))
    plan = s.schedule()  # a and b prefill; c waits for a seat
    assert [c.request_id for c in plan.chunks] == ["a", "b"] and s.num_waiting == 1
    s.update(plan, StepResult(plan.step_id, {"a": 7, "b": 7}))
    plan = s.schedule()
    s.update(plan, StepResult(plan.step_id, {"a": 7, "b": 7}))
    assert s.schedule_lookahead(plan) is None  # a is near its length limit: no step ahead
    plan = s.schedule()  # a's last token
    s.update(plan, StepResult(plan.step_id, {"a": 7, "b": 7}))
    assert s.requests.get("a") is None or s.requests["a"].status.finished
    plan = s.schedule()  # c takes a's seat
    assert {c.request_id for c in plan.chunks} == {"b", "c"}
    s.update(plan, StepResult(plan.step_id, {"b": 7, "c": 7}))
    s.add_request(make_request("d", 4, t=5, first=90))
    plan = s.schedule()  # b and c decode, d waits without a seat
    assert plan.num_decodes == 2 and s.num_waiting == 1
    ahead = s.schedule_lookahead(plan)
    assert ahead is not None and {c.request_id for c in ahead.chunks} == {"b", "c"}
    s.check_invariants()


def test_bounded_out_of_order_admission():
    """A big request that does not fit blocks the queue under FCFS; with max_out_of_order=1 exactly one later
    request that fits passes it, and the big one is admitted first once blocks free up."""
    for ooo, admitted in [(0, []), (1, ["small1"]), (5, ["small1", "small2"])]:
        s = make_scheduler(budget=256, num_blocks=10, block_size=4, max_out_of_order=ooo)
        s.add_request(make_request("hog", 20, max_tokens=4, t=0))           # 5 blocks, running
        plan = s.schedule()
        s.update(plan, StepResult(plan.step_id, {"hog": 7}))
        s.add_request(make_request("big", 24, max_tokens=4, t=1, first=300))   # 6 blocks: does not fit now
        s.add_request(make_request("small1", 4, max_tokens=4, t=2, first=500))
        s.add_request(make_request("small2", 4, max_tokens=4, t=3, first=600))
        plan = s.schedule()
        new = [n.request_id for n in plan.new_requests]
        assert new == admitted, (ooo, new)
        assert s.waiting[0][1].request_id == "big"  # it keeps its place at the head
        s.check_invariants()


def test_a_decode_without_room_waits_to_scale_up_instead_of_preempting():
    """Multi-master scale-up: with spilling on, a decode that finds no free block is held back and listed in
    spill_requests; once another instance takes its tail (attach_tail) it decodes without local blocks; a refused
    spill falls back to preemption."""
    s = make_scheduler(budget=64, num_blocks=4, block_size=4)
    s.spill_enabled = True
    core = EngineCore(s, FakeExecutor())
    for i in range(2):  # 8 prompt tokens each: both admitted into the 4 blocks, then no room for token 9
        core.add_request(make_request(f"r{i}", 8, max_tokens=6, t=i, first=10 * i + 1))
    core.step()
    plan = s.schedule()
    assert plan.is_empty and s.num_preemptions == 0
    assert s.spill_requests == (("r0", 8, 5), ("r1", 8, 5))  # KV of positions 8..12 goes elsewhere
    assert s.attach_tail("r0", 8) and not s.attach_tail("r0", 8)
    s.spill_failed("r1")
    plan = s.schedule()
    assert [c.request_id for c in plan.chunks] == ["r0"] and plan.chunks[0].new_block_ids == []
    assert s.num_preemptions == 1  # r1 was preempted to make room for itself: its blocks are free again
    s.update(plan, StepResult(plan.step_id, {"r0": 7}))
    run_to_idle(core)
    s.check_invariants()
    assert s.kv.num_free_blocks == s.kv.num_blocks and not s.spill_requests
