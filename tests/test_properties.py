"""Property test: families x methods x random valid configs x odd shapes (hypothesis, bounded, fixed seed).

Every generated case checks what accel promises for any valid call: the output is finite and keeps
the unpatched pipeline's dtype; a method with nothing to skip (dense attention, a cache that never
reuses, a sparse pattern at density 1) reproduces the unpatched output (bit for bit; sparse to
float rounding); and ``remove()`` restores the unpatched output bit for bit.
"""
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import accel
from accel.attention.patterns import SPARSE_PATTERNS
from accel.caching.forecast import FORECASTS, SCHEDULE_FORECASTS
from accel.pipelines.tiny import TINY_FAMILIES, TINY_SPECS, build_tiny_pipeline, tiny_call_kwargs

# Shapes off the builders' defaults: (height, width, frames), non-square, few and uneven tokens.
SHAPES = {"wan": [(32, 48, 5), (48, 32, 9)], "wan22": [(32, 48, 5), (48, 32, 9)],
          "hunyuan_video": [(32, 48, 5), (48, 32, 9)], "cogvideox": [(32, 48, 5), (48, 32, 9)],
          "ltx": [(64, 96, 9), (96, 64, 17)], "flux": [(32, 48, None), (48, 80, None)]}
STEPS = 3
SOLVERS = ("euler", "heun", "unipc", "dpmpp")


@functools.lru_cache(maxsize=None)
def pipeline(family, dtype):
    return build_tiny_pipeline(family, dtype=dtype)


def call(family, shape):
    height, width, frames = shape
    kwargs = {**tiny_call_kwargs(family, steps=STEPS), "output_type": "latent", "height": height, "width": width}
    if frames is not None:
        kwargs["num_frames"] = frames
    return kwargs


def run(pipe, kwargs):
    out = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)})
    return out.frames if hasattr(out, "frames") else out.images


@st.composite
def attention_specs(draw):
    name = draw(st.sampled_from(["dense", *SPARSE_PATTERNS.names()]))
    if name == "dense":
        return {"name": "dense"}, True
    density = draw(st.sampled_from([0.2, 0.5, 1.0]))
    spec = {"name": name, "density": density, "block_size": draw(st.sampled_from([16, 32])), "backend": "torch",
            "dense_warmup": draw(st.sampled_from([0.0, 0.4])), "dense_layers": draw(st.integers(0, 2))}
    if name == "topk":
        spec["similarity_threshold"] = -1.0  # random weights: keep the density honest
    return spec, density == 1.0


@st.composite
def cache_specs(draw):
    name = draw(st.sampled_from(["teacache", "fbcache", "easycache", "fixed"]))
    never = draw(st.booleans())
    # a fitted forecast comes with a fixed cache's schedule (on the tiny models: none, so its fallback)
    forecasts = FORECASTS if name == "fixed" else [f for f in FORECASTS if f not in SCHEDULE_FORECASTS]
    spec = {"name": name, "forecast": draw(st.sampled_from(forecasts)), "order": draw(st.integers(1, 2)),
            "warmup_steps": draw(st.integers(0, 2))}
    if name == "fixed":
        spec["interval"] = 1 if never else draw(st.integers(2, 3))
    else:
        spec["threshold"] = 0.0 if never else draw(st.sampled_from([0.05, 0.5, 5.0]))
    return spec, never


@st.composite
def cases(draw):
    family = draw(st.sampled_from(TINY_FAMILIES))
    shape = draw(st.sampled_from(SHAPES[family]))
    kinds = ["attention", "cache"] + (["solver"] if TINY_SPECS[family].flow_matching else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "attention":
        spec, exact = draw(attention_specs())
    elif kind == "cache":
        spec, exact = draw(cache_specs())
    else:
        spec, exact = {"name": draw(st.sampled_from(SOLVERS)), "steps": draw(st.integers(2, 4))}, False
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    return family, shape, kind, spec, exact, dtype


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_any_valid_patch_is_finite_keeps_dtype_is_exact_where_promised_and_removes_exactly(case):
    family, shape, kind, spec, exact, dtype = case
    pipe, kwargs = pipeline(family, dtype), call(family, shape)
    reference = run(pipe, kwargs)
    with accel.patched(pipe, **{kind: spec}):
        out = run(pipe, kwargs)
    assert out.dtype == reference.dtype, case
    assert torch.isfinite(out.float()).all(), case
    if exact and spec.get("density") == 1.0:  # sparse at density 1: every block, sums reordered
        if dtype == torch.float32:
            torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
        else:  # "float rounding" in bf16: no further from the dense run than bf16 itself is from fp32
            exact32 = run(pipeline(family, torch.float32), kwargs).float()
            rounding = (reference.float() - exact32).abs().mean()
            assert (out.float() - reference.float()).abs().mean() <= 2 * rounding, case
    elif exact:
        assert torch.equal(out, reference), case
    assert torch.equal(run(pipe, kwargs), reference), f"remove() must restore the exact output: {case}"
