"""The reference model's build, training conventions and a tiny end-to-end training run."""

import json
import os

import pytest
import torch

from accel.pipelines.reference import build, data, text
from accel.pipelines.reference import train as T

TINY = {"vae_base_dim": 4, "vae_z_dim": 4, "num_heads": 1, "head_dim": 32, "ffn_dim": 32, "num_layers": 1,
        "text_d_model": 16, "text_d_ff": 32, "text_heads": 2, "text_layers": 1}
# A whole training run in seconds: 2 steps per stage on 5-frame 16x32 clips of the TINY model.
TINY_RUN = ["--device", "cpu", "--max-steps", "2", "--num-frames", "5", "--height", "16", "--width", "32",
            "--vae-batch", "1", "--dit-batch", "2", "--dataset-clips", "2", "--encode-batch", "2",
            "--dit-mix", "1:2:0.5,2:1:0.5", "--eval-prompts", "0", "--config", json.dumps(TINY)]


def test_default_config_gives_at_least_1024_video_tokens():
    cfg = build.ReferenceConfig()
    d = build.REFERENCE_DEFAULTS
    latent = ((d["num_frames"] - 1) // 4 + 1, d["height"] // cfg.spatial_factor, d["width"] // cfg.spatial_factor)
    pt, ph, pw = cfg.patch_size
    tokens = (latent[0] // pt) * (latent[1] // ph) * (latent[2] // pw)
    assert latent == (8, 8, 16) and tokens == 1024
    assert cfg.head_dim in (64, 128)  # what the attention kernels target


@pytest.mark.parametrize("residual", [True, False], ids=["wan2.2-residual", "wan2.1"])
def test_single_pass_vae_equals_the_chunked_wan_path(residual):
    torch.manual_seed(0)
    cfg = build.ReferenceConfig(vae_base_dim=4, vae_z_dim=4, vae_residual=residual, vae_patch=2 if residual else 1,
                                vae_dim_mult=(1, 2, 2) if residual else (1, 2, 4))
    vae = build.build_components(cfg)["vae"].eval()
    build.zero_init_residual_branches(vae)
    with torch.no_grad():  # move off the initialisation so every layer matters
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(2, 3, 9, 16, 32) * 2 - 1  # first chunk + two cached chunks
    f = cfg.spatial_factor
    z = torch.randn(2, 4, 4, 16 // f, 32 // f)
    with torch.no_grad():
        ref_enc = vae.encode(x).latent_dist.mean
        ref_dec = vae.decode(z).sample
        fast_enc = build.fast_encode(vae, x).mean
        fast_dec = build.fast_decode(vae, z)
    assert torch.allclose(ref_enc, fast_enc, atol=1e-4)
    assert torch.allclose(ref_dec, fast_dec, atol=1e-4)
    assert "forward" not in vars(next(m for m in vae.modules() if type(m).__name__ == "WanResample"))


def _tiny_pipe():
    torch.manual_seed(0)
    return build.build_reference_pipeline(build.ReferenceConfig(**TINY))


def test_training_text_embeddings_equal_the_pipeline_ones():
    pipe = _tiny_pipe()
    prompts = [data.caption(data.all_specs()[5]), ""]
    expected, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                     max_sequence_length=text.TEXT_LEN)
    ids, mask = text.caption_tokens(pipe.tokenizer, prompts, "cpu")
    with torch.no_grad():
        got = text.encode_text(pipe.text_encoder, ids, mask)
    assert got.shape == expected.shape == (2, 512, TINY["text_d_model"])
    assert torch.allclose(got, expected, atol=1e-6)


def test_folded_text_padding_computes_the_pipelines_cross_attention():
    """Training folds the ~500 identical zero pads into one biased key; the transformer
    must compute the same function as on the pipeline's 512-token embeddings."""
    pipe = _tiny_pipe()
    with torch.no_grad():  # off the initialisation, so the pads' share of attention matters
        for p in pipe.transformer.parameters():
            p.normal_(0, 0.3)
    ids, mask = text.caption_tokens(pipe.tokenizer, [data.caption(data.all_specs()[7]), ""], "cpu")
    x, t = torch.randn(2, 4, 2, 2, 4), torch.tensor([250.0, 900.0])
    originals = [b.attn2.processor for b in pipe.transformer.blocks]

    def run(text_len):
        with torch.no_grad():
            embeds = text.encode_text(pipe.text_encoder, ids, mask, text_len)
            return pipe.transformer(x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]

    padded, short = run(text.TEXT_LEN), run(text.TOKEN_LEN + 1)
    with text.folded_text_padding(pipe.transformer) as text_len:
        folded = run(text_len)
    assert text_len == text.TOKEN_LEN + 1
    assert torch.allclose(folded, padded, rtol=1e-4, atol=1e-4 * padded.abs().max())
    assert not torch.allclose(short, padded, rtol=1e-2, atol=1e-2 * padded.abs().max())  # the fold is what matters
    assert [b.attn2.processor for b in pipe.transformer.blocks] == originals


def _padding_share(transformer, embeds, n_real):
    """Mean share of each cross-attention's softmax that falls on the zero pads, for
    LayerNorm-like video-token queries (Wan's cross-attention: q/k RMS-normed, no RoPE)."""
    hidden = torch.randn(1, 64, transformer.config.num_attention_heads * transformer.config.attention_head_dim,
                         generator=torch.Generator().manual_seed(0))
    shares = []
    with torch.no_grad():
        context = transformer.condition_embedder.text_embedder(embeds)
        for block in transformer.blocks:
            attn = block.attn2
            q = attn.norm_q(attn.to_q(hidden)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            k = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            shares.append(weights[..., n_real:].sum(-1).mean().item())
    return shares


def test_cross_attention_starts_past_the_prompt_padding():
    pipe = build.build_reference_pipeline()  # the real reference shape: 512-token prompts, head dim 64
    ids, mask = text.caption_tokens(pipe.tokenizer, [data.caption(data.all_specs()[3])], "cpu")
    with torch.no_grad():
        embeds = text.encode_text(pipe.text_encoder, ids, mask)
    n_real = int(mask.sum())
    before = _padding_share(pipe.transformer, embeds, n_real)
    text.init_attention_past_padding(pipe.transformer, torch.Generator().manual_seed(0))
    after = _padding_share(pipe.transformer, embeds, n_real)
    assert min(before) > 0.8, before  # why the initialisation exists
    assert max(after) < 0.05, after
    x = torch.randn(1, 16, 2, 8, 16)
    with torch.no_grad():
        out = pipe.transformer(x, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds, return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("which", ["pipeline", "euler"])
def test_training_target_matches_the_schedulers_convention(which):
    """A model that returns the exact velocity noise - x0 of a single data point
    (= (x_t - x0) / sigma) must lead the sampler to x0: this pins the training
    target, its sign and timestep = 1000 * sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = _tiny_pipe().scheduler if which == "pipeline" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.manual_seed(0)
    x0 = torch.randn(1, 4, 2, 4, 8)
    lat = torch.randn_like(x0)
    sched.set_timesteps(12)
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        assert abs(float(t) / 1000 - float(sigma)) < 2e-3  # the model sees 1000 * sigma
        lat = sched.step((lat - x0) / sigma, t, lat, return_dict=False)[0]
    assert torch.allclose(lat, x0, atol=1e-4)


def test_load_reference_pipeline_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        build.load_reference_pipeline(str(tmp_path))


def test_tiny_training_run_writes_a_loadable_pipeline(tmp_path):
    from diffusers import WanPipeline

    out = tmp_path / "ref"
    log = T.main(["--out", str(out), *TINY_RUN])
    assert log["vae"]["steps"] == 2 and log["dit"]["steps"] == 2
    saved = json.load(open(out / "train_log.json"))
    assert saved["seed"] == 0 and "wall_seconds" in saved and saved["dataset"]["latent_shape"] == [4, 2, 2, 4]
    pipe = WanPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.vae.config.latents_std == saved["dataset"]["latents_std"]
    frames = build.generate(pipe, data.caption(data.held_out_specs()[0]), height=16, width=32,
                            num_frames=5, num_inference_steps=2)
    assert frames.shape == (5, 16, 32, 3) and 0 <= frames.min() and frames.max() <= 1
    assert os.path.getsize(out / "transformer" / "diffusion_pytorch_model.safetensors") < 25e6


def test_training_resumes_from_a_saved_vae(tmp_path):
    first = T.main(["--out", str(tmp_path / "a"), "--stop-after", "vae", *TINY_RUN])
    assert "dit" not in first and (tmp_path / "a" / "vae" / "config.json").is_file()
    resumed = T.main(["--out", str(tmp_path / "b"), "--vae-from", str(tmp_path / "a"), *TINY_RUN])
    assert resumed["vae"]["steps"] == 2 and resumed["vae"]["loaded_from"] == str(tmp_path / "a")
    assert "--stop-after vae" in resumed["vae"]["command"]  # the log names both commands of the recipe
    assert resumed["dit"]["steps"] == 2
    from diffusers import AutoencoderKLWan

    saved, trained = (AutoencoderKLWan.from_pretrained(str(tmp_path / d / "vae")) for d in ("a", "b"))
    for (name, p), q in zip(saved.named_parameters(), trained.parameters()):
        assert torch.equal(p, q), name  # stage 3 does not touch the VAE
    with pytest.raises(ValueError, match="vae_from"):
        T.main(["--out", str(tmp_path / "c"), "--vae-from", str(tmp_path / "a"), *TINY_RUN,
                "--config", json.dumps({**TINY, "vae_z_dim": 8})])  # argparse: the last --config wins


def test_training_continues_from_a_saved_pipeline(tmp_path):
    from diffusers import WanPipeline

    first = T.main(["--out", str(tmp_path / "a"), *TINY_RUN])
    more = T.main(["--out", str(tmp_path / "b"), "--dit-from", str(tmp_path / "a"), *TINY_RUN, "--seed", "1"])
    assert more["dit_from"]["steps_before"] == 2 and more["dit"]["steps_total"] == 4
    a, b = (WanPipeline.from_pretrained(str(tmp_path / d)) for d in ("a", "b"))
    # the transformer was trained on the first run's latent statistics: they are kept, not refitted
    assert b.vae.config.latents_mean == a.vae.config.latents_mean == first["dataset"]["latents_mean"]
    for p, q in zip(a.vae.parameters(), b.vae.parameters()):
        assert torch.equal(p, q)
    # trained further (every weight moves) from the saved weights, not from a fresh init of seed 1
    for module in ("transformer", "text_encoder"):
        for (name, p), q in zip(getattr(a, module).named_parameters(), getattr(b, module).parameters()):
            if p.abs().max() > 0.01:
                assert 0 < (p - q).abs().max() < 0.1 * p.abs().max(), (module, name)
    with pytest.raises(FileNotFoundError, match="vae"):
        T.main(["--out", str(tmp_path / "c"), "--dit-from", str(tmp_path / "nothing"), *TINY_RUN])
    with pytest.raises(ValueError, match="dit_from"):
        T.main(["--out", str(tmp_path / "c"), "--dit-from", str(tmp_path / "a"), "--vae-from", str(tmp_path / "a"),
                *TINY_RUN])


def test_zero_initialised_transformer_starts_at_zero_velocity_and_still_learns():
    pipe = _tiny_pipe()
    T.zero_init_dit_outputs(pipe.transformer)
    x = torch.randn(1, TINY["vae_z_dim"], 2, 2, 4)
    text = torch.randn(1, 8, TINY["text_d_model"])
    out = pipe.transformer(x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == x.shape and not out.any()
    out.sub(x).pow(2).mean().backward()
    assert pipe.transformer.proj_out.weight.grad.abs().sum() > 0  # the zeroed layers get gradients


@pytest.mark.parametrize("bad", [["--dit-mix", "1:2:0.7"], ["--dit-mix", "1:2"], ["--dit-mix", "0:2:1"]])
def test_bad_dit_mix_is_rejected_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "x", *bad])
    assert "dit_mix" in capsys.readouterr().err


def test_vae_clip_length_must_follow_the_chunking(tmp_path):
    with pytest.raises(ValueError, match="vae_frames"):
        T.main(["--out", str(tmp_path), *TINY_RUN, "--vae-frames", "6"])
