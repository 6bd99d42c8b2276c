"""The block-work count that puts ours and the peers' caches on one compute axis, against hand counts."""
import pytest
import torch

import accel
from accel.caching.configs import FixedCacheConfig
from accel.eval.work_count import WorkCounter
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 6


@pytest.fixture(scope="module")
def wan():
    return build_tiny_pipeline("wan")


def count(pipe, **overrides):
    counter = WorkCounter(pipe.transformer)
    with counter.counting(), torch.no_grad():
        pipe(**{**tiny_call_kwargs("wan", steps=STEPS), "output_type": "latent", **overrides})
    return counter.macs


def hand_count_per_call(transformer, tokens: int, text_tokens: int) -> int:
    """One transformer call of the tiny Wan, by hand: per block, self-attention (4 projections and
    the two products over tokens x tokens), cross-attention (query and output projections of the
    video tokens, key and value projections of the text, the products over tokens x text) and the
    feed-forward (two projections)."""
    dim, ffn = transformer.config.num_attention_heads * transformer.config.attention_head_dim, transformer.config.ffn_dim
    self_attention = 4 * tokens * dim * dim + 2 * tokens * tokens * dim
    cross_attention = 2 * tokens * dim * dim + 2 * text_tokens * dim * dim + 2 * tokens * text_tokens * dim
    feed_forward = 2 * tokens * dim * ffn
    return transformer.config.num_layers * (self_attention + cross_attention + feed_forward)


def test_dense_count_is_the_hand_count(wan):
    calls = 2 * STEPS  # cond and uncond are separate calls in WanPipeline
    assert count(wan) == calls * hand_count_per_call(wan.transformer, tokens=3 * 4 * 4, text_tokens=16)


def test_our_cache_counted_by_the_hooks_is_the_engines_own_count(wan):
    dense = count(wan)
    handle = accel.patch(wan, cache=FixedCacheConfig(interval=2))
    try:
        cached = count(wan)
        engine = handle.summary()["methods"]["cache"]["counters"]["compute_fraction"]
    finally:
        handle.remove()
    assert engine < 1.0
    assert cached / dense == pytest.approx(engine, abs=1e-4)  # the engine reports to 4 decimals


def test_a_diffusers_forecast_of_every_module_counts_only_the_computed_steps(wan):
    diffusers = pytest.importorskip("diffusers")
    dense = count(wan)
    # TaylorSeer forecasts attn1, attn2 and ffn (everything with weights in a Wan block) and
    # computes steps 0 (warm-up), then every 2nd from disable_cache_before_step + 1: 0, 2 and 4 of 6.
    wan.transformer.enable_cache(diffusers.TaylorSeerCacheConfig(
        cache_interval=2, max_order=1, disable_cache_before_step=1,
        cache_identifiers=[r"^blocks\.\d+\.(attn1|attn2|ffn)$"]))
    try:
        forecast = count(wan)
    finally:
        wan.transformer.disable_cache()
    assert forecast / dense == pytest.approx(3 / 6)
