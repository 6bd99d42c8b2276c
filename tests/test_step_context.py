"""The step context is right for separate CFG calls (Wan), batched CFG (CogVideoX, LTX) and FLUX."""
import pytest
import torch

import accel
from accel.attention.dense import DenseAttention
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs


def record_calls(handle, model):
    """(step_index, branch, batch, timestep, num_steps) seen at every forward of ``model``."""
    seen = []

    def probe(module, args, kwargs):  # registered after accel's tracker, so it sees the updated context
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        step = handle.step
        seen.append((step.step_index, step.branch, hidden.shape[0], step.timestep, step.num_steps))

    return seen, model.register_forward_pre_hook(probe, with_kwargs=True)


def test_wan_separate_cfg_calls(run_pipeline):
    pipe = build_tiny_pipeline("wan")
    handle = accel.patch(pipe, attention="dense")
    seen, hook = record_calls(handle, pipe.transformer)
    run_pipeline(pipe, tiny_call_kwargs("wan", steps=3))
    hook.remove()
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert [(s, b) for s, b, *_ in seen] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond"),
                                            (2, "cond"), (2, "uncond")]
    assert [t for *_, t, _ in seen] == [timesteps[0]] * 2 + [timesteps[1]] * 2 + [timesteps[2]] * 2
    assert all(n == 3 for *_, n in seen)
    assert handle.summary()["steps_run"] == 3
    handle.remove()


@pytest.mark.parametrize("family", ["cogvideox", "ltx"])
def test_batched_cfg_is_one_call_per_step(family, run_pipeline):
    pipe = build_tiny_pipeline(family)
    handle = accel.patch(pipe, attention="dense")
    seen, hook = record_calls(handle, pipe.transformer)
    kwargs = tiny_call_kwargs(family, steps=3)
    run_pipeline(pipe, kwargs)
    hook.remove()
    assert [(s, b) for s, b, *_ in seen] == [(0, "cond_uncond"), (1, "cond_uncond"), (2, "cond_uncond")]
    assert all(batch == 2 for _, _, batch, *_ in seen), "both CFG halves travel in one batch"
    handle.remove()


def test_flux_guidance_distilled_one_call_per_step(run_pipeline):
    pipe = build_tiny_pipeline("flux")
    handle = accel.patch(pipe, attention="dense")
    seen, hook = record_calls(handle, pipe.transformer)
    run_pipeline(pipe, tiny_call_kwargs("flux", steps=3))
    run_pipeline(pipe, tiny_call_kwargs("flux", steps=2))  # a second generation restarts the count
    hook.remove()
    assert [(s, b) for s, b, *_ in seen] == [(0, "cond"), (1, "cond"), (2, "cond"), (0, "cond"), (1, "cond")]
    assert [n for *_, n in seen] == [3, 3, 3, 2, 2]
    assert handle.summary()["generations"] == 2
    handle.remove()


def test_wan22_two_transformers_share_one_step_count(run_pipeline):
    pipe = build_tiny_pipeline("wan22")
    handle = accel.patch(pipe, attention="dense")
    seen_high, hook_high = record_calls(handle, pipe.transformer)
    seen_low, hook_low = record_calls(handle, pipe.transformer_2)
    run_pipeline(pipe, tiny_call_kwargs("wan22", steps=4))
    hook_high.remove(), hook_low.remove()
    steps = sorted({s for s, *_ in seen_high} | {s for s, *_ in seen_low})
    assert steps == [0, 1, 2, 3]
    assert seen_high and seen_low, "both experts ran"
    assert max(s for s, *_ in seen_high) < min(s for s, *_ in seen_low), "high-noise expert runs first"
    handle.remove()


def test_attention_context_carries_layer_grid_and_step(monkeypatch, run_pipeline):
    contexts = []
    original = DenseAttention.attend

    def spy(self, q, k, v, ctx, attn_mask=None, scale=None):
        contexts.append((ctx, tuple(q.shape)))
        return original(self, q, k, v, ctx, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(DenseAttention, "attend", spy)
    pipe = build_tiny_pipeline("hunyuan_video")
    handle = accel.patch(pipe, attention="dense")
    run_pipeline(pipe, tiny_call_kwargs("hunyuan_video", steps=2))
    handle.remove()
    first_ctx, q_shape = contexts[0]
    t, h, w = first_ctx.layout.grid
    assert first_ctx.kind == "joint" and first_ctx.layout.text_position == "suffix"
    assert q_shape[1] == t * h * w + first_ctx.layout.text_tokens, "sequence = video grid + text suffix"
    assert q_shape[2] == first_ctx.heads
    layers = sorted({ctx.layer_index for ctx, _ in contexts})
    assert layers == list(range(first_ctx.num_layers))


def test_bare_transformer_steps_on_timestep_change():
    pipe = build_tiny_pipeline("wan")
    transformer = pipe.transformer
    handle = accel.patch(transformer, attention="dense")
    seen, hook = record_calls(handle, transformer)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, transformer.config.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(1, 4, transformer.config.text_dim, generator=g)
    with torch.no_grad():
        for t in (999.0, 999.0, 500.0, 500.0, 999.0):
            transformer(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text)
    hook.remove()
    handle.remove()
    assert [(s, b) for s, b, *_ in seen] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond"), (0, "cond")]
    assert handle.summary()["generations"] == 2
