"""accel: drop-in, measured acceleration for diffusers video and image pipelines.

    handle = accel.patch(pipe)            # the pipeline's default preset
    handle = accel.patch(pipe, attention="dense", cache=None)
    handle.summary(); handle.remove()     # exact restore

Everything lives in this one namespace: ``accel.attention``, ``accel.caching``, ``accel.solvers``,
``accel.distill``, ``accel.pipelines``, ``accel.eval`` (in the repository, the top-level folders
of those names; ``accel._source_tree`` explains the mapping). The public names below load on
first use, as diffusers' do: ``import accel.caching`` (what calibration tools and other hosts
import) then pays neither for diffusers' pipelines nor for every method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import _source_tree

_source_tree.install(Path(__file__).resolve().parent)

__version__ = "0.1.0"
__all__ = ["patch", "patched", "Handle", "Config", "list_all", "__version__"]

_PUBLIC = {
    "patch": "accel.api",
    "patched": "accel.api",
    "Handle": "accel.api",
    "Config": "accel.config",
    "list_all": "accel.catalog",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'accel' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
