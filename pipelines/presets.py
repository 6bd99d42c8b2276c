"""Preset tables: a preset names one method (and its options) per kind.

Adapters start from ``BASE_PRESETS`` and override per family (thresholds calibrated per model).
A preset may only name registered methods; ``accel.api`` checks that when it resolves one.
A trade-off preset enters only once it has been measured on the reference model (the shipped
weights, 25 steps, 2 held-out prompts, fidelity against the dense video of the same seed;
``accel bench cache``, figures and wall speed-ups in the README):

* "quality": first-block cache at 0.1, model-agnostic (a relative change of the first block's
  residual): 51.4 dB PSNR / 0.998 SSIM at 0.81 compute;
* "balanced": compute one step in 2, forecast the skipped ones with TaylorSeer's second-order
  expansion of the cached residual; ``schedule="auto"`` places the computed steps where
  ``accel calibrate --cache fixed`` found them best when a schedule is shipped for the model and
  step count (the reference model at 25 steps), else every 2nd step: 45.6 dB at 0.52 compute
  (it replaced every 2nd step with a first-order forecast, 45.0 dB, which had replaced TeaCache
  at 0.2, 31.4 dB at 0.36);
* "fast": one step in 3, the skipped ones forecast by the ``fitted`` forecast where one is shipped
  for the model, step count and budget (the reference model at 25 steps, ``accel calibrate --cache
  fixed --forecast fitted``), else as "balanced" does: 42.4 dB at 0.36 compute (TaylorSeer on the
  same searched schedule: 41.7 dB; every 3rd step, first order: 37.4 dB);
* "dense": every self-attention call through accel's interception, computed exactly; it exists
  to prove the interception path changes nothing.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

BASE_PRESETS: Dict[str, Dict[str, Any]] = {
    # Every self-attention call goes through accel's interception, computed densely by torch SDPA.
    "dense": {"attention": "dense", "cache": None, "solver": None},
    "quality": {"attention": None, "cache": {"name": "fbcache", "threshold": 0.1}, "solver": None},
    "balanced": {"attention": None, "cache": {"name": "fixed", "interval": 2, "forecast": "taylorseer", "order": 2,
                                              "schedule": "auto"}, "solver": None},
    "fast": {"attention": None, "cache": {"name": "fixed", "interval": 3, "forecast": "fitted", "order": 2,
                                          "schedule": "auto"}, "solver": None},
}


def family_presets(**overrides: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``BASE_PRESETS`` with per-family entries replaced or added."""
    presets = {name: dict(parts) for name, parts in BASE_PRESETS.items()}
    for name, parts in overrides.items():
        presets[name] = {**presets.get(name, {}), **parts}
    return presets
