"""Tiny HunyuanVideo text-to-video pipeline.

Text: a Llama encoder (hidden states of layer -3, as the pipeline skips the
last 2 layers) behind a chat-style prompt template, plus a CLIP encoder whose
pooled output feeds the transformer's conditioning.  Guidance: the transformer
is guidance-distilled (``guidance_embeds=True``) and ``tiny_call_kwargs`` also
turns on true CFG (``true_cfg_scale`` > 1 with a negative prompt), i.e. two
transformer calls per step, cond then uncond.

Geometry: VAE with the real 8x spatial / 4x temporal compression, 16 latent
channels; patch (1, 2, 2).  64x64 px, 9 frames -> latents (16, 3, 8, 8) ->
token grid T=3, H=4, W=4.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)

from ._common import (
    NEGATIVE_PROMPT,
    PROMPT,
    TEXT_DIM,
    clip_text_encoder,
    clip_tokenizer,
    finalize,
    llama_text_encoder,
    llama_tokenizer,
    make_generator,
    seeded,
)
from ._common import TinySpec

HEIGHT = WIDTH = 64
NUM_FRAMES = 9
MAX_SEQUENCE_LENGTH = 16

# A compact version of the pipeline's DEFAULT_PROMPT_TEMPLATE (same structure,
# far fewer tokens).  ``crop_start`` must equal the number of template tokens
# before the user text (bos included); see ``prompt_template()``.
_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\ndescribe the video.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)


SPECS = (TinySpec("hunyuan_video", "HunyuanVideoPipeline", (3, 4, 4), calls_per_step=2, cfg="separate",
                   flow_matching=True, guidance_off={"true_cfg_scale": 1.0}),)


def prompt_template() -> dict:
    """The compact template with its ``crop_start`` measured with our tokenizer."""
    prefix = _TEMPLATE.split("{}")[0]
    crop_start = len(llama_tokenizer()(prefix)["input_ids"])
    return {"template": _TEMPLATE, "crop_start": crop_start}


def _transformer(seed: int) -> HunyuanVideoTransformer3DModel:
    with seeded(seed, "transformer"):
        return HunyuanVideoTransformer3DModel(
            in_channels=16,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM,
            rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
        )


def _vae(seed: int) -> AutoencoderKLHunyuanVideo:
    with seeded(seed, "vae"):
        return AutoencoderKLHunyuanVideo(
            latent_channels=16,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )


def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> HunyuanVideoPipeline:
    tokenizer = llama_tokenizer()
    tokenizer_2 = clip_tokenizer()
    pipe = HunyuanVideoPipeline(
        text_encoder=llama_text_encoder(tokenizer, seed, "text_encoder"),
        tokenizer=tokenizer,
        transformer=_transformer(seed),
        vae=_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip_text_encoder(tokenizer_2, seed, "text_encoder_2"),
        tokenizer_2=tokenizer_2,
    )
    return finalize(pipe, dtype)


def call_kwargs(seed: int = 0, steps: int = 3) -> dict:
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        true_cfg_scale=2.0,
        guidance_scale=6.0,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=steps,
        generator=make_generator(seed),
        output_type="pt",
        prompt_template=prompt_template(),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
