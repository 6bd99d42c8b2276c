"""Cheaper classifier-free guidance: skip transformer calls whose result is known in advance.

Two options, shared by every solver config (``CFGOptions``):

* ``cfg_interval=(start, end)``: guidance only on steps whose position ``step_index / num_steps``
  lies in ``[start, end)``. Outside it the unconditional call is not run: it returns the
  conditional prediction of the same step, so ``uncond + g * (cond - uncond)`` is exactly ``cond``
  (guidance becomes the identity, as with ``guidance_scale=1``).
* ``cfg_zero_steps=K``: CFG-Zero*'s "zero-init": the first K steps use a zero velocity, so the
  sample stays at the initial noise and no transformer call runs in those steps (neither branch).
  CFG-Zero* found early velocity estimates of flow models to be mostly wrong; zeroing them is
  both cheaper and no worse. This is what "skip the first ~4% of steps" means (METHODS.md, sec. 5).

Per pipeline shape:

* separate CFG calls (Wan, HunyuanVideo and FLUX true-CFG): the "uncond" call returns the "cond"
  output of the same step, recorded when the cond call ran (never a stale one: keyed by
  generation, step, model and input shape; without a match the call runs normally).
* batched CFG (LTX; one call carries [uncond, cond] stacked on the batch axis, diffusers'
  convention): outside the interval only the cond half runs and its output is duplicated, halving
  the call. Every top-level tensor argument whose leading dimension equals the batch is sliced.
* guidance-distilled calls (FLUX without true CFG): nothing to skip outside the interval; zero
  steps still skip the call.

A skipped call still passes through the module's hooks (the step tracker counts it as a call the
pipeline made); only ``forward`` is short-circuited, by an instance attribute set through the
session's change log, so ``remove()`` restores the class's forward.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from accel.base.config import check_range
from accel.base.context import BRANCH_BATCHED, BRANCH_COND, BRANCH_UNCOND, StepContext
from accel.base.method import PatchSession

MAX_CFG_ZERO_STEPS = 1000  # as many as a schedule can have (solvers.schedule.MAX_STEPS)


class CFGOptions:
    """Mixin of the solver config dataclasses, which declare (last, so that ``steps`` comes first)
    ``cfg_interval: Tuple[float, float] = (0.0, 1.0)`` and ``cfg_zero_steps: int = 0``."""

    cfg_interval: Tuple[float, float]
    cfg_zero_steps: int

    def _check_cfg(self) -> None:
        owner = type(self).__name__
        interval = self.cfg_interval
        if not isinstance(interval, (tuple, list)) or len(interval) != 2:
            raise ValueError(f"{owner}.cfg_interval must be a pair (start, end) with 0 <= start <= end <= 1, "
                             f"got {interval!r}")
        start, end = interval
        check_range(owner, "cfg_interval[0]", start, 0.0, 1.0)
        check_range(owner, "cfg_interval[1]", end, 0.0, 1.0)
        if start > end:
            raise ValueError(f"{owner}.cfg_interval must have start <= end, got {interval!r}")
        object.__setattr__(self, "cfg_interval", (float(start), float(end)))
        check_range(owner, "cfg_zero_steps", self.cfg_zero_steps, 0, MAX_CFG_ZERO_STEPS, integer=True)

    @property
    def cfg_active(self) -> bool:
        """Whether any call may be skipped (the default changes nothing and installs nothing)."""
        return self.cfg_interval != (0.0, 1.0) or self.cfg_zero_steps > 0


class CFGSkipper:
    """Decides per call whether to skip, and wraps each transformer's ``forward`` to do it."""

    def __init__(self, options: CFGOptions, step: StepContext):
        self.options = options
        self.step = step
        self.uncond_calls_skipped = 0
        self.batched_halves_skipped = 0
        self.zero_step_calls_skipped = 0
        self._cond: Optional[Tuple[Any, Any]] = None  # (key, output) of the latest cond call worth keeping

    # -- decisions --------------------------------------------------------------------------
    def is_zero_step(self) -> bool:
        return self.step.generations > 0 and self.step.step_index < self.options.cfg_zero_steps

    def guidance_on(self) -> bool:
        n = self.step.num_steps
        if not n:  # unknown loop length: never skip
            return True
        start, end = self.options.cfg_interval
        return start <= self.step.step_index / n < end  # positions are < 1, so end = 1 keeps the last step

    def counters(self) -> Dict[str, int]:
        return {"uncond_calls_skipped": self.uncond_calls_skipped,
                "batched_halves_skipped": self.batched_halves_skipped,
                "zero_step_calls_skipped": self.zero_step_calls_skipped}

    def zero_velocity(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Called by the swapped scheduler before each step: a zero step's velocity is exactly zero.

        The skipped calls returned a broadcastable zero (the true output shape is model-specific);
        replacing it here gives the scheduler a full-shape zero whatever the pipeline did with it.
        """
        return torch.zeros_like(sample, dtype=model_output.dtype) if self.is_zero_step() else model_output

    # -- attaching --------------------------------------------------------------------------
    def attach(self, session: PatchSession) -> None:
        for model in session.models:
            session.changes.set_attr(model, "forward", self._wrap(model, model.forward))

    def _wrap(self, model: torch.nn.Module, forward: Callable) -> Callable:
        @functools.wraps(forward)  # pipelines and hooks may inspect the forward signature
        def forward_with_cfg_skips(*args, **kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if not torch.is_tensor(hidden):
                return forward(*args, **kwargs)
            if self.is_zero_step():
                self.zero_step_calls_skipped += 1
                zero = hidden.new_zeros((hidden.shape[0],) + (1,) * (hidden.ndim - 1))
                if kwargs.get("return_dict", True) is False:
                    return (zero,)
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=zero)
            if self.guidance_on():
                return forward(*args, **kwargs)
            branch = self.step.branch
            key = (self.step.generations, self.step.step_index, id(model), tuple(hidden.shape))
            if branch == BRANCH_UNCOND and self._cond is not None and self._cond[0] == key:
                self.uncond_calls_skipped += 1
                output, self._cond = self._cond[1], None
                return output
            if branch == BRANCH_BATCHED and hidden.shape[0] % 2 == 0:
                self.batched_halves_skipped += 1
                return _run_cond_half(forward, args, kwargs, hidden.shape[0])
            output = forward(*args, **kwargs)
            if branch == BRANCH_COND:
                self._cond = (key, output)  # the uncond call of this step will return it
            return output

        return forward_with_cfg_skips


def _run_cond_half(forward: Callable, args: tuple, kwargs: dict, batch: int) -> Any:
    """Run only the cond half of a batched-CFG call ([uncond, cond] on the batch axis) and
    return its output twice, so that the pipeline's chunk(2) gives cond for both halves."""
    half = batch // 2

    def cond_half(value: Any) -> Any:
        return value[half:] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch else value

    output = forward(*[cond_half(a) for a in args], **{k: cond_half(v) for k, v in kwargs.items()})
    return _map_sample(output, lambda t: torch.cat([t, t], dim=0))


def _map_sample(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, (tuple, list)):
        return type(output)([fn(output[0]), *output[1:]])
    if hasattr(output, "sample"):
        return type(output)(sample=fn(output.sample))
    return fn(output)
