"""LTX-Video (``LTXVideoTransformer3DModel``): pre-packed tokens, video-only self-attention."""
from __future__ import annotations

from accel.base.adapter import INVOKES_DISPATCH, BlockIO, ModelAdapter
from accel.base.context import TokenLayout
from accel.base.registry import MODEL_ADAPTERS

from .presets import family_presets


class LTXVideoAdapter(ModelAdapter):
    family = "ltx"
    transformer_class = "LTXVideoTransformer3DModel"
    pipeline_classes = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")
    timestep_position = 2
    invokes = INVOKES_DISPATCH
    self_attention_paths = ("attn1",)
    cross_attention_paths = ("attn2",)
    block_stack_names = ("transformer_blocks",)
    # LTXVideoTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, ...) -> hidden_states;
    # the text is read by cross-attention only.
    block_io = {"transformer_blocks": BlockIO(streams=("hidden_states",), returns=("hidden_states",))}
    teacache_coefficients = (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03)
    presets = family_presets()
    default_preset = "quality"

    def teacache_input(self, first_block, block_args, captured=None):
        # The first block's self-attention input: norm1(x) * (1 + scale_msa) + shift_msa, with the
        # per-block table added to ``temb`` exactly as LTXVideoTransformerBlock does.
        hidden, temb = block_args["hidden_states"], block_args["temb"]
        table = first_block.scale_shift_table
        ada = table[None, None].to(temb.device) + temb.reshape(hidden.shape[0], temb.shape[1], table.shape[0], -1)
        shift_msa, scale_msa = ada[:, :, 0], ada[:, :, 1]
        return first_block.norm1(hidden) * (1 + scale_msa) + shift_msa

    def token_layout(self, model, args, kwargs):
        # Tokens arrive packed (B, S, C); the pipeline passes the latent grid explicitly.
        frames = self.call_arg(args, kwargs, "num_frames", 4)
        height = self.call_arg(args, kwargs, "height", 5)
        width = self.call_arg(args, kwargs, "width", 6)
        if frames is None or height is None or width is None:
            return TokenLayout()
        p, p_t = model.config.patch_size, model.config.patch_size_t
        return TokenLayout(grid=(int(frames) // p_t, int(height) // p, int(width) // p))


MODEL_ADAPTERS.register(LTXVideoAdapter.transformer_class, LTXVideoAdapter())
