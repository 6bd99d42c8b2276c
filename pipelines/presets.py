"""Preset tables: a preset names one method (and its options) per kind.

Adapters start from ``BASE_PRESETS`` and override per family (thresholds calibrated per model).
A preset may only name registered methods; ``accel.api`` checks that when it resolves one.
A trade-off preset enters only once it has been measured on the reference model (the shipped
weights, 25 steps, 2 held-out prompts, fidelity against the dense video of the same seed;
``accel bench cache``, figures and wall speed-ups in the README):

* "quality": first-block cache at 0.1, model-agnostic (a relative change of the first block's
  residual): 51.4 dB PSNR / 0.998 SSIM at 0.81 compute;
* "balanced": compute every 2nd step, forecast the skipped ones with a first-order Taylor
  expansion of the cached residual: 45.0 dB / 0.997 at 0.52 compute (it replaced TeaCache at 0.2,
  31.4 dB / 0.939 at 0.36 with the model's own fitted polynomial);
* "fast": the same every 3rd step: 37.4 dB / 0.988 at 0.36 compute;
* "dense": every self-attention call through accel's interception, computed exactly; it exists
  to prove the interception path changes nothing.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

BASE_PRESETS: Dict[str, Dict[str, Any]] = {
    # Every self-attention call goes through accel's interception, computed densely by torch SDPA.
    "dense": {"attention": "dense", "cache": None, "solver": None},
    "quality": {"attention": None, "cache": {"name": "fbcache", "threshold": 0.1}, "solver": None},
    "balanced": {"attention": None, "cache": {"name": "fixed", "interval": 2, "forecast": "taylor"}, "solver": None},
    "fast": {"attention": None, "cache": {"name": "fixed", "interval": 3, "forecast": "taylor"}, "solver": None},
}


def family_presets(**overrides: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``BASE_PRESETS`` with per-family entries replaced or added."""
    presets = {name: dict(parts) for name, parts in BASE_PRESETS.items()}
    for name, parts in overrides.items():
        presets[name] = {**presets.get(name, {}), **parts}
    return presets
