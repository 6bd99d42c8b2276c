"""Config dataclasses of the cache methods, validated on construction.

``CacheConfig`` holds what the engine does for every rule (which blocks are cached, warm-up,
final steps, the consecutive-reuse cap, forecasting, CFG reuse); each method's config adds its
rule's knobs and overrides defaults. All fields are keyword-only. Configs are values: a
``calibration`` is only checked to be a path, a dict or a loaded artifact here; the method loads
it when it is built (``accel.patch``), so a missing or malformed file fails there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from accel.base.config import check_choice, check_range

from .calibration import CalibrationSource, check_calibration_source
from .forecast import FORECASTS, SCHEDULE_FORECASTS


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Engine options shared by every cache method.

    first_blocks / last_blocks: blocks always run before / after the cached span (Fn / Bn;
        FLUX and HunyuanVideo count dual blocks then single blocks as one sequence).
    warmup_steps, warmup_ratio: steps always computed at the start: the larger of the count
        and ceil(ratio * num_steps).
    final_steps: steps always computed at the end.
    max_consecutive_reuses: cap on reuses in a row per branch (None: no cap).
    forecast, order: "none" (reuse the residual), "taylor" (the exact polynomial of ``order`` 1
        or 2), "taylorseer" (TaylorSeer's expansion of ``order`` 1 or 2) or "foca" (see
        ``caching/forecast.py`` for the formulas); a fixed cache also runs "fitted".
    cfg_reuse_steps / cfg_reuse_interval: where the uncond branch takes the cond branch's
        residual plus the last measured (uncond - cond) difference: the listed step indices, or
        every step that is not a multiple of the interval (outside warm-up and final steps).
        Only pipelines that run the CFG branches as separate calls can use it.
    """

    first_blocks: int = 0
    last_blocks: int = 0
    warmup_steps: int = 1
    warmup_ratio: float = 0.0
    final_steps: int = 0
    max_consecutive_reuses: Optional[int] = None
    forecast: str = "none"
    order: int = 1
    cfg_reuse_steps: Tuple[int, ...] = ()
    cfg_reuse_interval: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("first_blocks", "last_blocks", "warmup_steps", "final_steps", "cfg_reuse_interval"):
            check_range(owner, name, getattr(self, name), 0, integer=True)
        check_range(owner, "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.max_consecutive_reuses is not None:
            check_range(owner, "max_consecutive_reuses", self.max_consecutive_reuses, 1, integer=True)
        check_choice(owner, "forecast", self.forecast, self.forecasts())
        check_range(owner, "order", self.order, 1, 2, integer=True)
        steps = self.cfg_reuse_steps
        if not isinstance(steps, (tuple, list)):
            raise ValueError(f"{owner}.cfg_reuse_steps must be a sequence of step indices, got {steps!r}")
        for step in steps:
            check_range(owner, "cfg_reuse_steps", step, 0, integer=True)
        object.__setattr__(self, "cfg_reuse_steps", tuple(steps))
        if steps and self.cfg_reuse_interval:
            raise ValueError(f"{owner}: give cfg_reuse_steps or cfg_reuse_interval, not both")
        self._check()

    def _check(self) -> None:
        """Per-method validation (subclasses)."""

    @classmethod
    def forecasts(cls) -> Tuple[str, ...]:
        """The forecasts this method runs: a fitted one needs a fixed cache's schedule."""
        return tuple(f for f in FORECASTS if f not in SCHEDULE_FORECASTS)

    def warmup_for(self, num_steps: Optional[int]) -> int:
        if num_steps is None:
            return self.warmup_steps
        return max(self.warmup_steps, math.ceil(self.warmup_ratio * num_steps - 1e-9))

    def cfg_reuse_at(self, step: int, num_steps: Optional[int]) -> bool:
        if self.cfg_reuse_steps:
            return step in self.cfg_reuse_steps
        if not self.cfg_reuse_interval or step < self.warmup_for(num_steps):
            return False
        if num_steps is not None and step >= num_steps - self.final_steps:
            return False
        return step % self.cfg_reuse_interval != 0

    @property
    def cfg_reuse(self) -> bool:
        return bool(self.cfg_reuse_steps or self.cfg_reuse_interval)


def _check_threshold(config: Any) -> None:
    check_range(type(config).__name__, "threshold", config.threshold, 0.0)
    if math.isinf(config.threshold):
        raise ValueError(f"{type(config).__name__}.threshold must be finite, got {config.threshold!r}")


@dataclass(frozen=True, kw_only=True)
class TeaCacheConfig(CacheConfig):
    """TeaCache: coefficients, if given, override the calibration, which overrides the adapter's."""

    threshold: float = 0.08
    coefficients: Optional[Tuple[float, ...]] = None
    calibration: Optional[CalibrationSource] = None
    final_steps: int = 1

    def _check(self) -> None:
        _check_threshold(self)
        if self.coefficients is not None:
            coefficients = tuple(self.coefficients)
            if not 1 <= len(coefficients) <= 10:
                raise ValueError(f"TeaCacheConfig.coefficients must hold 1 to 10 numbers (highest power first), "
                                 f"got {len(coefficients)}")
            for c in coefficients:
                check_range("TeaCacheConfig", "coefficients", c)
            object.__setattr__(self, "coefficients", coefficients)
            if self.calibration is not None:
                raise ValueError("TeaCacheConfig: give coefficients or calibration, not both")
        check_calibration_source("TeaCacheConfig", self.calibration)


@dataclass(frozen=True, kw_only=True)
class FBCacheConfig(CacheConfig):
    """First-block cache: ``first_blocks`` >= 1 blocks always run; their residual is the probe.
    The default threshold is the ``quality`` preset's."""

    threshold: float = 0.1
    first_blocks: int = 1

    def _check(self) -> None:
        _check_threshold(self)
        check_range("FBCacheConfig", "first_blocks", self.first_blocks, 1, integer=True)


@dataclass(frozen=True, kw_only=True)
class MagCacheConfig(CacheConfig):
    """MagCache: needs a calibration (``accel calibrate --cache magcache``); K is
    ``max_consecutive_reuses`` and the retention fraction is ``warmup_ratio``."""

    threshold: float = 0.12
    calibration: Optional[CalibrationSource] = None
    max_consecutive_reuses: Optional[int] = 2
    warmup_ratio: float = 0.2

    def _check(self) -> None:
        _check_threshold(self)
        check_calibration_source("MagCacheConfig", self.calibration)


@dataclass(frozen=True, kw_only=True)
class EasyCacheConfig(CacheConfig):
    threshold: float = 0.05
    warmup_ratio: float = 0.2

    def _check(self) -> None:
        _check_threshold(self)


SCHEDULES = ("uniform", "searched", "auto")


@dataclass(frozen=True, kw_only=True)
class FixedCacheConfig(CacheConfig):
    """Compute every ``interval``-th step, or exactly the steps in ``compute_steps`` (the step
    mask form); warm-up and final steps are computed either way. The defaults are the ``balanced``
    preset's: every 2nd step (or a searched schedule of as many steps, where one is shipped for the
    model), the others forecast by TaylorSeer's second-order expansion.

    schedule: "uniform" (every ``interval``-th step), "searched" (as many computed steps as the
        uniform schedule, placed where ``accel calibrate --cache fixed`` found them best: the
        ``calibration`` given, else one shipped for this model, step count, budget and forecast
        that computes the warm-up and final steps; without one, uniform with a warning) or "auto" (searched when one fits, else uniform
        quietly). ``Handle.summary()`` says which ran.
    calibration: a searched schedule (a ``fixed`` artifact, path or dict) to run; its compute
        steps replace the interval.
    forecast="fitted": the linear forecast fitted with a schedule (``accel calibrate --cache fixed
        --forecast fitted``), from ``calibration`` or a shipped artifact; where none is shipped for
        the model and step count, TaylorSeer of ``order`` on the best schedule left (quietly with
        schedule "auto", with a warning with "searched").
    """

    interval: int = 2
    forecast: str = "taylorseer"
    order: int = 2
    compute_steps: Optional[Tuple[int, ...]] = None
    schedule: str = "auto"
    calibration: Optional[CalibrationSource] = None

    @classmethod
    def forecasts(cls) -> Tuple[str, ...]:
        return FORECASTS

    def _check(self) -> None:
        check_range("FixedCacheConfig", "interval", self.interval, 1, integer=True)
        if self.forecast == "fitted" and (self.schedule == "uniform" or self.compute_steps is not None):
            raise ValueError("FixedCacheConfig: forecast='fitted' takes its weights from a fitted schedule "
                             "(calibration, or schedule 'auto'/'searched' for a shipped one), not from "
                             f"{'compute_steps' if self.compute_steps is not None else 'schedule=uniform'}")
        check_choice("FixedCacheConfig", "schedule", self.schedule, SCHEDULES)
        check_calibration_source("FixedCacheConfig", self.calibration)
        if self.compute_steps is not None:
            if not isinstance(self.compute_steps, (tuple, list)):
                raise ValueError(f"FixedCacheConfig.compute_steps must be a sequence of step indices, "
                                 f"got {self.compute_steps!r}")
            for step in self.compute_steps:
                check_range("FixedCacheConfig", "compute_steps", step, 0, integer=True)
            object.__setattr__(self, "compute_steps", tuple(self.compute_steps))
            if self.calibration is not None or self.schedule == "searched":
                raise ValueError("FixedCacheConfig: give compute_steps, or a searched schedule (calibration / "
                                 "schedule='searched'), not both")
