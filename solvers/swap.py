"""Scheduler swaps: ``solver="euler" | "heun" | "unipc" | "dpmpp"``, diffusers' own schedulers.

``SchedulerSwap.attach`` replaces ``pipe.scheduler`` (through the change log, so ``remove()`` puts
the original object back) with a ``SwappedScheduler``: the pipeline still reads the original's
``config`` and so computes the arguments it always computes; ``set_timesteps`` turns them into a
schedule (``SchedulePlanner``) and loads it into the new diffusers scheduler, which does every
step. The step tracker, attached right after, wraps the stand-in's ``set_timesteps``/``step``, so
the step context counts the new solver's steps.

Step counts follow diffusers: ``steps=n`` runs n solver steps; Heun evaluates the model 2n - 1
times (``handle.step.num_steps`` counts scheduler steps, i.e. model evaluations per branch).
UniPC and DPM-Solver++ keep diffusers' integer timesteps in flow mode (what Wan ships with).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from accel.base.config import check_range
from accel.base.method import Method, PatchSession
from accel.base.registry import SOLVER_METHODS

from .cfg import CFGSkipper
from .schedule import SchedulePlanner, SolverConfig, flow_scheduler_problem

# The first sigma of a flow schedule is often exactly 1 (pure noise); multistep solvers take
# log(alpha) = log(1 - sigma) there. diffusers' UniPC nudges it below 1 by this much; DPM-Solver++
# gets the same guard when we hand it a schedule.
_SIGMA_MAX_GUARD = 1e-6


class SwappedScheduler:
    """Stands in for ``pipe.scheduler`` while a solver swap is attached.

    ``original``: the pipeline's scheduler, untouched (its ``config`` is what the pipeline reads).
    ``solver``: the diffusers scheduler that steps; every other attribute is delegated to it
    (``timesteps``, ``sigmas``, ``order``, ``set_begin_index``, ``scale_noise`` ...).
    """

    def __init__(self, original: Any, solver: Any, method: "SchedulerSwap"):
        self.original = original
        self.solver = solver
        self._method = method
        self._step_params = set(inspect.signature(solver.step).parameters)
        self._keeps = step_dtype_source(original)

    @property
    def config(self) -> Any:
        return self.original.config

    # Explicit parameters: pipelines test ``"sigmas" in signature(scheduler.set_timesteps)`` before
    # passing them, and FLUX/LTX pass ``mu`` whenever the original scheduler shifts dynamically.
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None, sigmas: Any = None,
                      mu: Optional[float] = None, timesteps: Any = None) -> None:
        schedule = self._method.plan(num_inference_steps, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self._method.load_schedule(self.solver, schedule, device)
        self._method.last_num_steps = len(schedule) - 1

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, **kwargs: Any) -> Any:
        # The pipeline's loop keeps the latents in the dtype its own scheduler returns (Wan's UniPC:
        # the sample's, fp32; FlowMatchEuler: the model output's); the swap keeps that dtype too.
        dtype = (sample if self._keeps == "sample" else model_output).dtype
        if self._method.cfg_skipper is not None:
            model_output = self._method.cfg_skipper.zero_velocity(model_output, sample)
        self._method.solver_steps += 1
        kwargs = {k: v for k, v in kwargs.items() if k in self._step_params}  # e.g. generator for UniPC
        return _cast_prev_sample(self.solver.step(model_output, timestep, sample, **kwargs), dtype)

    def __getattr__(self, name: str) -> Any:
        solver = self.__dict__.get("solver")
        if solver is None:
            raise AttributeError(name)
        return getattr(solver, name)

    def __repr__(self) -> str:
        return f"<accel SwappedScheduler {type(self.solver).__name__} in place of {type(self.original).__name__}>"


def step_dtype_source(scheduler: Any) -> str:
    """Whose dtype ``scheduler.step`` returns: "sample" or "model_output" (probed on a copy, one
    2-element step with a bf16 velocity and an fp32 sample; diffusers' usual "model_output" when
    the probe cannot run)."""
    probe = copy.deepcopy(scheduler)
    kwargs: Dict[str, Any] = {"num_inference_steps": 4}
    if "mu" in inspect.signature(probe.set_timesteps).parameters and probe.config.get("use_dynamic_shifting"):
        kwargs["mu"] = 1.0
    try:
        probe.set_timesteps(**kwargs)
        out = probe.step(torch.zeros(1, 2, dtype=torch.bfloat16), probe.timesteps[0],
                         torch.zeros(1, 2, dtype=torch.float32), return_dict=False)[0]
    except Exception:  # an unprobeable scheduler: diffusers' schedulers mostly return the velocity's dtype
        return "model_output"
    return "sample" if out.dtype == torch.float32 else "model_output"


def _cast_prev_sample(output: Any, dtype: torch.dtype) -> Any:
    if isinstance(output, tuple):
        return (output[0].to(dtype), *output[1:])
    output.prev_sample = output.prev_sample.to(dtype)
    return output


class SchedulerSwap(Method):
    """Base of the swaps; subclasses say which scheduler to build and how to load a schedule."""

    kind = "solver"

    def __init__(self, config: Any):
        super().__init__(config)
        self.cfg_skipper: Optional[CFGSkipper] = None
        self.planner: Optional[SchedulePlanner] = None
        self.solver_steps = 0
        self.last_num_steps: Optional[int] = None
        self.scheduler_name = ""

    def attach(self, session: PatchSession) -> None:
        original = session.scheduler
        if original is None:
            raise ValueError(f"solver {self.name!r} swaps a pipeline's scheduler; patch the pipeline, "
                             "not a bare transformer")
        problem = flow_scheduler_problem(original)
        if problem is not None:
            raise ValueError(
                f"solver {self.name!r} needs a flow-matching pipeline (FlowMatchEuler/Heun, or UniPC/DPM-Solver "
                f"with prediction_type='flow_prediction'); {type(session.pipe).__name__} uses {problem}. "
                "CogVideoX is a v-prediction model: lower num_inference_steps there instead of swapping solvers.")
        self.check_model(session)
        self.planner = self.make_planner(original)
        solver = self.make_solver(original)
        self.scheduler_name = type(solver).__name__
        session.changes.set_attr(session.pipe, "scheduler", SwappedScheduler(original, solver, self))
        if self.config.cfg_active:
            self.cfg_skipper = CFGSkipper(self.config, session.step)
            self.cfg_skipper.attach(session)

    # -- hooks for subclasses -------------------------------------------------------------------
    def check_model(self, session: PatchSession) -> None:
        """Raise ValueError if this solver cannot serve the session's model (learned solvers)."""

    def make_planner(self, original: Any) -> Any:
        return SchedulePlanner(original, self.config)

    def plan(self, num_inference_steps: Optional[int], **kwargs: Any) -> np.ndarray:
        return self.planner(num_inference_steps, **kwargs)

    def make_solver(self, original: Any) -> Any:
        raise NotImplementedError

    def load_schedule(self, solver: Any, sigmas: np.ndarray, device: Any) -> None:
        """Make ``solver`` run ``sigmas`` (every step's sigma plus the final one). The default is for
        schedulers whose ``set_timesteps`` takes the step sigmas (Euler, UniPC)."""
        solver.set_timesteps(sigmas=sigmas[:-1].copy(), device=device)  # it may edit the array in place

    def counters(self) -> Dict[str, Any]:
        counters: Dict[str, Any] = {"scheduler": self.scheduler_name, "steps": self.last_num_steps,
                                    "solver_steps": self.solver_steps}
        if self.cfg_skipper is not None:
            counters.update(self.cfg_skipper.counters())
        return counters


def _train_timesteps(original: Any) -> int:
    return int(original.config.get("num_train_timesteps", 1000))


# A schedule handed over as given: no shift (1.0 is the identity), no sigma re-spacing.
_NEUTRAL_FLOW = dict(flow_shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, final_sigmas_type="zero",
                     prediction_type="flow_prediction", use_flow_sigmas=True)


def _neutral_flow(cls: type, **settings: Any) -> Dict[str, Any]:
    """``_NEUTRAL_FLOW`` plus ``settings``, limited to what ``cls.__init__`` accepts."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in {**_NEUTRAL_FLOW, **settings}.items() if k in accepted}


@dataclass(frozen=True)
class EulerConfig(SolverConfig):
    pass


@SOLVER_METHODS.register("euler")
class EulerSwap(SchedulerSwap):
    """First-order flow Euler (``FlowMatchEulerDiscreteScheduler``): the baseline."""

    name = "euler"
    Config = EulerConfig

    def make_solver(self, original: Any) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=_train_timesteps(original))  # shift 1


@dataclass(frozen=True)
class HeunConfig(SolverConfig):
    pass


@SOLVER_METHODS.register("heun")
class HeunSwap(SchedulerSwap):
    """Second-order Heun (``FlowMatchHeunDiscreteScheduler``): 2 * steps - 1 model evaluations."""

    name = "heun"
    Config = HeunConfig

    def make_solver(self, original: Any) -> Any:
        from diffusers import FlowMatchHeunDiscreteScheduler

        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=_train_timesteps(original), shift=1.0)

    def load_schedule(self, solver: Any, sigmas: np.ndarray, device: Any) -> None:
        # Its set_timesteps takes no sigmas: reset its state with it, then lay out our schedule the
        # way it lays out its own (inner sigmas repeated: one predictor and one corrector evaluation).
        solver.set_timesteps(len(sigmas) - 1, device=device)
        s = torch.tensor(sigmas, dtype=torch.float32, device=device)
        t = s[:-1] * solver.config.num_train_timesteps
        solver.timesteps = torch.cat([t[:1], t[1:].repeat_interleave(2)])
        solver.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])


@dataclass(frozen=True)
class UniPCConfig(SolverConfig):
    order: int = 2  # UniPC's solver_order

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(type(self).__name__, "order", self.order, 1, 3, integer=True)


@SOLVER_METHODS.register("unipc")
class UniPCSwap(SchedulerSwap):
    """UniPC (bh2, predictor-corrector) in flow mode, ``UniPCMultistepScheduler``."""

    name = "unipc"
    Config = UniPCConfig

    def make_solver(self, original: Any) -> Any:
        from diffusers import UniPCMultistepScheduler

        settings = _neutral_flow(UniPCMultistepScheduler, solver_order=self.config.order)
        if isinstance(original, UniPCMultistepScheduler):  # keep the pipeline's own UniPC settings
            return UniPCMultistepScheduler.from_config(original.config, **settings)
        return UniPCMultistepScheduler(num_train_timesteps=_train_timesteps(original), **settings)


@dataclass(frozen=True)
class DPMppConfig(SolverConfig):
    pass


@SOLVER_METHODS.register("dpmpp")
class DPMppSwap(SchedulerSwap):
    """DPM-Solver++ 2M in flow mode, ``DPMSolverMultistepScheduler``."""

    name = "dpmpp"
    Config = DPMppConfig

    def make_solver(self, original: Any) -> Any:
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(**_neutral_flow(
            DPMSolverMultistepScheduler, num_train_timesteps=_train_timesteps(original), algorithm_type="dpmsolver++",
            solver_order=2, solver_type="midpoint", lower_order_final=True))

    def load_schedule(self, solver: Any, sigmas: np.ndarray, device: Any) -> None:
        # Its set_timesteps takes no sigmas: reset its multistep state with it, then set our
        # schedule in the layout it builds itself (float32 sigmas on CPU, integer timesteps).
        solver.set_timesteps(num_inference_steps=len(sigmas) - 1, device=device)
        sigmas = sigmas.copy()
        sigmas[0] = min(sigmas[0], 1.0 - _SIGMA_MAX_GUARD)
        solver.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        timesteps = sigmas[:-1] * solver.config.num_train_timesteps
        solver.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
