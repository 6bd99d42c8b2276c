"""The project's own small trained text-to-video model, in real diffusers Wan format.

``build_reference_pipeline(config)`` assembles an *untrained* ``WanPipeline``
from tiny components (``train.py`` trains it); ``load_reference_pipeline()``
loads the trained one shipped in ``pipelines/reference/weights`` (offline).

Design choices (see ``ReferenceConfig``; all measured, see train_log.json):

- Video: 29 frames of 64 x 128 px.  The VAE is the Wan 2.2 kind
  (``is_residual``: average-pool / duplicate shortcuts around every
  resampling, and a 2 x 2 pixel patchify in front): 8x in space, 4x in time,
  so the latent grid is 8 x 8 x 16 and, with patch size (1, 1, 1), the
  transformer's self-attention sees 8 * 8 * 16 = 1024 video tokens.  The
  patchify makes the VAE's convolutions run at 32 x 64 (a quarter of the
  cost), and the shortcuts start it near an average-pooling autoencoder, so it
  learns faster at the start than the Wan 2.1 kind, with 0.70M parameters
  against 1.84M (CPU probes in the issue notes).  ``vae_residual=False, vae_patch=1``
  with ``vae_dim_mult=(1, 2, 4)`` builds the Wan 2.1 kind (4x).
- Transformer: head dim 64 (the attention kernels in ``attention/`` target
  head dims 64/128), 2 heads (inner dim 128), 8 blocks, ffn 512: ~2.3M
  parameters, so a CPU forward at 1024 tokens stays well under a second.
- Text: a word-level tokenizer over the closed caption vocabulary and a tiny
  UMT5 encoder (trained jointly).  Prompts are padded to the pipeline's
  default ``max_sequence_length`` (512), exactly as in training, so the
  pipeline works with its default arguments.
- Scheduler: Wan's default, UniPC with flow prediction and flow shift 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from dataclasses import dataclass, field

import torch

from accel.pipelines.reference import data

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
# Artifacts fitted on the shipped weights: {teacache,magcache}-25.json, dss-{4,6,8,10}.json.
CALIBRATION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration")

# Everything but "seed" is a WanPipeline argument; generate() turns the seed into a generator.
REFERENCE_DEFAULTS = {
    "prompt": "a red circle moving right on a dark background",
    "negative_prompt": "",
    "height": data.HEIGHT,
    "width": data.WIDTH,
    "num_frames": data.NUM_FRAMES,
    "num_inference_steps": 25,
    "guidance_scale": 4.0,
    "seed": 0,
}


def reference_call_kwargs(prompt: str | None = None, seed: int | None = None, **overrides) -> dict:
    """Keyword arguments that run the shipped model at its own size: ``pipe(**reference_call_kwargs(
    "a blue square moving up on a gray background"))``. WanPipeline's own defaults (480 x 832,
    81 frames, 50 steps) are 128 times the tokens this model was trained on."""
    kwargs = {k: v for k, v in REFERENCE_DEFAULTS.items() if k != "seed"}
    if prompt is not None:
        kwargs["prompt"] = prompt
    if seed is not None:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(int(seed))
    return {**kwargs, **overrides}


@dataclass
class ReferenceConfig:
    # text encoder (UMT5)
    text_d_model: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_d_ff: int = 256
    tokenizer_max_length: int = 32
    # VAE (AutoencoderKLWan); len(vae_dim_mult) - 1 down-samplings, each 2x in space and time,
    # after a vae_patch x vae_patch pixel patchify (Wan 2.2's residual VAE; 1 = none)
    vae_base_dim: int = 16
    vae_z_dim: int = 16
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    vae_num_res_blocks: int = 1
    vae_residual: bool = True
    vae_patch: int = 2
    # transformer (WanTransformer3DModel)
    num_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 512
    num_layers: int = 8
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 1, 1)
    # scheduler
    flow_shift: float = 3.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.vae_dim_mult) != 3:
            # Wan's encode loop hard-codes 4-frame chunks, i.e. exactly two temporal
            # down-samplings; with 3 levels those are also the only spatial ones (4x,
            # times vae_patch).
            raise ValueError(f"vae_dim_mult must have 3 entries (4x in time), got {self.vae_dim_mult}")
        if self.vae_residual and self.vae_dim_mult[-1] > self.vae_dim_mult[-2]:
            # the last level's average-pool shortcut can only merge channels, not create them
            raise ValueError(f"vae_dim_mult must end with two equal entries when vae_residual, got {self.vae_dim_mult}")
        if self.vae_patch not in (1, 2):
            raise ValueError(f"vae_patch must be 1 or 2, got {self.vae_patch}")
        for name in ("text_d_model", "vae_base_dim", "vae_z_dim", "num_heads", "head_dim", "ffn_dim", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def spatial_factor(self) -> int:
        return self.vae_patch * 2 ** (len(self.vae_dim_mult) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_tokenizer(config: ReferenceConfig):
    from accel.pipelines.tiny.tokenizer import build_word_tokenizer

    return build_word_tokenizer(data.vocabulary(), model_max_length=config.tokenizer_max_length)


def vae_layout(config: ReferenceConfig) -> dict:
    """The ``AutoencoderKLWan`` arguments that ``config`` fixes (all but the latent statistics)."""
    n_levels, patch = len(config.vae_dim_mult), config.vae_patch
    return {"base_dim": config.vae_base_dim, "z_dim": config.vae_z_dim, "dim_mult": list(config.vae_dim_mult),
            "num_res_blocks": config.vae_num_res_blocks, "attn_scales": [],
            "temperal_downsample": [True] * (n_levels - 1), "is_residual": config.vae_residual,
            "in_channels": 3 * patch * patch, "out_channels": 3 * patch * patch,
            "patch_size": patch if patch > 1 else None,
            "scale_factor_temporal": 4, "scale_factor_spatial": config.spatial_factor}


def build_components(config: ReferenceConfig | None = None) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    config = config or ReferenceConfig()
    tokenizer = build_tokenizer(config)
    text_config = UMT5Config(
        vocab_size=len(tokenizer), d_model=config.text_d_model, d_kv=config.text_d_model // config.text_heads,
        d_ff=config.text_d_ff, num_layers=config.text_layers, num_heads=config.text_heads,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    text_encoder = UMT5EncoderModel(text_config)
    vae = AutoencoderKLWan(**vae_layout(config), latents_mean=[0.0] * config.vae_z_dim,
                           latents_std=[1.0] * config.vae_z_dim)  # the latent statistics are set by train.py
    transformer = WanTransformer3DModel(
        patch_size=tuple(config.patch_size), num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, in_channels=config.vae_z_dim, out_channels=config.vae_z_dim,
        text_dim=config.text_d_model, freq_dim=config.freq_dim, ffn_dim=config.ffn_dim,
        num_layers=config.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=config.flow_shift,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae,
            "transformer": transformer, "scheduler": scheduler}


def build_reference_pipeline(config: ReferenceConfig | None = None):
    """An untrained reference ``WanPipeline`` (fp32, CPU)."""
    from diffusers import WanPipeline

    return WanPipeline(**build_components(config))


def load_reference_pipeline(path: str | None = None, torch_dtype: torch.dtype = torch.float32, device=None):
    """Load the trained reference pipeline (offline) from ``path`` or the shipped weights."""
    from diffusers import WanPipeline

    from accel.pipelines.loading import load_pipeline

    path = path or WEIGHTS_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"no trained reference pipeline at {path} (expected model_index.json); "
            "train one with: python -m accel.pipelines.reference.train --out DIR")
    pipe = load_pipeline(path, "reference weights", WanPipeline, dtype=torch_dtype)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def generate(pipe, prompt=None, seed=None, **overrides):
    """Run ``pipe`` with REFERENCE_DEFAULTS (overridable); returns (T, H, W, 3) float frames in [0, 1]."""
    kwargs = dict(REFERENCE_DEFAULTS)
    kwargs.update(overrides)
    if prompt is not None:
        kwargs["prompt"] = prompt
    seed = kwargs.pop("seed") if seed is None else seed
    kwargs.pop("seed", None)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return pipe(generator=generator, output_type="np", **kwargs).frames[0]


# ---------------------------------------------------------------- whole-clip VAE passes


def _full_sequence_resample(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006 - mirrors Wan's signature
    """WanResample over a whole clip at once.  Wan's chunked, cached encode/decode
    equals this: down-sampling keeps frame 0 and runs the stride-2 time conv over
    all frames; up-sampling keeps frame 0 and runs the causal time conv over frames
    1.. (the cache starts with zeros there).  Verified against vae.encode/decode in
    tests/reference/test_reference_train.py."""
    b, c, t, h, w = x.shape
    if self.mode == "upsample3d" and t > 1:
        y = self.time_conv(x[:, :, 1:]).reshape(b, 2, c, t - 1, h, w)
        y = torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c, 2 * (t - 1), h, w)
        x = torch.cat([x[:, :, :1], y], 2)
    t = x.shape[2]
    x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    x = x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)
    if self.mode == "downsample3d" and t > 1:
        x = torch.cat([x[:, :, :1], self.time_conv(x)], 2)
    return x


@contextlib.contextmanager
def single_pass(vae):
    """Run the Wan VAE's encoder/decoder over whole clips (one call instead of one per
    chunk): several times faster to train, same numbers.  Instance-level patch, undone on exit."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    mods = [m for m in vae.modules() if isinstance(m, WanResample)]
    for m in mods:
        m.forward = types.MethodType(_full_sequence_resample, m)
    try:
        yield vae
    finally:
        for m in mods:
            del m.forward


def fast_encode(vae, x):
    """``vae.encode(x).latent_dist`` computed in one pass (train.py uses it)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if vae.config.patch_size:
        x = patchify(x, patch_size=vae.config.patch_size)
    with single_pass(vae):
        return DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(x)))


def fast_decode(vae, z, clamp: bool = True) -> torch.Tensor:
    """``vae.decode(z).sample`` computed in one pass; ``clamp=False`` keeps training gradients."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    with single_pass(vae):
        # first_chunk: the residual VAE's duplicate-shortcut drops the copies that frame 0
        # does not have; over a whole clip that is exactly its first frame at each level
        out = vae.decoder(vae.post_quant_conv(z), first_chunk=True)
    if vae.config.patch_size:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1, 1) if clamp else out


def zero_init_residual_branches(module: torch.nn.Module) -> None:
    """Zero the last layer of every residual branch of a Wan VAE, so that training starts
    from the shortcuts alone (the usual ResNet trick; diffusers initialises them randomly)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock

    for m in module.modules():
        last = m.conv2 if isinstance(m, WanResidualBlock) else m.proj if isinstance(m, WanAttentionBlock) else None
        if last is not None:
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
