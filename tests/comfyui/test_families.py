"""Every ComfyUI family accel serves, on its tiny native model in a real ComfyUI: dense attention
through accel is exact, a caching preset skips, a sparse pattern runs sparse at a size that allows
it, and the unpatched model is untouched."""
import pytest
import torch

from accel.comfyui.families import COMFY_FAMILIES
from accel.comfyui.host import HOLDER_KEY
from accel.comfyui.nodes import patch
from accel.comfyui.tiny import TINY_MODELS, load_tiny, sample_family, save_tiny

TINY_OF = {"wan": "wan", "flux": "flux", "hunyuan_video": "hunyuan_video", "ltx": "ltxv"}  # accel family -> tiny


def test_every_served_family_has_a_tiny_model():
    assert {f.family for _, f in COMFY_FAMILIES.items()} == set(TINY_OF)
    for name, family in COMFY_FAMILIES.items():
        assert TINY_MODELS[TINY_OF[family.family]].class_name == name


@pytest.fixture(scope="module", params=sorted(TINY_OF))
def tiny(request, comfy, tmp_path_factory):
    family = TINY_OF[request.param]
    model = load_tiny(family, save_tiny(family, str(tmp_path_factory.mktemp(family) / "model.safetensors")))
    return family, model


def last_report(model):
    return model.model_options["transformer_options"][HOLDER_KEY].reports[-1]


def blocks(model):
    dm = model.model.diffusion_model
    return len(COMFY_FAMILIES.get(next(c.__name__ for c in type(dm).__mro__ if c.__name__ in COMFY_FAMILIES))
               .block_keys(dm))


def test_dense_attention_through_accel_is_exact(tiny):
    family, model = tiny
    reference = sample_family(model, family, steps=4)
    patched = patch("AccelPatchModel", model, preset="dense")
    assert torch.equal(sample_family(patched, family, steps=4), reference)
    counters = last_report(patched)["methods"]["attention"]["counters"]
    assert counters["calls"] == blocks(model) * 4 and counters["fallback_calls"] == 0


def test_a_caching_preset_skips_and_the_input_model_stays_exact(tiny):
    family, model = tiny
    reference = sample_family(model, family, steps=8)
    patched = patch("AccelPatchModel", model, preset="fast")
    out = sample_family(patched, family, steps=8)
    counters = last_report(patched)["methods"]["cache"]["counters"]
    assert sum(counters["steps_reused"].values()) > 0 and counters["compute_fraction"] < 1.0
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert torch.equal(sample_family(model, family, steps=8), reference)


def test_a_sparse_pattern_runs_sparse_at_a_large_size(tiny):
    family, model = tiny
    patched = patch("AccelAttention", model, attention="tile_window", density=0.3, dense_warmup=0.0)
    out = sample_family(patched, family, steps=2, size="large")
    counters = last_report(patched)["methods"]["attention"]["counters"]
    assert counters["calls"] == blocks(model) * 2 and counters["fallback_calls"] == 0
    # every call but the first block's (dense_layers=1) is sparse
    assert counters["sparse_calls"] == counters["calls"] - 2 and counters["mean_density"] < 0.9
    assert torch.isfinite(out).all()


def test_a_skip_where_nothing_changed_reproduces_the_full_step(tiny):
    """Every step is run twice, the second time at a sigma one part in a million lower: the cache
    skips exactly those repeats, and what it adds back must be what the blocks would have added
    (ComfyUI's Flux, HunyuanVideo and LTXV blocks add into their inputs in place; a cache that
    kept those inputs by reference would add back nothing)."""
    import comfy.sample
    import comfy.samplers

    family, model = tiny
    spec = TINY_MODELS[family]
    steps = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 6).tolist()
    sigmas = torch.tensor([s for sigma in steps[:-1] for s in (sigma, sigma * (1 - 1e-6))] + [0.0])
    latent = torch.zeros(spec.shapes["small"])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))

    def run(m):
        return comfy.sample.sample_custom(m, noise, spec.cfg, comfy.samplers.sampler_object("euler"), sigmas,
                                          spec.conditioning(1), spec.conditioning(2), latent, disable_pbar=True, seed=0)

    reference = run(model)
    patched = patch("AccelCache", model, cache="fbcache", threshold=1e-3)
    out = run(patched)
    counters = last_report(patched)["methods"]["cache"]["counters"]
    assert sum(counters["steps_reused"].values()) == 6 and sum(counters["calls"].values()) == 12
    assert float((out - reference).abs().max() / reference.abs().max()) < 1e-4
