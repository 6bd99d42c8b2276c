"""The residual-cache engine: one implementation over every model's block stacks, for every host.

The engine sees a model as an ordered sequence of blocks, each reading and writing named streams
(the visual stream, and the text stream of joint models), and decides, before each block runs,
whether the block runs at all:

    blocks [0, Fn)          always run; block 0 opens the call (step, branch, probes)
    blocks [Fn, N - Bn)     the cached span: at its first block the rule and the engine's gates
                            decide; on reuse every span block passes its streams through and the
                            last one returns span input + cached (or forecast) residual
    blocks [N - Bn, N)      always run

Residuals are kept per model and per CFG branch (the step context's ``branch``), reset when a new
generation starts. The engine knows nothing of who calls it: a *host* binds it to a model's blocks
and calls ``block_input``/``block_output`` with stream dicts. Hosts: diffusers modules
(``caching/diffusers_host.py``: each block gated in place) and ComfyUI's block patches
(``accel/comfy``). On reuse, anything the model's loop adds between cached blocks (ControlNet or
VACE hints) is dropped with the blocks' own work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from accel.base.context import BRANCH_BATCHED, BRANCH_COND, BRANCH_UNCOND, StepContext

from .configs import CacheConfig
from .forecast import Forecaster, ForecastInputs, Residuals, make_forecaster
from .indicators import FIRST_RESIDUAL, LOCAL, MODULATED_INPUT, SPAN_INPUT, Probe, Rule, Stats
from .state import BranchState, CallState, Counters, held_memory
from .streams import Streams


@dataclass
class SpanRecord:
    """One computed call, as observers (calibration) see it at the end of the cached span."""

    model: torch.nn.Module
    probe: Probe
    span_input: Streams
    span_output: Streams
    main_stream: str  # name of the visual stream


class CachedModel:
    """What the engine keeps for one model: its blocks' streams, the cached span, per-branch state.

    ``streams`` names each block's streams in order (the visual stream first); ``owner`` is what
    observers see as the model (the host's model object).
    """

    def __init__(self, owner: Any, streams: Sequence[Sequence[str]], config: CacheConfig, name: str = "model"):
        self.model = owner
        self.num_blocks = len(streams)
        self.span_start, self.span_end = config.first_blocks, self.num_blocks - config.last_blocks
        if self.span_start >= self.span_end:
            raise ValueError(f"first_blocks={config.first_blocks} + last_blocks={config.last_blocks} leave no block "
                             f"to cache: {name} has {self.num_blocks} blocks")
        first, last = streams[self.span_start], streams[self.span_end - 1]
        if set(first) != set(last):
            raise ValueError(f"the cached span starts with streams {tuple(first)} and ends with {tuple(last)}; "
                             "choose first_blocks/last_blocks inside stacks that carry the same streams")
        self.main_stream = first[0]
        self.branches: Dict[str, BranchState] = {}
        self.generation: Optional[int] = None
        self.call: Optional[CallState] = None
        self.captured: Any = None  # this call's teacache indicator input, when the host captures it
        # what the rules' means cover: this process's tensors, or (context parallelism) the group's
        self.stats: Stats = LOCAL


class CacheEngine:
    """Runs the reuse rule, the gates, forecasting and CFG reuse for every patched model."""

    def __init__(self, config: CacheConfig, rule: Rule, warn: Callable[[str], None],
                 rule_for_loop: Optional[Callable[[Optional[int]], Optional[Rule]]] = None,
                 step: Optional[StepContext] = None):
        self.config = config
        self.rule = rule
        self.forecaster = make_forecaster(config.forecast, config.order)
        self.warn = warn
        # Called when a denoising loop starts, with its step count: may raise (a calibration for
        # another step count) or return the rule for this loop (one fitted for that step count).
        self.rule_for_loop = rule_for_loop
        self.counters = Counters()
        self.plans: List[CachedModel] = []
        self.observers: List[Callable[[SpanRecord], None]] = []
        self.step = step or StepContext()  # the host keeps it true (step index, loop, CFG branch)

    def add_model(self, plan: CachedModel) -> CachedModel:
        self.plans.append(plan)
        return plan

    def clear(self) -> None:
        """Drop every cached tensor (on ``remove()`` or at the end of a run); counters stay readable."""
        for plan in self.plans:
            plan.branches.clear()
            plan.call = plan.captured = None

    # ---------------------------------------------------------------- the per-block path

    def block_input(self, plan: CachedModel, index: int, streams: Streams,
                    modulated_input: Callable[[], Optional[torch.Tensor]]) -> Optional[Streams]:
        """Streams to return instead of running block ``index``, or None to run it.

        ``streams`` are the block's input streams by name; ``modulated_input`` gives TeaCache's
        indicator input of this call (asked at block 0, only by rules that need it).
        """
        if index == 0:
            plan.call = self._begin_call(plan, streams, modulated_input)
        call = plan.call
        if call is None or not plan.span_start <= index < plan.span_end:
            return None
        if index == plan.span_start:
            self._decide(plan, call, dict(streams))
        if call.residual is None:
            return None
        streams = dict(streams)  # reuse: pass through, add the residual at the span's end
        if index == plan.span_end - 1:
            for name, residual in call.residual.items():
                streams[name] = call.span_input[name] + residual
            self._end_span(plan, call, None)
        return streams

    def block_output(self, plan: CachedModel, index: int, streams: Callable[[], Streams]) -> None:
        """After block ``index`` ran; ``streams`` gives its output streams (asked at the span's end)."""
        call = plan.call
        if call is not None and index == plan.span_end - 1:
            self._end_span(plan, call, streams())

    def _begin_call(self, plan: CachedModel, streams: Streams,
                    modulated_input: Callable[[], Optional[torch.Tensor]]) -> CallState:
        step = self.step
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
        probe = Probe(step=step.step_index, num_steps=step.num_steps, branch=branch, stats=plan.stats)
        call = CallState(branch=branch, state=state, probe=probe)
        if MODULATED_INPUT in self.rule.needs:
            with torch.no_grad():  # indicators decide; they are not differentiated (and must not be
                value = modulated_input()  # saved for a checkpointed block's recompute)
            if value is None:
                self.warn("this model has no TeaCache input hook; measuring the first block's input instead")
                value = streams[plan.main_stream]
            probe.modulated_input = value
        if FIRST_RESIDUAL in self.rule.needs:
            call.first_input = streams[plan.main_stream]
        return call

    def _decide(self, plan: CachedModel, call: CallState, span_input: Streams) -> None:
        call.span_input = span_input
        probe, state = call.probe, call.state
        main = span_input[plan.main_stream]
        if SPAN_INPUT in self.rule.needs:
            probe.span_input = main
        if FIRST_RESIDUAL in self.rule.needs:
            probe.first_residual = main - call.first_input
        with torch.no_grad():
            proposal = self.rule.propose(state.rule_state, probe)  # always: rules track every step
        residual = self._cfg_residual(plan, call, span_input)
        call.cfg_reused = residual is not None
        if residual is None and proposal and self._may_reuse(state, probe, span_input):
            residual = self.active_forecaster.predict(
                state.history, probe.step, ForecastInputs(call.branch, span_input, state.history_inputs))
        call.residual = residual
        reused = residual is not None
        with torch.no_grad():
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

    def _cfg_residual(self, plan: CachedModel, call: CallState, span_input: Streams) -> Optional[Residuals]:
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

    @property
    def active_forecaster(self) -> Forecaster:
        """The rule's own forecast (a fixed schedule fitted with its weights), else the config's."""
        return self.rule.forecaster or self.forecaster

    def _end_span(self, plan: CachedModel, call: CallState, output: Optional[Streams]) -> None:
        state, probe = call.state, call.probe
        forecaster = self.active_forecaster
        kept_input = call.span_input if forecaster.needs_inputs else None
        if output is None:
            residual = call.residual
            if call.cfg_reused:
                # the cond branch's measured residual of this step plus a slowly changing offset:
                # kept as a point of the uncond forecast, which otherwise extrapolates across the gap
                # (27.5 -> 39.4 dB on the reference model, 2 of 10 computed steps reused this way)
                state.remember(probe.step, residual, forecaster.history_size, kept_input)
        else:
            residual = {name: output[name] - value for name, value in call.span_input.items()
                        if torch.is_tensor(value) and torch.is_tensor(output.get(name))}
            state.remember(probe.step, residual, forecaster.history_size, kept_input)
            with torch.no_grad():
                self.rule.computed(state.rule_state, probe, output[plan.main_stream])
            for observer in self.observers:
                observer(SpanRecord(plan.model, probe, call.span_input, output, plan.main_stream))
        if self.config.cfg_reuse:
            self._track_cfg(plan, call, residual, computed=output is not None)
        plan.call = None  # release this call's inputs; later blocks just run
        self.counters.peak_bytes = max(self.counters.peak_bytes, self.held()[1])

    def _track_cfg(self, plan: CachedModel, call: CallState, residual: Residuals, computed: bool) -> None:
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
