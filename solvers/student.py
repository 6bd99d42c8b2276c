"""Few-step sampling with a distilled flow-map student: ``solver="flowmap"``.

A student (``accel distill``, ``distill/flow_map.py``) is the teacher's own transformer class with
fine-tuned weights that predict the average velocity u(z_t, r, t) over a jump from t to r; the
target time r enters through the family's ``TargetTimeInputs`` (``solvers/target_time.py``). Its
artifact is a folder:

    flowmap.json      model class, config fingerprint, how r enters, the schedule of each
                      distilled step count, the guidance scale distilled in, how it was trained
    transformer/      full weights, in diffusers' layout (``from_pretrained`` loads them), or
    lora.safetensors  LoRA factors of the teacher's linear layers (peft's key names), merged on load

Patching swaps the student's weights into the pipeline's transformer (``remove()`` puts the
teacher's own tensors back), routes r, and steps with ``FlowMapSampler``: one transformer call per
step. The guidance scale was distilled in, so the pipeline's unconditional call is not run: it
returns the conditional output of the same step, which makes ``uncond + g (cond - uncond)`` the
student's own prediction whatever ``guidance_scale`` the pipeline is called with.
"""
from __future__ import annotations

import hashlib
import json
import os
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from accel.base.adapter import config_fingerprint
from accel.base.artifacts import as_float, as_float_list, as_int, read_json_object, required
from accel.base.config import check_range
from accel.base.method import PatchSession
from accel.base.registry import SOLVER_METHODS

from .cfg import CFGSkipper
from .flow_map import FlowMapSampler
from .schedule import MAX_STEPS, check_sigmas
from .swap import SchedulerSwap
from .target_time import TargetTimeRoute, target_time_inputs

ARTIFACT_FORMAT = "accel-flowmap"
ARTIFACT_VERSION = 1
ARTIFACT_FILE = "flowmap.json"
FULL_WEIGHTS = "transformer"
LORA_WEIGHTS = "lora.safetensors"


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: a LoRA student is only valid on the weights it was fitted to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StudentArtifact:
    """A loaded ``flowmap.json``; ``folder`` is where its weights are."""

    folder: str
    model_class: str
    model_fingerprint: str
    teacher_weights: str
    r_blocks: int
    schedules: Dict[int, Tuple[float, ...]]  # step count -> sigmas, steps + 1 values from (0, 1] down to 0
    guidance: float
    lora: Optional[Dict[str, Any]] = None  # {"rank", "alpha", "targets"} when the weights are LoRA factors
    training: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def steps(self) -> Tuple[int, ...]:
        return tuple(sorted(self.schedules))

    def to_json(self) -> Dict[str, Any]:
        return {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "model_class": self.model_class,
                "model_fingerprint": self.model_fingerprint, "teacher_weights": self.teacher_weights,
                "conditioning": {"mechanism": "decoupled", "r_blocks": self.r_blocks},
                "schedules": {str(n): list(s) for n, s in sorted(self.schedules.items())},
                "guidance": self.guidance, "weights": LORA_WEIGHTS if self.lora else FULL_WEIGHTS,
                "lora": self.lora, "training": self.training}

    @classmethod
    def load(cls, path: str) -> "StudentArtifact":
        """Read ``path`` (the folder or its ``flowmap.json``); every problem is a ``ValueError``
        naming the file and the field."""
        path = os.fspath(path)
        file = os.path.join(path, ARTIFACT_FILE) if os.path.isdir(path) else path
        data = read_json_object(file, "flow-map student")
        where = f"flow-map student {file}"
        if data.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{where}: not a flow-map student (format must be {ARTIFACT_FORMAT!r})")
        if data.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"{where}: version {data.get('version')!r}; this accel reads version {ARTIFACT_VERSION}")
        strings = {key: required(data, key, where) for key in ("model_class", "model_fingerprint", "teacher_weights")}
        for key, value in strings.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
        conditioning = required(data, "conditioning", where)
        if not isinstance(conditioning, dict) or conditioning.get("mechanism") != "decoupled":
            raise ValueError(f"{where}: conditioning must be {{'mechanism': 'decoupled', 'r_blocks': K}}")
        r_blocks = as_int(required(conditioning, "r_blocks", where), where, "conditioning.r_blocks", 1)
        raw = required(data, "schedules", where)
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{where}: schedules must map step counts to sigmas")
        schedules = {}
        for key, sigmas in raw.items():
            if not key.isdigit():
                raise ValueError(f"{where}: schedules keys must be step counts, got {key!r}")
            steps = as_int(int(key), where, "schedules", 1, MAX_STEPS)
            values = as_float_list(sigmas, where, f"schedules[{key}]")
            if len(values) != steps + 1 or values[-1] != 0.0:
                raise ValueError(f"{where}: schedules[{key}] must hold {steps + 1} sigmas ending with 0")
            try:
                schedules[steps] = (*check_sigmas(where, values[:-1]), 0.0)
            except ValueError as exc:
                raise ValueError(f"{where}: schedules[{key}]: {exc}") from None
        guidance = as_float(required(data, "guidance", where), where, "guidance", positive=True)
        lora = data.get("lora")
        weights = required(data, "weights", where)
        if weights != (LORA_WEIGHTS if lora else FULL_WEIGHTS):
            raise ValueError(f"{where}: weights must be {FULL_WEIGHTS!r} (full) or {LORA_WEIGHTS!r} with a lora entry")
        if lora is not None:
            if not isinstance(lora, dict):
                raise ValueError(f"{where}: lora must be an object {{rank, alpha, targets}}")
            as_int(required(lora, "rank", where), where, "lora.rank", 1)
            as_float(required(lora, "alpha", where), where, "lora.alpha", positive=True)
        training = data.get("training", {})
        if not isinstance(training, dict):
            raise ValueError(f"{where}: training must be an object")
        return cls(folder=os.path.dirname(os.path.abspath(file)), r_blocks=r_blocks, schedules=schedules,
                   guidance=guidance, lora=lora, training=training, **strings)

    def save(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ARTIFACT_FILE)
        with open(path, "w") as fh:
            json.dump(self.to_json(), fh, indent=1)
            fh.write("\n")
        return path

    def student_tensors(self, teacher: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The student's value of every parameter it changes, in the teacher's dtype and device."""
        from safetensors.torch import load_file

        own = dict(teacher.named_parameters())
        if self.lora is None:
            file = os.path.join(self.folder, FULL_WEIGHTS, "diffusion_pytorch_model.safetensors")
            if not os.path.isfile(file):
                raise ValueError(f"flow-map student {self.folder}: lacks its weights {file}")
            loaded = load_file(file)
            missing = sorted(set(own) - set(loaded))
            if missing:
                raise ValueError(f"flow-map student {self.folder}: its weights lack {missing[:3]}")
            return {name: loaded[name].to(own[name].dtype) for name in own}
        file = os.path.join(self.folder, LORA_WEIGHTS)
        if not os.path.isfile(file):
            raise ValueError(f"flow-map student {self.folder}: lacks its weights {file}")
        return merged_lora(own, load_file(file), float(self.lora["alpha"]) / int(self.lora["rank"]))


def merged_lora(own: Dict[str, torch.Tensor], factors: Dict[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
    """W + scale * B @ A for every linear layer with factors (peft's ``<layer>.lora_A.weight`` names)."""
    merged = {}
    for key, down in factors.items():
        if ".lora_A." not in key:
            continue
        layer = key.split(".lora_A.")[0]
        up = factors.get(key.replace(".lora_A.", ".lora_B."))
        name = f"{layer}.weight"
        if up is None or name not in own:
            raise ValueError(f"LoRA factors for {layer} do not match the model (no {name} or no lora_B)")
        weight = own[name]
        merged[name] = (weight.float() + scale * (up.float() @ down.float()).to(weight.device)).to(weight.dtype)
    return merged


@dataclass(frozen=True)
class FlowMapConfig:
    """``artifact``: a student folder (``accel distill --out DIR``) or its ``flowmap.json``; None:
    the student shipped for the patched model. ``steps``: one of the step counts the student was
    distilled for; by default the pipeline's ``num_inference_steps`` when the student has it, else
    the student's largest. ``check_model``: refuse a student of another model."""

    artifact: Any = None
    steps: Optional[int] = None
    check_model: bool = True

    def __post_init__(self) -> None:
        if self.artifact is not None and not isinstance(self.artifact, (str, os.PathLike, StudentArtifact)):
            raise ValueError(f"FlowMapConfig.artifact must be a student folder (accel distill --out DIR), "
                             f"got {self.artifact!r}")
        if self.steps is not None:
            check_range("FlowMapConfig", "steps", self.steps, 1, MAX_STEPS, integer=True)
        if not isinstance(self.check_model, bool):
            raise ValueError(f"FlowMapConfig.check_model must be True or False, got {self.check_model!r}")

    cfg_active = False  # no cfg_interval/cfg_zero_steps: guidance is distilled into the student


# The pipeline's uncond call always returns the cond output of its step (solvers/cfg.py).
_NO_GUIDANCE = types.SimpleNamespace(cfg_interval=(0.0, 0.0), cfg_zero_steps=0)


@SOLVER_METHODS.register("flowmap")
class FlowMapSolver(SchedulerSwap):
    """Samples a flow-map student in its distilled step count, one transformer call per step."""

    name = "flowmap"
    Config = FlowMapConfig
    artifact_field = "artifact"

    def __init__(self, config: FlowMapConfig):
        super().__init__(config)
        source = config.artifact
        self.artifact: Optional[StudentArtifact] = None
        if source is not None:
            self.artifact = source if isinstance(source, StudentArtifact) else StudentArtifact.load(source)
            self._check_steps()
        self.sigmas: Optional[np.ndarray] = None
        self.num_train_timesteps = 1000

    def _check_steps(self) -> None:
        steps = self.config.steps
        if steps is not None and steps not in self.artifact.schedules:
            raise ValueError(f"FlowMapConfig.steps is {steps}, but the student {self.artifact.folder} was distilled "
                             f"for steps {list(self.artifact.steps)}; distill one for {steps} steps "
                             f"(accel distill --steps {steps} ...)")

    def attach(self, session: PatchSession) -> None:
        if len(session.models) != 1:
            raise ValueError("solver 'flowmap' serves pipelines with one transformer; "
                             f"this one has {len(session.models)} (two-expert Wan 2.2 has no students)")
        super().attach(session)
        model = session.models[0]
        for name, value in self.artifact.student_tensors(model).items():
            session.changes.set_parameter(model, name, value)
        route = TargetTimeRoute(model, target_time_inputs(session.adapter, model), self.artifact.r_blocks,
                                lambda: self._target_time(session))
        route.install(session.changes)
        self.cfg_skipper = CFGSkipper(_NO_GUIDANCE, session.step)
        self.cfg_skipper.attach(session)

    def check_model(self, session: PatchSession) -> None:
        model = session.models[0]
        target_time_inputs(session.adapter, model)
        if self.artifact is None:
            self.artifact = shipped_student(session)
            if self.artifact is None:
                raise ValueError(f"solver 'flowmap' needs a student of this {type(model).__name__}, and none is "
                                 "shipped for it: distill one with `accel distill --teacher PATH --steps 4 --out DIR` "
                                 "and pass solver={'name': 'flowmap', 'artifact': DIR}")
            self._check_steps()
        artifact, model_class = self.artifact, type(model).__name__
        if artifact.model_class != model_class:
            raise ValueError(f"flow-map student {artifact.folder} was distilled from a {artifact.model_class}, "
                             f"not a {model_class}; distill one from this model with accel distill")
        fingerprint = config_fingerprint(session.models)
        if self.config.check_model and fingerprint != artifact.model_fingerprint:
            raise ValueError(f"flow-map student {artifact.folder} was distilled from another {model_class} "
                             f"(config fingerprint {artifact.model_fingerprint}, this model {fingerprint}); distill "
                             "one from this model, or pass check_model=False to use it anyway")
        if artifact.lora is not None and self.config.check_model and weights_digest(model) != artifact.teacher_weights:
            raise ValueError(f"flow-map student {artifact.folder} holds LoRA factors fitted to other weights of "
                             f"{model_class} (weights {artifact.teacher_weights}); its factors only mean something on "
                             "those, so distill one from these weights")
        self.num_train_timesteps = int(session.scheduler.config.get("num_train_timesteps", 1000))

    def make_planner(self, original: Any) -> Any:
        return None

    def plan(self, num_inference_steps: Optional[int], **kwargs: Any) -> np.ndarray:
        steps = self.config.steps
        if steps is None:
            steps = num_inference_steps if num_inference_steps in self.artifact.schedules else max(self.artifact.steps)
        self.sigmas = np.asarray(self.artifact.schedules[steps], dtype=np.float64)
        return self.sigmas

    def make_solver(self, original: Any) -> Any:
        return FlowMapSampler(num_train_timesteps=self.num_train_timesteps)

    def load_schedule(self, solver: Any, sigmas: np.ndarray, device: Any) -> None:
        solver.set_timesteps(sigmas=sigmas[:-1].tolist(), device=device)

    def _target_time(self, session: PatchSession) -> Optional[torch.Tensor]:
        index = session.step.step_index
        if self.sigmas is None or not 0 <= index < len(self.sigmas) - 1:
            return None  # a call outside the sampling loop: the teacher's velocity (r = t)
        return torch.tensor(self.sigmas[index + 1] * self.num_train_timesteps, dtype=torch.float32)

    def counters(self) -> Dict[str, Any]:
        counters = super().counters()
        counters.update(student=self.artifact.folder if self.artifact else None,
                        guidance_distilled=self.artifact.guidance if self.artifact else None)
        return counters


def shipped_student(session: PatchSession) -> Optional[StudentArtifact]:
    """The student shipped for the patched model (``flowmap-*/flowmap.json`` in the adapter's
    artifact folders, same class and fingerprint), or None."""
    model = session.models[0]
    fingerprint = config_fingerprint(session.models)
    for folder in session.adapter.artifact_dirs:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name, ARTIFACT_FILE)
            if name.startswith("flowmap-") and os.path.isfile(path):
                artifact = StudentArtifact.load(path)
                if artifact.model_class == type(model).__name__ and artifact.model_fingerprint == fingerprint:
                    return artifact
    return None
