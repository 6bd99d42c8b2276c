"""Tiny LTX-Video (0.9.0-style) text-to-video pipeline.

LTX runs CFG as one *batched* transformer call per step (uncond and cond on
the batch axis) and keeps latents packed as a token sequence
``(B, T*H*W, C)`` during denoising; text enters through cross-attention.

Geometry: VAE with LTX's real compression (patch 4 x three 2x down-scalings =
32x spatial, 8x temporal) and 128 latent channels; transformer patch 1.
96x96 px, 17 frames -> latents (128, 3, 3, 3) -> token grid T=3, H=3, W=3.
``build_condition`` puts the same components in ``LTXConditionPipeline``.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXConditionPipeline, LTXPipeline,
                       LTXVideoTransformer3DModel)
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from PIL import Image

from ._common import NEGATIVE_PROMPT, PROMPT, TEXT_DIM, finalize, make_generator, seeded, t5_encoder, t5_tokenizer
from ._common import TinySpec

HEIGHT = WIDTH = 96
NUM_FRAMES = 17
MAX_SEQUENCE_LENGTH = 16
LATENT_CHANNELS = 128


SPECS = (TinySpec("ltx", "LTXPipeline", (3, 3, 3), calls_per_step=1, cfg="batched", flow_matching=True,
                   guidance_off={"guidance_scale": 1.0}),)


def _transformer(seed: int) -> LTXVideoTransformer3DModel:
    with seeded(seed, "transformer"):
        return LTXVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,  # == inner dim (heads * head_dim), as in LTX
            num_layers=2,
            caption_channels=TEXT_DIM,
            qk_norm="rms_norm_across_heads",
        )


def _vae(seed: int) -> AutoencoderKLLTXVideo:
    with seeded(seed, "vae"):
        return AutoencoderKLLTXVideo(
            latent_channels=LATENT_CHANNELS,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False),
            patch_size=4,
            patch_size_t=1,
            timestep_conditioning=False,
            encoder_causal=True,
            decoder_causal=False,
        )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The scheduler config shipped with Lightricks/LTX-Video (0.9.0).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )


def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> LTXPipeline:
    tokenizer = t5_tokenizer(MAX_SEQUENCE_LENGTH)
    pipe = LTXPipeline(
        scheduler=_scheduler(),
        vae=_vae(seed),
        text_encoder=t5_encoder(len(tokenizer), seed, "text_encoder"),
        tokenizer=tokenizer,
        transformer=_transformer(seed),
    )
    return finalize(pipe, dtype)


def call_kwargs(seed: int = 0, steps: int = 3) -> dict:
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=make_generator(seed),
        output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )


def build_condition(seed: int = 0, dtype: torch.dtype = torch.float32) -> LTXConditionPipeline:
    """The same components in ``LTXConditionPipeline`` (LTX 0.9.5+), whose scheduler shifts statically."""
    components = dict(build(seed=seed, dtype=dtype).components)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(
        components["scheduler"].config, use_dynamic_shifting=False)
    return finalize(LTXConditionPipeline(**components), dtype)


def condition_call_kwargs(seed: int = 0, steps: int = 3, frame_index: int = 8) -> dict:
    """``call_kwargs`` plus one conditioning image at ``frame_index`` (> 0: its latents become extra
    tokens before the video's, so the sequence is not the video grid alone)."""
    kwargs = call_kwargs(seed=seed, steps=steps)
    image = Image.new("RGB", (WIDTH, HEIGHT), (200, 40, 40))
    kwargs["conditions"] = [LTXVideoCondition(image=image, frame_index=frame_index)]
    return kwargs
