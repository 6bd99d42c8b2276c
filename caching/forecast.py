"""What a reuse step adds instead of running the cached blocks: the last residual, or a forecast.

Each forecaster keeps residuals of the last few *computed* steps (``history_size``) and predicts
the residual at a later step, in step-index units (so uneven gaps between computed steps, as
adaptive rules produce, are handled exactly). Residuals are dicts of stream name -> tensor;
each stream is forecast on its own, in float32, and cast back to its dtype.

* ``none``: the newest computed residual, as is.
* ``taylor`` (order n = 1 or 2): the Newton divided-difference polynomial through the last n+1
  computed residuals, evaluated at the target step. For evenly spaced steps this is the
  Taylor expansion F + F' k + F'' k^2 / 2 with F' and F'' the one-sided estimates at the newest
  step that are exact on quadratics (F' = (3 F0 - 4 F1 + F2) / 2h at order 2); it is exact for
  residuals that are polynomials of degree <= n in the step index.
* ``taylorseer`` (order n = 1 or 2): TaylorSeer's expansion at the newest computed step s0,
  F + D1 k + D2 k^2 / 2 with k = s - s0, D1 the slope over the newest gap and D2 the change of
  that slope over the newest gap (backward differences, as diffusers' and cache-dit's TaylorSeer
  compute them). Order 1 is ``taylor`` order 1; at order 2 the curvature term is k^2 where the
  exact quadratic's is k (k + h): exact only on straight lines, and it follows curvature by
  half at a lead of one gap (docs/cache_forecasting.md says when that is the better bet).
* ``foca`` (BDF2 predictor, Heun corrector, damped): with computed steps s1 > s2 > s3, residuals
  F1, F2, F3, gap h1 = s1 - s2 and lead tau = s - s1 > 0:

      v1 = (F1 - F2) / h1,  v2 = (F2 - F3) / (s2 - s3)       slopes at midpoints m1, m2
      a  = (v1 - v2) / (m1 - m2)                              slope change per step
      P  = F1 + tau * v1                                      predictor (= 2 F1 - F2 when tau = h1)
      C  = F1 + tau / 2 * (v(s1) + v(s1 + tau))               Heun: trapezoid of the linear slope model
         = P + a * tau * (h1 + tau) / 2
      F  = P + min(1, h1 / tau) * (C - P)                     correction damped beyond one gap

  Exact for linear residuals at any lead and for quadratic ones while tau <= h1; with only two
  computed steps it is the predictor alone.
* ``fitted``: a linear forecast whose weights were fitted for one schedule (``accel calibrate
  --cache fixed --forecast fitted``, ``distill/forecast_fit.py``). With computed steps
  s0 > s1 > ... before the target step s, residuals R and span inputs X (the streams entering the
  cached span):

      F(s) = sum_j a_j R(s_j)  (j < K)  +  sum_j b_j (X(s) - X(s_j))  (j < M)

  with one weight vector per CFG branch and target step, shared by the streams. The first sum
  holds every polynomial forecast above on that schedule (order 2 TaylorSeer is a = (2.5, -2, 0.5)
  at a lead of one gap); the second lets the forecast see where this step's input actually went,
  which no extrapolation of past residuals can. Steps without weights (a schedule it was not
  fitted for) use TaylorSeer's expansion of the config's order. Only a ``fixed`` cache runs it:
  its weights come with the schedule's artifact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from accel.base.config import check_choice, check_range

Residuals = Dict[str, torch.Tensor]
History = Sequence[Tuple[int, Residuals]]  # (step index, residuals), oldest first

FORECASTS = ("none", "taylor", "taylorseer", "foca", "fitted")
# forecasts whose weights come with a fixed cache's schedule artifact; adaptive rules cannot run them
SCHEDULE_FORECASTS = ("fitted",)


@dataclass
class ForecastInputs:
    """What a forecast may read besides the residual history: this call's branch and span input,
    and the span inputs of the steps in the history (kept only for forecasts that ask)."""

    branch: str
    span_input: Mapping[str, torch.Tensor]
    history_inputs: Mapping[int, Mapping[str, torch.Tensor]]


class Forecaster:
    history_size = 1
    needs_inputs = False  # whether predict reads ForecastInputs (the engine then keeps span inputs)

    def predict(self, history: History, step: int, inputs: Optional[ForecastInputs] = None) -> Residuals:
        raise NotImplementedError


class LastResidual(Forecaster):
    """Plain reuse: the residual of the newest computed step."""

    def predict(self, history: History, step: int, inputs: Optional[ForecastInputs] = None) -> Residuals:
        return history[-1][1]


class _ThroughLastPoints(Forecaster):
    """A forecast from the last ``order + 1`` computed steps by ``extrapolate(steps, values, step)``
    (newest first), each stream on its own."""

    def __init__(self, order: int):
        check_range(type(self).__name__, "order", order, 1, 2, integer=True)
        self.order = order
        self.history_size = order + 1

    def extrapolate(self, steps: Sequence[float], values: Sequence[torch.Tensor], target: float) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, history: History, step: int, inputs: Optional[ForecastInputs] = None) -> Residuals:
        points = list(history[-self.history_size:])[::-1]  # newest first
        steps = [s for s, _ in points]
        return {name: _cast_like(self.extrapolate(steps, [r[name].float() for _, r in points], step), ref)
                for name, ref in points[0][1].items()}


class TaylorForecast(_ThroughLastPoints):
    def extrapolate(self, steps, values, target):
        return newton_extrapolate(steps, values, target)


class TaylorSeerForecast(_ThroughLastPoints):
    def extrapolate(self, steps, values, target):
        return taylorseer_extrapolate(steps, values, target)


class FoCaForecast(Forecaster):
    history_size = 3

    def predict(self, history: History, step: int, inputs: Optional[ForecastInputs] = None) -> Residuals:
        points = list(history[-3:])[::-1]  # newest first
        out: Residuals = {}
        for name, newest in points[0][1].items():
            steps = [s for s, _ in points]
            values = [r[name].float() for _, r in points]
            out[name] = _cast_like(foca_extrapolate(steps, values, step), newest)
        return out


@dataclass(frozen=True)
class FittedWeights:
    """Weights of the ``fitted`` forecast: ``residuals`` (K) and ``inputs`` (M) features at most,
    ``branches[branch][step]`` the weights for that target step (fewer when the history was
    shorter: the first forecast steps)."""

    residuals: int
    inputs: int
    branches: Mapping[str, Mapping[int, Tuple[float, ...]]]


def fitted_features(history: History, history_inputs: Mapping[int, Mapping[str, torch.Tensor]],
                    span_input: Mapping[str, torch.Tensor], name: str, residuals: int,
                    inputs: int) -> List[torch.Tensor]:
    """The features of stream ``name`` in the fitted forecast's order (float32): the newest
    ``residuals`` computed residuals, then ``X(s) - X(s_j)`` for the newest ``inputs`` computed
    steps whose inputs are known. Fitting and forecasting both build them here."""
    points = list(history)[::-1]  # newest first
    features = [r[name].float() for _, r in points[:residuals]]
    now = span_input[name].float()
    for step, _ in points[:inputs]:
        past = history_inputs.get(step)
        if past is None:
            break
        features.append(now - past[name].float())
    return features


class FittedForecast(Forecaster):
    """The ``fitted`` forecast; ``fallback`` serves steps and branches without weights."""

    needs_inputs = True

    def __init__(self, weights: FittedWeights, fallback: Forecaster):
        self.weights, self.fallback = weights, fallback
        self.history_size = max(weights.residuals, weights.inputs, fallback.history_size)

    def predict(self, history: History, step: int, inputs: Optional[ForecastInputs] = None) -> Residuals:
        found = None if inputs is None else self.weights.branches.get(inputs.branch, {}).get(step)
        if found is None:
            return self.fallback.predict(history, step, inputs)
        out: Residuals = {}
        for name, ref in history[-1][1].items():
            features = fitted_features(history, inputs.history_inputs, inputs.span_input, name,
                                       self.weights.residuals, self.weights.inputs)
            if len(features) != len(found):  # a history the weights were not fitted on
                return self.fallback.predict(history, step, inputs)
            out[name] = _cast_like(sum(w * f for w, f in zip(found, features)), ref)
        return out


def newton_extrapolate(steps: Sequence[float], values: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """Value at ``target`` of the polynomial through (steps[i], values[i]) (distinct steps)."""
    coeffs: List[torch.Tensor] = list(values)
    n = len(steps)
    for level in range(1, n):  # coeffs[i] becomes the divided difference f[s_0 .. s_i]
        for i in range(n - 1, level - 1, -1):
            coeffs[i] = (coeffs[i] - coeffs[i - 1]) / float(steps[i] - steps[i - level])
    result = coeffs[-1]
    for i in range(n - 2, -1, -1):  # Horner in Newton form
        result = result * float(target - steps[i]) + coeffs[i]
    return result


def taylorseer_extrapolate(steps: Sequence[float], values: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """F + D1 k + D2 k^2 / 2 at the newest step (``steps``/``values`` newest first; fewer
    points, a lower order)."""
    lead = float(target - steps[0])
    derivatives = [values[0]]
    if len(steps) > 1:
        gap = float(steps[0] - steps[1])
        derivatives.append((values[0] - values[1]) / gap)
        if len(steps) > 2:
            older_slope = (values[1] - values[2]) / float(steps[1] - steps[2])
            derivatives.append((derivatives[1] - older_slope) / gap)
    result = derivatives[0]
    for power, derivative in enumerate(derivatives[1:], start=1):
        result = result + derivative * (lead ** power / math.factorial(power))
    return result


def foca_extrapolate(steps: Sequence[float], values: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """The damped BDF2/Heun forecast of the module docstring; ``steps``/``values`` newest first."""
    if len(steps) < 2:
        return values[0]
    s1, s2 = steps[0], steps[1]
    f1, f2 = values[0], values[1]
    h1, tau = float(s1 - s2), float(target - s1)
    if tau <= 0:
        return f1
    v1 = (f1 - f2) / h1
    predicted = f1 + tau * v1
    if len(steps) < 3:
        return predicted
    s3, f3 = steps[2], values[2]
    v2 = (f2 - f3) / float(s2 - s3)
    slope_change = (v1 - v2) / (0.5 * float(s1 - s3))  # midpoints are (s1 - s3) / 2 apart
    correction = slope_change * (tau * (h1 + tau) / 2)
    return predicted + min(1.0, h1 / tau) * correction


def make_forecaster(kind: str, order: int = 1) -> Forecaster:
    """The forecaster of a config; ``fitted`` gives its fallback (the weights come with a schedule)."""
    check_choice("forecast", "forecast", kind, FORECASTS)
    if kind == "taylor":
        return TaylorForecast(order)
    if kind in ("taylorseer", "fitted"):
        return TaylorSeerForecast(order)
    if kind == "foca":
        return FoCaForecast()
    return LastResidual()


def _cast_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return value.to(ref.dtype)
