"""Keep a handle's ``StepContext`` true while a pipeline runs.

* ``scheduler.set_timesteps`` starts a denoising loop and tells its length; ``scheduler.step``
  ends a step. Counting scheduler steps (not transformer calls) keeps the index right when CFG
  runs the transformer twice per step (Wan) or once for both halves (CogVideoX, LTX).
* ``transformer.cache_context(name)`` is how diffusers pipelines name the CFG branch of a call
  ("cond", "uncond", "cond_uncond"); without it, the call order within the step decides.
* A bare transformer (no scheduler) advances a step whenever the timestep changes, and starts a
  new loop when the timestep goes back up.

Wrappers keep the wrapped method's signature (``functools.wraps``) because pipelines inspect
``scheduler.step`` and ``scheduler.set_timesteps`` to decide which arguments to pass.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional

import torch

from accel.base.context import BRANCH_COND, BRANCH_UNCOND
from accel.base.method import PatchSession


def install_step_tracking(session: PatchSession) -> None:
    scheduler = session.scheduler
    if scheduler is not None:
        _track_scheduler(session, scheduler)
    for model in session.models:
        _track_model(session, model, scheduler_driven=scheduler is not None)


def _track_scheduler(session: PatchSession, scheduler: Any) -> None:
    step, changes = session.step, session.changes
    set_timesteps, step_fn = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)
    def tracked_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        step.begin_generation(len(scheduler.timesteps))
        return out

    @functools.wraps(step_fn)
    def tracked_step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        step.end_step()
        return out

    changes.set_attr(scheduler, "set_timesteps", tracked_set_timesteps)
    changes.set_attr(scheduler, "step", tracked_step)


def _track_model(session: PatchSession, model: torch.nn.Module, scheduler_driven: bool) -> None:
    step, changes, adapter = session.step, session.changes, session.adapter
    named_branch: list = [None]  # set by cache_context while the pipeline is inside one

    original_context = getattr(model, "cache_context", None)
    if original_context is not None:
        @functools.wraps(original_context)
        @contextlib.contextmanager
        def cache_context(name, **kwargs):
            named_branch[0] = name
            try:
                with original_context(name, **kwargs):
                    yield
            finally:
                named_branch[0] = None

        changes.set_attr(model, "cache_context", cache_context)

    def before_forward(module, args, kwargs):
        timestep = adapter.timestep(args, kwargs)
        if not scheduler_driven:
            _advance_on_timestep(step, timestep)
        session.layouts[id(module)] = adapter.token_layout(module, args, kwargs)
        branch = named_branch[0] or (BRANCH_COND if step.call_index == 0 else
                                     BRANCH_UNCOND if step.call_index == 1 else f"call{step.call_index}")
        step.begin_call(branch, timestep, _sigma(session.scheduler, step.step_index))

    def after_forward(module, args, kwargs, output):
        step.end_call()

    # Step bookkeeping is Python state that changes every call: under torch.compile(transformer)
    # it runs eagerly around the graph, not traced (it would recompile at every step).
    changes.keep_handle(model.register_forward_pre_hook(torch.compiler.disable(before_forward), with_kwargs=True))
    changes.keep_handle(model.register_forward_hook(torch.compiler.disable(after_forward), with_kwargs=True,
                                                    always_call=True))


def _advance_on_timestep(step, timestep: Optional[float]) -> None:
    if step.generations == 0 or (timestep is not None and step.timestep is not None and timestep > step.timestep):
        step.begin_generation(None)
    elif timestep is not None and step.timestep is not None and timestep != step.timestep:
        step.end_step()


def _sigma(scheduler: Any, index: int) -> Optional[float]:
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or index >= len(sigmas):
        return None
    return float(sigmas[index])
