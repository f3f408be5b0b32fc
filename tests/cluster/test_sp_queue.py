"""The global manager's prefill queue on its own: FCFS per instance, one batch in flight per instance, batching."""

from __future__ import annotations

from types import SimpleNamespace

from accordion.cluster.sp_queue import PendingPrefill, PrefillQueue


def entry(rid: str, group: list[str], tokens: int = 100, placement=None) -> PendingPrefill:
    return PendingPrefill(SimpleNamespace(request_id=rid, num_prompt_tokens=tokens), group, placement)


def ids(batches) -> list[list[str]]:
    return [[p.request.request_id for p in b] for b in batches]


def test_same_group_prompts_go_in_one_batch_up_to_the_token_cap():
    q = PrefillQueue(max_batch_tokens=250)
    for rid in "abc":
        q.add(entry(rid, ["i0", "i1"]))
    assert ids(q.take_ready()) == [["a", "b"]]  # c would make 300 tokens
    assert q.take_ready() == [] and q.busy == {"i0", "i1"}
    q.finished(["i0", "i1"])
    assert ids(q.take_ready()) == [["c"]]


def test_one_batch_per_instance_and_no_later_prompt_passes_a_waiting_one_on_its_instances():
    q = PrefillQueue()
    q.add(entry("a", ["i0", "i1"]))
    assert ids(q.take_ready()) == [["a"]]
    q.add(entry("b", ["i1", "i2"]))  # waits for i1
    q.add(entry("c", ["i2", "i3"]))  # i2 is claimed by b: waits too
    q.add(entry("d", ["i4", "i5"]))  # other instances: starts
    assert ids(q.take_ready()) == [["d"]]
    q.finished(["i0", "i1"])
    assert ids(q.take_ready()) == [["b"]]
    q.finished(["i1", "i2"])
    assert ids(q.take_ready()) == [["c"]]


def test_spread_placements_run_alone_and_cancelled_prompts_leave_the_queue():
    q = PrefillQueue()
    q.add(entry("a", ["i0", "i1"], placement=[("i0", 0, 50, 0), ("i1", 50, 100, 8)]))
    q.add(entry("b", ["i0", "i1"]))
    q.add(entry("c", ["i0", "i1"]))
    assert ids(q.take_ready()) == [["a"]]
    assert [p.request.request_id for p in q.remove({"c"})] == ["c"]
    q.finished(["i0", "i1"])
    assert ids(q.take_ready()) == [["b"]]


def test_the_cost_model_batches_short_prompts_and_keeps_long_ones_apart():
    """LoongServe's objective: batching saves the later prompt the fixed cost A and costs the earlier one the
    later one's prefill, each weighed by 1 / prompt length."""
    from accordion.cluster.esp_planner import PrefillCostModel

    cost = PrefillCostModel({2: (0.05, 1e-5, 1e-10)})  # A = 50 ms
    q = PrefillQueue(predict=cost.predict)
    for rid, n in [("a", 2000), ("b", 1000), ("c", 100_000)]:
        q.add(entry(rid, ["i0", "i1"], tokens=n))
    assert ids(q.take_ready()) == [["a", "b"]]  # b's 10 ms + A is under 2A: worth one pass; c's 2 s is not
    q.finished(["i0", "i1"])
    assert ids(q.take_ready()) == [["c"]]
