"""Live migration's scheduler half on its own (no torch): export, release, import, resume, and the races with
abort and preemption. Every path must leave both pools with no block held."""

from __future__ import annotations

from accordion.cluster.migration import MigrationCandidate, MigrationState, NotMigratable, choose_destination
from accordion.cluster.plan import StepResult
from accordion.cluster.request import RequestStatus
from tests.cluster.test_scheduler import make_request, make_scheduler


def _decoding(s, rid="a", n_prompt=6, max_tokens=20, steps=3):
    """A request that has run its prefill and ``steps - 1`` decodes (fake token 7 each)."""
    s.add_request(make_request(rid, n_prompt, max_tokens=max_tokens))
    for _ in range(steps):
        plan = s.schedule()
        s.update(plan, StepResult(plan.step_id, {c.request_id: 7 for c in plan.chunks if c.sample}))
    return s.requests[rid]


def _assert_idle(s):
    s.check_invariants()
    assert not s.has_unfinished() and s.kv.num_free_blocks == s.kv.num_blocks


def test_export_pauses_and_a_step_in_flight_makes_it_wait():
    s = make_scheduler()
    req = _decoding(s)
    assert s.migration_candidates() == [MigrationCandidate("a", req.num_tokens, 6 + 20)]
    assert s.export_request("a", in_flight={"a"}) is None  # paused, but a launched step still computes it
    assert s.schedule().chunks == []  # no longer scheduled
    state = s.export_request("a", in_flight=set())
    assert isinstance(state, MigrationState)
    assert state.num_computed_tokens == req.num_tokens - 1 and state.output_token_ids == [7, 7, 7]
    assert state.block_ids == s.kv.req_blocks["a"][:len(state.block_ids)] and len(state.block_ids) == 2  # 8 tokens
    assert s.migration_candidates() == []
    s.resume_migration("a")
    assert [c.request_id for c in s.schedule().chunks] == ["a"]


def test_release_then_import_elsewhere_continues_with_the_same_state():
    src, dst = make_scheduler(), make_scheduler()
    _decoding(src)
    state = src.export_request("a", set())
    blocks = dst.reserve_slice("a", state.num_computed_tokens)
    assert len(blocks) == len(state.block_ids)
    req = dst.import_request(state)
    assert src.release_migrated("a")
    _assert_idle(src)
    assert req.status == RequestStatus.RUNNING and req.output_token_ids == [7, 7, 7]
    plan = dst.schedule()
    assert [(c.request_id, c.start) for c in plan.chunks] == [("a", state.num_computed_tokens)]
    outs = dst.update(plan, StepResult(plan.step_id, {"a": 7}))
    assert outs[0].new_token_ids == [7]
    dst.abort(["a"])
    _assert_idle(dst)


def test_abort_or_preemption_while_paused_makes_the_commit_fail_without_leaks():
    s = make_scheduler()
    _decoding(s)
    assert isinstance(s.export_request("a", set()), MigrationState)
    s.abort(["a"])
    assert not s.release_migrated("a")
    _assert_idle(s)

    s = make_scheduler()
    _decoding(s)
    s.export_request("a", set())
    s._preempt(s.requests["a"])  # a decode elsewhere needed its blocks
    assert not s.release_migrated("a")
    assert isinstance(s.export_request("a", set()), NotMigratable)  # waiting for recomputation: not decoding
    s.abort(["a"])
    _assert_idle(s)


def test_not_migratable_while_prefilling_or_unknown():
    s = make_scheduler(budget=4)
    s.add_request(make_request("a", 10))
    s.update(p := s.schedule(), StepResult(p.step_id, {}))  # 4 of 10 prompt tokens
    assert isinstance(s.export_request("a", set()), NotMigratable)
    assert isinstance(s.export_request("zzz", set()), NotMigratable)
    assert s.migration_candidates() == []


def test_a_request_that_comes_back_keeps_its_new_worker_state():
    """A -> B -> A before A stepped: A must not tell its worker to forget the request it just took back."""
    a, b = make_scheduler(), make_scheduler()
    _decoding(a)
    state = a.export_request("a", set())
    b.reserve_slice("a", state.num_computed_tokens)
    b.import_request(state)
    assert a.release_migrated("a")
    state = b.export_request("a", set())
    a.reserve_slice("a", state.num_computed_tokens)
    a.import_request(state)
    assert b.release_migrated("a")
    assert "a" not in a.schedule().finished_request_ids


def test_choose_destination_needs_room_to_finish():
    c = MigrationCandidate("a", 30, 100)  # 100 tokens: 7 blocks of 16
    assert choose_destination(c, {"x": 6, "y": 7, "z": 9}, 16) == "z"
    assert choose_destination(c, {"x": 6}, 16) is None


def test_plan_compaction_fewest_tokens_first_within_the_budget():
    from accordion.cluster.migration import plan_compaction

    cands = [MigrationCandidate("big", 161, 200), MigrationCandidate("small", 33, 60),
             MigrationCandidate("huge", 90, 900)]  # huge fits nowhere to finish
    secs = lambda n: n / 100  # noqa: E731
    # 'small' frees 2 blocks of 16 (32 tokens of KV), 'big' 10
    assert plan_compaction(cands, 4, 6, {"x": 20}, 16, secs, 10.0) == [(cands[1], "x")]
    assert plan_compaction(cands, 4, 10, {"x": 20}, 16, secs, 10.0) == [(cands[1], "x"), (cands[0], "x")]
    assert plan_compaction(cands, 4, 10, {"x": 20}, 16, secs, 1.0) is None  # 'big' costs too much
    assert plan_compaction(cands, 4, 10, {"x": 5}, 16, secs, 10.0) is None  # no room to finish elsewhere


def test_reserve_migration_leaves_room_for_the_residents_to_finish():
    """64 blocks of 4. The destination's resident grows to 6 + 200 tokens (52 blocks): 12 spare. A request that
    can finish in 7 blocks is taken; one that needs 17 is refused, though its KV so far would fit now."""
    dst = make_scheduler()
    _decoding(dst, "r", max_tokens=200)
    assert dst.blocks_to_finish() == 52 - len(dst.kv.req_blocks["r"])
    assert dst.num_spare_blocks == 12
    for rid, max_tokens, fits in [("big", 60, False), ("small", 20, True)]:
        src = make_scheduler()
        _decoding(src, rid, max_tokens=max_tokens)
        state = src.export_request(rid, set())
        blocks = dst.reserve_migration(state)
        assert (blocks is not None) == fits, rid
        if not fits:
            src.resume_migration(rid)
            continue
        dst.import_request(state)
        assert src.release_migrated(rid)
        _assert_idle(src)
    assert dst.num_spare_blocks == 12 - 7
    dst.add_request(make_request("w", 8, max_tokens=8))  # waiting: it needs all its blocks still
    assert dst.num_spare_blocks == 12 - 7 - 4
    dst.abort(["r", "small", "w"])
    _assert_idle(dst)


def test_a_request_migrated_back_reserves_its_blocks_again():
    """A -> B -> A through reserve_migration: the source freed every block when the request left, so coming back
    never meets 'already holds blocks here' (which a second reservation for the same request would)."""
    a, b = make_scheduler(), make_scheduler()
    _decoding(a)
    for src, dst in [(a, b), (b, a), (a, b)]:
        state = src.export_request("a", set())
        assert dst.reserve_migration(state) is not None
        dst.import_request(state)
        assert src.release_migrated("a")
        _assert_idle(src)
    try:
        b.reserve_slice("a", 4)
    except ValueError as e:
        assert "already holds blocks here" in str(e)
    else:
        raise AssertionError("a second reservation for a request must be refused")
    b.abort(["a"])
    _assert_idle(b)


def test_room_held_for_a_prompt_is_kept_from_decoding_requests_and_taken_by_its_reservation():
    """64 blocks of 4. Compaction's room held for a 40-token prompt (10 blocks) is not free to the decoding
    request that grows meanwhile; the prompt's reservation takes exactly those blocks (grown when asked for more),
    and released or not, every path ends with all blocks free."""
    s = make_scheduler()
    assert s.hold_room("p", 40)
    held = list(s.kv.req_blocks["p"])
    assert len(held) == 10 and s.kv.num_free_blocks == 54
    assert not s.hold_room("q", 4 * 55)  # more than is free: nothing held
    assert "q" not in s.kv.req_blocks
    _decoding(s, "d", max_tokens=20, steps=5)
    assert s.kv.req_blocks["p"] == held
    blocks = s.reserve_slice("p", 44)  # the prompt grew by a block since: the held ones first
    assert blocks[:10] == held and len(blocks) == 11
    s.release_slice("p")
    assert s.hold_room("p2", 8)
    s.release_slice("p2")  # the request went elsewhere
    assert s.reserve_slice("p2", 8) is not None  # a later reservation is a fresh one, not the released hold
    s.release_slice("p2")
    s.abort(["d"])
    _assert_idle(s)
