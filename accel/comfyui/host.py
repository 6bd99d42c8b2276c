"""accel's engines on ComfyUI's own models, through ComfyUI's public patch points only.

A node clones the MODEL and puts an ``AccelHolder`` (an object: ComfyUI copies the dicts of
``transformer_options`` on every call, not the objects in them) into its model options, plus:

* an ``OUTER_SAMPLE`` wrapper that makes a fresh ``RunState`` for each sampling run (step context,
  cache engine, attention method), releases it at the end and logs what happened;
* a ``DIFFUSION_MODEL`` wrapper that keeps the run's step context true for each call (step from
  the sigma, CFG branch from ``cond_or_uncond``, token grid from the latent shape);
* a ``patches_replace["dit"]`` patch per block, through which the cache engine decides whether the
  block runs (the same engine and rules as the diffusers host) and which says which block's
  attention calls come next;
* an ``optimized_attention_override`` that sends each block's self-attention to accel's attention
  method and everything else (text and image cross-attention) to ComfyUI's own function.

Another pack's override or block patch already on the model is chained, not replaced; nothing
global is touched, so the unpatched MODEL keeps producing exactly what it produced.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from accel.attention.intercept import host_dense_attention
from accel.base.context import BRANCH_BATCHED, BRANCH_COND, BRANCH_UNCOND, AttnContext, StepContext, TokenLayout
from accel.base.registry import MODEL_ADAPTERS
from accel.caching.engine import CacheEngine, CachedModel
from accel.config import Part

from .families import ComfyFamily

HOLDER_KEY = "accel"  # transformer_options key of the node's holder
RUN_KEY = "accel_run"  # transformer_options key of the sampling run's state
log = logging.getLogger("accel.comfyui")


@dataclasses.dataclass(frozen=True)
class AccelSpec:
    """What the accel nodes ask of a MODEL: the parts (resolved methods) and the window."""

    cache: Optional[Part] = None
    attention: Optional[Part] = None
    start_percent: float = 0.0  # fraction of the steps, from the start, left exact
    end_percent: float = 1.0  # from here to the end, exact again
    label: str = ""


class AccelHolder:
    """The spec on a cloned MODEL, and the reports of the runs sampled with it (newest last)."""

    def __init__(self, spec: AccelSpec, family: ComfyFamily):
        self.spec = spec
        self.family = family
        self.reports: List[Dict[str, Any]] = []


class _AdapterView:
    """What a diffusers cache method reads from a patch session (its family's adapter)."""

    def __init__(self, family: str):
        adapter = next((a for _, a in MODEL_ADAPTERS.items() if a.family == family), None)
        self.adapter = adapter


class RunState:
    """One sampling run: made by the OUTER_SAMPLE wrapper, released when the run ends."""

    def __init__(self, holder: AccelHolder, diffusion_model: Any, sigmas: torch.Tensor):
        self.holder, self.family, self.spec = holder, holder.family, holder.spec
        self.model = diffusion_model
        self.sigmas = [float(s) for s in sigmas]
        self.step = StepContext()
        self.step.begin_generation(max(1, len(self.sigmas) - 1))
        self.layout = TokenLayout()
        self.block_index = -1
        self.attention_calls = 0  # optimized_attention calls so far in the current block
        self.call: Dict[str, Any] = {}  # the family's scratch for the current model call
        self.block_keys = self.family.block_keys(diffusion_model)
        self.num_blocks = len(self.block_keys)
        self.cache = self.engine = self.plan = None
        self.attention = self.spec.attention.build() if self.spec.attention is not None else None
        if self.spec.cache is not None:
            self._build_cache()

    def _build_cache(self) -> None:
        method = self.spec.cache.build()
        steps = self.step.num_steps
        config = dataclasses.replace(
            method.config, warmup_ratio=max(method.config.warmup_ratio, self.spec.start_percent),
            final_steps=max(method.config.final_steps, math.ceil((1.0 - self.spec.end_percent) * steps - 1e-9)))
        rule = method.make_rule(_AdapterView(self.family.family), method.calibration)
        self.engine = CacheEngine(config, rule, warn=method.warn_once, step=self.step)
        self.plan = self.engine.add_model(CachedModel(self.model, [self.family.streams] * self.num_blocks, config,
                                                      type(self.model).__name__))
        method.engine = self.engine
        self.cache = method

    # -- the step context -------------------------------------------------------------------

    def begin_call(self, x: torch.Tensor, transformer_options: Dict[str, Any]) -> None:
        sigma = transformer_options.get("sigmas")
        value = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else None
        if value is not None and self.sigmas:
            self.step.step_index = min(range(len(self.sigmas) - 1 or 1), key=lambda i: abs(self.sigmas[i] - value))
        halves = set(transformer_options.get("cond_or_uncond") or [0])
        branch = BRANCH_BATCHED if len(halves) > 1 else (BRANCH_UNCOND if halves == {1} else BRANCH_COND)
        self.step.begin_call(branch, value, value)
        self.layout = TokenLayout(grid=self.family.token_grid(self.model, x))
        self.block_index, self.attention_calls, self.call = -1, 0, {}

    def attention_layout(self, qkv: Optional[tuple]) -> Optional[TokenLayout]:
        """The layout of a block's attention call over the visual tokens (with the text tokens, in
        joint models), or None where the call is not that (other tokens added, cross-attention)."""
        visual = self.layout.visual_tokens
        if qkv is None or visual is None or qkv[0].shape[1] != qkv[1].shape[1]:
            return None
        text = qkv[0].shape[1] - visual
        if text == 0:
            return self.layout
        if self.family.text_position is None or text != self.call.get("text_tokens"):
            return None
        return TokenLayout(grid=self.layout.grid, text_tokens=text, text_position=self.family.text_position)

    def in_window(self) -> bool:
        progress = self.step.progress or 0.0
        return self.spec.start_percent <= progress < self.spec.end_percent

    # -- reporting --------------------------------------------------------------------------

    def report(self) -> Dict[str, Any]:
        methods = {kind: m.describe() for kind, m in (("cache", self.cache), ("attention", self.attention))
                   if m is not None}
        warnings_ = [w for w in (m.idle_warning() for m in (self.cache, self.attention) if m is not None) if w]
        return {"preset": self.spec.label, "steps": self.step.num_steps, "methods": methods, "warnings": warnings_,
                "calls_by_branch": dict(self.step.calls_by_branch)}

    def log_line(self, report: Dict[str, Any]) -> str:
        parts = [f"accel ({report['preset'] or 'custom'}) on {self.family.family}, {report['steps']} steps"]
        cache = report["methods"].get("cache")
        if cache:
            counters = cache["counters"]
            reused = ", ".join(f"{b} {counters['steps_reused'][b]}/{counters['calls'][b]}" for b in counters["calls"])
            parts.append(f"{cache['name']} skipped the cached blocks in {reused} calls "
                         f"(compute fraction {counters['compute_fraction']})")
        attention = report["methods"].get("attention")
        if attention:
            counters = attention["counters"]
            density = counters.get("mean_density")
            parts.append(f"{attention['name']} attention: {counters['calls']} calls, {counters['fallback_calls']} fell "
                         f"back" + (f", mean density {density}" if density is not None else ""))
        return "; ".join(parts) + "".join(f"; warning: {w}" for w in report["warnings"])


# -- the patch points ---------------------------------------------------------------------------


def _transformer_options(args: tuple, kwargs: dict) -> Dict[str, Any]:
    options = kwargs.get("transformer_options")
    if options is None:
        options = next((a for a in reversed(args) if isinstance(a, dict)), {})
    return options


def outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    holder: Optional[AccelHolder] = guider.model_options.get("transformer_options", {}).get(HOLDER_KEY)
    if holder is None:
        return executor(*args, **kwargs)
    original = guider.model_options
    run = RunState(holder, guider.model_patcher.model.diffusion_model, args[3])
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        report = run.report()
        holder.reports.append(report)
        log.info(run.log_line(report))
        if run.engine is not None:
            run.engine.clear()
        guider.model_options = original


def diffusion_model_wrapper(executor, *args, **kwargs):
    options = _transformer_options(args, kwargs)
    run: Optional[RunState] = options.get(RUN_KEY)
    if run is None:
        return executor(*args, **kwargs)
    run.begin_call(args[0], options)
    try:
        return executor(*args, **kwargs)
    finally:
        run.step.end_call()


def block_patch(index: int, key: Tuple[str, int], chained: Optional[Callable] = None) -> Callable:
    """The ``patches_replace["dit"][key]`` entry of the ``index``-th block of the loop (calling
    ``chained``, another pack's patch for the same block, as the block)."""
    def run_block(args, extra):
        return chained(args, extra) if chained is not None else extra["original_block"](args)

    def patch(args, extra):
        run: Optional[RunState] = args.get("transformer_options", {}).get(RUN_KEY)
        if run is None:
            return run_block(args, extra)
        run.block_index, run.attention_calls = index, 0
        family = run.family
        streams = family.block_streams(key, args, run.call)  # also notes what the block's attention sees
        if run.engine is None:
            return run_block(args, extra)
        if index in (0, run.plan.span_start):  # the engine keeps these inputs, and ComfyUI's Flux, HunyuanVideo
            streams = {name: t.clone() for name, t in streams.items()}  # and LTXV blocks add into them in place
        replaced = run.engine.block_input(run.plan, index, streams, lambda: family.modulated_input(args))
        if replaced is not None:
            return family.block_result(key, replaced, run.call)
        out = run_block(args, extra)
        run.engine.block_output(run.plan, index, lambda: family.output_streams(key, out, run.call))
        return out

    return patch


_ATTENTION_ARGS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def attention_override(chained: Optional[Callable] = None) -> Callable:
    """The ``optimized_attention_override``: a block's self-attention to accel's method."""
    def original(func, *args, **kwargs):
        return chained(func, *args, **kwargs) if chained is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        run: Optional[RunState] = options.get(RUN_KEY)
        if run is None or run.attention is None or run.block_index < 0:
            return original(func, *args, **kwargs)
        call = run.attention_calls
        run.attention_calls += 1
        named = {**dict(zip(_ATTENTION_ARGS, args)), **kwargs}  # ComfyUI passes some of these by position
        heads, skip_reshape = named["heads"], named.get("skip_reshape", False)
        to_bshd = _to_bshd(named["q"], named["k"], named["v"], heads, skip_reshape)
        layout = run.attention_layout(to_bshd) if call == run.family.self_attention_call else None
        if layout is None or not run.in_window():
            return original(func, *args, **kwargs)
        kind, site = ("joint" if layout.text_tokens else "self"), "{}s.{}".format(*run.block_keys[run.block_index])
        ctx = AttnContext(layer_index=run.block_index, num_layers=run.num_blocks, site=site, kind=kind, heads=heads,
                          layout=layout, step=run.step)
        rest = {k: v for k, v in named.items() if k not in _ATTENTION_ARGS[:5] + ("skip_reshape", "skip_output_reshape")}

        def comfy_dense(q_, k_, v_, mask):  # ComfyUI's own attention for the method's dense calls
            packed = [t.reshape(t.shape[0], t.shape[1], -1) for t in (q_, k_, v_)]
            out_ = original(func, *packed, heads, mask=mask, **rest)
            return out_.view(out_.shape[0], out_.shape[1], heads, -1)

        with warnings.catch_warnings(record=True) as caught, host_dense_attention(comfy_dense):
            warnings.simplefilter("always")
            out = run.attention.run(*to_bshd, ctx, attn_mask=named.get("mask"))
        for warning in caught:  # a fallback's one warning, into ComfyUI's log
            if str(warning.message).startswith("accel"):
                log.warning(str(warning.message))
        if named.get("skip_output_reshape", False):
            return out.transpose(1, 2)
        return out.reshape(out.shape[0], out.shape[1], -1)

    return override


def _to_bshd(q, k, v, heads: int, skip_reshape: bool):
    """(q, k, v) as (B, S, H, D), from ComfyUI's (B, S, H*D) or, with skip_reshape, (B, H, S, D)."""
    if skip_reshape:
        return tuple(t.transpose(1, 2) for t in (q, k, v))
    if q.dim() != 3 or q.shape[-1] % heads:
        return None
    return tuple(t.view(t.shape[0], t.shape[1], heads, t.shape[-1] // heads) for t in (q, k, v))


def apply(model: Any, spec: AccelSpec, family: ComfyFamily) -> Any:
    """A clone of ComfyUI ``model`` (a ModelPatcher) that runs ``spec``; earlier accel parts on it
    are kept unless ``spec`` names the same kind."""
    import comfy.patcher_extension

    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous: Optional[AccelHolder] = options.get(HOLDER_KEY)
    if previous is not None:
        spec = dataclasses.replace(spec, cache=spec.cache or previous.spec.cache,
                                   attention=spec.attention or previous.spec.attention,
                                   label=spec.label or previous.spec.label)
    options[HOLDER_KEY] = AccelHolder(spec, family)
    if previous is None:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "accel", outer_sample_wrapper)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "accel",
                                     diffusion_model_wrapper)
        existing = options.get("patches_replace", {}).get("dit", {})
        for index, key in enumerate(family.block_keys(patched.model.diffusion_model)):
            patched.set_model_patch_replace(block_patch(index, key, existing.get(key)), "dit", *key)
    if spec.attention is not None and (previous is None or previous.spec.attention is None):
        options = patched.model_options["transformer_options"]  # set_model_patch_replace copied the dict
        options["optimized_attention_override"] = attention_override(options.get("optimized_attention_override"))
    return patched
