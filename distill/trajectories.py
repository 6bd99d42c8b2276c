"""Teacher ODE trajectories for flow-map distillation, recorded through the pipeline itself, and
the training pairs drawn from them.

The teacher runs as users run it (its pipeline, prompt encoding, guidance), with the Euler swap at
``teacher_steps`` steps so the states lie on the model's own shifted schedule. A pre-hook on the
transformer keeps the conditional branch's input at every step and the arguments of its first call
(the text embeddings and whatever else the family passes), and the pipeline returns the final
latents (``output_type="latent"``). So one record holds z at every teacher sigma, from the noise to
the sample, and what the transformer needs to be called on them: nothing in here knows a family.

Records are cached one file per (prompt, seed) under a key of everything that shapes them, so an
interrupted run resumes where it stopped and a changed option never reads a stale file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from accel.base.context import BRANCH_BATCHED, BRANCH_UNCOND

# The transformer arguments that change per step; everything else of the first call is context.
PER_STEP = ("hidden_states", "timestep")


def _cond_part(value: Any, batch: Optional[int]) -> Any:
    """A batched-CFG call's conditional half ([uncond, cond] on the batch axis, diffusers' order)."""
    if batch is not None and torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[batch // 2:]
    return value


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().to("cpu").clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def record_trajectory(pipe: Any, prompt: str, seed: int, teacher_steps: int, guidance: float,
                      call_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """One teacher run: ``states`` (teacher_steps + 1, ...) from noise to sample, the ``timesteps``
    the transformer got, the ``sigmas`` (with the final 0) and the conditional call's ``context``."""
    import accel

    transformer = pipe.transformer
    handle = accel.patch(pipe, solver={"name": "euler", "steps": teacher_steps})
    states: List[torch.Tensor] = []
    timesteps: List[float] = []
    context: Dict[str, Any] = {}
    seen_steps: set = set()

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        step = handle.step
        if step.branch == BRANCH_UNCOND or step.step_index in seen_steps:
            return
        seen_steps.add(step.step_index)
        named = dict(zip(("hidden_states", "timestep"), args))
        named.update(kwargs)
        batch = named["hidden_states"].shape[0] if step.branch == BRANCH_BATCHED else None
        states.append(_detached(_cond_part(named["hidden_states"], batch)))
        timesteps.append(float(torch.as_tensor(named["timestep"]).flatten()[0]))
        if not context:
            context.update({k: _detached(_cond_part(v, batch)) for k, v in named.items() if k not in PER_STEP})
            context["return_dict"] = False

    hook = transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            final = pipe(prompt=prompt, num_inference_steps=teacher_steps, guidance_scale=guidance,
                         generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                         return_dict=False, **call_kwargs)[0]
        sigmas = [float(s) for s in pipe.scheduler.solver.sigmas]
    finally:
        hook.remove()
        handle.remove()
    if len(states) != teacher_steps:
        raise ValueError(f"the teacher made {len(states)} conditional calls in {teacher_steps} steps; flow-map "
                         "distillation needs one per step")
    final = final.detach().to("cpu").reshape(states[-1].shape).to(states[-1].dtype)
    return {"prompt": prompt, "seed": seed, "states": torch.stack([*states, final]),
            "timesteps": torch.tensor(timesteps, dtype=torch.float32),
            "sigmas": torch.tensor(sigmas[:teacher_steps] + [0.0], dtype=torch.float64), "context": context}


def record_key(prompt: str, seed: int, teacher_steps: int, guidance: float, call_kwargs: Dict[str, Any],
               teacher: str) -> str:
    blob = json.dumps([prompt, seed, teacher_steps, guidance, teacher,
                       sorted((k, repr(v)) for k, v in call_kwargs.items())])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_trajectories(pipe: Any, prompts: Sequence[str], seeds_per_prompt: int, seed: int, teacher_steps: int,
                        guidance: float, call_kwargs: Dict[str, Any], folder: str, teacher: str,
                        shard: Callable[[int], bool] = lambda index: True,
                        log: Callable[[str], None] = lambda message: None) -> List[str]:
    """The record files of every (prompt, seed), generating the missing ones this process owns
    (``shard(index)``); returns every path, whoever wrote it."""
    os.makedirs(folder, exist_ok=True)
    runs = [(prompt, seed + 1000 * j + i) for j in range(seeds_per_prompt) for i, prompt in enumerate(prompts)]
    paths = []
    for index, (prompt, run_seed) in enumerate(runs):
        key = record_key(prompt, run_seed, teacher_steps, guidance, call_kwargs, teacher)
        path = os.path.join(folder, f"{key}.pt")
        paths.append(path)
        if os.path.isfile(path) or not shard(index):
            continue
        record = record_trajectory(pipe, prompt, run_seed, teacher_steps, guidance, call_kwargs)
        torch.save(record, path + ".partial")
        os.replace(path + ".partial", path)  # a killed run never leaves a truncated record
        log(f"teacher trajectory {index + 1}/{len(runs)}: {prompt!r}, seed {run_seed}")
    return paths


def grid_indices(teacher_steps: int, steps: int) -> List[int]:
    """The teacher states a ``steps``-step student jumps between: evenly spaced teacher indices
    (the teacher's schedule is the model's shifted one, so the student's is shifted alike)."""
    return [round(k * teacher_steps / steps) for k in range(steps + 1)]


def sample_pairs(generator: torch.Generator, count: int, teacher_steps: int, grids: Sequence[List[int]],
                 grid_fraction: float) -> List[Tuple[int, int, int]]:
    """(a, b, previous): a jump from teacher state a to b, and for a student jump after the first
    the grid point it came from (-1 otherwise)."""
    pairs = []
    for _ in range(count):
        if float(torch.rand((), generator=generator)) < grid_fraction:
            grid = grids[int(torch.randint(len(grids), (), generator=generator))]
            j = int(torch.randint(len(grid) - 1, (), generator=generator))
            pairs.append((grid[j], grid[j + 1], grid[j - 1] if j > 0 else -1))
        else:
            a = int(torch.randint(teacher_steps, (), generator=generator))
            b = int(torch.randint(a + 1, teacher_steps + 1, (), generator=generator))
            pairs.append((a, b, -1))
    return pairs


def student_call(model: torch.nn.Module, x: torch.Tensor, records: Sequence[Dict[str, Any]], froms: Sequence[int],
                 to_sigmas: Sequence[float], scale: float, target_r: List[Optional[torch.Tensor]]) -> torch.Tensor:
    """The student's average velocity for ``x`` (one row per record) at the timesteps of teacher
    states ``froms``, jumping to ``to_sigmas``: the route reads r from ``target_r``."""
    t = torch.stack([r["timesteps"][a] for r, a in zip(records, froms)]).to(x.device)
    target_r[0] = torch.tensor([float(s) * scale for s in to_sigmas], dtype=torch.float32)
    return model(hidden_states=x, timestep=t, **batched_context(records, x.device))[0]


def per_row(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """One float64 value per batch row, shaped to broadcast against ``like``."""
    return torch.tensor(values, dtype=torch.float64, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def student_jump(model: torch.nn.Module, records: Sequence[Dict[str, Any]], jumps: Sequence[Tuple[int, int]],
                 sigmas: torch.Tensor, scale: float, target_r: List[Optional[torch.Tensor]], device: Any) -> torch.Tensor:
    """Where the student's own jump from teacher state p to grid point a lands (no gradient): a
    later jump trained from there learns to bring the student's drift back onto the teacher."""
    with torch.no_grad():
        start = torch.cat([r["states"][p] for r, (p, _) in zip(records, jumps)]).to(device)
        u = student_call(model, start, records, [p for p, _ in jumps], [sigmas[a] for _, a in jumps], scale, target_r)
        step = per_row([float(sigmas[p] - sigmas[a]) for p, a in jumps], start)
        return (start.double() - step * u.double()).to(start.dtype)


def batched_context(records: Sequence[Dict[str, Any]], device: Any) -> Dict[str, Any]:
    """The records' conditional-call arguments, tensors stacked on the batch axis, on ``device``."""
    out = {}
    for key, value in records[0]["context"].items():
        out[key] = torch.cat([r["context"][key] for r in records]).to(device) if torch.is_tensor(value) else value
    return out
