"""Registered sparse attention methods: every family, exact fallbacks, padding masks, warm-up, counters."""
import warnings

import pytest
import torch

import accel
from accel.base.context import AttnContext, StepContext, TokenLayout
from accel.base.registry import ATTENTION_METHODS
from accel.attention.intercept import dense_attention
from accel.attention.patterns import SPARSE_PATTERNS
from accel.pipelines.tiny import TINY_FAMILIES, TINY_SPECS, build_tiny_pipeline, tiny_call_kwargs

PATTERNS = SPARSE_PATTERNS.names()
STEPS = 2


def sparse_config(name, density, **extra):
    """Small blocks so the tiny pipelines' 27-48 visual tokens really are sparse; no dense warm-up."""
    extra = {"block_size": 16, "dense_warmup": 0.0, "dense_layers": 0, "backend": "torch",
             **({"similarity_threshold": -1.0} if name == "topk" else {}),
             **({"q_clusters": 8, "k_clusters": 8} if name == "cluster" else {}), **extra}
    return SPARSE_PATTERNS.get(name).Config(density=density, **extra)


def call_kwargs(family):
    # Latents, not decoded frames: everything accel changes happens before the VAE, which is
    # deterministic, so equal latents mean equal videos; decoding would double the test time.
    return {**tiny_call_kwargs(family, steps=STEPS), "output_type": "latent"}


def run_recording_warnings(pipe, family, run_pipeline, attention, kwargs=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = accel.patch(pipe, attention=attention)
        out = run_pipeline(pipe, kwargs or call_kwargs(family))
        counters = handle.summary()["methods"]["attention"]["counters"]
        handle.remove()
    return out, counters, [str(w.message) for w in caught if "accel" in str(w.message)]


def test_every_sparse_pattern_is_a_registered_method():
    assert len(PATTERNS) >= 5
    for name, pattern in SPARSE_PATTERNS.items():
        method = ATTENTION_METHODS.get(name)
        assert method.Pattern is pattern and method.Config is pattern.Config and method.name == name
        assert accel.Config(attention=pattern.Config()).attention == pattern.Config()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_pattern_runs_on_every_family_and_remove_restores(family, run_pipeline):
    pipe = build_tiny_pipeline(family)
    reference = run_pipeline(pipe, call_kwargs(family))
    dense = None
    for name in PATTERNS:
        out, counters, messages = run_recording_warnings(pipe, family, run_pipeline, sparse_config(name, 0.3))
        assert counters["calls"] > 0, name
        if counters["fallback_calls"]:  # FLUX images have one frame: the video-only patterns step aside
            assert family == "flux" and SPARSE_PATTERNS.get(name).min_frames > 1
            assert counters["fallback_calls"] == counters["calls"] and counters["sparse_calls"] == 0
            assert len(messages) == 1 and "falling back to dense" in messages[0], messages
            if dense is None:
                dense = run_recording_warnings(pipe, family, run_pipeline, "dense")[0]
            assert torch.equal(out, dense), name
        else:
            assert messages == [], messages
            assert counters["sparse_calls"] == counters["calls"], name
            assert 0.0 < counters["mean_density"] <= 1.0 and len(counters["density_by_step"]) == STEPS
            assert torch.isfinite(out).all(), name
    assert torch.equal(run_pipeline(pipe, call_kwargs(family)), reference)


def density_one_cases():
    """One pattern per family, in registry order, so every pattern is covered (with joint text as
    prefix and suffix, a padding mask, batched CFG); a family gets the next pattern its frames fit."""
    cases, index = [], 0
    for family, spec in TINY_SPECS.items():
        for offset in range(len(PATTERNS)):
            name = PATTERNS[(index + offset) % len(PATTERNS)]
            if SPARSE_PATTERNS.get(name).min_frames <= spec.frames:
                cases.append((family, name))
                index += offset + 1
                break
    assert len(cases) < len(PATTERNS) or {name for _, name in cases} == set(PATTERNS)
    return cases


DENSITY_ONE_CASES = density_one_cases()


@pytest.mark.parametrize("family, name", DENSITY_ONE_CASES)
def test_density_one_equals_dense_output(family, name, run_pipeline, monkeypatch):
    """Density 1.0 runs the caller's dense kernel: the unpatched output, bit for bit. The sparse path
    itself with every block kept (reordering, text spans, kernel) agrees with it to rounding."""
    from accel.attention.sparse import SparseAttention, leading_call

    pipe = build_tiny_pipeline(family)
    reference = run_pipeline(pipe, call_kwargs(family))
    out, counters, messages = run_recording_warnings(pipe, family, run_pipeline, sparse_config(name, 1.0))
    assert messages == [] and counters["dense_calls"] == counters["calls"] > 0 and counters["sparse_calls"] == 0
    assert torch.equal(out, reference)
    monkeypatch.setattr(SparseAttention, "dense_now",
                        lambda self, ctx: leading_call(ctx, self.config.dense_layers, self.config.dense_warmup))
    out, counters, messages = run_recording_warnings(pipe, family, run_pipeline, sparse_config(name, 1.0))
    assert messages == [] and counters["sparse_calls"] == counters["calls"] > 0
    assert counters["mean_density"] == 1.0
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


# -- single attention calls -----------------------------------------------------------------------

def make_ctx(grid=(3, 4, 4), text=0, position=None, step=5, num_steps=10, layer=3):
    return AttnContext(layer_index=layer, num_layers=8, site=f"blocks.{layer}.attn", kind="joint" if text else "self",
                       heads=2, layout=TokenLayout(grid=grid, text_tokens=text, text_position=position),
                       step=StepContext(step_index=step, num_steps=num_steps))


def qkv(seq, batch=1, dtype=torch.float32, seed=0, head_dim=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, 2, head_dim, generator=gen).to(dtype) for _ in range(3)]


def run_method(name, calls, **config):
    method = ATTENTION_METHODS.get(name)(sparse_config(name, **{"density": 0.3, **config}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [method.run(*args, **kwargs) for args, kwargs in calls]
    return method, outs, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["spatiotemporal", "radial", "tile_window"])
def test_grid_patterns_without_a_grid_fall_back_to_exact_dense_once(name):
    q, k, v = qkv(48)
    ctx = make_ctx(grid=None)
    method, outs, messages = run_method(name, [((q, k, v, ctx), {})] * 2)
    assert len(messages) == 1 and "needs a token grid" in messages[0]
    assert method.fallback_calls == 2 and method.sparse_calls == 0
    for out in outs:
        assert torch.equal(out, dense_attention(q, k, v))
    with pytest.raises(ValueError, match="needs a token grid"):  # attend() alone never guesses
        method.attend(q, k, v, ctx)


def test_unsupported_dtype_and_masks_fall_back_to_exact_dense():
    q, k, v = qkv(48, dtype=torch.float64)
    method, (out,), messages = run_method("topk", [((q, k, v, make_ctx()), {})])
    assert method.fallback_calls == 1 and "dtype" in messages[0]
    assert torch.equal(out, dense_attention(q, k, v))

    q, k, v = qkv(48)
    causal = torch.ones(48, 48, dtype=torch.bool).tril()
    hides_visual = torch.ones(1, 1, 1, 48, dtype=torch.bool)
    hides_visual[..., 7] = False
    for mask, reason in [(causal, "not a key-padding mask"), (hides_visual, "hides visual tokens")]:
        method, (out,), messages = run_method("radial", [((q, k, v, make_ctx()), {"attn_mask": mask})])
        assert method.fallback_calls == 1 and reason in messages[0]
        assert torch.equal(out, dense_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("head_dim, reason", [(24, "head_dim 24 is not a power of two"),
                                              (16, "device cpu needs the Triton interpreter")])
def test_triton_backend_off_its_head_dims_or_devices_falls_back_to_exact_dense_once(head_dim, reason):
    # The Triton kernel takes power-of-two head dims, on CUDA (or the interpreter, which this
    # process never starts: tests/attention/conftest.py runs it in a child process).
    q, k, v = qkv(48, head_dim=head_dim)
    method, outs, messages = run_method("radial", [((q, k, v, make_ctx()), {})] * 2, backend="triton")
    assert len(messages) == 1 and reason in messages[0], messages
    assert method.fallback_calls == 2 and method.sparse_calls == 0
    for out in outs:
        assert torch.equal(out, dense_attention(q, k, v))


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_padding_masks_stay_sparse_and_exact(position):
    text, visual = 16, 48
    q, k, v = qkv(visual + text, batch=2)
    text_start = 0 if position == "prefix" else visual
    keep = torch.ones(2, visual + text, dtype=torch.bool)
    keep[0, text_start + 12:text_start + text] = False  # batch items pad differently
    keep[1, text_start + 5:text_start + text] = False
    for mask in (keep.view(2, 1, 1, -1), torch.zeros(2, 1, 1, visual + text).masked_fill(~keep.view(2, 1, 1, -1),
                                                                                        float("-inf"))):
        ctx = make_ctx(text=text, position=position)
        # 0.999 keeps every block of this grid (the budget rounds up) through the sparse path; 1.0 is dense
        method, (out,), messages = run_method("topk", [((q, k, v, ctx), {"attn_mask": mask})], density=0.999)
        assert messages == [] and method.sparse_calls == 1
        torch.testing.assert_close(out, dense_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    method, (out,), messages = run_method("tile_window", [((q, k, v, ctx), {"attn_mask": keep.view(2, 1, 1, -1)})])
    assert messages == [] and method.sparse_calls == 1 and torch.isfinite(out).all()


def test_dense_warmup_steps_and_dense_first_layers():
    q, k, v = qkv(48)
    calls = [((q, k, v, make_ctx(step=1, num_steps=10)), {}),  # 10% of the loop done: warm-up (20%)
             ((q, k, v, make_ctx(step=2, num_steps=10, layer=0)), {}),  # first layer: dense
             ((q, k, v, make_ctx(step=2, num_steps=10, layer=1)), {})]  # sparse
    method, outs, messages = run_method("tile_window", calls, dense_warmup=0.2, dense_layers=1)
    assert messages == [] and method.dense_calls == 2 and method.sparse_calls == 1
    assert torch.equal(outs[0], dense_attention(q, k, v)) and torch.equal(outs[1], dense_attention(q, k, v))
    table = method.density_table()
    assert table[(1, 3)] == 1.0 and table[(2, 0)] == 1.0 and table[(2, 1)] < 1.0
    counters = method.counters()
    assert counters["calls"] == 3 and counters["density_by_step"][0] == 1.0
    assert counters["mean_density"] == pytest.approx((2 + table[(2, 1)]) / 3, abs=1e-4)


def test_auto_backend_matches_the_torch_reference():
    """On CPU ``backend="auto"`` runs compiled FlexAttention (one compile, several seconds)."""
    q, k, v = qkv(48 + 16)
    ctx = make_ctx(text=16, position="prefix")
    topk = ATTENTION_METHODS.get("topk")
    auto = topk(sparse_config("topk", 0.3, backend="auto")).run(q, k, v, ctx)
    reference = topk(sparse_config("topk", 0.3)).run(q, k, v, ctx)
    torch.testing.assert_close(auto, reference, atol=1e-5, rtol=1e-5)


def test_grid_patterns_run_sparse_on_ltx_condition_calls(run_pipeline):
    """LTXConditionPipeline passes token coordinates, not the grid, and puts a later conditioning
    frame's tokens before the video's: before, every grid pattern fell back ("needs a token grid")."""
    from accel.pipelines.tiny import ltx

    pipe = ltx.build_condition()
    kwargs = {**ltx.condition_call_kwargs(steps=STEPS), "output_type": "latent"}
    reference = run_pipeline(pipe, kwargs)
    for name in ("spatiotemporal", "tile_window", "radial"):
        out, counters, messages = run_recording_warnings(pipe, "ltx", run_pipeline, sparse_config(name, 0.3),
                                                         kwargs={**kwargs, "generator": torch.Generator().manual_seed(0)})
        assert messages == [] and counters["fallback_calls"] == 0, (name, messages)
        assert counters["sparse_calls"] == counters["calls"] > 0, name
        assert torch.isfinite(out).all()
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(run_pipeline(pipe, kwargs), reference)


def test_ltx_condition_layout_from_token_coordinates():
    from accel.pipelines.ltx import layout_from_coords

    def coords(frame_times, height, width):
        t = torch.tensor(frame_times).repeat_interleave(height * width)
        y = torch.arange(height).repeat_interleave(width).repeat(len(frame_times)) * 32.0
        x = torch.arange(width).repeat(height * len(frame_times)) * 32.0
        return torch.stack([t, y, x])

    assert layout_from_coords(coords([0.0, 0.04, 0.36], 3, 4)) == TokenLayout(grid=(3, 3, 4))
    prefixed = layout_from_coords(coords([0.32, 0.5, 0.0, 0.04, 0.36], 2, 2))
    assert prefixed == TokenLayout(grid=(3, 2, 2), text_tokens=8, text_position="prefix")
    assert layout_from_coords(coords([0.0, 0.04, 0.36], 3, 4)[:, :-1]) == TokenLayout()  # ragged: no grid


def test_a_realised_density_far_above_the_request_is_reported_with_its_knob(run_pipeline):
    """topk on random weights: no key block is self-similar, so every row is kept whole."""
    pipe = build_tiny_pipeline("wan")
    spec = {"name": "topk", "density": 0.25, "block_size": 16, "backend": "torch", "dense_warmup": 0.0}
    with accel.patched(pipe, attention=spec) as handle:
        run_pipeline(pipe, call_kwargs("wan"))
        summary = handle.summary()
    counters = summary["methods"]["attention"]["counters"]
    assert counters["sparse_mean_density"] > 1.5 * 0.25, counters
    said = [w for w in summary["warnings"] if "density=0.25 was asked" in w]
    assert len(said) == 1 and "similarity_threshold" in said[0], summary["warnings"]
    with accel.patched(pipe, attention={**spec, "similarity_threshold": -1.0}) as handle:
        run_pipeline(pipe, call_kwargs("wan"))
        summary = handle.summary()
    assert summary["methods"]["attention"]["counters"]["sparse_mean_density"] <= 1.5 * 0.25
    assert not [w for w in summary["warnings"] if "was asked" in w]
