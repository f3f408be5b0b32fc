"""Dispatch policies (pure Python)."""

from __future__ import annotations

import pytest

from accordion.cluster.load import LoadReport
from accordion.cluster.router import InstanceLoad, LeastLoaded, RoundRobin, make_router


def cand(iid: str, running: int = 0, waiting: int = 0, kv: float = 0.0, outstanding: int = 0) -> InstanceLoad:
    return InstanceLoad(iid, LoadReport(iid, num_running=running, num_waiting=waiting, kv_usage=kv), outstanding)


def test_least_loaded_picks_lowest_score():
    r = LeastLoaded()
    assert r.choose([cand("a", running=5), cand("b", running=1), cand("c", running=3)]) == "b"
    assert r.choose([cand("a", waiting=2), cand("b", running=1)]) == "b"
    assert r.choose([cand("a", running=1, kv=0.9), cand("b", running=2, kv=0.0)]) == "b"


def test_outstanding_counts_as_waiting():
    r = LeastLoaded()
    assert r.choose([cand("a", outstanding=3), cand("b", running=2)]) == "b"


def test_ties_round_robin():
    r = LeastLoaded()
    picks = [r.choose([cand("a"), cand("b"), cand("c")]) for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]


def test_burst_spreads_when_outstanding_is_tracked():
    r = LeastLoaded()
    sent = {"a": 0, "b": 0}
    for _ in range(10):
        iid = r.choose([InstanceLoad(i, None, sent[i]) for i in sent])
        sent[iid] += 1
    assert sent == {"a": 5, "b": 5}


def test_no_report_yet_and_errors():
    r = LeastLoaded()
    assert r.choose([InstanceLoad("a", None), cand("b", running=1)]) == "a"
    with pytest.raises(ValueError):
        r.choose([])
    with pytest.raises(ValueError):
        make_router("random")


def test_round_robin():
    r = make_router("round_robin")
    assert isinstance(r, RoundRobin)
    assert [r.choose([cand("a"), cand("b")]) for _ in range(4)] == ["a", "b", "a", "b"]
