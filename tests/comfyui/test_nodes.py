"""accel's nodes on a tiny native Wan in a real ComfyUI, in this process: KSampler's own sampling path."""
import logging

import pytest
import torch

from accel.comfyui.host import HOLDER_KEY
from accel.comfyui.nodes import INPUTS, legacy_nodes, patch, v3_nodes
from accel.comfyui.tiny import sample, save_tiny_wan

LARGE = (1, 16, 5, 32, 32)  # 5 x 16 x 16 = 1,280 tokens: ten 128-token blocks, room for sparsity


@pytest.fixture(scope="module")
def wan(comfy, tmp_path_factory):
    path = save_tiny_wan(str(tmp_path_factory.mktemp("models") / "tiny_wan.safetensors"))
    return comfy.sd.load_diffusion_model(path)


def reports(model):
    return model.model_options["transformer_options"][HOLDER_KEY].reports


def test_caching_presets_skip_steps_and_report_them_and_the_input_model_stays_exact(wan):
    reference = sample(wan)
    for preset in ("quality", "balanced", "fast"):
        patched = patch("AccelPatchModel", wan, preset=preset)
        assert patched is not wan
        out = sample(patched)
        (report,) = reports(patched)
        counters = report["methods"]["cache"]["counters"]
        # KSampler batches cond and uncond in one call: one branch, 8 calls
        assert counters["calls"] == {"cond_uncond": 8} and counters["steps_reused"]["cond_uncond"] > 0, preset
        assert counters["compute_fraction"] < 1.0 and report["steps"] == 8
        assert torch.isfinite(out).all() and not torch.equal(out, reference), preset
    assert torch.equal(sample(wan), reference), "the unpatched MODEL must produce what it produced"


def test_dense_preset_routes_every_self_attention_exactly(wan):
    reference = sample(wan)
    patched = patch("AccelPatchModel", wan, preset="dense")
    assert torch.equal(sample(patched), reference)
    counters = reports(patched)[-1]["methods"]["attention"]["counters"]
    assert counters["calls"] == 4 * 8 and counters["fallback_calls"] == 0  # 4 blocks x 8 steps


def test_attention_runs_sparse_where_the_token_count_allows_and_logs_the_run(wan, caplog):
    reference = sample(wan, shape=LARGE)
    patched = patch("AccelAttention", wan, attention="radial", density=0.3)
    with caplog.at_level(logging.INFO, logger="accel.comfyui"):
        out = sample(patched, shape=LARGE)
    counters = reports(patched)[-1]["methods"]["attention"]["counters"]
    assert counters["fallback_calls"] == 0 and counters["sparse_calls"] > 0 and counters["mean_density"] < 0.9
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert any("radial attention: 32 calls, 0 fell back" in r.message for r in caplog.records), caplog.text
    assert torch.equal(sample(wan, shape=LARGE), reference)


def test_nodes_chain_and_keep_both_parts(wan):
    both = patch("AccelAttention", patch("AccelCache", wan, cache="fixed"), attention="radial", density=0.5)
    sample(both)
    methods = reports(both)[-1]["methods"]
    assert methods["cache"]["name"] == "fixed" and methods["attention"]["name"] == "radial"
    assert sum(methods["cache"]["counters"]["steps_reused"].values()) > 0


def test_two_expert_workflows_keep_separate_state(comfy, tmp_path):
    """Wan 2.2 style: a high-noise and a low-noise model, each patched, sampling one part of the
    steps each (KSamplerAdvanced's start/end steps)."""
    high = comfy.sd.load_diffusion_model(save_tiny_wan(str(tmp_path / "high.safetensors"), seed=1))
    low = comfy.sd.load_diffusion_model(save_tiny_wan(str(tmp_path / "low.safetensors"), seed=2))
    high, low = patch("AccelPatchModel", high, preset="fast"), patch("AccelPatchModel", low, preset="fast")
    latent = sample(high, steps=8, last_step=4)
    sample(low, steps=8, start_step=4, latent=latent)
    (high_run,), (low_run,) = reports(high), reports(low)
    assert high_run["steps"] == 4 and low_run["steps"] == 4
    for run in (high_run, low_run):
        counters = run["methods"]["cache"]["counters"]
        assert counters["calls"] == {"cond_uncond": 4} and counters["steps_reused"]["cond_uncond"] > 0
    assert reports(high) is not reports(low)


def test_v3_and_legacy_nodes_are_the_same_nodes(comfy):
    v3 = {node.define_schema().node_id: node.define_schema() for node in v3_nodes()}
    assert set(v3) == set(INPUTS) == {"AccelPatchModel", "AccelCache", "AccelAttention"}
    assert v3["AccelPatchModel"].display_name == "accel: patch model"
    legacy = legacy_nodes()
    for node, schema in v3.items():
        assert [i.id for i in schema.inputs] == list(legacy[node].INPUT_TYPES()["required"]), node


@pytest.mark.parametrize("values, message", [
    (dict(preset="turbo"), "unknown preset 'turbo'; valid presets: dense, quality, balanced, fast, off"),
    (dict(preset="off", attention="radial", density=1.5), "RadialConfig.density must be in"),
    (dict(preset="off", cache="fixed", threshold=0.3), "threshold does not apply to 'fixed'"),
    (dict(preset="quality", start_percent=0.8, end_percent=0.2), "start_percent and end_percent must satisfy"),
])
def test_bad_inputs_are_clear_errors_before_sampling(wan, values, message):
    with pytest.raises(ValueError, match=message):
        patch("AccelPatchModel", wan, **values)


def test_an_unsupported_model_passes_through_with_one_warning(comfy, caplog):
    """A ComfyUI model accel does not serve is returned as it is (no clone, nothing patched)."""
    import comfy.model_patcher

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(4, 4)

    model = comfy.model_patcher.ModelPatcher(Holder(), torch.device("cpu"), torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="accel.comfyui"):
        assert patch("AccelPatchModel", model, preset="quality") is model
    assert ("Linear is not a model accel serves in ComfyUI (supported: wan (WanModel), flux (Flux), "
            "hunyuan_video (HunyuanVideo), ltx (LTXVModel)); passed through unchanged") in caplog.text
