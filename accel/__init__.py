"""accel: drop-in, measured acceleration for diffusers video and image pipelines.

    handle = accel.patch(pipe)            # the pipeline's default preset
    handle = accel.patch(pipe, attention="dense", cache=None)
    handle.summary(); handle.remove()     # exact restore

The public names load lazily: the method packages import ``accel.base`` (the bottom layer), so
importing them eagerly here would run in a circle.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["patch", "patched", "Handle", "Config", "list_all", "__version__"]

_LAZY = {
    "patch": ("accel.api", "patch"),
    "patched": ("accel.api", "patched"),
    "Handle": ("accel.api", "Handle"),
    "Config": ("accel.config", "Config"),
    "list_all": ("accel.catalog", "list_all"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'accel' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
