"""Sampling with flow-map (average-velocity) models: z_r = z_t - (t - r) * u(z_t, r, t).

A flow-map model (MeanFlow, Decoupled MeanFlow, SplitMeanFlow, ...) predicts the AVERAGE velocity
over [r, t] instead of the instantaneous one, so a jump from t to r is one model call and the
result does not depend on how [1, 0] is cut into steps (the interval additivity
(t - r) u(t, r) = (s - r) u(s, r) + (t - s) u(t, s) these models are trained for). Typical use is
1 to 8 steps.

Times follow diffusers' flow convention: t = sigma in [0, 1], t = 1 is noise, t = 0 is data, and the
velocity points from data to noise (so Euler with an instantaneous velocity is the special case
r -> t). ``FlowMapSampler`` has a scheduler's interface (``set_timesteps``, ``timesteps``,
``step``) plus ``r_timesteps``: flow-map models take the target time r as a second time input, which
no stock diffusers pipeline passes, so students in ``distill/`` drive it with ``sample``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from accel.base.config import check_range

from .schedule import check_sigmas


@dataclass
class FlowMapOutput:
    prev_sample: torch.Tensor


class FlowMapSampler:
    """Steps z_t -> z_r with a model's average velocity u(z_t, r, t)."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        check_range("FlowMapSampler", "num_train_timesteps", num_train_timesteps, 1, None, integer=True)
        check_range("FlowMapSampler", "shift", shift, 0, None, low_inclusive=False)
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.sigmas: Optional[torch.Tensor] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.r_timesteps: Optional[torch.Tensor] = None
        self._step_index: Optional[int] = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None,
                      sigmas: Optional[Sequence[float]] = None) -> None:
        """``num_inference_steps`` evenly spaced jumps (shifted like a flow schedule), or ``sigmas``
        (decreasing in (0, 1]; the final 0 is implied)."""
        if sigmas is not None:
            values = torch.tensor(check_sigmas("FlowMapSampler", sigmas), dtype=torch.float64)
        else:
            if num_inference_steps is None:
                raise ValueError("FlowMapSampler.set_timesteps needs num_inference_steps or sigmas")
            check_range("FlowMapSampler", "num_inference_steps", num_inference_steps, 1, None, integer=True)
            values = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)[:-1]
            values = self.shift * values / (1 + (self.shift - 1) * values)
        self.sigmas = torch.cat([values, values.new_zeros(1)]).to(device)
        self.timesteps = (self.sigmas[:-1] * self.num_train_timesteps).float()
        self.r_timesteps = (self.sigmas[1:] * self.num_train_timesteps).float()
        self._step_index = None

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._step_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True) -> Any:
        """One jump from sigmas[i] to sigmas[i + 1], ``model_output`` = u(sample, r, t)."""
        if self.sigmas is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = int(torch.argmin((self.timesteps - float(timestep)).abs()))
        t, r = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        # at least float32 arithmetic (diffusers' schedulers upcast bf16 samples the same way)
        dtype = torch.promote_types(sample.dtype, torch.float32)
        prev = sample.to(dtype) - float(t - r) * model_output.to(dtype)
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMapOutput(prev_sample=prev) if return_dict else (prev,)

    def sample(self, model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               num_inference_steps: Optional[int] = None, sigmas: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Run the whole chain from ``noise`` (t = 1); ``model(z, r, t)`` gets r and t as sigmas in [0, 1]
        (scalar tensors), and must return the average velocity over [r, t]."""
        self.set_timesteps(num_inference_steps, device=noise.device, sigmas=sigmas)
        self.set_begin_index(0)
        z = noise
        for i in range(len(self.timesteps)):
            t, r = self.sigmas[i], self.sigmas[i + 1]
            z = self.step(model(z, r, t), self.timesteps[i], z, return_dict=False)[0]
        return z
