"""Calibration artifacts (TeaCache polynomials, MagCache ratios, a fixed cache's searched compute
steps): format, loading and checks.

``distill/cache_calibration.py`` fits and writes them; cache configs load them here. An artifact
is a small JSON object::

    {"format": 1, "kind": "teacache" | "magcache" | "fixed", "model_class": "WanTransformer3DModel",
     "model_fingerprint": "3f1c...",                  # accel.base.adapter.config_fingerprint
     "family": "wan", "num_steps": 50, "resolution": {...}, "token_grid": [T, H, W],
     "first_blocks": 0, "last_blocks": 0, "prompts": 4,
     "coefficients": [c4, c3, c2, c1, c0]             # teacache, highest power first
     "ratios": {"cond": [...], "uncond": [...]}}      # magcache, one ratio per step
     "compute_steps": [0, 2, 5, ...], "forecast": "taylorseer", "order": 2,   # fixed
     "weights": {"residuals": 3, "inputs": 2,          # fixed with forecast "fitted": per branch
                 "branches": {"cond": {"1": [a0, b0], "3": [...], ...}, "uncond": {...}}}}

A fitted curve or ratio table is only valid for the model and the step count it was fitted with
(the per-step change grows as steps get fewer); attaching refuses another model class, another
architecture config (when the artifact records its fingerprint: the reference model's calibration
on Wan2.1-1.3B, say) or another step count.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from accel.base.artifacts import as_float_list, as_int, read_json_object, required

from .forecast import FittedWeights

FORMAT_VERSION = 1
MAX_STEPS = 10_000
KINDS = ("teacache", "magcache", "fixed")
CalibrationSource = Union[str, "os.PathLike[str]", Mapping[str, Any], "CacheCalibration"]


@dataclass(frozen=True)
class CacheCalibration:
    kind: str
    model_class: str
    num_steps: int
    coefficients: Optional[Tuple[float, ...]] = None
    ratios: Optional[Dict[str, Tuple[float, ...]]] = None
    compute_steps: Optional[Tuple[int, ...]] = None  # fixed: the steps that compute
    weights: Optional[FittedWeights] = None  # fixed with forecast "fitted": how the others are forecast
    source: str = "<dict>"
    meta: Dict[str, Any] = field(default_factory=dict, compare=False)

    def check_model(self, model_class: str, fingerprint: Optional[str] = None) -> None:
        if model_class != self.model_class:
            raise ValueError(f"{self.kind} calibration {self.source} was fitted for {self.model_class}, "
                             f"not {model_class}; run `accel calibrate --cache {self.kind}` for this model")
        recorded = self.meta.get("model_fingerprint")
        if fingerprint is not None and recorded is not None and fingerprint != recorded:
            raise ValueError(f"{self.kind} calibration {self.source} was fitted for another {model_class} "
                             f"(config fingerprint {recorded}, this model {fingerprint}); "
                             f"run `accel calibrate --cache {self.kind}` for this model")

    def check_steps(self, num_steps: Optional[int]) -> None:
        if num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f"{self.kind} calibration {self.source} was fitted for {self.num_steps} steps, "
                             f"this run has {num_steps}; calibrate for {num_steps} steps or run "
                             f"{self.num_steps}")


def check_calibration_source(owner: str, source: Any) -> None:
    """A config's ``calibration`` field: None, a JSON path, a parsed dict, or a loaded artifact."""
    if source is not None and not isinstance(source, (str, os.PathLike, Mapping, CacheCalibration)):
        raise ValueError(f"{owner}.calibration must be a JSON path, a dict or a CacheCalibration, "
                         f"got {type(source).__name__}")


def load_calibration(source: CalibrationSource, kind: str, *, model_class: Optional[str] = None,
                     num_steps: Optional[int] = None) -> CacheCalibration:
    """Load and validate an artifact (path, parsed dict, or an already loaded one).

    Raises ``ValueError`` naming the file and the problem: unreadable or not JSON, wrong kind,
    missing or malformed fields, or (when given) another model class or step count.
    """
    if isinstance(source, CacheCalibration):
        calibration = source
    elif isinstance(source, Mapping):
        calibration = _parse(dict(source), "<dict>")
    elif isinstance(source, (str, os.PathLike)):
        calibration = _parse(read_json_object(source, "calibration"), os.fspath(source))
    else:
        raise ValueError(f"calibration must be a JSON path or a dict, got {type(source).__name__}")
    if calibration.kind != kind:
        raise ValueError(f"calibration {calibration.source} is a {calibration.kind} artifact, not {kind}")
    if model_class is not None:
        calibration.check_model(model_class)
    calibration.check_steps(num_steps)
    return calibration


def _parse(data: Dict[str, Any], source: str) -> CacheCalibration:
    where = f"calibration {source}"
    kind = required(data, "kind", where)
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"{where}: format {data.get('format')!r} is not supported "
                         f"(this version reads format {FORMAT_VERSION})")
    num_steps = as_int(required(data, "num_steps", where), where, "num_steps", 1, MAX_STEPS)
    model_class = required(data, "model_class", where)
    if not isinstance(model_class, str) or not model_class:
        raise ValueError(f"{where}: model_class must be a class name, got {model_class!r}")
    coefficients = ratios = compute_steps = weights = None
    if kind == "fixed":
        compute_steps = _parse_schedule(data, where, num_steps)
        weights = _parse_weights(data, where, num_steps, compute_steps)
    elif kind == "teacache":
        coefficients = tuple(as_float_list(required(data, "coefficients", where), where, "coefficients"))
        if not 1 <= len(coefficients) <= 10:
            raise ValueError(f"{where}: 1 to 10 coefficients expected, got {len(coefficients)}")
    else:
        raw = required(data, "ratios", where)
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError(f"{where}: ratios must map branch names to per-step lists")
        # A ratio is |R_t| / |R_(t-1)| of residual norms: positive by construction.
        ratios = {str(b): tuple(as_float_list(values, where, f"ratios[{b!r}]", positive=True))
                  for b, values in raw.items()}
        for branch, values in ratios.items():
            if len(values) != num_steps:
                raise ValueError(f"{where}: branch {branch!r} has {len(values)} ratios for {num_steps} steps")
    meta = {k: v for k, v in data.items()
            if k not in ("kind", "model_class", "num_steps", "coefficients", "ratios", "compute_steps", "weights")}
    return CacheCalibration(kind=kind, model_class=model_class, num_steps=num_steps, coefficients=coefficients,
                            ratios=ratios, compute_steps=compute_steps, weights=weights, source=source, meta=meta)


def _parse_schedule(data: Dict[str, Any], where: str, num_steps: int) -> Tuple[int, ...]:
    from .forecast import FORECASTS

    raw = required(data, "compute_steps", where)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: compute_steps must be a non-empty list of step indices")
    steps = tuple(as_int(s, where, "compute_steps", 0, num_steps - 1) for s in raw)
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"{where}: compute_steps must be increasing without repeats, got {list(steps)}")
    if required(data, "forecast", where) not in FORECASTS:
        raise ValueError(f"{where}: forecast must be one of {FORECASTS}, got {data['forecast']!r}")
    as_int(required(data, "order", where), where, "order", 1, 2)
    return steps


MAX_FEATURES = 8


def _parse_weights(data: Dict[str, Any], where: str, num_steps: int,
                   compute_steps: Tuple[int, ...]) -> Optional[FittedWeights]:
    """The ``fitted`` forecast's weights: required with that forecast, refused with any other."""
    raw = data.get("weights")
    if data["forecast"] != "fitted":
        if raw is not None:
            raise ValueError(f"{where}: weights go with forecast 'fitted', not {data['forecast']!r}")
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: forecast 'fitted' needs weights: "
                         "{'residuals': K, 'inputs': M, 'branches': {branch: {step: [...]}}}")
    residuals = as_int(required(raw, "residuals", where), where, "weights.residuals", 1, MAX_FEATURES)
    inputs = as_int(required(raw, "inputs", where), where, "weights.inputs", 0, MAX_FEATURES)
    branches = required(raw, "branches", where)
    if not isinstance(branches, Mapping):  # empty: every step falls back (a fit's first step)
        raise ValueError(f"{where}: weights.branches must map branch names to {{step: weights}}")
    parsed: Dict[str, Dict[int, Tuple[float, ...]]] = {}
    for branch, steps in branches.items():
        name = f"weights.branches[{branch!r}]"
        if not isinstance(steps, Mapping):
            raise ValueError(f"{where}: {name} must map step indices to weight lists")
        parsed[str(branch)] = {}
        for step, values in steps.items():
            if not str(step).isdigit():
                raise ValueError(f"{where}: {name} has step {step!r}, not a step index")
            index = as_int(int(step), where, name, 0, num_steps - 1)
            if index in compute_steps:
                raise ValueError(f"{where}: {name} has weights for step {index}, which the schedule computes")
            found = tuple(as_float_list(values, where, f"{name}[{step!r}]"))
            if not 1 <= len(found) <= residuals + inputs:
                raise ValueError(f"{where}: {name}[{step!r}] has {len(found)} weights; 1 to "
                                 f"{residuals + inputs} (residuals + inputs) expected")
            parsed[str(branch)][index] = found
    return FittedWeights(residuals=residuals, inputs=inputs, branches=parsed)


def save_calibration(artifact: Mapping[str, Any], path: Union[str, "os.PathLike[str]"]) -> None:
    """Write an artifact after checking it parses back."""
    _parse(dict(artifact), os.fspath(path))
    with open(path, "w") as fh:
        json.dump(dict(artifact), fh, indent=2)
        fh.write("\n")
