"""Tiny FLUX.1-dev-style text-to-image pipeline.

Guidance-distilled (``guidance_embeds=True``): ``tiny_call_kwargs`` passes a
``guidance_scale`` and no negative prompt, so each step is exactly one
transformer call.  Text: CLIP pooled output + T5 sequence.

Geometry: AutoencoderKL with 4 levels (8x spatial) and 16 latent channels;
latents are packed 2x2 into 64-channel tokens.  64x64 px -> latents
(16, 8, 8) -> 4x4 = 16 image tokens, plus 16 text tokens.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from ._common import (
    PROMPT,
    TEXT_DIM,
    clip_text_encoder,
    clip_tokenizer,
    finalize,
    make_generator,
    seeded,
    t5_encoder,
    t5_tokenizer,
)
from ._common import TinySpec

HEIGHT = WIDTH = 64
MAX_SEQUENCE_LENGTH = 16
LATENT_CHANNELS = 16


# Guidance-distilled: one call per step; a negative prompt with true_cfg_scale > 1 adds a second.
SPECS = (TinySpec("flux", "FluxPipeline", (4, 4), calls_per_step=1, cfg="none", flow_matching=True,
                   guidance_off={"true_cfg_scale": 1.0}),)


def _transformer(seed: int) -> FluxTransformer2DModel:
    with seeded(seed, "transformer"):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )


def _vae(seed: int) -> AutoencoderKL:
    with seeded(seed, "vae"):
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=HEIGHT,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The scheduler config shipped with black-forest-labs/FLUX.1-dev.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer(MAX_SEQUENCE_LENGTH)
    pipe = FluxPipeline(
        scheduler=_scheduler(),
        vae=_vae(seed),
        text_encoder=clip_text_encoder(tokenizer, seed, "text_encoder"),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(len(tokenizer_2), seed, "text_encoder_2"),
        tokenizer_2=tokenizer_2,
        transformer=_transformer(seed),
    )
    return finalize(pipe, dtype)


def call_kwargs(seed: int = 0, steps: int = 3) -> dict:
    return dict(
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=make_generator(seed),
        output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
