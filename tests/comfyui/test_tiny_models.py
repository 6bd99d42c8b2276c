"""The tiny native checkpoints of every family load into ComfyUI's own classes and sample reproducibly."""
import pytest
import torch

from accel.comfyui.tiny import TINY_MODELS, load_tiny, sample_family, save_tiny


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def loaded(request, comfy, tmp_path_factory):
    family = request.param
    path = save_tiny(family, str(tmp_path_factory.mktemp(family) / f"{family}.safetensors"))
    return family, load_tiny(family, path)


def test_detected_as_the_family_class(loaded):
    family, model = loaded
    assert type(model.model.diffusion_model).__name__ == TINY_MODELS[family].class_name


def test_sampling_is_finite_shaped_and_seeded(loaded):
    family, model = loaded
    first, again, other = (sample_family(model, family, steps=4, seed=seed) for seed in (0, 0, 1))
    assert first.shape == TINY_MODELS[family].shapes["small"]
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_large_shape_leaves_room_for_128_token_blocks():
    for tiny in TINY_MODELS.values():
        assert tiny.tokens("large") >= 1024 and tiny.tokens("small") <= 256
