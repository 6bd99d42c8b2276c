"""The registered cache methods: one engine, five reuse rules.

``accel.patch(pipe, cache="teacache")`` or ``cache=TeaCacheConfig(threshold=0.1, forecast="taylor")``
builds one of these; ``attach`` makes the rule for the patched model (coefficients, calibration)
and hands it to the ``CacheEngine``.

Calibrated rules (``teacache``, ``magcache``) given no calibration look for one shipped for the
patched model (the adapter's ``artifact_dirs``; each artifact records the model class and config
fingerprint it was fitted on) and pick, when a loop starts, the one fitted for its step count.
Without one for the loop's step count, TeaCache uses the family's published coefficients (with a
warning when calibrations for other step counts are shipped) and MagCache raises a ``ValueError``
that says what to pass. ``Handle.summary()`` warns when a cache reused nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from accel.base.adapter import config_fingerprint
from accel.base.artifacts import shipped_files
from accel.base.method import Method, PatchSession
from accel.base.registry import CACHE_METHODS

from .calibration import CacheCalibration, load_calibration
from .configs import (CacheConfig, EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig,
                      TeaCacheConfig)
from .diffusers_host import attach_engine
from .engine import CacheEngine
from .forecast import FittedForecast, make_forecaster
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

    calibrated = False  # whether the rule reads a calibration artifact of kind ``name``

    def __init__(self, config: Any):
        super().__init__(config)
        self.engine: Optional[CacheEngine] = None
        source = getattr(config, "calibration", None)
        self.calibration: Optional[CacheCalibration] = (
            None if source is None else load_calibration(source, self.name))
        self.shipped_list: List[CacheCalibration] = []  # calibrations shipped for this model
        self.shipped: Dict[int, CacheCalibration] = {}  # step count -> one of them

    def make_rule(self, session: PatchSession, calibration: Optional[CacheCalibration]) -> Rule:
        raise NotImplementedError

    def attach(self, session: PatchSession) -> None:
        fingerprint = config_fingerprint(session.models)
        if self.calibration is not None:
            for model in session.models:
                self.calibration.check_model(type(model).__name__, fingerprint)
        elif self.calibrated and self.wants_calibration():
            self.shipped_list = self.shipped_calibrations(session, fingerprint)
            self.shipped = {c.num_steps: c for c in self.shipped_list}
        self.session = session
        self.engine = CacheEngine(self.config, self.make_rule(session, self.calibration), warn=self.warn_once,
                                  rule_for_loop=self.rule_for_loop)
        attach_engine(self.engine, session)

    def wants_calibration(self) -> bool:
        return True

    def shipped_calibrations(self, session: PatchSession, fingerprint: str) -> List[CacheCalibration]:
        found = []
        for path in shipped_files(session.adapter.artifact_dirs, self.name):
            calibration = load_calibration(path, self.name)
            if all(type(m).__name__ == calibration.model_class for m in session.models) \
                    and calibration.meta.get("model_fingerprint") == fingerprint:
                found.append(calibration)
        return found

    def rule_for_loop(self, num_steps: Optional[int]) -> Optional[Rule]:
        """The rule for a loop of ``num_steps``: the shipped calibration for it, if any."""
        if self.calibration is not None:
            self.calibration.check_steps(num_steps)
            return None
        if not self.shipped or num_steps is None:  # a bare transformer: no step count to match
            return None
        calibration = self.shipped.get(num_steps)
        if calibration is None:
            return self.no_shipped_calibration(num_steps)
        return self.make_rule(self.session, calibration)

    def no_shipped_calibration(self, num_steps: Optional[int]) -> Optional[Rule]:
        return self.make_rule(self.session, None)

    def counters(self) -> Dict[str, Any]:
        return self.engine.counter_dict() if self.engine is not None else {}

    def idle_warning(self) -> Optional[str]:
        counters = self.counters()
        calls = sum(counters.get("calls", {}).values())
        if calls and not sum(counters["steps_reused"].values()):
            return (f"cache {self.name!r} reused no step in {calls} transformer calls, so it saved nothing: its "
                    "threshold or calibration does not fit this model or step count (a looser threshold, a "
                    "calibration from `accel calibrate`, or the 'quality' preset)")
        return None


@CACHE_METHODS.register("teacache")
class TeaCache(ResidualCache):
    name = "teacache"
    Config = TeaCacheConfig
    calibrated = True
    artifact_field = "calibration"  # a path to a teacache calibration resolves to this method with it

    def wants_calibration(self) -> bool:
        return self.config.coefficients is None

    def no_shipped_calibration(self, num_steps: Optional[int]) -> Optional[Rule]:
        self.warn_once(f"no TeaCache calibration shipped for this model at {num_steps} steps (shipped: "
                       f"{sorted(self.shipped)}); using the {self.session.adapter.family} published coefficients")
        return self.make_rule(self.session, None)

    def make_rule(self, session: PatchSession, calibration: Optional[CacheCalibration]) -> Rule:
        coefficients = self.config.coefficients
        if coefficients is None and calibration is not None:
            coefficients = calibration.coefficients
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

    def make_rule(self, session: PatchSession, calibration: Optional[CacheCalibration]) -> Rule:
        return FirstBlockRule(self.config.threshold)


@CACHE_METHODS.register("magcache")
class MagCache(ResidualCache):
    name = "magcache"
    Config = MagCacheConfig
    calibrated = True
    artifact_field = "calibration"

    def make_rule(self, session: PatchSession, calibration: Optional[CacheCalibration]) -> Rule:
        calibration = calibration or self.calibration or (next(iter(self.shipped.values())) if self.shipped else None)
        if calibration is None:
            raise ValueError("magcache needs a calibration: run `accel calibrate --cache magcache --model ... "
                             "--steps N --out FILE` and pass MagCacheConfig(calibration=FILE)")
        return MagCacheRule(self.config.threshold, calibration.ratios)

    def no_shipped_calibration(self, num_steps: Optional[int]) -> Optional[Rule]:
        raise ValueError(f"magcache: the calibrations shipped for this model are for {sorted(self.shipped)} steps, "
                         f"this run has {num_steps}; run `accel calibrate --cache magcache --steps {num_steps} ...` "
                         "and pass MagCacheConfig(calibration=FILE), or run a shipped step count")


@CACHE_METHODS.register("easycache")
class EasyCache(ResidualCache):
    name = "easycache"
    Config = EasyCacheConfig

    def make_rule(self, session: PatchSession, calibration: Optional[CacheCalibration]) -> Rule:
        return EasyCacheRule(self.config.threshold)


@CACHE_METHODS.register("fixed")
class FixedCache(ResidualCache):
    """Every ``interval``-th step computes, or a searched schedule of as many computed steps
    (``schedule``/``calibration``: a shipped or given ``fixed`` artifact for the loop's step count
    and forecast). With ``forecast="fitted"`` the artifact's weights forecast the other steps; a
    loop without a fitted artifact runs the best one left: a schedule searched for TaylorSeer of
    the config's order, else the uniform one, forecast by TaylorSeer (the summary says which)."""

    name = "fixed"
    Config = FixedCacheConfig
    calibrated = True
    artifact_field = "calibration"

    def __init__(self, config: Any):
        super().__init__(config)
        self.schedule_used = "uniform"
        self.forecast_used = self.fallback_forecast()

    def fallback_forecast(self) -> str:
        config = self.config
        kind = "taylorseer" if config.forecast == "fitted" else config.forecast
        return kind if kind in ("none", "foca") else f"{kind} order {config.order}"

    def wants_calibration(self) -> bool:
        return self.config.schedule != "uniform" and self.config.compute_steps is None

    def make_rule(self, session: PatchSession, calibration: Optional[CacheCalibration]) -> Rule:
        self.forecast_used = self.fallback_forecast()
        if calibration is not None:
            self.schedule_used = f"searched ({calibration.source})"
            return FixedRule(self.config.interval, calibration.compute_steps, self.fitted_forecast(calibration))
        self.schedule_used = "uniform" if self.config.compute_steps is None else "compute_steps"
        return FixedRule(self.config.interval, self.config.compute_steps)

    def fitted_forecast(self, calibration: CacheCalibration) -> Optional[FittedForecast]:
        """The artifact's fitted forecast, when the config asks for one (None: the config's forecast)."""
        if self.config.forecast != "fitted":
            return None
        if calibration.weights is None:
            if calibration is self.calibration:  # given by the user: say so; a shipped one is only not picked
                raise ValueError(f"FixedCacheConfig.forecast='fitted' needs a fitted artifact; {calibration.source} "
                                 f"holds a schedule for forecast {calibration.meta.get('forecast')!r} without "
                                 "weights (`accel calibrate --cache fixed --forecast fitted` fits them)")
            return None
        self.forecast_used = "fitted"
        return FittedForecast(calibration.weights, make_forecaster("fitted", self.config.order))

    def rule_for_loop(self, num_steps: Optional[int]) -> Optional[Rule]:
        if self.calibration is not None or not self.wants_calibration() or num_steps is None:
            return super().rule_for_loop(num_steps)
        config = self.config
        budget = len(uniform_compute_steps(config, num_steps))
        # the steps the engine computes whatever the schedule says: a uniform schedule with no
        # interval step inside the loop and no cap computes exactly the warm-up and final steps
        forced = set(uniform_compute_steps(
            dataclasses.replace(config, interval=num_steps + 1, max_consecutive_reuses=None), num_steps))
        fitting = [c for c in self.shipped_list if c.num_steps == num_steps and len(c.compute_steps) == budget
                   and forced <= set(c.compute_steps)]
        wanted = [("fitted", None)] if config.forecast == "fitted" else []
        wanted.append(("taylorseer" if config.forecast == "fitted" else config.forecast, config.order))
        for forecast, order in wanted:  # a fitted artifact first, then one searched for the fallback
            found = [c for c in fitting if c.meta.get("forecast") == forecast
                     and (order is None or c.meta.get("order") == order)]
            if found:
                if forecast != config.forecast and config.schedule == "searched":
                    self.warn_once(f"no fitted forecast for this model with {budget} computed steps of {num_steps}; "
                                   f"running TaylorSeer order {config.order} on the searched schedule. `accel "
                                   f"calibrate --cache fixed --forecast fitted --budget {budget} --steps {num_steps}` "
                                   "fits one")
                return self.make_rule(self.session, found[0])
        if config.schedule == "searched":
            self.warn_once(f"no searched schedule for this model with {budget} computed steps of {num_steps} and "
                           f"forecast={config.forecast!r}, order={config.order} (shipped: "
                           f"{[(c.num_steps, len(c.compute_steps)) for c in self.shipped_list] or 'none'}); "
                           f"computing one step in {config.interval}. `accel calibrate --cache fixed --budget "
                           f"{budget} --steps {num_steps}` searches one")
        # back to the uniform rule only when an earlier loop ran a searched one
        return self.make_rule(self.session, None) if self.schedule_used.startswith("searched") else None

    def counters(self) -> Dict[str, Any]:
        counters = super().counters()
        return {**counters, "schedule": self.schedule_used, "forecast": self.forecast_used} if counters else counters


def uniform_compute_steps(config: FixedCacheConfig, num_steps: int) -> List[int]:
    """The steps a uniform fixed cache computes in a loop of ``num_steps``, the engine's gates
    (warm-up, final steps, the consecutive-reuse cap) included."""
    warmup, computed, reuses = max(1, config.warmup_for(num_steps)), [], 0
    for step in range(num_steps):
        capped = config.max_consecutive_reuses is not None and reuses >= config.max_consecutive_reuses
        if warmup <= step < num_steps - config.final_steps and step % config.interval and not capped:
            reuses += 1
        else:
            computed.append(step)
            reuses = 0
    return computed
