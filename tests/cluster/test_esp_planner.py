"""The elastic-SP planner on its own: cost-model fit, degree choice, proactive scale-down placement."""

from __future__ import annotations

import pytest

from accordion.cluster.esp_planner import PrefillCostModel, choose_degree, plan_placement


def test_cost_model_fit_recovers_coefficients(tmp_path):
    truth = {1: (0.01, 2e-5, 1e-9), 2: (0.012, 1e-5, 5e-10)}
    samples = [(d, [n], a + b * n + c * n * n) for d, (a, b, c) in truth.items() for n in (128, 1024, 4096, 16384)]
    model = PrefillCostModel.fit(samples)
    for d, (a, b, c) in truth.items():
        assert model.predict(d, [8000]) == pytest.approx(a + b * 8000 + c * 64e6, rel=1e-6)
    model.save(tmp_path / "cost.json")
    assert PrefillCostModel.load(tmp_path / "cost.json").coeffs == model.coeffs


def test_choose_degree_short_prompts_stay_local_long_prompts_spread():
    cost = PrefillCostModel.analytic(4)
    assert choose_degree(cost, 64, available=4) == 1  # fixed overhead dominates: not worth it
    assert choose_degree(cost, 100_000, available=4) == 4
    assert choose_degree(cost, 100_000, available=2) == 2
    assert choose_degree(cost, 100_000, available=1) == 1


def test_placement_fills_master_first_then_the_freest_and_the_tail_has_room_to_grow():
    assert plan_placement(100, 20, 16, [0, 1, 2], {0: 10, 1: 2, 2: 5}) == [(0, 0, 100, 20)]
    assert plan_placement(200, 0, 16, [0, 1, 2], {0: 4, 1: 2, 2: 5}) is None  # 176 slots < 200 tokens
    assert plan_placement(150, 0, 16, [0, 1, 2], {0: 4, 1: 2, 2: 5}) == [(0, 0, 64, 0), (2, 64, 144, 0),
                                                                          (1, 144, 150, 0)]
    # the tail reserves room for the decoded tokens
    assert plan_placement(150, 30, 16, [0, 1, 2], {0: 4, 1: 2, 2: 8}) == [(0, 0, 64, 0), (2, 64, 150, 30)]
    assert plan_placement(150, 30, 16, [0, 1, 2], {0: 4, 1: 2, 2: 7}) == [(0, 0, 64, 0), (2, 64, 150, 0),
                                                                          (1, 150, 150, 30)]
    # the prompt fills 0 and 1 exactly: 2 is the tail without prompt positions
    assert plan_placement(96, 10, 16, [0, 1, 2], {0: 4, 1: 2, 2: 1}) == [(0, 0, 64, 0), (1, 64, 96, 0),
                                                                         (2, 96, 96, 10)]
    assert plan_placement(10_000, 0, 16, [0, 1], {0: 4, 1: 4}) is None