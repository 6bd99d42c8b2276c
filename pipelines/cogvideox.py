"""CogVideoX (``CogVideoXTransformer3DModel``): joint attention with text first, direct torch SDPA."""
from __future__ import annotations

from accel.base.adapter import INVOKES_SDPA, BlockIO, ModelAdapter
from accel.base.context import TokenLayout
from accel.base.registry import MODEL_ADAPTERS

from .presets import family_presets


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    transformer_class = "CogVideoXTransformer3DModel"
    pipeline_classes = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")
    timestep_position = 2
    invokes = INVOKES_SDPA
    self_attention_paths = ("attn1",)
    block_stack_names = ("transformer_blocks",)
    # CogVideoXBlock.forward(hidden_states, encoder_hidden_states, temb, ...) -> (hidden_states, encoder_hidden_states).
    block_io = {"transformer_blocks": BlockIO(streams=("hidden_states", "encoder_hidden_states"),
                                              returns=("hidden_states", "encoder_hidden_states"))}
    joint_text = "prefix"
    teacache_coefficients = (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02)
    presets = family_presets()
    default_preset = "quality"

    def teacache_input(self, first_block, block_args, captured=None):
        # The CogVideoX coefficients were fitted on the time embedding the blocks receive as ``temb``.
        return block_args["temb"]

    def token_layout(self, model, args, kwargs):
        hidden_states = self.call_arg(args, kwargs, "hidden_states", 0)  # (B, F, C, H, W)
        text = self.call_arg(args, kwargs, "encoder_hidden_states", 1)
        p = model.config.patch_size
        p_t = model.config.patch_size_t or 1  # CogVideoX 1.5 also patches time
        _, frames, _, height, width = hidden_states.shape
        return TokenLayout(
            grid=((frames + p_t - 1) // p_t, height // p, width // p),
            text_tokens=int(text.shape[1]),
            text_position=self.joint_text,
        )


MODEL_ADAPTERS.register(CogVideoXAdapter.transformer_class, CogVideoXAdapter())
