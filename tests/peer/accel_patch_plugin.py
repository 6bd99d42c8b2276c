"""A pytest plugin that patches every model accel serves right after it is built, for running a
suite nobody here wrote (diffusers' own model tests) on patched models.

    ACCEL_PEER_SETTING=topk python -m pytest -p accel_patch_plugin tests/models/transformers/...

(with this folder on ``PYTHONPATH``). ``ACCEL_PEER_SETTING`` is one of ``SETTINGS``; every
instance of a class in accel's model registry gets ``accel.patch(model, **setting)`` at the end of
its ``__init__``. A model accel refuses (its error) is left unpatched and counted in
``ACCEL_PEER_LOG`` when set, so refusals show up next to the pass counts.
"""
import functools
import json
import os

import accel
from accel.attention.patterns import SPARSE_PATTERNS
from accel import pipelines  # noqa: F401  (its adapters fill MODEL_ADAPTERS)
from accel.base.registry import MODEL_ADAPTERS
from accel.caching import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig


def _flat_magcache(cls) -> MagCacheConfig:
    """MagCache needs a calibration for the model class (else accel refuses it): a flat one."""
    return MagCacheConfig(threshold=0.0, calibration={"kind": "magcache", "model_class": cls.__name__, "num_steps": 3,
                                                      "ratios": {"cond": [1.0] * 3}})


def _settings():
    # caches that never reuse (thresholds no step can meet): what they add must change nothing
    never = {"fbcache": FBCacheConfig(threshold=0.0), "teacache": TeaCacheConfig(threshold=0.0),
             "magcache": _flat_magcache, "easycache": EasyCacheConfig(threshold=0.0),
             "fixed": FixedCacheConfig(interval=1)}
    settings = {f"cache:{name}": {"cache": config} for name, config in never.items()}
    settings["attention:dense"] = {"attention": "dense"}
    settings["attention:int8"] = {"attention": "int8"}
    for name, pattern in SPARSE_PATTERNS.items():  # density 1.0: every block kept, the dense result
        settings[f"attention:{name}"] = {"attention": pattern.Config(density=1.0, dense_warmup=0.0, dense_layers=0)}
    settings["preset:balanced"] = {"preset": "balanced"}
    return settings


SETTINGS = _settings()


def _wrap(cls, setting, log):
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is not cls:  # a subclass's own __init__ patches it
            return
        preset = setting.get("preset")
        parts = {k: (v(cls) if callable(v) else v) for k, v in setting.items() if k != "preset"}
        try:
            accel.patch(self, preset, **parts)
            outcome = "patched"
        except ValueError as exc:  # a clear refusal (say, a model too small to cache)
            outcome = f"refused: {exc}"
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({"class": cls.__name__, "outcome": outcome}) + "\n")
    return original, __init__


def pytest_configure(config):
    name = os.environ.get("ACCEL_PEER_SETTING")
    if not name:
        return
    if name not in SETTINGS:
        raise ValueError(f"ACCEL_PEER_SETTING={name!r}; valid: {', '.join(SETTINGS)}")
    import diffusers

    config._accel_restore = []
    for class_name, _ in MODEL_ADAPTERS.items():
        cls = getattr(diffusers, class_name, None)
        if cls is None:
            continue
        original, wrapped = _wrap(cls, SETTINGS[name], os.environ.get("ACCEL_PEER_LOG"))
        cls.__init__ = wrapped
        config._accel_restore.append((cls, original))


def pytest_unconfigure(config):
    for cls, original in getattr(config, "_accel_restore", []):
        cls.__init__ = original
