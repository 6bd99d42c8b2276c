"""Learned tiny solvers (DSS-style): ``solver=DSSConfig(artifact="wan-8.json")``.

For one model and one step count n, a search (``distill/solver_search.py``) fits the sigmas
sigma_0 = 1 > ... > sigma_n = 0 (so the step sizes dt_i = sigma_(i+1) - sigma_i) and a
lower-triangular matrix c mixing the velocities seen so far:

    v_hat_i = sum_(j<i) c_ij v_j + (1 - sum_(j<i) c_ij) v_i,    x_(i+1) = x_i + dt_i v_hat_i

n(n+1)/2 numbers in all (n - 1 free step sizes and n(n-1)/2 coefficients, plus the fixed ends).
With c = 0 this is Euler on the fitted sigmas. The artifact is a small JSON file naming the model
class and a fingerprint of its config: a solver fitted for one model (or step count) is refused
on another, because its coefficients are only meaningful for the velocity field it was fitted on.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from accel.base.adapter import config_fingerprint
from accel.base.artifacts import as_float_list, as_int, read_json_object, required, shipped_files
from accel.base.config import check_range
from accel.base.method import PatchSession
from accel.base.registry import SOLVER_METHODS

from .cfg import CFGOptions
from .schedule import MAX_STEPS
from .swap import SchedulerSwap

ARTIFACT_FORMAT = "accel-dss"
ARTIFACT_VERSION = 1


def dss_velocity(history: Sequence[torch.Tensor], row: Any) -> torch.Tensor:
    """v_hat_i from ``history`` = [v_0, ..., v_i] and ``row`` = [c_i0, ..., c_i(i-1)] (floats or a tensor).

    Shared by the scheduler and the search, so the fitted numbers are applied exactly as fitted.
    """
    current = history[-1]
    if len(history) == 1:
        return current
    v_hat = current
    for j, v in enumerate(history[:-1]):
        v_hat = v_hat + row[j] * (v - current)  # == sum_j c_ij v_j + (1 - sum_j c_ij) v_i
    return v_hat


@dataclass(frozen=True)
class DSSArtifact:
    model_class: str
    model_fingerprint: str
    steps: int
    sigmas: Tuple[float, ...]  # steps + 1 values, 1 -> 0
    coefficients: Tuple[Tuple[float, ...], ...]  # row i holds c_i0 .. c_i(i-1)
    fit: Dict[str, Any] = field(default_factory=dict, compare=False)  # how it was fitted, for reports

    def __post_init__(self) -> None:
        check_range("DSSArtifact", "steps", self.steps, 1, None, integer=True)
        sigmas = tuple(float(s) for s in self.sigmas)
        if len(sigmas) != self.steps + 1:
            raise ValueError(f"DSSArtifact.sigmas must have steps + 1 = {self.steps + 1} entries, got {len(sigmas)}")
        if not all(math.isfinite(s) for s in sigmas) or sigmas[-1] != 0.0 or not 0.0 < sigmas[0] <= 1.0 \
                or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"DSSArtifact.sigmas must decrease strictly from (0, 1] to 0, got {sigmas}")
        rows = tuple(tuple(float(c) for c in row) for row in self.coefficients)
        if [len(r) for r in rows] != list(range(self.steps)):
            raise ValueError(f"DSSArtifact.coefficients must be lower-triangular rows of lengths 0..{self.steps - 1}, "
                             f"got lengths {[len(r) for r in rows]}")
        if not all(math.isfinite(c) for r in rows for c in r):
            raise ValueError("DSSArtifact.coefficients must be finite")
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "coefficients", rows)

    @property
    def parameter_count(self) -> int:
        return self.steps * (self.steps + 1) // 2

    def to_json(self) -> Dict[str, Any]:
        return {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "model_class": self.model_class,
                "model_fingerprint": self.model_fingerprint, "steps": self.steps,
                "parameter_count": self.parameter_count, "sigmas": list(self.sigmas),
                "coefficients": [list(r) for r in self.coefficients], "fit": self.fit}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "DSSArtifact":
        """Read and check an artifact; every problem is a ``ValueError`` naming the file and field."""
        data = read_json_object(path, "DSS artifact")
        where = f"DSS artifact {os.fspath(path)}"
        if data.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{where}: not a DSS solver artifact (format must be {ARTIFACT_FORMAT!r})")
        if data.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"{where}: artifact version {data.get('version')!r}; this accel reads "
                             f"version {ARTIFACT_VERSION}")
        model_class, fingerprint = (required(data, key, where) for key in ("model_class", "model_fingerprint"))
        for key, value in (("model_class", model_class), ("model_fingerprint", fingerprint)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
        steps = as_int(required(data, "steps", where), where, "steps", 1, MAX_STEPS)
        sigmas = as_float_list(required(data, "sigmas", where), where, "sigmas")
        rows = required(data, "coefficients", where)
        if not isinstance(rows, list):
            raise ValueError(f"{where}: coefficients must be a list of rows, got {type(rows).__name__}")
        coefficients = [as_float_list(row, where, f"coefficients[{i}]") for i, row in enumerate(rows)]
        fit = data.get("fit", {})
        if not isinstance(fit, dict):
            raise ValueError(f"{where}: fit must be an object, got {type(fit).__name__}")
        try:
            return cls(model_class=model_class, model_fingerprint=fingerprint, steps=steps, sigmas=sigmas,
                       coefficients=coefficients, fit=fit)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


class DSSScheduler:
    """A scheduler (diffusers' interface) that applies a ``DSSArtifact``."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, artifact: DSSArtifact, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps
        self.use(artifact)

    def use(self, artifact: DSSArtifact) -> None:
        """Run ``artifact`` from the next loop on (the method picks one per step count)."""
        self.artifact = artifact
        self.sigmas = torch.tensor(artifact.sigmas, dtype=torch.float32)
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps
        self.num_inference_steps = artifact.steps
        self._history: List[torch.Tensor] = []
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None, **_: Any) -> None:
        self.timesteps = (self.sigmas[:-1] * self.num_train_timesteps).to(device)
        self._history = []
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> Any:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                self._step_index = int(torch.argmin((self.timesteps.cpu() - float(timestep)).abs()))
                self._history = self._history[:self._step_index]
        i = self._step_index
        self._history.append(model_output.float())
        v_hat = dss_velocity(self._history, self.artifact.coefficients[i])
        dt = float(self.sigmas[i + 1] - self.sigmas[i])
        prev = (sample.float() + dt * v_hat).to(model_output.dtype)
        self._step_index += 1
        if self._step_index == self.artifact.steps:
            self._history = []  # the loop is over; do not hold the velocities
        if not return_dict:
            return (prev,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=prev)


@dataclass(frozen=True)
class DSSConfig(CFGOptions):
    """``artifact``: path of a JSON written by ``accel calibrate --solver dss`` (or a loaded
    ``DSSArtifact``); None: the artifacts shipped for the patched model (the reference model has
    them for 4, 6, 8 and 10 steps), the one for ``steps`` or else the pipeline's step count.
    ``steps``: with an artifact, must equal its step count (a guard in presets).
    ``check_model``: refuse an artifact whose model fingerprint differs from the patched model's
    (same class, other architecture). A value: the method loads the artifact when built."""

    artifact: Any = None
    steps: Optional[int] = None
    check_model: bool = True
    cfg_interval: Tuple[float, float] = (0.0, 1.0)  # cheaper CFG, as for every solver (solvers/cfg.py)
    cfg_zero_steps: int = 0

    def __post_init__(self) -> None:
        if self.artifact is not None and not isinstance(self.artifact, (str, os.PathLike, DSSArtifact)):
            raise ValueError(f"DSSConfig.artifact must be the path of a DSS artifact JSON "
                             f"(accel calibrate --solver dss ...), got {self.artifact!r}")
        if self.steps is not None:
            check_range("DSSConfig", "steps", self.steps, 1, MAX_STEPS, integer=True)
        if not isinstance(self.check_model, bool):
            raise ValueError(f"DSSConfig.check_model must be True or False, got {self.check_model!r}")
        self._check_cfg()


@SOLVER_METHODS.register("dss")
class DSSSolver(SchedulerSwap):
    """Runs a fitted DSS artifact. A given artifact sets the step count (the pipeline's is
    ignored); without one, the artifact shipped for the model and the step count is picked."""

    name = "dss"
    Config = DSSConfig
    artifact_field = "artifact"  # a path to a DSS artifact resolves to this method with it

    def __init__(self, config: DSSConfig):
        super().__init__(config)
        source = config.artifact
        self.artifact: Optional[DSSArtifact] = None
        self.shipped: Dict[int, DSSArtifact] = {}  # step count -> artifact, when none was given
        if source is not None:
            self.artifact = source if isinstance(source, DSSArtifact) else DSSArtifact.load(os.fspath(source))
            if config.steps is not None and config.steps != self.artifact.steps:
                raise ValueError(f"DSSConfig.steps is {config.steps} but artifact {config.artifact!r} was fitted "
                                 f"for {self.artifact.steps} steps; fit one for {config.steps} steps")

    def check_model(self, session: PatchSession) -> None:
        if self.artifact is None:
            self.shipped = self.shipped_artifacts(session)
            if not self.shipped:
                raise ValueError(
                    f"solver 'dss' needs an artifact fitted for this {type(session.models[0]).__name__}, and none is "
                    "shipped for it: fit one with `accel calibrate --solver dss --steps N --out FILE` and pass "
                    "solver={'name': 'dss', 'artifact': FILE} (or the file's path as the solver)")
            return
        artifact = self.artifact
        model_class = type(session.models[0]).__name__
        if model_class != artifact.model_class:
            raise ValueError(f"DSS artifact {self.config.artifact!r} was fitted for {artifact.model_class}, "
                             f"not {model_class}; fit one for this model with accel calibrate --solver dss")
        fingerprint = config_fingerprint(session.models)
        if self.config.check_model and fingerprint != artifact.model_fingerprint:
            raise ValueError(f"DSS artifact {self.config.artifact!r} was fitted for another {model_class} "
                             f"(config fingerprint {artifact.model_fingerprint}, this model {fingerprint}); "
                             "fit one for this model, or pass check_model=False to use it anyway")

    @staticmethod
    def shipped_artifacts(session: PatchSession) -> Dict[int, DSSArtifact]:
        fingerprint = config_fingerprint(session.models)
        found = {}
        for path in shipped_files(session.adapter.artifact_dirs, "dss"):
            artifact = DSSArtifact.load(path)
            if artifact.model_class == type(session.models[0]).__name__ and artifact.model_fingerprint == fingerprint:
                found[artifact.steps] = artifact
        return found

    def make_planner(self, original: Any) -> Any:
        return None

    def plan(self, num_inference_steps: Optional[int], **kwargs: Any) -> np.ndarray:
        if self.shipped:  # no artifact given: the shipped one for this loop's step count
            steps = self.config.steps or num_inference_steps
            if steps not in self.shipped:
                raise ValueError(f"solver 'dss': the artifacts shipped for this model are for {sorted(self.shipped)} "
                                 f"steps, not {steps}; pass steps= one of them, or fit one with "
                                 f"`accel calibrate --solver dss --steps {steps} --out FILE`")
            self.artifact = self.shipped[steps]
        return np.asarray(self.artifact.sigmas, dtype=np.float64)

    def make_solver(self, original: Any) -> Any:
        first = self.artifact or self.shipped[min(self.shipped)]
        return DSSScheduler(first, int(original.config.get("num_train_timesteps", 1000)))

    def load_schedule(self, solver: Any, sigmas: np.ndarray, device: Any) -> None:
        if solver.artifact is not self.artifact:
            solver.use(self.artifact)
        solver.set_timesteps(device=device)
