"""Preset tables: a preset names one method (and its options) per kind.

Adapters start from ``BASE_PRESETS`` and override per family (thresholds calibrated per model).
A preset may only name registered methods; ``accel.api`` checks that when it resolves one.
A trade-off preset enters only once it has been measured on the reference model (25 steps,
fidelity against the dense video of the same seed; the figures are in the README):

* "quality": first-block cache at 0.1, model-agnostic (a relative change of the first block's
  residual), measured 55 dB PSNR / 0.9998 SSIM at 0.76 compute (1.2x on CPU);
* "balanced" (Wan only, where TeaCache's polynomial was fitted): TeaCache at 0.2, measured
  39.6 dB / 0.993 at 0.44 compute (1.6x on CPU);
* "dense": every self-attention call through accel's interception, computed exactly; it exists
  to prove the interception path changes nothing.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

BASE_PRESETS: Dict[str, Dict[str, Any]] = {
    # Every self-attention call goes through accel's interception, computed densely by torch SDPA.
    "dense": {"attention": "dense", "cache": None, "solver": None},
    "quality": {"attention": None, "cache": {"name": "fbcache", "threshold": 0.1}, "solver": None},
}


def family_presets(**overrides: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``BASE_PRESETS`` with per-family entries replaced or added."""
    presets = {name: dict(parts) for name, parts in BASE_PRESETS.items()}
    for name, parts in overrides.items():
        presets[name] = {**presets.get(name, {}), **parts}
    return presets
