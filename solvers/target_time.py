"""Telling a flow-map student its target time r, with the teacher's own weights and class.

Decoupled MeanFlow's split: the call's timestep t is embedded as always, and the same embedder
is run a second time on r. The first blocks keep t's embedding; the last ``r_blocks`` blocks and
the output head get r's. With r = t every tensor is the teacher's, so a student starts as its
teacher exactly and only fine-tuning makes it a flow map. Where the embeddings enter is declared
per family (``ModelAdapter.target_time``); this module only binds that declaration with hooks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from accel.base.adapter import ModelAdapter, TargetTimeInputs
from accel.base.changes import ChangeLog

# What a route asks for each call: the target timesteps (on the model's timestep scale), or None
# for the teacher's call (t everywhere).
TargetTimes = Callable[[], Optional[torch.Tensor]]


def target_time_inputs(adapter: Optional[ModelAdapter], model: torch.nn.Module) -> TargetTimeInputs:
    """The family's declaration, or a ``ValueError`` saying that this model takes no students."""
    spec = getattr(adapter, "target_time", None)
    if spec is None:
        family = getattr(adapter, "family", "") or type(model).__name__
        raise ValueError(f"{type(model).__name__} ({family}) declares no way to feed a flow-map student its target "
                         "time (ModelAdapter.target_time); flow-map students exist for: wan")
    return spec


def broadcast_like(times: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``times`` (a scalar or one per sample) in the shape, dtype and device of ``timestep``."""
    times = torch.as_tensor(times).to(device=timestep.device, dtype=timestep.dtype)
    if times.ndim == 0 or times.numel() == 1:
        return times.reshape(()).expand(timestep.shape)
    if times.shape[0] != timestep.shape[0]:
        raise ValueError(f"target times for {times.shape[0]} samples, but the call has {timestep.shape[0]}")
    return times.reshape(times.shape[0], *([1] * (timestep.ndim - 1))).expand(timestep.shape)


class TargetTimeRoute:
    """Hooks on one transformer: r's embedding to its last ``r_blocks`` blocks and its head."""

    def __init__(self, model: torch.nn.Module, spec: TargetTimeInputs, r_blocks: int, target: TargetTimes):
        blocks = list(model.get_submodule(spec.stack))
        if not 1 <= r_blocks <= len(blocks):
            raise ValueError(f"r_blocks must be between 1 and the {len(blocks)} blocks of {spec.stack}, got {r_blocks}")
        self.model, self.spec, self.r_blocks, self.target = model, spec, r_blocks, target
        self.embedder = model.get_submodule(spec.embedder)
        self.late_blocks = blocks[len(blocks) - r_blocks:]
        self._late: Optional[torch.Tensor] = None  # r's block embedding for the call in flight

    def install(self, changes: ChangeLog) -> None:
        changes.keep_handle(self.embedder.register_forward_hook(self._on_embedder, with_kwargs=True))
        for block in self.late_blocks:
            changes.keep_handle(block.register_forward_pre_hook(self._on_late_block, with_kwargs=True))

    def _on_embedder(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        r = self.target()
        if r is None:
            self._late = None
            return None
        if args:
            r_args, r_kwargs = (broadcast_like(r, args[0]), *args[1:]), kwargs
        else:
            r_args, r_kwargs = (), {**kwargs, "timestep": broadcast_like(r, kwargs["timestep"])}
        # module.forward, not module(...): this hook must not see its own second call
        r_output = module.forward(*r_args, **r_kwargs)
        self._late = r_output[self.spec.block_output]
        output = list(output)
        for index in self.spec.head_outputs:
            output[index] = r_output[index]
        return tuple(output)

    def _on_late_block(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        late = self._late
        if late is None:
            return None
        name, position = self.spec.block_arg, self.spec.block_arg_position
        if name in kwargs:
            return args, {**kwargs, name: late.reshape(kwargs[name].shape)}
        if len(args) > position:
            args = list(args)
            args[position] = late.reshape(args[position].shape)
            return tuple(args), kwargs
        return None
