"""Tiny offline diffusers pipelines (accel.pipelines.tiny): build, run, shapes,
token grids, determinism; plus the word tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from accel.pipelines.tiny import (
    TINY_FAMILIES,
    TINY_SPECS,
    build_tiny_pipeline,
    build_word_tokenizer,
    tiny_call_kwargs,
)
from accel.pipelines.tiny import hunyuan_video as tiny_hunyuan

# --------------------------------------------------------------------------- tokenizer


def test_word_tokenizer_ids_padding_truncation():
    tok = build_word_tokenizer(["a", "cat", "walks", ","], model_max_length=6)
    assert tok.get_vocab() == {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "walks": 5, ",": 6}
    enc = tok(["A cat, walks", "dog"], padding="max_length", truncation=True, return_tensors="pt")
    assert enc.input_ids.tolist() == [[3, 4, 6, 5, 1, 0], [2, 1, 0, 0, 0, 0]]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    long = tok("a cat walks a cat walks a cat", padding="max_length", max_length=4, truncation=True)
    assert long.input_ids == [3, 4, 5, 1]  # eos kept on truncation
    again = build_word_tokenizer(["a", "cat", "walks", ","], model_max_length=6)
    assert again("a cat").input_ids == tok("a cat").input_ids


def test_word_tokenizer_special_tokens():
    tok = build_word_tokenizer(
        ["system", "a", "cat"],
        bos_token="<s>",
        add_eos_token=False,
        additional_special_tokens=["<|eot_id|>"],
    )
    ids = tok("<|eot_id|>system a cat<|eot_id|>").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "<|eot_id|>", "system", "a", "cat", "<|eot_id|>"]
    with pytest.raises(TypeError):
        build_word_tokenizer(["a"], nonsense=True)


def test_hunyuan_template_crop_lands_on_prompt():
    template = tiny_hunyuan.prompt_template()
    tok = tiny_hunyuan.llama_tokenizer()
    ids = tok(template["template"].format("fox runs")).input_ids
    assert tok.convert_ids_to_tokens(ids[template["crop_start"] :]) == ["fox", "runs", "<|eot_id|>"]


# --------------------------------------------------------------------------- pipelines


def _frames(output) -> torch.Tensor:
    return output.frames if hasattr(output, "frames") else output.images


def _token_grid(family: str, pipe, hidden: torch.Tensor, kwargs: dict) -> tuple[int, ...]:
    """Post-patching token grid seen by the transformer."""
    cfg = pipe.transformer.config
    if family in ("wan", "wan22"):  # (B, C, T, H, W)
        pt, ph, pw = cfg.patch_size
        return (hidden.shape[2] // pt, hidden.shape[3] // ph, hidden.shape[4] // pw)
    if family == "hunyuan_video":  # (B, C, T, H, W)
        p, pt = cfg.patch_size, cfg.patch_size_t
        return (hidden.shape[2] // pt, hidden.shape[3] // p, hidden.shape[4] // p)
    if family == "cogvideox":  # (B, T, C, H, W)
        return (hidden.shape[1], hidden.shape[3] // cfg.patch_size, hidden.shape[4] // cfg.patch_size)
    if family == "ltx":  # packed (B, T*H*W, C)
        grid = (kwargs["num_frames"], kwargs["height"], kwargs["width"])
        assert hidden.shape[1] == math.prod(grid)
        return grid
    if family == "flux":  # packed (B, H*W, C); img_ids holds (0, row, col)
        ids = kwargs["img_ids"]
        return (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    raise AssertionError(family)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_pipeline_runs_and_is_deterministic(family):
    pipe = build_tiny_pipeline(family, seed=0)
    spec = TINY_SPECS[family]
    assert type(pipe).__name__ == spec.pipeline_class

    seen = []  # (module name, token grid, text length) per transformer call

    def watch(name):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs["encoder_hidden_states"]
            seen.append((name, _token_grid(family, pipe, hidden, kwargs), text.shape[1]))

        return hook

    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_pre_hook(watch(name), with_kwargs=True)
            head_dim = module.config.attention_head_dim
            assert head_dim >= 16

    kwargs = tiny_call_kwargs(family, seed=0, steps=3)
    first = _frames(pipe(**kwargs))

    if family == "flux":
        assert first.shape == (1, 3, kwargs["height"], kwargs["width"])
    else:
        vae_t = 8 if family == "ltx" else 4
        num_frames = (kwargs["num_frames"] - 1) // vae_t * vae_t + 1
        assert first.shape == (1, num_frames, 3, kwargs["height"], kwargs["width"])
    assert torch.isfinite(first).all()
    assert first.min() >= 0 and first.max() <= 1 and first.std() > 0

    grids = {grid for _, grid, _ in seen}
    assert grids == {spec.token_grid}
    assert all(extent >= 2 for extent in spec.token_grid)
    assert {length for _, _, length in seen} == {16}

    assert len(seen) == 3 * spec.calls_per_step
    if family == "wan22":
        names = [name for name, _, _ in seen]
        assert names[:2] == ["transformer"] * 2 and set(names[2:]) == {"transformer_2"}

    # Same seed -> bit-identical output (fresh generator, same weights).
    second = _frames(pipe(**tiny_call_kwargs(family, seed=0, steps=3)))
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", ["wan22", "flux"])
def test_tiny_weights_depend_only_on_seed(family):
    rng_before = torch.random.get_rng_state()
    a = build_tiny_pipeline(family, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    b = build_tiny_pipeline(family, seed=0)
    c = build_tiny_pipeline(family, seed=1)
    for name, module in a.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        sa, sb, sc = module.state_dict(), b.components[name].state_dict(), c.components[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
    if family == "wan22":  # the two experts are different models
        t1, t2 = a.transformer.state_dict(), a.transformer_2.state_dict()
        assert not all(torch.equal(t1[k], t2[k]) for k in t1)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_pipeline("sdxl")
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_call_kwargs("sdxl")
