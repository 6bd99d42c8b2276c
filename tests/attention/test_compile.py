"""Attention methods inside torch.compile(fullgraph=True): regional (``compile_repeated_blocks``) and
whole-model, with no graph break, the eager outputs, no recompile when the step, the CFG branch or
the prompt changes, and ``remove()`` exact afterwards.

The ``eager`` dynamo backend traces exactly as inductor does (the same graph, the same breaks and
guards) and runs fast on a CPU.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import accel
from accel.api import adapter_for
from accel.attention.patterns import SPARSE_PATTERNS
from accel.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs


def method_config(name):
    if name in ("dense", "int8"):
        return name
    extra = {"block_size": 16, "dense_warmup": 0.0, "dense_layers": 0, "backend": "torch",
             **({"similarity_threshold": -1.0} if name == "topk" else {}),
             **({"q_clusters": 8, "k_clusters": 8} if name == "cluster" else {})}
    return SPARSE_PATTERNS.get(name).Config(density=0.3, **extra)


def latents(pipe, family, steps, prompt=None, **extra):
    kwargs = {**tiny_call_kwargs(family, steps=steps), "output_type": "latent", **extra}
    if prompt is not None:
        kwargs["prompt"] = prompt
    out = pipe(**kwargs)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def compile_model(pipe, style):
    if style == "regional" and pipe.transformer._repeated_blocks:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    elif style == "regional":  # CogVideoX names no repeated blocks: each block compiled, as that does
        for stack in adapter_for(pipe.transformer).block_stacks(pipe.transformer):
            for block in stack.blocks:
                block.compile(fullgraph=True, backend="eager")
    else:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="eager")


def check_compiled(family, style, **patch):
    pipe = build_tiny_pipeline(family)
    never_patched = latents(pipe, family, 3)
    with accel.patched(pipe, **patch):
        eager = latents(pipe, family, 3)
    torch._dynamo.reset()
    counters.clear()
    compile_model(pipe, style)
    handle = accel.patch(pipe, **patch)
    after_first_step = []

    def count(pipeline, step, timestep, tensors):
        if step == 0:
            after_first_step.append(counters["stats"]["unique_graphs"])
        return {}

    compiled = latents(pipe, family, 3, callback_on_step_end=count)  # compiles in step 0
    graphs = after_first_step[0]
    latents(pipe, family, 3, prompt="another prompt entirely")
    where = f"{family} {style} {patch}"
    assert not counters["graph_break"], f"{where}: graph breaks {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == graphs, f"{where}: recompiled after the first step"
    attention = handle.summary()["methods"]["attention"]
    handle.remove()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")
    assert torch.equal(latents(pipe, family, 3), never_patched), f"{where}: remove() not exact"
    return attention


METHODS = ["dense", "int8", *SPARSE_PATTERNS.names()]


@pytest.mark.parametrize("style", ["regional", "whole"])
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_method_compiles_in_one_graph_on_every_family(family, name, style):
    attention = check_compiled(family, style, attention=method_config(name))
    calls = attention["counters"]
    assert calls["calls"] > 0
    if family == "wan" and name not in ("dense", "int8"):  # int8 falls back on a CPU, inside the op, as in eager
        assert calls["sparse_calls"] == calls["calls"], calls


def cache_configs(model_class):
    from accel.caching import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig

    flat = {"model_class": model_class, "num_steps": 3}
    return {"fbcache": FBCacheConfig(threshold=0.2),
            "teacache": TeaCacheConfig(threshold=1.0, calibration={"kind": "teacache", **flat,
                                                                   "coefficients": [0.0, 0.0, 0.0, 1.0, 0.0]}),
            "magcache": MagCacheConfig(threshold=0.25, calibration={"kind": "magcache", **flat, "ratios": {
                b: [0.9] * 3 for b in ("cond", "uncond")}}),
            "easycache": EasyCacheConfig(threshold=0.2, warmup_ratio=0.0),
            "fixed": FixedCacheConfig(interval=2, forecast="taylor")}


@pytest.mark.parametrize("rule", ["fbcache", "teacache", "magcache", "easycache", "fixed"])
def test_attention_with_every_cache_and_a_solver_swap_compiles_regionally(rule):
    """The cache's decisions stay outside the compiled blocks. (Whole-model compilation of a cached
    model stops at each block's gate: the cache decides in Python whether the block runs.)"""
    config = cache_configs("WanTransformer3DModel")[rule]
    check_compiled("wan", "regional", attention=method_config("topk"), cache=config, solver="unipc")


def test_a_solver_swap_compiles_whole():
    check_compiled("wan", "whole", attention=method_config("radial"), solver="unipc")


@pytest.mark.parametrize("style", ["regional", "whole"])
def test_patch_then_compile(style):
    """The other order: accel.patch first, then compile; the same graph properties and outputs."""
    pipe = build_tiny_pipeline("wan")
    never_patched = latents(pipe, "wan", 3)
    handle = accel.patch(pipe, attention=method_config("radial"))
    eager = latents(pipe, "wan", 3)
    torch._dynamo.reset()
    counters.clear()
    compile_model(pipe, style)
    compiled = latents(pipe, "wan", 3)
    graphs = counters["stats"]["unique_graphs"]
    latents(pipe, "wan", 3, prompt="another prompt entirely")
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == graphs
    assert handle.summary()["methods"]["attention"]["counters"]["sparse_calls"] > 0
    handle.remove()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert torch.equal(latents(pipe, "wan", 3), never_patched)
