"""Reuse rules: each says, from what it measures at one call, whether reusing is acceptable.

A rule keeps its running quantities in a per-branch state (its ``State`` dataclass) and is driven
by the engine through three calls, so its decision can be tested on constructed inputs:

* ``propose(state, probe)`` at every call, before the cached blocks: update running quantities
  and return True when this rule would reuse. The engine may still compute (warm-up, final
  steps, consecutive-reuse cap, nothing cached yet).
* ``committed(state, probe, reused)`` with the engine's final decision (rules reset on compute).
* ``computed(state, probe, span_output)`` after the cached blocks ran (rules that learn from
  full steps).

``needs`` names the probe fields the engine must fill for the rule (they cost work to produce).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, FrozenSet, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:
    from .forecast import Forecaster

MODULATED_INPUT = "modulated_input"  # TeaCache's timestep-modulated input (adapter hook)
FIRST_RESIDUAL = "first_residual"  # visual stream after the first Fn blocks minus before them
SPAN_INPUT = "span_input"  # visual stream entering the cached blocks


class Stats:
    """The means rules decide from. This one sees whole tensors; a host whose tensors are split
    across processes (context parallelism) gives one whose means cover every process's part
    (``caching/distributed.py``), so every rank measures the same number and decides alike."""

    def mean_abs(self, x: torch.Tensor) -> float:
        return float(torch.mean(torch.abs(x), dtype=torch.float32))


LOCAL = Stats()


@dataclass
class Probe:
    """What the engine measured for one transformer call, up to the first cached block."""

    step: int
    num_steps: Optional[int] = None
    branch: str = "cond"
    modulated_input: Optional[torch.Tensor] = None
    first_residual: Optional[torch.Tensor] = None
    span_input: Optional[torch.Tensor] = None
    stats: Stats = LOCAL


def mean_abs(x: torch.Tensor, stats: Stats = LOCAL) -> float:
    return stats.mean_abs(x)


def relative_l1(current: torch.Tensor, previous: torch.Tensor, stats: Stats = LOCAL) -> float:
    """mean|current - previous| / mean|previous| (inf when previous is all zeros)."""
    denominator = stats.mean_abs(previous)
    numerator = stats.mean_abs(current - previous)
    return numerator / denominator if denominator > 0 else (0.0 if numerator == 0 else float("inf"))


def _comparable(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return a is not None and b is not None and a.shape == b.shape


class Rule:
    name = ""
    needs: FrozenSet[str] = frozenset()
    # a forecast that comes with the rule's decisions (a fixed schedule fitted with its own
    # weights); None: the config's
    forecaster: Optional["Forecaster"] = None
    State: ClassVar[Optional[type]] = None  # per-branch running quantities; None: the rule keeps none

    def new_state(self) -> Any:
        return None if self.State is None else self.State()

    def propose(self, state: Any, probe: Probe) -> bool:
        raise NotImplementedError

    def committed(self, state: Any, probe: Probe, reused: bool) -> None:
        pass

    def computed(self, state: Any, probe: Probe, span_output: torch.Tensor) -> None:
        pass


@dataclass
class TeaCacheState:
    previous: Optional[torch.Tensor] = None  # modulated input at the previous call
    accumulated: float = 0.0  # rescaled change summed since the last computed step


class TeaCacheRule(Rule):
    """Accumulate the polynomial-rescaled relative L1 change of the modulated input; reuse while
    the sum stays under ``threshold``; reset on compute.

    A negative polynomial value (fitted curves dip below zero near 0) is counted as 0: it would
    otherwise let a threshold of 0 reuse, and a negative predicted change means no change.
    """

    name = "teacache"
    needs = frozenset({MODULATED_INPUT})
    State = TeaCacheState

    def __init__(self, threshold: float, coefficients: Sequence[float]):
        self.threshold = float(threshold)
        self.coefficients = tuple(float(c) for c in coefficients)

    def rescale(self, relative_change: float) -> float:
        return max(0.0, float(np.polyval(self.coefficients, relative_change)))

    def propose(self, state, probe):
        current, previous = probe.modulated_input, state.previous
        state.previous = current
        if not _comparable(current, previous):
            return False
        state.accumulated += self.rescale(relative_l1(current, previous, probe.stats))
        return state.accumulated < self.threshold

    def committed(self, state, probe, reused):
        if not reused:
            state.accumulated = 0.0


@dataclass
class FirstBlockState:
    reference: Optional[torch.Tensor] = None  # first blocks' residual at the last computed step


class FirstBlockRule(Rule):
    """Reuse while the first blocks' residual changed by less than ``threshold`` (relative mean
    absolute difference) against the last computed step."""

    name = "fbcache"
    needs = frozenset({FIRST_RESIDUAL})
    State = FirstBlockState

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def propose(self, state, probe):
        if not _comparable(probe.first_residual, state.reference):
            return False
        return relative_l1(probe.first_residual, state.reference, probe.stats) < self.threshold

    def committed(self, state, probe, reused):
        if not reused:
            state.reference = probe.first_residual


@dataclass
class MagCacheState:
    ratio: float = 1.0  # product of the per-step ratios since the last computed step
    error: float = 0.0  # accumulated |1 - ratio|


class MagCacheRule(Rule):
    """Calibrated per-step magnitude ratios r_t = |R_t| / |R_(t-1)| of the cached residual.

    While reusing, the ratio since the last computed step is the product of the r_t, and each
    reused step adds |1 - product| to the error; reuse while the error is under ``threshold``.
    (The consecutive-reuse cap K and the retention fraction are the engine's
    ``max_consecutive_reuses`` and ``warmup_ratio``.)
    """

    name = "magcache"
    State = MagCacheState

    def __init__(self, threshold: float, ratios: Mapping[str, Sequence[float]]):
        self.threshold = float(threshold)
        self.ratios = {branch: tuple(float(r) for r in values) for branch, values in ratios.items()}

    def ratios_for(self, branch: str) -> Tuple[float, ...]:
        # Batched and single-branch runs calibrate as the branch they ran; fall back to "cond".
        return self.ratios.get(branch) or self.ratios.get("cond") or next(iter(self.ratios.values()))

    def propose(self, state, probe):
        ratios = self.ratios_for(probe.branch)
        if probe.step >= len(ratios):
            return False
        state.ratio *= ratios[probe.step]
        state.error += abs(1.0 - state.ratio)
        return state.error < self.threshold

    def committed(self, state, probe, reused):
        if not reused:
            state.ratio, state.error = 1.0, 0.0


@dataclass
class EasyCacheState:
    previous_input: Optional[torch.Tensor] = None  # span input at the previous call
    computed_input: Optional[torch.Tensor] = None  # span input and output at the last computed step
    computed_output: Optional[torch.Tensor] = None
    k: Optional[float] = None  # output change / input change between the last two computed steps
    accumulated: float = 0.0


class EasyCacheRule(Rule):
    """Runtime-only: k = (output change / input change) of the cached blocks between the last
    two computed steps; each later step adds k * (input change since the previous step) /
    |output at the last computed step|; reuse while the sum is under ``threshold``."""

    name = "easycache"
    needs = frozenset({SPAN_INPUT})
    State = EasyCacheState

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def propose(self, state, probe):
        current, previous = probe.span_input, state.previous_input
        state.previous_input = current
        if state.k is None or not _comparable(current, previous) or state.computed_output is None:
            return False
        output_scale = mean_abs(state.computed_output, probe.stats)
        if output_scale == 0:
            return False
        state.accumulated += state.k * mean_abs(current - previous, probe.stats) / output_scale
        return state.accumulated < self.threshold

    def committed(self, state, probe, reused):
        if not reused:
            state.accumulated = 0.0

    def computed(self, state, probe, span_output):
        current = probe.span_input
        if _comparable(current, state.computed_input) and _comparable(span_output, state.computed_output):
            input_change = mean_abs(current - state.computed_input, probe.stats)
            output_change = mean_abs(span_output - state.computed_output, probe.stats)
            state.k = output_change / input_change if input_change > 0 else None
        state.computed_input, state.computed_output = current, span_output


class FixedRule(Rule):
    """Compute on steps that are multiples of ``interval`` (or on the listed steps); reuse between."""

    name = "fixed"

    def __init__(self, interval: int = 2, compute_steps: Optional[Sequence[int]] = None,
                 forecaster: Optional["Forecaster"] = None):
        self.interval = int(interval)
        self.compute_steps = None if compute_steps is None else frozenset(int(s) for s in compute_steps)
        self.forecaster = forecaster

    def propose(self, state, probe):
        if self.compute_steps is not None:
            return probe.step not in self.compute_steps
        return probe.step % self.interval != 0
