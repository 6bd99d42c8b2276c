"""Tiny CogVideoX (1.0, 5B-style: rotary position embeddings) text-to-video
pipeline.

CogVideoX runs CFG as one *batched* transformer call per step (uncond and
cond concatenated on the batch axis, cache context ``"cond_uncond"``); the
text tokens are joined to the video tokens inside every block.

Geometry: VAE with the real 8x spatial / 4x temporal compression and 16
latent channels; patch 2x2 (no temporal patch).  64x64 px, 9 frames ->
latents (3, 16, 8, 8) (CogVideoX keeps frames before channels) -> token grid
T=3, H=4, W=4.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)

from ._common import NEGATIVE_PROMPT, PROMPT, TEXT_DIM, finalize, make_generator, seeded, t5_encoder, t5_tokenizer
from ._common import TinySpec

HEIGHT = WIDTH = 64
NUM_FRAMES = 9
MAX_SEQUENCE_LENGTH = 16
_SPATIAL = 8


SPECS = (TinySpec("cogvideox", "CogVideoXPipeline", (3, 4, 4), calls_per_step=1, cfg="batched",
                   flow_matching=False, guidance_off={"guidance_scale": 1.0}),)


def _transformer(seed: int) -> CogVideoXTransformer3DModel:
    with seeded(seed, "transformer"):
        return CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,  # rotary split t/h/w = 4/6/6
            in_channels=16,
            out_channels=16,
            time_embed_dim=32,
            text_embed_dim=TEXT_DIM,
            num_layers=2,
            sample_width=WIDTH // _SPATIAL,
            sample_height=HEIGHT // _SPATIAL,
            sample_frames=NUM_FRAMES,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=MAX_SEQUENCE_LENGTH,
            use_rotary_positional_embeddings=True,
        )


def _vae(seed: int) -> AutoencoderKLCogVideoX:
    with seeded(seed, "vae"):
        return AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=16,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            sample_height=HEIGHT,
            sample_width=WIDTH,
            scaling_factor=0.7,
        )


def _scheduler() -> CogVideoXDDIMScheduler:
    # The scheduler config shipped with THUDM/CogVideoX-5b.
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )


def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> CogVideoXPipeline:
    tokenizer = t5_tokenizer(MAX_SEQUENCE_LENGTH)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer), seed, "text_encoder"),
        vae=_vae(seed),
        transformer=_transformer(seed),
        scheduler=_scheduler(),
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
        guidance_scale=6.0,
        generator=make_generator(seed),
        output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
