"""What accel supports, as data: used by ``accel list`` and the docs."""
from __future__ import annotations

from typing import Any, Dict

from accel.base.registry import METHOD_REGISTRIES, MODEL_ADAPTERS

from .api import supported_families  # noqa: F401  (importing api fills the adapter registry)
from .config import KINDS


def list_all() -> Dict[str, Any]:
    """``{"models": [...], "methods": {"attention": [...], "cache": [...], "solver": [...]}, "presets": {...}}``."""
    models = [
        {"family": a.family, "transformer": cls_name, "pipelines": list(a.pipeline_classes),
         "attention_call": a.invokes, "default_preset": a.default_preset}
        for cls_name, a in MODEL_ADAPTERS.items()
    ]
    methods = {kind: list(METHOD_REGISTRIES[kind].names()) for kind in KINDS}
    presets = {a.family: {name: dict(parts) for name, parts in a.presets.items()} for _, a in MODEL_ADAPTERS.items()}
    return {"models": models, "methods": methods, "presets": presets}
