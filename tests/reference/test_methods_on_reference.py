"""Every attention pattern, cache rule and solver on the reference model's own architecture.

The tiny pipelines of tests/attention, tests/caching and tests/solvers have 27-48 visual tokens;
the reference model has 1,024 (8 x 8 x 16 after patching) and 8 blocks, the geometry the methods
are tuned for: blocks of 128 tokens, 8 blocks per query row, real grid reorderings. Random
weights (the trained ones are not shipped yet), latents only (the VAE decode is deterministic and
tells nothing about the transformer), few steps: this checks plumbing and exactness at the real
shape, not quality; quality is `accel bench cache|sparse|solvers` on trained weights.
"""
import pytest
import torch

import accel
from accel.attention.patterns import SPARSE_PATTERNS
from accel.caching import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, TeaCacheConfig
from accel.pipelines.reference.build import REFERENCE_DEFAULTS, ReferenceConfig, build_reference_pipeline

STEPS = 4
PATTERNS = [*SPARSE_PATTERNS.names(), "radial+int8", "int8"]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = build_reference_pipeline(ReferenceConfig())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps=STEPS):
    kwargs = {k: v for k, v in REFERENCE_DEFAULTS.items() if k != "seed"}
    kwargs.update(num_inference_steps=steps, output_type="latent")
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames


@pytest.fixture(scope="module")
def dense(pipe):
    out = run(pipe)
    assert out.shape == (1, 16, 8, 8, 16)  # (B, C, latent frames, H/8, W/8): 8 * 8 * 16 = 1024 tokens
    return out


@pytest.mark.parametrize("attention", PATTERNS)
def test_attention_method_is_sparse_at_the_real_shape_and_remove_restores(pipe, dense, attention):
    # Torch backend: the CPU FlexAttention path compiles once per mask shape (~15 s each), and is
    # tested against the torch reference in tests/attention.
    spec = {"name": attention, "backend": "torch", **({} if attention == "int8" else {"density": 0.25})}
    if attention == "topk":  # random weights: no block is self-similar, so the default keeps them all
        spec["similarity_threshold"] = -1.0
    with accel.patched(pipe, attention=spec) as handle:
        out = run(pipe)
        counters = handle.summary()["methods"]["attention"]["counters"]
    assert torch.isfinite(out).all()
    assert counters["fallback_calls"] == 0, counters
    if attention != "int8":
        # dense warm-up steps and first layers are dense by default; the rest is really sparse
        assert counters["sparse_calls"] > 0 and counters["dense_calls"] > 0, counters
        assert 0.0 < counters["mean_density"] < 0.75, counters
    assert not torch.equal(out, dense), attention  # the method changed the computation
    assert torch.equal(run(pipe), dense), f"{attention}: remove() must restore the exact output"


CACHES = {
    "teacache": TeaCacheConfig(threshold=1e6),  # the reference model's fitted polynomial is not shipped yet
    "fbcache": FBCacheConfig(threshold=1e3),
    "easycache": EasyCacheConfig(threshold=1e3),
    "fixed+taylor": FixedCacheConfig(interval=2, forecast="taylor", order=2),
    "fixed+foca": FixedCacheConfig(interval=2, forecast="foca"),
}


CACHE_STEPS = 6  # warm-up, then room to reuse


@pytest.fixture(scope="module")
def dense_cache_steps(pipe):
    return run(pipe, steps=CACHE_STEPS)


@pytest.mark.parametrize("name", list(CACHES))
def test_cache_rule_reuses_at_the_real_shape_and_remove_restores(pipe, dense_cache_steps, name):
    steps, baseline = CACHE_STEPS, dense_cache_steps
    with accel.patched(pipe, cache=CACHES[name]) as handle:
        out = run(pipe, steps=steps)
        counters = handle.summary()["methods"]["cache"]["counters"]
    assert torch.isfinite(out).all()
    assert sum(counters["steps_reused"].values()) > 0 and counters["compute_fraction"] < 1.0, counters
    assert torch.equal(run(pipe, steps=steps), baseline), f"{name}: remove() must restore the exact output"


@pytest.mark.parametrize("solver", ["unipc", "dpmpp", "heun", "euler"])
def test_solver_swap_runs_with_cache_and_attention_and_restores(pipe, dense, solver):
    scheduler = pipe.scheduler
    with accel.patched(pipe, solver=solver, cache=FixedCacheConfig(interval=2), attention={"name": "radial", "density": 0.5, "backend": "torch"}) as handle:
        assert pipe.scheduler is not scheduler
        out = run(pipe)
        summary = handle.summary()["methods"]
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert summary["cache"]["counters"]["compute_fraction"] < 1.0
    assert summary["attention"]["counters"]["sparse_calls"] > 0
    assert pipe.scheduler is scheduler
    assert torch.equal(run(pipe), dense)
