"""Each reuse rule's decision on constructed inputs, driven exactly as the engine drives it."""
import math

import pytest
import torch

from accel.caching.indicators import (EasyCacheRule, FirstBlockRule, FixedRule, MagCacheRule, Probe, TeaCacheRule,
                                      relative_l1)


def drive(rule, state, probe, engine_allows=True):
    """propose -> the engine's final decision -> committed; returns whether the call reused."""
    reused = rule.propose(state, probe) and engine_allows
    rule.committed(state, probe, reused)
    return reused


def scaled(value, shape=(2, 8)):
    return torch.full(shape, float(value))


def test_relative_l1():
    assert relative_l1(scaled(1.1), scaled(1.0)) == pytest.approx(0.1)
    assert relative_l1(scaled(0.0), scaled(0.0)) == 0.0
    assert math.isinf(relative_l1(scaled(1.0), scaled(0.0)))


def test_teacache_accumulates_rescaled_change_and_resets_on_compute():
    rule = TeaCacheRule(threshold=0.25, coefficients=(2.0, 0.0))  # rescaled change = 2 * relative change
    state = rule.new_state()
    inputs = [1.0, 1.05, 1.1025, 1.157625, 1.21550625]  # +5% per step -> +0.1 rescaled per step
    decisions = [drive(rule, state, Probe(step=i, modulated_input=scaled(v))) for i, v in enumerate(inputs)]
    # step 0 has no previous input; 0.1, 0.2 stay under 0.25; 0.3 computes and resets; then 0.1 again
    assert decisions == [False, True, True, False, True]
    assert state.accumulated == pytest.approx(0.1)


def test_teacache_negative_polynomial_counts_as_zero_and_threshold_zero_never_reuses():
    rule = TeaCacheRule(threshold=0.0, coefficients=(1.0, -5.0))  # negative for small changes
    state = rule.new_state()
    assert rule.rescale(0.01) == 0.0
    assert not any(drive(rule, state, Probe(step=i, modulated_input=scaled(1 + 0.01 * i))) for i in range(5))
    loose = TeaCacheRule(threshold=0.1, coefficients=(1.0, -5.0))
    state = loose.new_state()
    assert [drive(loose, state, Probe(step=i, modulated_input=scaled(1 + 0.01 * i))) for i in range(4)] == \
        [False, True, True, True]


def test_teacache_is_polyval_highest_power_first():
    rule = TeaCacheRule(threshold=1.0, coefficients=(3.0, 2.0, 1.0))
    assert rule.rescale(0.5) == pytest.approx(3 * 0.25 + 2 * 0.5 + 1)


def test_fbcache_compares_against_the_last_computed_step():
    rule = FirstBlockRule(threshold=0.1)
    state = rule.new_state()
    residuals = [1.0, 1.05, 1.09, 1.12, 1.13]  # drifts: 5%, 9%, 12% from the step-0 reference
    decisions = [drive(rule, state, Probe(step=i, first_residual=scaled(v))) for i, v in enumerate(residuals)]
    assert decisions == [False, True, True, False, True]  # reference moves to 1.12 at step 3
    assert torch.equal(state.reference, scaled(1.12))


def test_fbcache_reference_only_moves_on_compute():
    rule = FirstBlockRule(threshold=0.1)
    state = rule.new_state()
    drive(rule, state, Probe(step=0, first_residual=scaled(1.0)))
    assert drive(rule, state, Probe(step=1, first_residual=scaled(1.05)))
    assert torch.equal(state.reference, scaled(1.0))
    assert not drive(rule, state, Probe(step=2, first_residual=scaled(1.06)), engine_allows=False)
    assert torch.equal(state.reference, scaled(1.06))


def test_magcache_accumulates_error_of_the_ratio_product():
    ratios = {"cond": [1.0, 0.95, 0.95, 0.9, 1.0, 1.0], "uncond": [1.0] * 6}
    rule = MagCacheRule(threshold=0.2, ratios=ratios)
    state = rule.new_state()
    decisions = [drive(rule, state, Probe(step=i, branch="cond")) for i in range(6)]
    # error: step0 0 | step1 0.05 | step2 0.05 + 0.0975 = 0.1475 | step3 + |1 - 0.812| -> compute, reset
    # step4 ratio 1.0 -> error 0 | step5 0
    assert decisions == [True, True, True, False, True, True]
    state = rule.new_state()
    assert all(drive(rule, state, Probe(step=i, branch="uncond")) for i in range(6)), "per-branch ratios"
    assert MagCacheRule(0.2, {"cond": [1.0, 2.0]}).ratios_for("cond_uncond") == (1.0, 2.0)


def test_magcache_beyond_the_calibrated_steps_computes():
    rule = MagCacheRule(threshold=1.0, ratios={"cond": [1.0, 1.0]})
    assert not drive(rule, rule.new_state(), Probe(step=5))


def test_easycache_predicts_output_change_from_input_change():
    rule = EasyCacheRule(threshold=0.3)
    state = rule.new_state()
    x = [scaled(v) for v in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5)]
    y = [scaled(2 * v) for v in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5)]  # output moves twice as much: k = 2
    for i in range(2):  # two full steps teach k
        assert not drive(rule, state, Probe(step=i, span_input=x[i]), engine_allows=False)
        rule.computed(state, Probe(step=i, span_input=x[i]), y[i])
    assert state.k == pytest.approx(2.0)
    # each step adds k * 0.1 / |y_1| = 2 * 0.1 / 2.2 = 0.0909
    decisions = [drive(rule, state, Probe(step=i, span_input=x[i])) for i in range(2, 6)]
    assert decisions == [True, True, True, False]
    assert state.accumulated == 0.0


def test_fixed_interval_and_step_mask():
    every_third = FixedRule(interval=3)
    assert [every_third.propose(None, Probe(step=i)) for i in range(7)] == [False, True, True, False, True, True,
                                                                           False]
    mask = FixedRule(compute_steps=(0, 1, 4))
    assert [mask.propose(None, Probe(step=i)) for i in range(6)] == [False, False, True, True, False, True]
    assert not any(FixedRule(interval=1).propose(None, Probe(step=i)) for i in range(5))
