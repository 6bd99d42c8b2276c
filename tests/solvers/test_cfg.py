"""Cheaper CFG: skipped calls are counted, the skipped work really is gone, and nothing else changes."""
import pytest
import torch

import accel
from accel.pipelines.tiny import TINY_SPECS, build_tiny_pipeline
from accel.solvers.swap import EulerConfig

STEPS = 4
# family -> call kwargs that turn CFG on where the tiny call leaves it off (guidance-distilled FLUX)
CFG_ON = {"wan": {}, "hunyuan_video": {}, "ltx": {},
          "flux": {"negative_prompt": "blurry, low quality", "true_cfg_scale": 2.0}}


@pytest.mark.parametrize("family", list(CFG_ON))
def test_uncond_skipping_outside_the_interval(family, run_latents, call_counter):
    extra, no_guidance = CFG_ON[family], TINY_SPECS[family].guidance_off
    pipe = build_tiny_pipeline(family)
    with accel.patched(pipe, solver="euler"):
        counter = call_counter(pipe.transformer)
        full = run_latents(pipe, family, steps=STEPS, **extra)
        counter.remove()
        cond_only = run_latents(pipe, family, steps=STEPS, **{**extra, **no_guidance})
    full_rows = counter.rows

    if family in ("wan", "ltx"):  # one separate-CFG and one batched-CFG family
        # (0, 0.9) holds every step position (0, .25, .5, .75): the wrapper runs, nothing is skipped.
        with accel.patched(pipe, solver=EulerConfig(cfg_interval=(0.0, 0.9))) as handle:
            assert torch.equal(run_latents(pipe, family, steps=STEPS, **extra), full)
            counters = handle.summary()["methods"]["solver"]["counters"]
            assert counters["uncond_calls_skipped"] == counters["batched_halves_skipped"] == 0

    # Guidance nowhere: the same result as guidance off (uncond returns cond, so u + g(c - u) == c).
    with accel.patched(pipe, solver=EulerConfig(cfg_interval=(0.5, 0.5))) as handle:
        counter = call_counter(pipe.transformer)
        skipped = run_latents(pipe, family, steps=STEPS, **extra)
        counter.remove()
        counters = handle.summary()["methods"]["solver"]["counters"]
    assert torch.equal(skipped, cond_only)
    assert counter.rows == full_rows // 2, "half the transformer work is gone"
    if TINY_SPECS[family].cfg == "batched":
        assert counters["batched_halves_skipped"] == STEPS and counter.calls == STEPS
    else:
        assert counters["uncond_calls_skipped"] == STEPS and counter.calls == STEPS

    # A middle interval: guidance on steps 1 and 2 only.
    with accel.patched(pipe, solver=EulerConfig(cfg_interval=(0.25, 0.75))) as handle:
        counter = call_counter(pipe.transformer)
        middle = run_latents(pipe, family, steps=STEPS, **extra)
        counter.remove()
    assert counter.rows == full_rows - 2 * full_rows // (2 * STEPS)
    assert not torch.equal(middle, full) and not torch.equal(middle, cond_only)


def test_zero_init_steps_keep_the_noise_and_skip_every_call(run_latents, call_counter):
    pipe = build_tiny_pipeline("wan")
    seen = {}

    def keep(pipeline, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return tensors

    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with accel.patched(pipe, solver=EulerConfig(cfg_zero_steps=2)) as handle:
        counter = call_counter(pipe.transformer)
        out = run_latents(pipe, "wan", steps=STEPS, latents=noise.clone(), callback_on_step_end=keep)
        counter.remove()
        counters = handle.summary()["methods"]["solver"]["counters"]
        assert handle.summary()["steps_run"] == STEPS, "zero steps are still steps"
    assert torch.equal(seen[0], noise) and torch.equal(seen[1], noise), "zero velocity: the sample stays put"
    assert not torch.equal(seen[2], noise) and torch.isfinite(out).all()
    assert counters["zero_step_calls_skipped"] == 2 * 2  # two steps, cond and uncond
    assert counter.calls == 2 * (STEPS - 2)


def test_zero_steps_on_batched_and_guidance_distilled_pipelines(run_latents, call_counter):
    for family in ("ltx", "flux"):
        pipe = build_tiny_pipeline(family)
        with accel.patched(pipe, solver={"name": "unipc", "steps": 3, "cfg_zero_steps": 1}) as handle:
            counter = call_counter(pipe.transformer)
            out = run_latents(pipe, family)
            counter.remove()
            assert handle.summary()["methods"]["solver"]["counters"]["zero_step_calls_skipped"] == 1
        assert counter.calls == 2 and torch.isfinite(out).all(), family


def test_remove_restores_forward():
    pipe = build_tiny_pipeline("wan")
    with accel.patched(pipe, solver=EulerConfig(cfg_interval=(0.2, 0.8))):
        assert "forward" in vars(pipe.transformer)
    assert "forward" not in vars(pipe.transformer)
    with accel.patched(pipe, solver="euler"):  # default options install no wrapper at all
        assert "forward" not in vars(pipe.transformer)
