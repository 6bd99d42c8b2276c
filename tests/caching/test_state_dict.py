"""A cache leaves the model's names alone: state_dict keys, load_state_dict, save_pretrained, LoRA."""
import pytest
import torch

import accel
from accel.caching import FixedCacheConfig
from accel.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs

NEVER_REUSES = FixedCacheConfig(interval=1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_keys_and_module_names_are_unchanged_while_attached(family):
    pipe = build_tiny_pipeline(family)
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module) and hasattr(m, "config")]
    before = [(list(m.state_dict()), [n for n, _ in m.named_modules()]) for m in models]
    with accel.patched(pipe, cache=FixedCacheConfig(interval=2)):
        assert [(list(m.state_dict()), [n for n, _ in m.named_modules()]) for m in models] == before


def test_load_state_dict_and_save_pretrained_round_trip_while_attached(tmp_path):
    patched, donor = build_tiny_pipeline("wan", seed=0).transformer, build_tiny_pipeline("wan", seed=1).transformer
    with accel.patched(patched, cache=FixedCacheConfig(interval=2)):
        patched.load_state_dict(donor.state_dict(), strict=True)
        patched.save_pretrained(str(tmp_path / "saved"))
    reloaded = type(donor).from_pretrained(str(tmp_path / "saved"))
    for name, value in donor.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
        assert torch.equal(patched.state_dict()[name], value), name


def lora_weights(transformer, rank=4, seed=0):
    """A LoRA state dict in diffusers' pipeline key format for every self-attention q/k/v projection."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v")):
            weights[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.2
            weights[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.2
    assert weights
    return weights


def frames(pipe):
    return torch.as_tensor(pipe(**tiny_call_kwargs("wan", seed=0, steps=2)).frames)


def test_lora_loads_into_a_patched_transformer_as_into_an_unpatched_one():
    """diffusers' own LoRA loading (its PEFT integration; peft is a test dependency)."""
    plain, patched = build_tiny_pipeline("wan"), build_tiny_pipeline("wan")
    without_lora = frames(plain)
    plain.load_lora_weights(lora_weights(plain.transformer), adapter_name="probe")
    with accel.patched(patched, cache=NEVER_REUSES):
        patched.load_lora_weights(lora_weights(patched.transformer), adapter_name="probe")
        with_lora = frames(patched)
    assert not torch.equal(with_lora, without_lora), "the LoRA changes the output"
    assert torch.equal(with_lora, frames(plain))
