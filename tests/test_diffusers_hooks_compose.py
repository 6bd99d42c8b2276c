"""diffusers' own model hooks and accel's patch on one model, in both orders: layerwise casting
(fp8 storage) and group offloading (block and leaf level) stay exact with an exact patch (dense
attention through accel, a cache that never reuses), and ``remove()`` leaves diffusers' hook
working as before."""
import pytest
import torch

import accel
from accel.caching import FBCacheConfig
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

EXACT = dict(attention="dense", cache=FBCacheConfig(threshold=1e-9))  # routes everything, reuses nothing


def layerwise_casting(pipe):
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def block_offloading(pipe):
    pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)


def leaf_offloading(pipe):
    pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")


def generate(pipe):
    with torch.no_grad():
        return pipe(**{**tiny_call_kwargs("wan", steps=3), "output_type": "latent"}).frames


@pytest.mark.parametrize("hook", [layerwise_casting, block_offloading, leaf_offloading], ids=lambda f: f.__name__)
@pytest.mark.parametrize("accel_first", [False, True], ids=["diffusers-then-accel", "accel-then-diffusers"])
def test_diffusers_hooks_and_an_exact_patch_compose_in_both_orders(hook, accel_first):
    reference_pipe = build_tiny_pipeline("wan")
    hook(reference_pipe)
    reference = generate(reference_pipe)
    if hook is layerwise_casting:  # the hook is live: fp8 storage changes the numbers
        assert not torch.equal(reference, generate(build_tiny_pipeline("wan")))

    pipe = build_tiny_pipeline("wan")
    if accel_first:
        handle = accel.patch(pipe, **EXACT)
        hook(pipe)
    else:
        hook(pipe)
        handle = accel.patch(pipe, **EXACT)
    patched = generate(pipe)
    counters = handle.summary()["methods"]
    assert counters["attention"]["counters"]["calls"] > 0 and sum(counters["cache"]["counters"]["calls"].values()) > 0
    assert counters["cache"]["counters"]["compute_fraction"] == 1.0
    assert torch.equal(patched, reference)
    handle.remove()
    assert torch.equal(generate(pipe), reference)
