"""The registered cache methods: one engine, five reuse rules.

``accel.patch(pipe, cache="teacache")`` or ``cache=TeaCacheConfig(threshold=0.1, forecast="taylor")``
builds one of these; ``attach`` makes the rule for the patched model (coefficients, calibration)
and hands it to the ``CacheEngine``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from accel.base.adapter import config_fingerprint
from accel.base.method import Method, PatchSession
from accel.base.registry import CACHE_METHODS

from .calibration import CacheCalibration, load_calibration
from .configs import (CacheConfig, EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig,
                      TeaCacheConfig)
from .engine import CacheEngine
from .indicators import EasyCacheRule, FirstBlockRule, FixedRule, MagCacheRule, Rule, TeaCacheRule

# Used when neither the config, a calibration nor the adapter has coefficients: the raw relative
# change, unscaled (the threshold then means "relative change of the indicator input").
IDENTITY_POLYNOMIAL = (1.0, 0.0)


class ResidualCache(Method):
    """Base of the cache methods: builds the rule, attaches the engine, reports its counters.

    A config's ``calibration`` (path, dict or loaded artifact) is loaded and checked here, when
    the method is built, so a bad artifact fails ``accel.patch`` before anything is attached.
    """

    kind = "cache"
    Config = CacheConfig

    def __init__(self, config: Any):
        super().__init__(config)
        self.engine: Optional[CacheEngine] = None
        source = getattr(config, "calibration", None)
        self.calibration: Optional[CacheCalibration] = (
            None if source is None else load_calibration(source, self.name))

    def make_rule(self, session: PatchSession) -> Rule:
        raise NotImplementedError

    def attach(self, session: PatchSession) -> None:
        calibration = self.calibration
        if calibration is not None:
            fingerprint = config_fingerprint(session.models)
            for model in session.models:
                calibration.check_model(type(model).__name__, fingerprint)
        rule = self.make_rule(session)
        self.engine = CacheEngine(self.config, rule, warn=self.warn_once,
                                  check_steps=calibration.check_steps if calibration is not None else None)
        self.engine.attach(session)

    def counters(self) -> Dict[str, Any]:
        return self.engine.counter_dict() if self.engine is not None else {}


@CACHE_METHODS.register("teacache")
class TeaCache(ResidualCache):
    name = "teacache"
    Config = TeaCacheConfig

    def make_rule(self, session: PatchSession) -> Rule:
        coefficients = self.config.coefficients
        if coefficients is None and self.calibration is not None:
            coefficients = self.calibration.coefficients
        if coefficients is None:
            coefficients = session.adapter.teacache_coefficients
        if coefficients is None:
            self.warn_once(f"no TeaCache coefficients for {session.adapter.family}: using the raw relative change; "
                           "run `accel calibrate --cache teacache` for a fitted curve")
            coefficients = IDENTITY_POLYNOMIAL
        return TeaCacheRule(self.config.threshold, coefficients)


@CACHE_METHODS.register("fbcache")
class FBCache(ResidualCache):
    name = "fbcache"
    Config = FBCacheConfig

    def make_rule(self, session: PatchSession) -> Rule:
        return FirstBlockRule(self.config.threshold)


@CACHE_METHODS.register("magcache")
class MagCache(ResidualCache):
    name = "magcache"
    Config = MagCacheConfig

    def make_rule(self, session: PatchSession) -> Rule:
        if self.calibration is None:
            raise ValueError("magcache needs a calibration: run `accel calibrate --cache magcache --model ... "
                             "--steps N --out FILE` and pass MagCacheConfig(calibration=FILE)")
        return MagCacheRule(self.config.threshold, self.calibration.ratios)


@CACHE_METHODS.register("easycache")
class EasyCache(ResidualCache):
    name = "easycache"
    Config = EasyCacheConfig

    def make_rule(self, session: PatchSession) -> Rule:
        return EasyCacheRule(self.config.threshold)


@CACHE_METHODS.register("fixed")
class FixedCache(ResidualCache):
    name = "fixed"
    Config = FixedCacheConfig

    def make_rule(self, session: PatchSession) -> Rule:
        return FixedRule(self.config.interval, self.config.compute_steps)
