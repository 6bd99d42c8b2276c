"""Preset tables: a preset names one method (and its options) per kind.

Adapters start from ``BASE_PRESETS`` and override per family (thresholds calibrated per model).
A preset may only name registered methods; ``accel.api`` checks that when it resolves one.
Presets named after speed/quality trade-offs ("quality", "balanced", "fast", "max") are added
as the caching, sparse-attention and solver methods land; until then "dense" is the only one,
and it exists to prove the interception path changes nothing.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

BASE_PRESETS: Dict[str, Dict[str, Any]] = {
    # Every self-attention call goes through accel's interception, computed densely by torch SDPA.
    "dense": {"attention": "dense", "cache": None, "solver": None},
}


def family_presets(**overrides: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``BASE_PRESETS`` with per-family entries replaced or added."""
    presets = {name: dict(parts) for name, parts in BASE_PRESETS.items()}
    for name, parts in overrides.items():
        presets[name] = {**presets.get(name, {}), **parts}
    return presets
