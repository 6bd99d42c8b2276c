"""``accel.patch`` / ``accel.patched`` and the ``Handle`` that owns every change they make."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from accel import pipelines  # noqa: F401  (fills the model-adapter registry)
from accel.base.adapter import ModelAdapter
from accel.base.changes import ChangeLog
from accel.base.context import StepContext
from accel.base.method import Method, PatchSession
from accel.base.parallel import summary_of as parallel_summary
from accel.base.registry import MODEL_ADAPTERS

from .config import KINDS, Config, Part, resolve_method
from .step_tracking import install_step_tracking

_HANDLE_ATTR = "_accel_handle"


class Summary(dict):
    """``Handle.summary()``: a plain dict with a readable ``str``."""

    def __str__(self) -> str:
        lines = [f"accel on {self['family']} (preset: {self['preset'] or '-'})"]
        for kind, info in self["methods"].items():
            if info is None:
                lines.append(f"  {kind:<9} off")
                continue
            params = ", ".join(f"{k}={v}" for k, v in info["params"].items())
            counters = ", ".join(f"{k}={v}" for k, v in info["counters"].items())
            lines.append(f"  {kind:<9} {info['name']}({params})" + (f"  [{counters}]" if counters else ""))
        lines.append(f"  steps run {self['steps_run']} in {self['generations']} generation(s); "
                     f"transformer calls by branch {self['calls_by_branch']}")
        if self.get("parallel"):
            lines.append("  context parallel: " + ", ".join(f"{k} {v}" for k, v in self["parallel"].items())
                         + " (counters are this rank's)")
        lines += [f"  warning: {warning}" for warning in self["warnings"]]
        return "\n".join(lines)


class Handle:
    """Owns one patch of one pipeline. ``remove()`` restores it exactly."""

    def __init__(self, target: Any, session: PatchSession, methods: Dict[str, Optional[Method]], preset: Optional[str]):
        self.target = target
        self.session = session
        self.methods = methods
        self.preset = preset
        self.removed = False

    @property
    def step(self) -> StepContext:
        return self.session.step

    @property
    def family(self) -> str:
        return self.session.adapter.family

    def remove(self) -> None:
        """Undo every change in reverse order. Calling it again does nothing.

        Refused from inside a generation of the patched pipeline (a ``callback_on_step_end``): the
        loop holds the scheduler and the step state that removing would take away mid-step.
        """
        if not self.removed:
            refuse_during_generation(self.target, "remove accel from")
            self.removed = True
            self.session.changes.undo_all()

    def summary(self) -> Summary:
        step = self.session.step
        return Summary(
            family=self.family,
            preset=self.preset,
            methods={kind: (m.describe() if m is not None else None) for kind, m in self.methods.items()},
            steps_run=step.steps_run,
            generations=step.generations,
            calls_by_branch=dict(step.calls_by_branch),
            warnings=[w for w in (m.idle_warning() for m in self.methods.values() if m is not None) if w],
            # under diffusers' context parallelism: degrees and this rank (the counters are this rank's)
            parallel=next((p for p in map(parallel_summary, self.session.models) if p is not None), None),
        )

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        active = {k: m.name for k, m in self.methods.items() if m is not None}
        return f"<accel.Handle {self.family} {active} {state}>"


def patch(pipe: Any, preset: Optional[str] = None, *, attention: Any = None, cache: Any = None,
          solver: Any = None, config: Optional[Config] = None, replace: bool = False) -> Handle:
    """Accelerate a diffusers pipeline (or a bare transformer) in place; returns the ``Handle``.

    ``preset`` picks a named bundle from the model's adapter (default: the adapter's default
    preset). ``attention``/``cache``/``solver`` override single parts: a method name, a method
    config object, or ``None``/``"off"``. ``config`` is the typed form of all of these and cannot
    be mixed with them. A pipeline that is already patched raises ``ValueError`` unless
    ``replace=True``, which removes the old patch first.
    """
    if config is not None and (preset is not None or attention is not None or cache is not None or solver is not None):
        raise ValueError("pass either config=Config(...) or preset/attention/cache/solver, not both")
    if config is None:
        config = Config(preset=preset, attention=attention, cache=cache, solver=solver)
    elif not isinstance(config, Config):
        raise ValueError(f"config must be an accel.Config, got {type(config).__name__}")

    adapter, models, scheduler_owner = _find_models(pipe)
    refuse_during_generation(pipe, "patch")
    preset_name, parts = _resolve_parts(adapter, config)
    _release_previous(pipe, models, replace)

    changes = ChangeLog()
    session = PatchSession(pipe=scheduler_owner, models=models, adapter=adapter, step=StepContext(), changes=changes)
    try:
        # The solver may swap the scheduler, which step tracking then wraps; the cache gates the
        # blocks that attention methods run inside. Undo runs in reverse.
        solver = _attach(parts["solver"], session)
        install_step_tracking(session)
        cache = _attach(parts["cache"], session)
        attention = _attach(parts["attention"], session)
        handle = Handle(pipe, session, {"attention": attention, "cache": cache, "solver": solver}, preset_name)
        for owned in {id(obj): obj for obj in (pipe, *models)}.values():
            changes.set_attr(owned, _HANDLE_ATTR, handle)
    except BaseException:
        changes.undo_all()
        raise
    return handle


@contextlib.contextmanager
def patched(pipe: Any, preset: Optional[str] = None, **kwargs: Any) -> Iterator[Handle]:
    """``with accel.patched(pipe, ...) as handle:`` patches for the block and always restores."""
    handle = patch(pipe, preset, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


def supported_families() -> List[Tuple[str, str]]:
    return [(adapter.family, cls_name) for cls_name, adapter in MODEL_ADAPTERS.items()]


def adapter_for(module: torch.nn.Module) -> Optional[ModelAdapter]:
    """The adapter serving ``module``'s class or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls.__name__ in MODEL_ADAPTERS:
            return MODEL_ADAPTERS.get(cls.__name__)
    return None


def _find_models(pipe: Any) -> Tuple[ModelAdapter, List[torch.nn.Module], Any]:
    if isinstance(pipe, torch.nn.Module):
        candidates, owner = [pipe], None
    else:
        components = getattr(pipe, "components", None)
        if not isinstance(components, dict):
            raise ValueError(f"accel.patch expects a diffusers pipeline or transformer model, got {type(pipe).__name__}")
        candidates = [c for c in components.values() if isinstance(c, torch.nn.Module)]
        owner = pipe
    # `pipe.transformer = torch.compile(pipe.transformer)`: the compiled wrapper runs the module it
    # holds, so that module is what gets patched (its graph is traced again where it changed)
    candidates = [getattr(c, "_orig_mod", c) if isinstance(c, torch._dynamo.eval_frame.OptimizedModule) else c
                  for c in candidates]
    found = [(adapter_for(m), m) for m in candidates]
    found = [(a, m) for a, m in found if a is not None]
    if not found:
        families = ", ".join(f"{fam} ({cls})" for fam, cls in supported_families())
        raise ValueError(f"accel does not support {type(pipe).__name__}: no registered transformer found. "
                         f"Supported families: {families}")
    adapters = {id(a) for a, _ in found}
    if len(adapters) > 1:
        raise ValueError(f"{type(pipe).__name__} holds transformers of several families; patch each model separately")
    return found[0][0], [m for _, m in found], owner


def refuse_during_generation(pipe: Any, action: str) -> None:
    """``ValueError`` when called from inside ``pipe(...)`` (its ``__call__`` is on this thread's stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipe:
            raise ValueError(f"cannot {action} {type(pipe).__name__} while a generation is running "
                             "(from a callback); do it before or after the pipeline call")
        frame = frame.f_back


def live_handle(obj: Any) -> Optional[Handle]:
    """The handle that patched ``obj`` (a pipeline or one of its transformers) and is not removed."""
    handle = getattr(obj, "__dict__", {}).get(_HANDLE_ATTR)
    return handle if handle is not None and not handle.removed else None


def _release_previous(pipe: Any, models: List[torch.nn.Module], replace: bool) -> None:
    """Refuse (or, with ``replace``, remove) every live handle on the pipeline or on its transformers.

    Checking the models, not only ``pipe``, matters: ``accel.patch(pipe.transformer)`` then
    ``accel.patch(pipe)``, or two pipelines sharing components (``WanPipeline(**pipe.components)``,
    ``from_pipe``), would otherwise put two handles' hooks on the same modules.
    """
    for obj in (pipe, *models):
        previous = live_handle(obj)
        if previous is None:
            continue
        if not replace:
            what = type(obj).__name__ if obj is pipe else f"its {type(obj).__name__}"
            raise ValueError(f"{type(pipe).__name__}: {what} is already patched by {previous!r}; "
                             "call that handle's remove() first or pass replace=True")
        previous.remove()


def _attach(part: Optional[Part], session: PatchSession) -> Optional[Method]:
    if part is None:
        return None
    method = part.build()
    method.attach(session)
    return method


def check_preset(adapter: ModelAdapter, preset_name: str) -> None:
    """``ValueError`` listing the family's presets unless ``preset_name`` is one of them."""
    if preset_name not in adapter.presets:
        raise ValueError(f"unknown preset {preset_name!r} for {adapter.family}; "
                         f"valid presets: {', '.join(adapter.presets)}")


def _resolve_parts(adapter: ModelAdapter, config: Config) -> Tuple[Optional[str], Dict[str, Optional[Part]]]:
    """The preset's parts (resolved here: a preset belongs to the adapter), overridden by the config's."""
    preset_name = config.preset
    if preset_name is None and not config.has_parts:
        preset_name = adapter.default_preset
    parts: Dict[str, Optional[Part]] = {kind: None for kind in KINDS}
    if preset_name is not None:
        check_preset(adapter, preset_name)
        parts.update({kind: resolve_method(kind, spec) for kind, spec in adapter.presets[preset_name].items()})
    parts.update(config.parts)
    return preset_name, parts
