"""The residual-cache engine: one implementation over every model's block stacks.

Each block of the adapter's stacks (dual then single stacks, as one ordered sequence) gets a gate
through the session's change log (``gate_block``): the model's own loop still calls every
position, and the gate decides, outside the block (so a compiled block stays one graph), whether
it runs:

    blocks [0, Fn)          always run; block 0 opens the call (step, branch, probes)
    blocks [Fn, N - Bn)     the cached span: at its first block the rule and the engine's gates
                            decide; on reuse every span block passes its streams through and the
                            last one returns span input + cached (or forecast) residual
    blocks [N - Bn, N)      always run

Residuals are kept per model and per CFG branch (``session.step.branch``), reset when a new
generation starts. Streams are read and written through each stack's ``BlockIO``, so there is no
model-specific code here. On reuse, anything the model's loop adds between cached blocks
(ControlNet residuals) is dropped with the blocks' own work.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from accel.base.context import BRANCH_BATCHED, BRANCH_COND, BRANCH_UNCOND
from accel.base.method import PatchSession

from .configs import CacheConfig
from .forecast import Residuals, make_forecaster
from .indicators import FIRST_RESIDUAL, MODULATED_INPUT, SPAN_INPUT, Probe, Rule
from .state import BranchState, CallState, Counters, held_memory
from .streams import StreamBinding, Streams


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

    Only patched instances get it (their ``__class__`` is swapped and swapped back by the change
    log), and it keeps ``cls``'s name: the module tree, parameter names, ``state_dict`` keys,
    LoRA targets, hooks and ``compile_repeated_blocks`` (which matches class names) see the
    block exactly as before. The gate wraps ``nn.Module.__call__``, so it sits outside the
    block's hooks and outside its compiled ``_call_impl``.
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


@dataclass
class SpanRecord:
    """One computed call, as observers (calibration) see it at the end of the cached span."""

    model: torch.nn.Module
    probe: Probe
    span_input: Streams
    span_output: Streams
    main_stream: str  # name of the visual stream


class ModelPlan:
    """One model's block sequence, cached span and per-branch state."""

    def __init__(self, model: torch.nn.Module, session: PatchSession, config: CacheConfig):
        self.model = model
        self.bindings: List[StreamBinding] = []
        self.blocks: List[torch.nn.Module] = []
        for stack in session.adapter.block_stacks(model):
            for index, block in enumerate(stack.blocks):
                if getattr(type(block), "_accel_gated", False):
                    raise ValueError(f"{type(model).__name__}.{stack.name} is already cached by another accel handle")
                self.blocks.append(block)
                self.bindings.append(StreamBinding(block, stack.io, f"{stack.name}.{index}"))
        self.num_blocks = len(self.blocks)
        self.span_start, self.span_end = config.first_blocks, self.num_blocks - config.last_blocks
        if self.span_start >= self.span_end:
            raise ValueError(f"first_blocks={config.first_blocks} + last_blocks={config.last_blocks} leave no block "
                             f"to cache: {type(model).__name__} has {self.num_blocks} blocks")
        first, last = self.bindings[self.span_start], self.bindings[self.span_end - 1]
        if set(first.names) != set(last.names):
            raise ValueError(f"the cached span starts with streams {first.names} and ends with {last.names}; "
                             "choose first_blocks/last_blocks inside stacks that carry the same streams")
        self.main_stream = first.names[0]
        self.branches: Dict[str, BranchState] = {}
        self.generation: Optional[int] = None
        self.call: Optional[CallState] = None
        self.captured: Any = None  # this call's output of the adapter's teacache_input_module


class CacheEngine:
    """Runs the reuse rule, the gates, forecasting and CFG reuse for every patched model."""

    def __init__(self, config: CacheConfig, rule: Rule, warn: Callable[[str], None],
                 rule_for_loop: Optional[Callable[[Optional[int]], Optional[Rule]]] = None):
        self.config = config
        self.rule = rule
        self.forecaster = make_forecaster(config.forecast, config.order)
        self.warn = warn
        # Called when a denoising loop starts, with its step count: may raise (a calibration for
        # another step count) or return the rule for this loop (one fitted for that step count).
        self.rule_for_loop = rule_for_loop
        self.counters = Counters()
        self.plans: List[ModelPlan] = []
        self.observers: List[Callable[[SpanRecord], None]] = []
        self.session: Optional[PatchSession] = None

    # ---------------------------------------------------------------- attach / detach

    def attach(self, session: PatchSession) -> None:
        self.session = session
        plans = [ModelPlan(model, session, self.config) for model in session.models]  # validate all first
        for plan in plans:
            for index, block in enumerate(plan.blocks):
                gate_block(block, BlockGate(functools.partial(self.before_block, plan, index),
                                            functools.partial(self.after_block, plan, index)), session.changes)
            capture = session.adapter.teacache_input_module
            if MODULATED_INPUT in self.rule.needs and capture:
                session.changes.keep_handle(plan.model.get_submodule(capture).register_forward_hook(
                    self._capturer(plan)))
        self.plans = plans
        session.changes.on_undo(self.clear)

    def clear(self) -> None:
        """Drop every cached tensor (on ``remove()``); counters stay readable."""
        for plan in self.plans:
            plan.branches.clear()
            plan.call = plan.captured = None

    @staticmethod
    def _capturer(plan: ModelPlan):
        def capture(module, args, output):
            plan.captured = output
        return capture

    # ---------------------------------------------------------------- the per-block path

    def before_block(self, plan: ModelPlan, index: int, block: torch.nn.Module, args: tuple,
                     kwargs: dict) -> Tuple[bool, Any]:
        """(True, value to return instead of running the block) or (False, None) to run it."""
        binding = plan.bindings[index]
        if index == 0:
            plan.call = self._begin_call(plan, block, binding, args, kwargs)
        call = plan.call
        if call is None or not plan.span_start <= index < plan.span_end:
            return False, None
        if index == plan.span_start:
            self._decide(plan, call, binding.streams(args, kwargs))
        if call.residual is None:
            return False, None
        streams = binding.streams(args, kwargs)  # reuse: pass through, add the residual at the span's end
        if index == plan.span_end - 1:
            for name, residual in call.residual.items():
                streams[name] = call.span_input[name] + residual
            self._end_span(plan, call, None)
        return True, binding.pack(streams)

    def after_block(self, plan: ModelPlan, index: int, output: Any) -> Any:
        call = plan.call
        if call is not None and index == plan.span_end - 1:
            self._end_span(plan, call, plan.bindings[index].unpack(output))
        return output

    def _begin_call(self, plan: ModelPlan, block, binding: StreamBinding, args: tuple, kwargs: dict) -> CallState:
        step = self.session.step
        if plan.generation != step.generations:  # a new denoising loop: nothing carries over
            if self.rule_for_loop is not None:  # before adopting the loop, so every call of it refuses
                self.rule = self.rule_for_loop(step.num_steps) or self.rule
            plan.generation = step.generations
            plan.branches.clear()
        branch = step.branch
        if branch == BRANCH_BATCHED and self.config.cfg_reuse:
            self.warn("cfg reuse needs separate cond/uncond calls; this pipeline batches both halves in one "
                      "call, which is cached as one branch")
        state = plan.branches.get(branch)
        if state is None:
            state = plan.branches[branch] = BranchState(self.rule.new_state())
        probe = Probe(step=step.step_index, num_steps=step.num_steps, branch=branch)
        call = CallState(branch=branch, state=state, probe=probe)
        if MODULATED_INPUT in self.rule.needs:
            probe.modulated_input = self._modulated_input(plan, block, binding, args, kwargs)
        if FIRST_RESIDUAL in self.rule.needs:
            call.first_input = binding.streams(args, kwargs)[plan.main_stream]
        return call

    def _modulated_input(self, plan: ModelPlan, block, binding: StreamBinding, args: tuple, kwargs: dict):
        captured, plan.captured = plan.captured, None
        value = self.session.adapter.teacache_input(block, binding.arguments(args, kwargs), captured)
        if value is None:
            self.warn(f"the {self.session.adapter.family} adapter has no TeaCache input hook; measuring the "
                      "first block's input instead")
            value = binding.streams(args, kwargs)[plan.main_stream]
        return value

    def _decide(self, plan: ModelPlan, call: CallState, span_input: Streams) -> None:
        call.span_input = span_input
        probe, state = call.probe, call.state
        main = span_input[plan.main_stream]
        if SPAN_INPUT in self.rule.needs:
            probe.span_input = main
        if FIRST_RESIDUAL in self.rule.needs:
            probe.first_residual = main - call.first_input
        proposal = self.rule.propose(state.rule_state, probe)  # always: rules track every step
        residual = self._cfg_residual(plan, call, span_input)
        call.cfg_reused = residual is not None
        if residual is None and proposal and self._may_reuse(state, probe, span_input):
            residual = self.forecaster.predict(state.history, probe.step)
        call.residual = residual
        reused = residual is not None
        self.rule.committed(state.rule_state, probe, reused)
        state.consecutive_reuses = state.consecutive_reuses + 1 if reused else 0
        span = plan.span_end - plan.span_start
        self.counters.record(call.branch, plan.num_blocks, span if reused else 0, call.cfg_reused)

    def _may_reuse(self, state: BranchState, probe: Probe, span_input: Streams) -> bool:
        """The engine's gates, common to every rule."""
        config, step, num_steps = self.config, probe.step, probe.num_steps
        if not state.history or step < config.warmup_for(num_steps):
            return False
        if num_steps is not None and step >= num_steps - config.final_steps:
            return False
        if config.max_consecutive_reuses is not None and state.consecutive_reuses >= config.max_consecutive_reuses:
            return False
        return _fits(state.history[-1][1], span_input)

    def _cfg_residual(self, plan: ModelPlan, call: CallState, span_input: Streams) -> Optional[Residuals]:
        """cond residual at this step + last (uncond - cond) difference, on the chosen uncond steps."""
        probe = call.probe
        if call.branch != BRANCH_UNCOND or not self.config.cfg_reuse_at(probe.step, probe.num_steps):
            return None
        cond = plan.branches.get(BRANCH_COND)
        delta = call.state.cfg_delta
        if cond is None or cond.applied is None or cond.applied[0] != probe.step or delta is None:
            return None
        residual = {name: value + delta[name] for name, value in cond.applied[1].items() if name in delta}
        return residual if residual and _fits(residual, span_input) else None

    def _end_span(self, plan: ModelPlan, call: CallState, output: Optional[Streams]) -> None:
        state, probe = call.state, call.probe
        if output is None:
            residual = call.residual
        else:
            residual = {name: output[name] - value for name, value in call.span_input.items()
                        if torch.is_tensor(value) and torch.is_tensor(output.get(name))}
            state.remember(probe.step, residual, self.forecaster.history_size)
            self.rule.computed(state.rule_state, probe, output[plan.main_stream])
            for observer in self.observers:
                observer(SpanRecord(plan.model, probe, call.span_input, output, plan.main_stream))
        if self.config.cfg_reuse:
            self._track_cfg(plan, call, residual, computed=output is not None)
        plan.call = None  # release this call's inputs; later blocks just run
        self.counters.peak_bytes = max(self.counters.peak_bytes, self.held()[1])

    def _track_cfg(self, plan: ModelPlan, call: CallState, residual: Residuals, computed: bool) -> None:
        """Remember the residual each branch used; measure (uncond - cond) when both computed a step."""
        step, state = call.probe.step, call.state
        state.applied, state.applied_computed = (step, residual), computed
        cond = plan.branches.get(BRANCH_COND)
        if call.branch == BRANCH_UNCOND and computed and cond is not None and cond.applied_computed \
                and cond.applied is not None and cond.applied[0] == step:
            cond_residual = cond.applied[1]
            state.cfg_delta = {name: value - cond_residual[name] for name, value in residual.items()
                               if name in cond_residual and cond_residual[name].shape == value.shape}

    # ---------------------------------------------------------------- reporting

    def held(self) -> Tuple[int, int]:
        return held_memory([plan.branches for plan in self.plans])

    def counter_dict(self) -> Dict[str, Any]:
        return self.counters.as_dict(self.held())


def _fits(residual: Residuals, span_input: Streams) -> bool:
    return all(torch.is_tensor(span_input.get(name)) and span_input[name].shape == value.shape
               for name, value in residual.items())
