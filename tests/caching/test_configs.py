"""Cache configs validate on construction and resolve through the public API."""
import dataclasses

import pytest

import accel
from accel.base.registry import CACHE_METHODS
from accel.config import resolve_method
from accel.caching import (EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig,
                           load_calibration)


def test_all_methods_are_registered():
    assert set(CACHE_METHODS.names()) >= {"fbcache", "teacache", "magcache", "easycache", "fixed"}
    for name, cls in CACHE_METHODS.items():
        assert cls.kind == "cache" and cls.name == name
        cls.Config()  # defaults are valid


@pytest.mark.parametrize("make,field", [
    (lambda: TeaCacheConfig(threshold=-0.1), "threshold"),
    (lambda: TeaCacheConfig(threshold=float("nan")), "threshold"),
    (lambda: FBCacheConfig(threshold="0.1"), "threshold"),
    (lambda: MagCacheConfig(threshold=float("inf")), "threshold"),
    (lambda: EasyCacheConfig(threshold=-1), "threshold"),
    (lambda: TeaCacheConfig(forecast="taylor", order=3), "order"),
    (lambda: TeaCacheConfig(order=0), "order"),
    (lambda: FBCacheConfig(forecast="spline"), "forecast"),
    (lambda: FBCacheConfig(first_blocks=0), "first_blocks"),
    (lambda: TeaCacheConfig(last_blocks=-1), "last_blocks"),
    (lambda: TeaCacheConfig(warmup_steps=1.5), "warmup_steps"),
    (lambda: EasyCacheConfig(warmup_ratio=1.5), "warmup_ratio"),
    (lambda: TeaCacheConfig(final_steps=-2), "final_steps"),
    (lambda: FixedCacheConfig(max_consecutive_reuses=0), "max_consecutive_reuses"),
    (lambda: FixedCacheConfig(interval=0), "interval"),
    (lambda: FixedCacheConfig(compute_steps=(0, -1)), "compute_steps"),
    (lambda: FixedCacheConfig(cfg_reuse_steps=(1, "2")), "cfg_reuse_steps"),
    (lambda: FixedCacheConfig(cfg_reuse_steps=(1,), cfg_reuse_interval=2), "cfg_reuse_interval"),
    (lambda: TeaCacheConfig(coefficients=()), "coefficients"),
    (lambda: TeaCacheConfig(coefficients=(1.0, "x")), "coefficients"),
])
def test_bad_values_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_configs_are_keyword_only_and_sequences_become_tuples():
    with pytest.raises(TypeError):
        TeaCacheConfig(0.1)
    config = FixedCacheConfig(compute_steps=[0, 2], cfg_reuse_steps=[3])
    assert config.compute_steps == (0, 2) and config.cfg_reuse_steps == (3,)


def test_warmup_and_cfg_reuse_schedules():
    config = EasyCacheConfig(warmup_steps=1, warmup_ratio=0.2)
    assert config.warmup_for(50) == 10 and config.warmup_for(3) == 1 and config.warmup_for(None) == 1
    interval = FixedCacheConfig(cfg_reuse_interval=2, warmup_steps=2, final_steps=1)
    assert [s for s in range(8) if interval.cfg_reuse_at(s, 8)] == [3, 5]
    explicit = FixedCacheConfig(cfg_reuse_steps=(0, 4))
    assert [s for s in range(8) if explicit.cfg_reuse_at(s, 8)] == [0, 4]


def test_names_config_objects_and_preset_entries_resolve():
    assert resolve_method("cache", "teacache")[0].name == "teacache"
    config = TeaCacheConfig(threshold=0.1, forecast="taylor", order=2)
    assert resolve_method("cache", config) == (CACHE_METHODS.get("teacache"), config)
    cls, built = resolve_method("cache", {"name": "fbcache", "threshold": 0.05, "first_blocks": 2})
    assert cls.name == "fbcache" and built == FBCacheConfig(threshold=0.05, first_blocks=2)
    assert accel.Config(cache=FixedCacheConfig(interval=3)).cache.interval == 3


def test_configs_are_values_and_the_method_loads_the_calibration(tmp_path):
    missing = TeaCacheConfig(calibration=str(tmp_path / "missing.json"))  # no file I/O in a config
    assert vars(missing).keys() == {f.name for f in dataclasses.fields(TeaCacheConfig)}, "no hidden attributes"
    teacache, magcache_method = CACHE_METHODS.get("teacache"), CACHE_METHODS.get("magcache")
    with pytest.raises(ValueError, match="does not exist"):
        teacache(missing)
    with pytest.raises(ValueError, match="calibration must be a JSON path"):
        TeaCacheConfig(calibration=3)
    magcache = {"kind": "magcache", "model_class": "WanTransformer3DModel", "num_steps": 2,
                "ratios": {"cond": [1.0, 1.0]}}
    with pytest.raises(ValueError, match="magcache artifact, not teacache"):
        teacache(TeaCacheConfig(calibration=magcache))
    with pytest.raises(ValueError, match="give coefficients or calibration"):
        TeaCacheConfig(coefficients=(1.0,), calibration={**magcache, "kind": "teacache", "coefficients": [1.0]})
    assert magcache_method(MagCacheConfig(calibration=magcache)).calibration.ratios == {"cond": (1.0, 1.0)}
    with pytest.raises(ValueError, match="2 ratios for 3 steps"):
        load_calibration({**magcache, "num_steps": 3}, "magcache")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        magcache_method(MagCacheConfig(calibration=str(bad)))
