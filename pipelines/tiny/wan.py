"""Tiny Wan 2.1 (one transformer) and Wan 2.2 (two experts + boundary_ratio)
text-to-video pipelines.

Geometry: the VAE keeps Wan's real compression (8x spatial, 4x temporal,
z_dim 16); the transformer patch is (1, 2, 2).  64x64 px, 9 frames ->
latents (16, 3, 8, 8) -> token grid T=3, H=4, W=4 (48 tokens).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from ._common import NEGATIVE_PROMPT, PROMPT, TEXT_DIM, finalize, make_generator, seeded, t5_encoder, t5_tokenizer
from ._common import TinySpec

HEIGHT = WIDTH = 64
NUM_FRAMES = 9
MAX_SEQUENCE_LENGTH = 16

# Wan 2.2 A14B switches experts at t = 0.875 * 1000.  With flow_shift=3 and 3
# UniPC steps the timesteps are ~[999, 857, 600]: step 0 runs `transformer`
# (high noise), the rest `transformer_2` (low noise), so both experts run.
WAN22_BOUNDARY_RATIO = 0.875


SPECS = (
    TinySpec("wan", "WanPipeline", (3, 4, 4), calls_per_step=2, cfg="separate", flow_matching=True,
             guidance_off={"guidance_scale": 1.0}),
    TinySpec("wan22", "WanPipeline", (3, 4, 4), calls_per_step=2, cfg="separate", flow_matching=True,
             guidance_off={"guidance_scale": 1.0, "guidance_scale_2": 1.0}, build_kwargs={"two_experts": True}),
)

def _transformer(seed: int, name: str) -> WanTransformer3DModel:
    with seeded(seed, name):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )


def _vae(seed: int) -> AutoencoderKLWan:
    with seeded(seed, "vae"):
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )


def _scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=3.0,
    )


def build(seed: int = 0, dtype: torch.dtype = torch.float32, two_experts: bool = False) -> WanPipeline:
    tokenizer = t5_tokenizer(MAX_SEQUENCE_LENGTH)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer), seed, "text_encoder", umt5=True),
        vae=_vae(seed),
        scheduler=_scheduler(),
        transformer=_transformer(seed, "transformer"),
        transformer_2=_transformer(seed, "transformer_2") if two_experts else None,
        boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None,
    )
    return finalize(pipe, dtype)


def call_kwargs(seed: int = 0, steps: int = 3, two_experts: bool = False) -> dict:
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=make_generator(seed),
        output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    if two_experts:
        kwargs["guidance_scale_2"] = 4.0
    return kwargs
