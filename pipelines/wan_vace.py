"""Wan 2.1 VACE (``WanVACETransformer3DModel``): Wan's blocks plus control blocks that add hints.

The control blocks (``vace_blocks``) run first, on the control video's tokens (the same grid as the
video's), and the model's loop adds each one's hint after its matching main block. Everything in
the main blocks is Wan's, so this adapter is Wan's with the control blocks as a side stack:
attention methods replace their self-attention too; caches skip only main blocks, so a reused
span reuses the hints added inside it with the blocks' own work (the control blocks still run).
"""
from __future__ import annotations

from accel.base.registry import MODEL_ADAPTERS

from .wan import WanAdapter


class WanVACEAdapter(WanAdapter):
    transformer_class = "WanVACETransformer3DModel"
    pipeline_classes = ("WanVACEPipeline",)
    side_stack_names = ("vace_blocks",)
    # The control blocks read the time embedding too; no student of a VACE model has been trained.
    target_time = None


MODEL_ADAPTERS.register(WanVACEAdapter.transformer_class, WanVACEAdapter())
