"""Scheduler swaps: every flow family, step overrides, exact restore, the pipeline's own schedule."""
import inspect

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

import accel
from accel.pipelines.tiny import TINY_SPECS, build_tiny_pipeline, tiny_call_kwargs
from accel.solvers.schedule import SchedulePlanner, resample
from accel.solvers.swap import EulerConfig, SwappedScheduler, UniPCConfig

FLOW_FAMILIES = tuple(name for name, spec in TINY_SPECS.items() if spec.flow_matching)
SOLVERS = ("euler", "heun", "unipc", "dpmpp")


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_each_swap_overrides_steps_and_remove_restores(family, run_latents):
    pipe = build_tiny_pipeline(family)
    original = pipe.scheduler
    never_patched = run_latents(pipe, family, steps=2)
    state = (dict(vars(original)), dict(pipe.config))  # the swaps must not touch the original at all
    for solver in SOLVERS:
        handle = accel.patch(pipe, solver={"name": solver, "steps": 3})
        assert isinstance(pipe.scheduler, SwappedScheduler) and pipe.scheduler.original is original
        seen = []
        hooks = [m.register_forward_pre_hook(lambda *a: seen.append(1)) for m in handle.session.models]
        out = run_latents(pipe, family, steps=2)  # the override wins over num_inference_steps=2
        for h in hooks:
            h.remove()
        evaluations = 2 * 3 - 1 if solver == "heun" else 3  # Heun: predictor + corrector per inner step
        assert handle.step.num_steps == evaluations, solver
        assert handle.summary()["steps_run"] == evaluations
        assert len(seen) == evaluations * TINY_SPECS[family].calls_per_step, solver
        assert torch.isfinite(out).all(), solver
        handle.remove()
        assert pipe.scheduler is original
    assert (dict(vars(original)), dict(pipe.config)) == state
    assert torch.equal(run_latents(pipe, family, steps=2), never_patched)


@pytest.mark.parametrize("family", ["hunyuan_video", "ltx", "flux"])
def test_euler_reproduces_flow_match_euler_pipelines(family, run_latents):
    """Same count: the pipeline's own output. Other count: the pipeline's own schedule for that count
    (FLUX/LTX dynamic shift with mu, HunyuanVideo's static shift) -- the planner replays it."""
    pipe = build_tiny_pipeline(family)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    own_2, own_4 = run_latents(pipe, family, steps=2), run_latents(pipe, family, steps=4)
    own_sigmas_4 = pipe.scheduler.sigmas.clone()
    with accel.patched(pipe, solver="euler"):
        torch.testing.assert_close(run_latents(pipe, family, steps=2), own_2, atol=1e-6, rtol=0)
    with accel.patched(pipe, solver=EulerConfig(steps=4)):
        torch.testing.assert_close(run_latents(pipe, family, steps=2), own_4, atol=1e-6, rtol=0)
        torch.testing.assert_close(pipe.scheduler.sigmas, own_sigmas_4, atol=1e-7, rtol=0)


def test_unipc_on_wan_reproduces_its_own_unipc(run_latents):
    pipe = build_tiny_pipeline("wan")
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    own_4 = run_latents(pipe, "wan", steps=4)
    with accel.patched(pipe, solver=UniPCConfig(steps=4)):
        torch.testing.assert_close(run_latents(pipe, "wan", steps=2), own_4, atol=1e-6, rtol=0)


def test_patched_scheduler_keeps_the_signatures_pipelines_inspect():
    pipe = build_tiny_pipeline("flux")
    with accel.patched(pipe, solver="unipc"):
        params = inspect.signature(pipe.scheduler.set_timesteps).parameters  # through the step tracker's wrapper
        assert {"num_inference_steps", "sigmas", "mu", "timesteps"} <= set(params)
        assert pipe.scheduler.config is pipe.scheduler.original.config  # FLUX reads base_shift etc. from it


def test_shift_override_replaces_static_and_dynamic_shift():
    n, s = 4, 2.0
    wan = build_tiny_pipeline("wan").scheduler  # UniPC, flow_shift 3
    same = SchedulePlanner(wan, EulerConfig(shift=3.0))(n)
    assert np.array_equal(same, SchedulePlanner(wan, EulerConfig())(n)), "its own shift changes nothing"
    flux = build_tiny_pipeline("flux").scheduler  # dynamic shifting: FLUX passes sigmas and mu
    u = np.linspace(1.0, 1.0 / n, n)
    planned = SchedulePlanner(flux, EulerConfig(shift=s))(n, sigmas=u, mu=1.1)
    np.testing.assert_allclose(planned[:-1], s * u / (1 + (s - 1) * u), rtol=1e-6)
    assert planned[-1] == 0.0
    assert not np.allclose(planned, SchedulePlanner(flux, EulerConfig())(n, sigmas=u, mu=1.1)), "mu ignored"


def test_custom_sigmas_are_run_as_given(run_latents):
    pipe = build_tiny_pipeline("flux")
    with accel.patched(pipe, solver={"name": "dpmpp", "sigmas": [0.95, 0.6, 0.25]}) as handle:
        run_latents(pipe, "flux", steps=7)
        assert handle.step.num_steps == 3
        torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([0.95, 0.6, 0.25, 0.0]))


def test_resample_is_exact_for_linear_pipeline_lists():
    np.testing.assert_allclose(resample(np.linspace(1.0, 1 / 7, 7), 4), np.linspace(1.0, 1 / 4, 4), atol=1e-12)
    np.testing.assert_allclose(resample(np.linspace(1.0, 0.0, 8)[:-1], 3), np.linspace(1.0, 0.0, 4)[:-1], atol=1e-12)
    same = [0.9, 0.5]
    assert resample(same, 2) is same


def test_cogvideox_and_bare_transformers_are_refused_cleanly():
    pipe = build_tiny_pipeline("cogvideox")
    scheduler = pipe.scheduler
    for solver in SOLVERS:
        with pytest.raises(ValueError, match=r"flow-matching pipeline.*v-prediction"):
            accel.patch(pipe, solver=solver)
        assert pipe.scheduler is scheduler and "_accel_handle" not in vars(pipe)
    with pytest.raises(ValueError, match="not a bare transformer"):
        accel.patch(build_tiny_pipeline("flux").transformer, solver="euler")


def test_solver_with_dense_attention_in_one_patch(run_latents):
    pipe = build_tiny_pipeline("wan")
    reference = run_latents(pipe, "wan")
    handle = accel.patch(pipe, solver={"name": "unipc", "steps": 4}, attention="dense")
    run_latents(pipe, "wan")
    summary = handle.summary()
    assert summary["methods"]["attention"]["counters"]["calls"] > 0
    assert summary["methods"]["solver"]["counters"]["steps"] == 4 and handle.step.num_steps == 4
    handle.remove()
    assert torch.equal(run_latents(pipe, "wan"), reference)


def test_solver_cache_and_attention_in_one_patch(run_latents):
    from accel.base.registry import CACHE_METHODS

    if "fixed" not in CACHE_METHODS:
        pytest.skip("no cache method registered yet")
    pipe = build_tiny_pipeline("wan")
    reference = run_latents(pipe, "wan")
    solver = UniPCConfig(steps=6, cfg_interval=(0.0, 0.5), cfg_zero_steps=1)
    handle = accel.patch(pipe, solver=solver, cache="fixed", attention="dense")
    out = run_latents(pipe, "wan")
    summary = handle.summary()
    assert handle.step.num_steps == 6 and summary["steps_run"] == 6 and torch.isfinite(out).all()
    solver_counters = summary["methods"]["solver"]["counters"]
    # positions 0, 1/6, 2/6 are guided, step 0 is a zero step: uncond skipped on steps 3..5
    assert solver_counters["zero_step_calls_skipped"] == 2 and solver_counters["uncond_calls_skipped"] == 3
    assert summary["methods"]["attention"]["counters"]["calls"] > 0
    handle.remove()
    assert torch.equal(run_latents(pipe, "wan"), reference)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])  # UniPC and FlowMatchEuler pipelines
def test_swaps_keep_the_latent_dtype_of_the_pipelines_own_loop(family):
    """In bf16 Wan's UniPC keeps fp32 latents and HunyuanVideo's Euler bf16 ones; every swap must
    keep what the pipeline keeps (before: Euler/Heun/DSS made Wan's bf16, UniPC/DPM++/Heun and
    cfg_zero_steps made HunyuanVideo's fp32)."""
    pipe = build_tiny_pipeline(family, dtype=torch.bfloat16)
    kwargs = {**tiny_call_kwargs(family, steps=2), "output_type": "latent"}
    own = pipe(**kwargs).frames.dtype
    for solver in [*SOLVERS, {"name": "euler", "cfg_zero_steps": 1}]:
        with accel.patched(pipe, solver=solver):
            out = pipe(**kwargs).frames
        assert out.dtype == own and torch.isfinite(out).all(), solver


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_schedule_that_is_not_finite_is_refused_naming_steps_and_scheduler(solver):
    """LTX stretches its schedule to shift_terminal, which one step cannot: before, UniPC/DPM++ gave an
    all-NaN video and Euler/Heun an IndexError inside diffusers."""
    pipe = build_tiny_pipeline("ltx")
    with accel.patched(pipe, solver={"name": solver, "steps": 1}):
        with pytest.raises(ValueError, match=r"steps=1: the pipeline's FlowMatchEulerDiscreteScheduler schedule "
                                             r"for 1 step\(s\) is not finite.*shift_terminal"):
            pipe(**{**tiny_call_kwargs("ltx", steps=2), "output_type": "latent"})
    out = pipe(**{**tiny_call_kwargs("ltx", steps=2), "output_type": "latent"}).frames
    assert torch.isfinite(out).all()
