"""The accel nodes: ``AccelPatchModel``, ``AccelCache``, ``AccelAttention`` on ComfyUI's MODEL.

Each node's inputs are declared once (``INPUTS``) and turned into a V3 schema (``comfy_api.latest``)
where ComfyUI has it, or into the legacy ``INPUT_TYPES`` where it does not; both call ``patch``.
A node clones the MODEL (``host.apply``); a model accel does not serve passes through unchanged
with one warning naming the supported families; a bad value is a ``ValueError`` naming the input,
which ComfyUI shows on the node before anything is sampled.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

from accel import attention as _attention  # noqa: F401  (fills the method registries)
from accel import caching as _caching  # noqa: F401
from accel.base.registry import ATTENTION_METHODS, CACHE_METHODS, MODEL_ADAPTERS
from accel.caching.forecast import FORECASTS, SCHEDULE_FORECASTS
from accel.config import Part, resolve_method
from accel.pipelines.presets import BASE_PRESETS

from .families import family_of, supported
from .host import AccelSpec, apply

log = logging.getLogger("accel.comfyui")
PRESETS = (*BASE_PRESETS, "off")
DEFAULT = "default"  # a combo value that keeps the method's (or preset's) own setting
WINDOW = [("start_percent", "float", dict(default=0.0, min=0.0, max=1.0, step=0.01),
           "fraction of the steps, from the start, left exact"),
          ("end_percent", "float", dict(default=1.0, min=0.0, max=1.0, step=0.01),
           "from this fraction of the steps to the end, exact again")]
CACHE_INPUTS = [("threshold", "float", dict(default=-1.0, min=-1.0, max=10.0, step=0.01),
                 "reuse threshold of the rule (-1: the rule's default)"),
                ("interval", "int", dict(default=0, min=0, max=10), "fixed rule: compute every N-th step (0: its default)"),
                # the fitted forecast's weights ship for diffusers' model classes, never ComfyUI's
                ("forecast", "combo", dict(options=[DEFAULT, *(f for f in FORECASTS if f not in SCHEDULE_FORECASTS)],
                                           default=DEFAULT),
                 "what a skipped step adds: the cached residual or a forecast of it")]
ATTENTION_INPUTS = [("density", "float", dict(default=-1.0, min=-1.0, max=1.0, step=0.01),
                     "fraction of visual query/key pairs kept (-1: the pattern's default)"),
                    ("dense_warmup", "float", dict(default=-1.0, min=-1.0, max=1.0, step=0.01),
                     "fraction of the steps, from the start, with dense attention (-1: the pattern's default)")]
INPUTS = {
    "AccelPatchModel": [
        ("preset", "combo", dict(options=list(PRESETS), default="quality"), "a named bundle of methods"),
        ("cache", "combo", dict(options=["preset", "off", *CACHE_METHODS.names()], default="preset"),
         "the cache rule, replacing the preset's"),
        *CACHE_INPUTS,
        ("attention", "combo", dict(options=["preset", "off", *ATTENTION_METHODS.names()], default="preset"),
         "the attention method, replacing the preset's"),
        *ATTENTION_INPUTS, *WINDOW],
    "AccelCache": [("cache", "combo", dict(options=list(CACHE_METHODS.names()), default="fbcache"),
                    "the reuse rule"), *CACHE_INPUTS, *WINDOW],
    "AccelAttention": [("attention", "combo", dict(options=list(ATTENTION_METHODS.names()), default="radial"),
                        "the attention method"), *ATTENTION_INPUTS, *WINDOW],
}
DISPLAY = {"AccelPatchModel": "accel: patch model", "AccelCache": "accel: cache", "AccelAttention": "accel: attention"}
DESCRIPTION = {
    "AccelPatchModel": "accel's caches and attention methods on this model (a clone: the input MODEL is unchanged). "
                       "Each run logs what it skipped.",
    "AccelCache": "One of accel's residual caches on this model (a clone).",
    "AccelAttention": "One of accel's attention methods on the model's self-attention (a clone).",
}


def patch(node: str, model: Any, preset: str = "off", cache: str = "preset", threshold: float = -1.0,
          interval: int = 0, forecast: str = DEFAULT, attention: str = "preset", density: float = -1.0,
          dense_warmup: float = -1.0, start_percent: float = 0.0, end_percent: float = 1.0) -> Any:
    """What every node does: resolve its inputs into an ``AccelSpec`` and apply it to a clone."""
    family = family_of(model.model.diffusion_model)
    if family is None:
        log.warning(f"accel: {type(model.model.diffusion_model).__name__} is not a model accel serves in ComfyUI "
                    f"(supported: {supported()}); passed through unchanged")
        return model
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"accel: start_percent and end_percent must satisfy 0 <= start_percent <= end_percent <= 1, "
                         f"got {start_percent} and {end_percent}")
    if preset not in PRESETS:
        raise ValueError(f"accel: unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    parts = preset_parts(family.family, preset)
    if cache not in ("preset", ""):
        parts["cache"] = resolve_method("cache", None if cache == "off" else cache)
    if attention not in ("preset", ""):
        parts["attention"] = resolve_method("attention", None if attention == "off" else attention)
    parts["cache"] = _override(parts.get("cache"), threshold=threshold if threshold >= 0 else None,
                               interval=interval or None, forecast=None if forecast == DEFAULT else forecast)
    parts["attention"] = _override(parts.get("attention"), density=density if density >= 0 else None,
                                   dense_warmup=dense_warmup if dense_warmup >= 0 else None)
    spec = AccelSpec(cache=parts["cache"], attention=parts["attention"], start_percent=start_percent,
                     end_percent=end_percent, label=preset if node == "AccelPatchModel" else node)
    return apply(model, spec, family)


def preset_parts(family: str, preset: str) -> Dict[str, Optional[Part]]:
    if preset == "off":
        return {"cache": None, "attention": None}
    adapter = next(a for _, a in MODEL_ADAPTERS.items() if a.family == family)
    entries = adapter.presets[preset]
    if entries.get("solver") is not None:
        log.warning(f"accel: preset {preset!r} names a solver; in ComfyUI the sampler node chooses the solver")
    return {kind: resolve_method(kind, entries.get(kind)) for kind in ("cache", "attention")}


def _override(part: Optional[Part], **values: Any) -> Optional[Part]:
    """``part`` with the given config fields replaced (None: keep); a field the method lacks is an error."""
    values = {k: v for k, v in values.items() if v is not None}
    if part is None or not values:
        return part
    fields = {f.name for f in dataclasses.fields(part.config)}
    missing = sorted(set(values) - fields)
    if missing:
        raise ValueError(f"accel: {missing[0]} does not apply to {part.method.name!r} "
                         f"(its settings: {', '.join(sorted(fields))})")
    return Part(part.method, dataclasses.replace(part.config, **values))  # the config validates the values


# -- node classes ------------------------------------------------------------------------------


def _legacy_input(kind: str, options: Dict[str, Any], tooltip: str) -> Tuple:
    if kind == "combo":
        return (list(options["options"]), {"default": options["default"], "tooltip": tooltip})
    return ("FLOAT" if kind == "float" else "INT", {**options, "tooltip": tooltip})


def legacy_nodes() -> Dict[str, type]:
    """Node classes for ComfyUI versions without the V3 API (``NODE_CLASS_MAPPINGS``)."""
    classes = {}
    for node, inputs in INPUTS.items():
        def input_types(cls, inputs=inputs):
            required = {"model": ("MODEL",)}
            required.update({name: _legacy_input(kind, options, tooltip) for name, kind, options, tooltip in inputs})
            return {"required": required}

        def run(self, model, node=node, **values):
            return (patch(node, model, **values),)

        classes[node] = type(node, (), {"INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": ("MODEL",),
                                        "FUNCTION": "run", "CATEGORY": "accel", "DESCRIPTION": DESCRIPTION[node],
                                        "run": run})
    return classes


def v3_nodes() -> List[type]:
    """The same nodes on ComfyUI's V3 API (``comfy_api.latest``); ImportError where it has none."""
    from comfy_api.latest import io

    def v3_input(name: str, kind: str, options: Dict[str, Any], tooltip: str):
        if kind == "combo":
            return io.Combo.Input(name, options=list(options["options"]), default=options["default"], tooltip=tooltip)
        cls = io.Float if kind == "float" else io.Int
        return cls.Input(name, tooltip=tooltip, **options)

    nodes = []
    for node, inputs in INPUTS.items():
        def define_schema(cls, node=node, inputs=inputs):
            return io.Schema(node_id=node, display_name=DISPLAY[node], category="accel", description=DESCRIPTION[node],
                             inputs=[io.Model.Input("model"), *[v3_input(*spec) for spec in inputs]],
                             outputs=[io.Model.Output()])

        def execute(cls, model, node=node, **values):
            return io.NodeOutput(patch(node, model, **values))

        nodes.append(type(node, (io.ComfyNode,), {"define_schema": classmethod(define_schema),
                                                  "execute": classmethod(execute)}))
    return nodes
