"""The cache engine's diffusers host: each block of the adapter's stacks is gated in place.

A gated block's instance gets a subclass of its own class (same name) whose ``__call__`` asks the
engine first (``ChangeLog.set_class`` undoes it), so the module tree, parameter names,
``state_dict`` keys, LoRA targets, hooks and ``compile_repeated_blocks`` (which matches class
names) see the block exactly as before. Streams are read and written through each stack's
``BlockIO`` (``streams.StreamBinding``); TeaCache's indicator input comes from the adapter.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from accel.base.method import PatchSession
from accel.base.parallel import context_parallel_config, group_of

from .distributed import GroupStats
from .engine import CacheEngine, CachedModel
from .indicators import LOCAL, MODULATED_INPUT
from .streams import StreamBinding

GATE_ATTR = "_accel_cache_gate"


class BlockGate:
    """The engine's two calls around one block; ``before`` may answer in the block's place."""

    __slots__ = ("before", "after")

    def __init__(self, before: Callable, after: Callable):
        # Bookkeeping stays out of any compiled graph: a regionally compiled block is one graph.
        self.before = torch.compiler.disable(before)
        self.after = torch.compiler.disable(after)


_GATED_CLASSES: Dict[type, type] = {}


def gated_class(cls: type) -> type:
    """A subclass of the block class ``cls`` whose ``__call__`` asks the instance's gate first.

    Only patched instances get it, and it keeps ``cls``'s name. The gate wraps
    ``nn.Module.__call__``, so it sits outside the block's hooks and its compiled ``_call_impl``.
    """
    gated = _GATED_CLASSES.get(cls)
    if gated is None:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            gate = self.__dict__.get(GATE_ATTR)
            if gate is None:
                return super(gated, self).__call__(*args, **kwargs)
            skip, value = gate.before(self, args, kwargs)
            if skip:
                return value
            return gate.after(super(gated, self).__call__(*args, **kwargs))

        gated = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                            "__qualname__": cls.__qualname__, "_accel_gated": True})
        _GATED_CLASSES[cls] = gated
    return gated


def gate_block(block: torch.nn.Module, gate: BlockGate, changes) -> None:
    changes.set_class(block, gated_class(type(block)))
    changes.set_attr(block, GATE_ATTR, gate)


class DiffusersModel:
    """One diffusers transformer bound to the engine: its blocks, their stream bindings."""

    def __init__(self, engine: CacheEngine, model: torch.nn.Module, session: PatchSession):
        self.engine, self.model, self.adapter = engine, model, session.adapter
        self.blocks: List[torch.nn.Module] = []
        self.bindings: List[StreamBinding] = []
        for stack in session.adapter.block_stacks(model):
            for index, block in enumerate(stack.blocks):
                if getattr(type(block), "_accel_gated", False):
                    raise ValueError(f"{type(model).__name__}.{stack.name} is already cached by another accel handle")
                self.blocks.append(block)
                self.bindings.append(StreamBinding(block, stack.io, f"{stack.name}.{index}"))
        self.plan = CachedModel(model, [b.names for b in self.bindings], engine.config, type(model).__name__)

    def before(self, index: int, block: torch.nn.Module, args: tuple, kwargs: dict):
        if index == 0:
            self._follow_context_parallel()
        args, kwargs = forward_view(block, args, kwargs)
        binding = self.bindings[index]
        replaced = self.engine.block_input(self.plan, index, binding.streams(args, kwargs),
                                           lambda: self._modulated_input(block, binding, args, kwargs))
        return (False, None) if replaced is None else (True, binding.pack(replaced))

    def after(self, index: int, output: Any) -> Any:
        self.engine.block_output(self.plan, index, lambda: self.bindings[index].unpack(output))
        return output

    def _follow_context_parallel(self) -> None:
        """Under diffusers' context parallelism the rules' means cover every rank's slice."""
        config = context_parallel_config(self.model)
        group = group_of(config) if config is not None else None
        if group is None:
            self.plan.stats = LOCAL
        elif getattr(self.plan.stats, "group", None) is not group:
            self.plan.stats = GroupStats(group)

    def _modulated_input(self, block, binding: StreamBinding, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        captured, self.plan.captured = self.plan.captured, None
        return self.adapter.teacache_input(block, binding.arguments(args, kwargs), captured)


def forward_view(block: torch.nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """The arguments the block's ``forward`` will see: diffusers' context-parallel plan splits some
    blocks' inputs (Wan: ``blocks.0``'s hidden states) in a hook inside the call, after our gate;
    the engine must keep the same slice the block's output will be a slice of."""
    registry = getattr(block, "_diffusers_hook", None)  # only blocks that carry diffusers hooks
    if registry is None:
        return args, kwargs
    try:
        from diffusers.hooks.context_parallel import ContextParallelSplitHook
    except ImportError:  # a diffusers without context parallelism splits nothing
        return args, kwargs
    for hook in list(registry.hooks.values()):
        if isinstance(hook, ContextParallelSplitHook):
            args, kwargs = hook.pre_forward(block, *args, **kwargs)
    return args, kwargs


def attach_engine(engine: CacheEngine, session: PatchSession) -> None:
    """Gate every block of the session's models; undone with the session's change log."""
    engine.step = session.step
    for model in session.models:
        refuse_diffusers_cache(model)
    hosts = [DiffusersModel(engine, model, session) for model in session.models]  # validate all first
    for host in hosts:
        engine.add_model(host.plan)
        if hasattr(host.model, "enable_cache"):  # diffusers' CacheMixin: a second cache would gate our gates
            session.changes.set_attr(host.model, "enable_cache", _refuse_enable_cache(host.model))
        for index, block in enumerate(host.blocks):
            gate_block(block, BlockGate(functools.partial(host.before, index), functools.partial(host.after, index)),
                       session.changes)
        capture = session.adapter.teacache_input_module
        if MODULATED_INPUT in engine.rule.needs and capture:
            session.changes.keep_handle(host.model.get_submodule(capture).register_forward_hook(
                _capturer(host.plan)))
    session.changes.on_undo(engine.clear)


def _capturer(plan: CachedModel):
    def capture(module, args, output):
        plan.captured = output
    return capture


def refuse_diffusers_cache(model: torch.nn.Module) -> None:
    """Two caches on one model would both skip blocks: diffusers' own cache must be off first."""
    if getattr(model, "is_cache_enabled", False):
        raise ValueError(f"cache: {type(model).__name__} already has diffusers' cache enabled (enable_cache); two "
                         f"caches would both skip its blocks. Call `pipe.transformer.disable_cache()` before "
                         f"accel.patch, or patch without cache=")


def _refuse_enable_cache(model: torch.nn.Module) -> Callable:
    name = type(model).__name__

    def enable_cache(*args: Any, **kwargs: Any) -> None:
        raise ValueError(f"{name} is cached by accel (accel.patch with a cache); diffusers' enable_cache would cache "
                         f"its blocks a second time. Call `handle.remove()` on accel's handle first, or patch "
                         f"without cache=")
    return enable_cache
