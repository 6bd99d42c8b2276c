"""Training through a patched model: a backward pass through every attention method on every
family's tiny model, never a crash. Sparse patterns run their pure-torch reference path on calls
that need a backward (the kernels have none): at density 1.0 the calls are dense and the gradients
the dense ones, at 0.3 they are finite and the calls still sparse. INT8 has no backward: those calls run dense, with
one warning, and the gradients are the dense ones."""
import warnings

import pytest
import torch

import accel
from accel.attention.patterns import SPARSE_PATTERNS
from accel.base.registry import ATTENTION_METHODS
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

FAMILIES = ("wan", "hunyuan_video", "flux", "ltx", "cogvideox")


def method_configs():
    """Every registered attention method, the sparse ones at density 1.0 and at 0.3, from the first block."""
    for name in ATTENTION_METHODS.names():
        if name in SPARSE_PATTERNS:
            for density in (1.0, 0.3):
                yield f"{name}@{density}", name, SPARSE_PATTERNS.get(name).Config(
                    density=density, block_size=16, backend="torch", dense_warmup=0.0, dense_layers=0)
        else:
            yield name, name, None


@pytest.fixture(scope="module", params=FAMILIES)
def training_call(request):
    """The family's tiny transformer in training mode with trainable weights, and the inputs of
    its first call in the pipeline (captured, so every family gets the arguments its pipeline passes)."""
    pipe = build_tiny_pipeline(request.param)
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("kwargs", {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    hook = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        pipe(**{**tiny_call_kwargs(request.param, steps=2), "output_type": "latent"})
    hook.remove()
    model = pipe.transformer.train()
    for param in model.parameters():
        param.requires_grad_(True)
    return pipe, model, captured["kwargs"]


def pipe_family(pipe) -> str:
    return "flux" if type(pipe).__name__.startswith("Flux") else type(pipe).__name__


def gradients(model, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**{**kwargs, "return_dict": False})[0]
    out.float().square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("label,method,config", list(method_configs()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_backward_through_every_attention_method_matches_the_dense_gradients(training_call, label, method, config):
    pipe, model, kwargs = training_call
    reference = gradients(model, kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with accel.patched(pipe, attention=config if config is not None else method) as handle:
            patched = gradients(model, kwargs)
            counters = handle.summary()["methods"]["attention"]["counters"]
    assert counters["calls"] > 0
    assert patched.keys() == reference.keys() and reference
    sparse = method in [name for name, _ in SPARSE_PATTERNS.items()]
    exact = not sparse or config.density == 1.0
    for name, grad in patched.items():
        assert torch.isfinite(grad).all(), name
        if exact:
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    said = [str(w.message) for w in caught if "require grad" in str(w.message)]
    if sparse and config.density == 1.0:  # every block kept is dense attention: the caller's kernel, nothing said
        assert counters["dense_calls"] + counters["fallback_calls"] == counters["calls"], counters
        assert not said
    elif sparse:  # sparse through the reference path wherever the shape allows (FLUX has no frames), said once
        assert not any("no backward" in message for message in said)
        assert counters["sparse_calls"] > 0 or pipe_family(pipe) == "flux"
        assert len(said) == (1 if counters["sparse_calls"] else 0) and all("reference path" in m for m in said)
    elif method != "dense":  # no backward at all: every call ran dense, and said why once
        assert counters["fallback_calls"] == counters["calls"]
        assert len(said) == 1 and "no backward" in said[0]


def test_a_training_step_through_every_cache_rule_is_the_dense_one(training_call):
    """Outside a denoising loop a cache has no steps to reuse across: every call runs every block,
    so the gradients are the unpatched model's, bit for bit."""
    from accel.caching import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig

    pipe, model, kwargs = training_call
    reference = gradients(model, kwargs)
    flat = {"kind": "magcache", "model_class": type(model).__name__, "num_steps": 3, "ratios": {"cond": [1.0] * 3}}
    for config in (FBCacheConfig(threshold=1e3), FixedCacheConfig(interval=2), TeaCacheConfig(threshold=1e6),
                   EasyCacheConfig(threshold=1e3, warmup_ratio=0.0), MagCacheConfig(threshold=0.5, calibration=flat)):
        with accel.patched(pipe, cache=config) as handle:
            patched = [gradients(model, kwargs) for _ in range(3)][-1]  # repeated calls: nothing to reuse
            counters = handle.summary()["methods"]["cache"]["counters"]
        assert counters["compute_fraction"] == 1.0, type(config).__name__
        assert all(torch.equal(grad, reference[name]) for name, grad in patched.items()), type(config).__name__


@pytest.mark.parametrize("setting", ["cluster", "teacache"])
def test_gradient_checkpointing_recomputes_what_the_forward_ran(setting):
    """A checkpointed block runs again in the backward pass; what accel decides inside it (the
    cluster pattern's block choice, TeaCache's indicator) must save nothing for the backward, or
    the recomputation differs from the forward and torch refuses it."""
    from accel.caching import TeaCacheConfig

    pipe = build_tiny_pipeline("wan")
    captured = {}
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: (captured.setdefault("kwargs", dict(kwargs)), None)[1], with_kwargs=True)
    with torch.no_grad():
        pipe(**{**tiny_call_kwargs("wan", steps=2), "output_type": "latent"})
    hook.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items() if k != "return_dict"}
    model = pipe.transformer.train()
    for param in model.parameters():
        param.requires_grad_(True)
    patch = ({"attention": SPARSE_PATTERNS.get("cluster").Config(density=0.5, block_size=16, dense_warmup=0.0,
                                                                 dense_layers=0)}
             if setting == "cluster" else {"cache": TeaCacheConfig(threshold=0.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with accel.patched(pipe, **patch):
            plain = gradients(model, kwargs)
            model.enable_gradient_checkpointing()
            checkpointed = gradients(model, kwargs)
            model.disable_gradient_checkpointing()
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-6)
