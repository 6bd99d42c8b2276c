"""The published configurations of every supported model, layers cut down, patched and checked.

Each transformer is built from its published ``config.json`` (embedded below with its source;
widths, heads, channels, patch sizes and extra embeddings as published) with two blocks (one
double and one single block for HunyuanVideo and FLUX), on random weights in bf16 (fp32 where
diffusers keeps modules in fp32), and run as a bare transformer on a small token grid for a few
decreasing timesteps, with inputs shaped as each family's pipeline passes them. Checks: dense attention through
accel equals the unpatched model bit for bit; every cache rule runs and reuses; every grid pattern
runs sparse where the shape allows (else falls back, with its reason); ``remove()`` is exact.

Weights are a tiled random pattern rather than a full random init: a 14B-wide block has 0.4B
parameters, and filling them from one short random vector takes a fraction of the time; the
checks are about plumbing and exactness, which any finite weights exercise.
"""
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights

import accel
from accel.attention.patterns import SPARSE_PATTERNS
from accel.caching import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig

WAN_COMMON = dict(attention_head_dim=128, cross_attn_norm=True, eps=1e-06, freq_dim=256, patch_size=[1, 2, 2],
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096, out_channels=16)
HUNYUAN_COMMON = dict(attention_head_dim=128, mlp_ratio=4.0, num_attention_heads=24, num_refiner_layers=2,
                      out_channels=16, patch_size=2, patch_size_t=1, pooled_projection_dim=768, qk_norm="rms_norm",
                      rope_axes_dim=[16, 56, 56], rope_theta=256.0, text_embed_dim=4096)
COGVIDEOX_COMMON = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0,
                        flip_sin_to_cos=True, freq_shift=0, in_channels=16, max_text_seq_length=226,
                        norm_elementwise_affine=True, norm_eps=1e-05, out_channels=16, patch_size=2,
                        spatial_interpolation_scale=1.875, temporal_compression_ratio=4,
                        temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512,
                        timestep_activation_fn="silu")
LTX_COMMON = dict(activation_fn="gelu-approximate", attention_bias=True, attention_out_bias=True, caption_channels=4096,
                  in_channels=128, norm_elementwise_affine=False, norm_eps=1e-06, num_attention_heads=32,
                  out_channels=128, patch_size=1, patch_size_t=1, qk_norm="rms_norm_across_heads")
FLUX_COMMON = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                   num_attention_heads=24, patch_size=1, pooled_projection_dim=768)

# name: (class, config as published (layer counts included), source). Sources are the hub's
# config.json (a copy of it where the hub page was read through a mirror) or, where no copy was
# found, diffusers' conversion script that writes it. Identical configs are listed once (Wan 2.2
# T2V-A14B's two experts equal Wan2.1-T2V-14B's; Wan2.2-I2V-A14B's two experts equal each other).
PUBLISHED = {
    "Wan2.1-T2V-1.3B": ("WanTransformer3DModel", dict(
        WAN_COMMON, ffn_dim=8960, in_channels=16, num_attention_heads=12, num_layers=30),
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (verbatim copy)"),
    "Wan2.1-T2V-14B / Wan2.2-T2V-A14B": ("WanTransformer3DModel", dict(
        WAN_COMMON, ffn_dim=13824, in_channels=16, num_attention_heads=40, num_layers=40),
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer_2/config.json; diffusers scripts/convert_wan_to_diffusers.py "
        "'Wan-T2V-14B'"),
    "Wan2.1-I2V-14B-480P": ("WanTransformer3DModel", dict(
        WAN_COMMON, ffn_dim=13824, in_channels=36, num_attention_heads=40, num_layers=40, image_dim=1280,
        added_kv_proj_dim=5120), "diffusers scripts/convert_wan_to_diffusers.py 'Wan-I2V-14B-480p'"),
    "Wan2.1-FLF2V-14B-720P": ("WanTransformer3DModel", dict(
        WAN_COMMON, ffn_dim=13824, in_channels=36, num_attention_heads=40, num_layers=40, image_dim=1280,
        added_kv_proj_dim=5120, pos_embed_seq_len=514),
        "diffusers scripts/convert_wan_to_diffusers.py 'Wan-FLF2V-14B-720P'"),
    "Wan2.2-I2V-A14B": ("WanTransformer3DModel", dict(
        WAN_COMMON, ffn_dim=13824, in_channels=36, num_attention_heads=40, num_layers=40),
        "diffusers scripts/convert_wan_to_diffusers.py 'Wan2.2-I2V-14B-720p' (both experts)"),
    "Wan2.2-TI2V-5B": ("WanTransformer3DModel", dict(
        WAN_COMMON, ffn_dim=14336, in_channels=48, num_attention_heads=24, num_layers=30, out_channels=48),
        "diffusers scripts/convert_wan_to_diffusers.py 'Wan2.2-TI2V-5B'"),
    "Wan2.1-VACE-1.3B": ("WanVACETransformer3DModel", dict(
        WAN_COMMON, ffn_dim=8960, in_channels=16, num_attention_heads=12, num_layers=30, vace_in_channels=96,
        vace_layers=list(range(0, 30, 2))), "Wan-AI/Wan2.1-VACE-1.3B-diffusers transformer/config.json (copy)"),
    "Wan2.1-VACE-14B": ("WanVACETransformer3DModel", dict(
        WAN_COMMON, ffn_dim=13824, in_channels=16, num_attention_heads=40, num_layers=40, vace_in_channels=96,
        vace_layers=list(range(0, 40, 5))), "Wan-AI/Wan2.1-VACE-14B-diffusers transformer/config.json (copy)"),
    "HunyuanVideo": ("HunyuanVideoTransformer3DModel", dict(
        HUNYUAN_COMMON, guidance_embeds=True, in_channels=16, num_layers=20, num_single_layers=40),
        "hunyuanvideo-community/HunyuanVideo transformer/config.json (copy)"),
    "HunyuanVideo-I2V-33ch": ("HunyuanVideoTransformer3DModel", dict(
        HUNYUAN_COMMON, guidance_embeds=False, image_condition_type="latent_concat", in_channels=33, num_layers=20,
        num_single_layers=40), "diffusers scripts/convert_hunyuan_video_to_diffusers.py 'HYVideo-T/2-I2V-33ch'"),
    "HunyuanVideo-I2V": ("HunyuanVideoTransformer3DModel", dict(
        HUNYUAN_COMMON, guidance_embeds=True, image_condition_type="token_replace", in_channels=16, num_layers=20,
        num_single_layers=40), "diffusers scripts/convert_hunyuan_video_to_diffusers.py 'HYVideo-T/2-I2V-16ch'"),
    "CogVideoX-2b": ("CogVideoXTransformer3DModel", dict(
        COGVIDEOX_COMMON, num_attention_heads=30, num_layers=30, sample_frames=49, sample_height=60, sample_width=90),
        "THUDM/CogVideoX-2b transformer/config.json"),
    "CogVideoX-5b": ("CogVideoXTransformer3DModel", dict(
        COGVIDEOX_COMMON, num_attention_heads=48, num_layers=42, sample_frames=49, sample_height=60, sample_width=90,
        use_rotary_positional_embeddings=True), "THUDM/CogVideoX-5b transformer/config.json (copy)"),
    "CogVideoX1.5-5B": ("CogVideoXTransformer3DModel", dict(
        COGVIDEOX_COMMON, num_attention_heads=48, num_layers=42, sample_frames=81, sample_height=300,
        sample_width=300, patch_size_t=2, patch_bias=False, use_rotary_positional_embeddings=True),
        "diffusers scripts/convert_cogvideox_to_diffusers.py version 1.5"),
    "LTX-Video-0.9.1": ("LTXVideoTransformer3DModel", dict(
        LTX_COMMON, attention_head_dim=64, cross_attention_dim=2048, num_layers=28),
        "Lightricks/LTX-Video transformer/config.json (0.9.0/0.9.1)"),
    "LTX-Video-0.9.7-13B": ("LTXVideoTransformer3DModel", dict(
        LTX_COMMON, attention_head_dim=128, cross_attention_dim=4096, num_layers=48),
        "Lightricks/LTX-Video-0.9.7-dev transformer/config.json"),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(FLUX_COMMON, num_layers=19, num_single_layers=38),
                   "black-forest-labs/FLUX.1-dev transformer/config.json (copy)"),
    "FLUX.1-Kontext-dev": ("FluxTransformer2DModel", dict(
        FLUX_COMMON, num_layers=19, num_single_layers=38, axes_dims_rope=[16, 56, 56], out_channels=None),
        "black-forest-labs/FLUX.1-Kontext-dev transformer/config.json (copy)"),
}
# The widest (5120, 0.4B parameters a block): about a minute of CPU together. They run in CI while
# the suite stays within its budget; ``-m "not widest"`` skips them.
WIDEST = {"Wan2.1-T2V-14B / Wan2.2-T2V-A14B", "Wan2.1-I2V-14B-480P", "Wan2.1-FLF2V-14B-720P", "Wan2.2-I2V-A14B",
          "Wan2.1-VACE-14B"}
DTYPE = torch.bfloat16  # what these models run in; also 3x faster than fp32 on this CPU
TIMESTEPS = (900.0, 700.0, 500.0)  # enough for every rule to reuse once (EasyCache learns from two)
GRID = (2, 4, 6)  # latent frames, rows, columns of tokens after patching
TEXT = 8


def cut_down(cls_name, config):
    config = dict(config, num_layers=2)
    if cls_name in ("HunyuanVideoTransformer3DModel", "FluxTransformer2DModel"):
        config.update(num_layers=1, num_single_layers=1)
    if cls_name == "HunyuanVideoTransformer3DModel":
        config["num_refiner_layers"] = 1
    if cls_name == "WanVACETransformer3DModel":
        config["vace_layers"] = [0]
    return config


def build(cls_name, config, dtype=DTYPE):
    """The model in ``dtype`` (its ``_keep_in_fp32_modules`` in fp32, as ``from_pretrained`` keeps
    them), every parameter filled from one seeded random vector, tiled: fast and finite."""
    import diffusers

    with init_empty_weights(include_buffers=False):
        model = getattr(diffusers, cls_name)(**config)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    pattern = torch.randn(100_003, generator=torch.Generator().manual_seed(0)) * 0.02
    for index, (module_name, module) in enumerate(model.named_modules()):
        in_fp32 = any(part in keep_fp32 for part in module_name.split("."))
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            value = torch.empty(param.shape, dtype=torch.float32 if in_fp32 else dtype)
            if "norm" in name or "norm" in module_name:  # unit scale, zero shift
                value.fill_(1.0 if name == "weight" else 0.0)
            else:
                flat, tile = value.view(-1), pattern.roll(-(index * 7919) % pattern.numel())
                whole = flat.numel() // tile.numel() * tile.numel()
                flat[:whole].view(-1, tile.numel()).copy_(tile.expand(whole // tile.numel(), -1))
                flat[whole:].copy_(tile[:flat.numel() - whole])
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval()


def inputs(model, timestep, reference_image=False):
    """One call's keyword arguments on the small grid, as the family's pipeline would pass them
    (``reference_image``: FLUX Kontext's reference-image tokens after the generated image's)."""
    cls_name, config = type(model).__name__, model.config
    frames, rows, cols = GRID
    generator = torch.Generator().manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    # the latents change from call to call as in a denoising loop; the conditioning does not
    latent_generator = torch.Generator().manual_seed(int(timestep))
    noisy = lambda *shape: torch.randn(*shape, generator=latent_generator)  # noqa: E731
    if cls_name.startswith("Wan"):
        p_t, p_h, p_w = config.patch_size
        kwargs = dict(hidden_states=noisy(1, config.in_channels, frames * p_t, rows * p_h, cols * p_w),
                      timestep=torch.tensor([timestep]), encoder_hidden_states=randn(1, TEXT, config.text_dim))
        if config.image_dim:  # CLIP image tokens; FLF2V passes first and last frame's 257 each, as a batch of 2
            frames_given = 2 if config.pos_embed_seq_len else 1
            kwargs["encoder_hidden_states_image"] = randn(frames_given, (config.pos_embed_seq_len or 8) // frames_given,
                                                          config.image_dim)
        if cls_name == "WanVACETransformer3DModel":
            kwargs["control_hidden_states"] = randn(1, config.vace_in_channels, *kwargs["hidden_states"].shape[2:])
        return kwargs
    if cls_name == "HunyuanVideoTransformer3DModel":
        p = config.patch_size
        return dict(hidden_states=noisy(1, config.in_channels, frames, rows * p, cols * p),
                    timestep=torch.tensor([timestep]), encoder_hidden_states=randn(1, TEXT, config.text_embed_dim),
                    encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.bool),
                    pooled_projections=randn(1, config.pooled_projection_dim),
                    guidance=torch.tensor([6000.0]) if config.guidance_embeds else None)
    if cls_name == "CogVideoXTransformer3DModel":
        from diffusers import CogVideoXPipeline

        p, p_t = config.patch_size, config.patch_size_t or 1
        latent_frames = frames * p_t
        # the sinusoidal position table of the non-rotary models spans all max_text_seq_length tokens
        text = TEXT if config.use_rotary_positional_embeddings else config.max_text_seq_length
        kwargs = dict(hidden_states=noisy(1, latent_frames, config.in_channels, rows * p, cols * p),
                      encoder_hidden_states=randn(1, text, config.text_embed_dim),
                      timestep=torch.tensor([int(timestep)]))
        if config.use_rotary_positional_embeddings:  # computed by the pipeline, with diffusers' own code
            fake = SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
            kwargs["image_rotary_emb"] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                fake, rows * p * 8, cols * p * 8, latent_frames, torch.device("cpu"))
        return kwargs
    if cls_name == "LTXVideoTransformer3DModel":
        return dict(hidden_states=noisy(1, frames * rows * cols, config.in_channels),
                    encoder_hidden_states=randn(1, TEXT, config.caption_channels), timestep=torch.tensor([timestep]),
                    encoder_attention_mask=torch.ones(1, TEXT), num_frames=frames, height=rows, width=cols,
                    rope_interpolation_scale=(8 / 25, 32, 32))
    # FLUX: packed 2x2 latents and their (index, row, column) ids; Kontext appends a reference image
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(rows, dtype=torch.float32),
                                     torch.arange(cols, dtype=torch.float32), indexing="ij"), -1)
    ids = ids.reshape(-1, 3)
    if reference_image:
        ids = torch.cat([ids, ids + torch.tensor([1.0, 0, 0])])
    return dict(hidden_states=noisy(1, ids.shape[0], config.in_channels),
                encoder_hidden_states=randn(1, TEXT, config.joint_attention_dim),
                pooled_projections=randn(1, config.pooled_projection_dim), timestep=torch.tensor([timestep / 1000]),
                img_ids=ids, txt_ids=torch.zeros(TEXT, 3), guidance=torch.tensor([3.5]))


# What pipelines pass in the transformer's dtype; timesteps, ids, masks and rotary tables stay as they are.
IN_MODEL_DTYPE = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image", "control_hidden_states",
                  "pooled_projections")


def runner(model, reference_image=False):
    def call(timestep):
        kwargs = inputs(model, timestep, reference_image)
        return {k: v.to(DTYPE) if k in IN_MODEL_DTYPE else v for k, v in kwargs.items()}

    def run(calls=len(TIMESTEPS)):
        with torch.no_grad():
            return [model(**call(t), return_dict=False)[0] for t in TIMESTEPS[:calls]]
    return run


def cache_rules(model):
    """One config per registered rule, loose enough to reuse within the three calls."""
    flat = {"kind": "magcache", "model_class": type(model).__name__, "num_steps": len(TIMESTEPS),
            "ratios": {"cond": [1.0] * len(TIMESTEPS)}}
    return {"teacache": TeaCacheConfig(threshold=1e6, warmup_steps=1), "fbcache": FBCacheConfig(threshold=1e3),
            "magcache": MagCacheConfig(threshold=0.5, calibration=flat, warmup_ratio=0.0),
            "easycache": EasyCacheConfig(threshold=1e3, warmup_ratio=0.0, warmup_steps=1),
            "fixed": FixedCacheConfig(interval=2)}


def patterns():
    for name, pattern in SPARSE_PATTERNS.items():
        extra = {"similarity_threshold": -1.0} if name == "topk" else {"q_clusters": 4, "k_clusters": 4} \
            if name == "cluster" else {}
        yield name, pattern.Config(density=0.3, block_size=16, backend="torch", dense_warmup=0.0, dense_layers=0,
                                   **extra)


CASES = [pytest.param(name, marks=pytest.mark.widest) if name in WIDEST else name for name in PUBLISHED]


@pytest.mark.parametrize("name", CASES)
def test_published_configuration(name):
    cls_name, config, _ = PUBLISHED[name]
    model = build(cls_name, cut_down(cls_name, config))
    run = runner(model, reference_image="Kontext" in name)
    reference = run()
    assert all(torch.isfinite(out).all() for out in reference)

    with accel.patched(model, attention="dense") as handle:
        dense = run()
        assert handle.summary()["methods"]["attention"]["counters"]["calls"] > 0
    assert all(torch.equal(a, b) for a, b in zip(dense, reference)), "dense attention through accel is exact"

    assert set(cache_rules(model)) == set(accel.list_all()["methods"]["cache"])
    for rule, cache in cache_rules(model).items():
        with accel.patched(model, cache=cache) as handle:
            outputs = run()
            reused = handle.summary()["methods"]["cache"]["counters"]["steps_reused"]
        assert sum(reused.values()) > 0, (rule, reused)
        assert all(torch.isfinite(out).all() for out in outputs), rule

    for pattern, attention in patterns():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with accel.patched(model, attention=attention) as handle:
                outputs = run(calls=2)
                counters = handle.summary()["methods"]["attention"]["counters"]
        assert all(torch.isfinite(out).all() for out in outputs), pattern
        messages = [str(w.message) for w in caught if "accel" in str(w.message)]
        if counters["fallback_calls"]:  # the shape does not allow it: one frame, or no single grid
            assert counters["fallback_calls"] == counters["calls"] and len(messages) == 1, (pattern, messages)
            assert "needs a token grid" in messages[0] or "needs at least 2 frames" in messages[0], messages
        else:
            assert counters["sparse_calls"] == counters["calls"] > 0 and not messages, (pattern, counters, messages)

    assert all(torch.equal(a, b) for a, b in zip(run(), reference)), "remove() restores the exact output"
