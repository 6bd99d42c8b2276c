"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video-only self-attention, text by cross-attention."""
from __future__ import annotations

import os

from accel.base.adapter import INVOKES_DISPATCH, BlockIO, ModelAdapter, TargetTimeInputs
from accel.base.context import TokenLayout
from accel.base.registry import MODEL_ADAPTERS

from .presets import family_presets


class WanAdapter(ModelAdapter):
    family = "wan"
    transformer_class = "WanTransformer3DModel"
    # Wan 2.2 A14B runs the same pipeline with a second transformer (``transformer_2``) for the
    # low-noise steps; both get the same adapter and share one step context.
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")
    invokes = INVOKES_DISPATCH
    self_attention_paths = ("attn1",)
    cross_attention_paths = ("attn2",)
    block_stack_names = ("blocks",)
    # WanTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, rotary_emb) -> hidden_states;
    # the text enters by cross-attention and is never updated, so it is context, not a stream.
    block_io = {"blocks": BlockIO(streams=("hidden_states",), returns=("hidden_states",))}
    # TeaCache, Wan2.1 T2V-1.3B (indicator: the time embedding ``temb``).
    teacache_coefficients = (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01)
    # Blocks receive the projected ``timestep_proj``; the coefficients above were fitted on ``temb``,
    # the first output of the condition embedder.
    teacache_input_module = "condition_embedder"
    presets = family_presets()
    default_preset = "quality"
    # The reference model's calibrations and DSS solvers (it is a WanTransformer3DModel).
    # The condition embedder returns (temb, timestep_proj, text, image): the blocks get timestep_proj
    # (argument ``temb``, unflattened to (B, 6, D)), and only the output norm reads temb.
    target_time = TargetTimeInputs(embedder="condition_embedder", block_output=1, block_arg="temb",
                                   block_arg_position=2, head_outputs=(0,))
    artifact_dirs = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "calibration"),)

    def teacache_input(self, first_block, block_args, captured=None):
        return captured[0] if captured is not None else None  # (temb, timestep_proj, text, image)

    def token_layout(self, model, args, kwargs):
        hidden_states = self.call_arg(args, kwargs, "hidden_states", 0)  # (B, C, F, H, W)
        p_t, p_h, p_w = model.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        return TokenLayout(grid=(frames // p_t, height // p_h, width // p_w))


MODEL_ADAPTERS.register(WanAdapter.transformer_class, WanAdapter())
