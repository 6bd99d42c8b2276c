"""FLUX.1 (``FluxTransformer2DModel``): joint attention with text first, image grid from ``img_ids``."""
from __future__ import annotations

from accel.base.adapter import INVOKES_DISPATCH, BlockIO, ModelAdapter
from accel.base.context import TokenLayout
from accel.base.registry import MODEL_ADAPTERS

from .presets import family_presets


class FluxAdapter(ModelAdapter):
    family = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline")
    timestep_position = 3
    invokes = INVOKES_DISPATCH
    self_attention_paths = ("attn",)
    block_stack_names = ("transformer_blocks", "single_transformer_blocks")
    # Both FluxTransformerBlock and FluxSingleTransformerBlock take (hidden_states,
    # encoder_hidden_states, temb, ...) and return (encoder_hidden_states, hidden_states): text first.
    block_io = {name: BlockIO(streams=("hidden_states", "encoder_hidden_states"),
                              returns=("encoder_hidden_states", "hidden_states")) for name in block_stack_names}
    joint_text = "prefix"
    teacache_coefficients = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
    presets = family_presets()
    default_preset = "quality"

    def teacache_input(self, first_block, block_args, captured=None):
        # The timestep-modulated, normed image stream of the first dual block (norm1 -> x * (1 + scale) + shift).
        return first_block.norm1(block_args["hidden_states"], emb=block_args["temb"])[0]

    def token_layout(self, model, args, kwargs):
        hidden_states = self.call_arg(args, kwargs, "hidden_states", 0)  # (B, S, C), packed 2x2 latents
        text = self.call_arg(args, kwargs, "encoder_hidden_states", 1)
        img_ids = self.call_arg(args, kwargs, "img_ids", 4)
        text_tokens = int(text.shape[1]) if text is not None else 0
        grid = None
        if img_ids is not None:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            # Kontext appends reference-image tokens: then the sequence is not one grid.
            if height * width == hidden_states.shape[1]:
                grid = (1, height, width)
        return TokenLayout(grid=grid, text_tokens=text_tokens, text_position=self.joint_text)


MODEL_ADAPTERS.register(FluxAdapter.transformer_class, FluxAdapter())
