"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint attention, text appended after video."""
from __future__ import annotations

from accel.base.adapter import INVOKES_DISPATCH, BlockIO, ModelAdapter
from accel.base.context import TokenLayout
from accel.base.registry import MODEL_ADAPTERS

from .presets import family_presets


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan_video"
    transformer_class = "HunyuanVideoTransformer3DModel"
    pipeline_classes = ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline")
    invokes = INVOKES_DISPATCH
    # Dual-stream blocks and single-stream blocks both run one joint attention called ``attn``.
    self_attention_paths = ("attn",)
    block_stack_names = ("transformer_blocks", "single_transformer_blocks")
    # Dual and single blocks take (hidden_states, encoder_hidden_states, temb, ...) and return
    # (hidden_states, encoder_hidden_states): video first (unlike FLUX).
    block_io = {name: BlockIO(streams=("hidden_states", "encoder_hidden_states"),
                              returns=("hidden_states", "encoder_hidden_states")) for name in block_stack_names}
    joint_text = "suffix"
    teacache_coefficients = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)
    presets = family_presets()
    default_preset = "quality"

    def teacache_input(self, first_block, block_args, captured=None):
        # The timestep-modulated, normed video stream of the first dual block. The image-to-video
        # (token-replace) block modulates its first-frame tokens with their own embedding.
        hidden, temb = block_args["hidden_states"], block_args["temb"]
        if block_args.get("token_replace_emb") is not None:
            return first_block.norm1(hidden, temb, block_args["token_replace_emb"], block_args["num_tokens"])[0]
        return first_block.norm1(hidden, emb=temb)[0]

    def token_layout(self, model, args, kwargs):
        hidden_states = self.call_arg(args, kwargs, "hidden_states", 0)  # (B, C, F, H, W)
        text = self.call_arg(args, kwargs, "encoder_hidden_states", 2)
        p, p_t = model.config.patch_size, model.config.patch_size_t
        _, _, frames, height, width = hidden_states.shape
        return TokenLayout(
            grid=(frames // p_t, height // p, width // p),
            text_tokens=int(text.shape[1]),
            text_position=self.joint_text,
        )


MODEL_ADAPTERS.register(HunyuanVideoAdapter.transformer_class, HunyuanVideoAdapter())
