"""Which sigma schedule a swapped solver runs, and the config fields that change it.

The pipeline's ORIGINAL scheduler defines the model's schedule: Wan's UniPC applies ``flow_shift``,
FLUX and LTX pass ``sigmas`` and a resolution-dependent ``mu`` (dynamic shifting, LTX also
stretches to a terminal sigma), HunyuanVideo passes ``sigmas`` to a statically shifted Euler.
Rather than re-deriving any of that, ``SchedulePlanner`` replays the pipeline's own
``set_timesteps`` arguments on a private copy of the original scheduler (for the requested step
count) and reads back the sigmas; the new solver then runs exactly those. So the Euler swap at the
pipeline's own step count reproduces a FlowMatchEuler pipeline, and a step override keeps the
model's shift.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from accel.base.config import check_range

from .cfg import CFGOptions

_FLOW_MATCH_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
MAX_STEPS = 1000  # solver steps; diffusers' flow schedulers train on 1,000 timesteps
_FLOW_PREDICTION_CLASSES = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


@dataclass(frozen=True)
class SolverConfig(CFGOptions):
    """Options shared by the training-free swaps (``euler``, ``heun``, ``unipc``, ``dpmpp``).

    ``steps``: solver steps, overriding the ``num_inference_steps`` the pipeline is called with.
    ``shift``: a static flow shift ``s * sigma / (1 + (s - 1) * sigma)`` replacing the scheduler's
    own (static or resolution-dependent) shift. ``sigmas``: the full schedule (one sigma per step,
    strictly decreasing in (0, 1]; the final 0 is implied), used as given. ``cfg_interval`` and
    ``cfg_zero_steps``: cheaper CFG (``solvers/cfg.py``).
    """

    steps: Optional[int] = None
    shift: Optional[float] = None
    sigmas: Optional[Tuple[float, ...]] = None
    cfg_interval: Tuple[float, float] = (0.0, 1.0)
    cfg_zero_steps: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.steps is not None:
            check_range(owner, "steps", self.steps, 1, MAX_STEPS, integer=True)
        if self.shift is not None:
            check_range(owner, "shift", self.shift, 0, None, low_inclusive=False)
            if math.isinf(self.shift):
                raise ValueError(f"{owner}.shift must be finite, got {self.shift!r}")
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", check_sigmas(owner, self.sigmas))
            if self.steps is not None and self.steps != len(self.sigmas):
                raise ValueError(f"{owner}.sigmas has {len(self.sigmas)} entries but {owner}.steps is "
                                 f"{self.steps}; they must match (or leave steps unset)")
            if self.shift is not None:
                raise ValueError(f"{owner}.shift and {owner}.sigmas are exclusive: sigmas are used as given")
        self._check_cfg()


def check_sigmas(owner: str, sigmas: Any) -> Tuple[float, ...]:
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence) and not hasattr(sigmas, "tolist"):
        raise ValueError(f"{owner}.sigmas must be a sequence of floats in (0, 1], got {sigmas!r}")
    raw = sigmas.tolist() if hasattr(sigmas, "tolist") else list(sigmas)
    if not raw:
        raise ValueError(f"{owner}.sigmas must not be empty")
    if len(raw) > MAX_STEPS:
        raise ValueError(f"{owner}.sigmas must hold at most {MAX_STEPS} steps, got {len(raw)}")
    for i, s in enumerate(raw):
        check_range(owner, f"sigmas[{i}]", s, 0, 1, low_inclusive=False)
    values = tuple(float(s) for s in raw)
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{owner}.sigmas must be strictly decreasing, got {values!r}")
    return values


def flow_scheduler_problem(scheduler: Any) -> Optional[str]:
    """None when ``scheduler`` is a flow-matching scheduler we can read a schedule from."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {})
    if name in _FLOW_MATCH_CLASSES:
        if config.get("invert_sigmas", False):
            return f"{name} with invert_sigmas=True (Mochi-style inverted sigmas) is not supported"
        return None
    if name in _FLOW_PREDICTION_CLASSES:
        if config.get("prediction_type") == "flow_prediction" and config.get("use_flow_sigmas", False):
            return None
    return f"{name} (prediction_type={config.get('prediction_type', 'n/a')!r}) is not a flow-matching scheduler"


def resample(values: Any, n: int) -> Any:
    """``values`` (a decreasing per-step list ending before 0) at ``n`` evenly spaced positions.

    The list is read as a curve over [0, 1) with an implied final 0 at position 1 and interpolated
    linearly; linear lists (FLUX/LTX's ``linspace(1, 1/N, N)``, HunyuanVideo's ``linspace(1, 0,
    N + 1)[:-1]``) map exactly onto the same list for ``n`` steps. At ``n == len(values)`` the
    input is returned untouched, so an unchanged step count is bit-exact.
    """
    if len(values) == n:
        return values
    src = np.append(np.asarray(values, dtype=np.float64), 0.0)
    return np.interp(np.arange(n) / n, np.arange(len(src)) / (len(src) - 1), src)


class SchedulePlanner:
    """Turns the pipeline's ``set_timesteps`` arguments into the schedule the solver will run."""

    def __init__(self, original: Any, config: SolverConfig):
        self.config = config
        # A private copy: computing a schedule mutates a scheduler, and the pipeline's own object
        # must come back from remove() exactly as it was.
        self.reference = copy.deepcopy(original)
        if config.shift is not None:
            _force_static_shift(self.reference, float(config.shift))
        self._accepts = set(inspect.signature(self.reference.set_timesteps).parameters)

    def __call__(self, num_inference_steps: Optional[int] = None, sigmas: Any = None, mu: Optional[float] = None,
                 timesteps: Any = None) -> np.ndarray:
        """Sigmas of every step plus the final one (float64, length steps + 1)."""
        if self.config.sigmas is not None:
            return np.append(np.asarray(self.config.sigmas, dtype=np.float64), 0.0)
        given = sigmas if sigmas is not None else timesteps
        n = self.config.steps or num_inference_steps or (len(given) if given is not None else None)
        if not n:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        kwargs: dict = {}
        if sigmas is not None:
            kwargs["sigmas"] = resample(sigmas, n)
        elif timesteps is not None:
            kwargs["timesteps"] = resample(timesteps, n)
        else:
            kwargs["num_inference_steps"] = n
        if mu is not None and self.config.shift is None:
            kwargs["mu"] = mu  # a shift override replaces the resolution-dependent shift
        rejected = set(kwargs) - self._accepts
        if rejected:
            raise ValueError(f"the pipeline passed {', '.join(sorted(rejected))} to set_timesteps, which "
                             f"{type(self.reference).__name__} does not accept")
        with np.errstate(invalid="ignore", divide="ignore"):  # a degenerate schedule is reported below
            self.reference.set_timesteps(**kwargs)
        planned = self.reference.sigmas.detach().double().cpu().numpy()
        if getattr(self.reference, "order", 1) == 2:  # Heun repeats inner sigmas: s0, s1, s1, ..., 0
            planned = np.concatenate([planned[:1], planned[1::2]])
        self._check(planned, n)
        return planned

    def _check(self, planned: np.ndarray, n: int) -> None:
        """A schedule every solver can run: finite, in [0, 1], strictly decreasing, one sigma per step."""
        problem = None
        if len(planned) != n + 1:
            problem = f"has {len(planned) - 1} steps, not {n}"
        elif not np.isfinite(planned).all():
            problem = "is not finite"
        elif planned.min() < 0 or planned.max() > 1 or (np.diff(planned) >= 0).any():
            problem = "is not strictly decreasing in [0, 1]"
        if problem is not None:
            extra = (f" (it stretches to shift_terminal={self.reference.config.shift_terminal}, which a "
                     f"{n}-step schedule cannot)" if self.reference.config.get("shift_terminal") else "")
            what = f"{type(self.config).__name__}.steps" if self.config.steps else "num_inference_steps"
            raise ValueError(f"{what}={n}: the pipeline's "
                             f"{type(self.reference).__name__} schedule for {n} step(s) {problem}: "
                             f"{np.round(planned, 4).tolist()}{extra}; choose another step count")


def _force_static_shift(scheduler: Any, shift: float) -> None:
    """Make the private reference copy apply ``shift`` statically instead of its own shift."""
    config = scheduler.config
    updates = {key: False for key in ("use_dynamic_shifting",) if key in config}
    if "flow_shift" in config:  # UniPC / DPM-Solver in flow mode
        updates["flow_shift"] = shift
    elif "shift" in config:  # FlowMatchEuler / FlowMatchHeun
        updates["shift"] = shift
    scheduler.register_to_config(**updates)
    if hasattr(scheduler, "set_shift"):  # FlowMatchEuler reads its shift from ``_shift``
        scheduler.set_shift(shift)
