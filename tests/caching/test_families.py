"""Every rule, with and without forecasting, on every tiny family: exact when it never reuses,
reuses at a loose threshold, and ``remove()`` gives the unpatched output back."""
import pytest
import torch

import accel
from accel.api import adapter_for
from accel.caching import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig
from accel.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline

STEPS = 6


def configs(family_model_class, helpers, never_reuse, forecast="none"):
    """One config per rule: at a threshold that never reuses, or at a loose one."""
    extra = {"forecast": forecast, "order": 2 if forecast == "taylor" else 1}
    if never_reuse:
        return {
            "teacache": TeaCacheConfig(threshold=0.0, **extra),
            "fbcache": FBCacheConfig(threshold=0.0, **extra),
            "magcache": MagCacheConfig(threshold=0.0, **extra, calibration=helpers.calibration(
                "magcache", family_model_class, STEPS, 1.0)),
            "easycache": EasyCacheConfig(threshold=0.0, **extra),
            "fixed": FixedCacheConfig(interval=1, **extra),
        }
    return {
        "teacache": TeaCacheConfig(threshold=1e6, **extra),
        "fbcache": FBCacheConfig(threshold=1e3, **extra),
        "magcache": MagCacheConfig(threshold=0.5, **extra, calibration=helpers.calibration(
            "magcache", family_model_class, STEPS, 1.0)),
        "easycache": EasyCacheConfig(threshold=1e3, **extra),
        "fixed": FixedCacheConfig(interval=2, **extra),
    }


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_never_reusing_is_exact_and_reusing_restores_exactly(family, helpers):
    pipe = build_tiny_pipeline(family)
    model_class = type(pipe.transformer).__name__
    reference = helpers.run(pipe, family, STEPS)
    for name, config in configs(model_class, helpers, never_reuse=True).items():
        with accel.patched(pipe, cache=config) as handle:
            cached = helpers.run(pipe, family, STEPS)
            counters = helpers.counters(handle)
        assert sum(counters["steps_reused"].values()) == 0, name
        assert counters["compute_fraction"] == 1.0
        assert torch.equal(cached, reference), f"{family} {name}: the engine is not exact when it never reuses"
    with accel.patched(pipe, cache=FixedCacheConfig(interval=2, forecast="foca")):
        assert not torch.equal(helpers.run(pipe, family, STEPS), reference)
    assert torch.equal(helpers.run(pipe, family, STEPS), reference), "remove() must restore the exact output"


@pytest.mark.parametrize("forecast", ["none", "taylor", "foca"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_rule_reuses_at_a_loose_threshold(family, forecast, helpers):
    pipe = build_tiny_pipeline(family)
    model_class = type(pipe.transformer).__name__
    num_blocks = sum(len(s.blocks) for s in adapter_for(pipe.transformer).block_stacks(pipe.transformer))
    for name, config in configs(model_class, helpers, never_reuse=False, forecast=forecast).items():
        with accel.patched(pipe, cache=config) as handle:
            out = helpers.run(pipe, family, STEPS)
            counters = helpers.counters(handle)
        assert torch.isfinite(out).all(), f"{family} {name} {forecast}"
        assert sum(counters["steps_reused"].values()) >= 1, f"{family} {name} {forecast}: {counters}"
        assert counters["compute_fraction"] < 1.0
        calls = sum(counters["calls"].values())
        assert sum(counters["blocks_computed"].values()) + sum(counters["blocks_reused"].values()) == calls * num_blocks
