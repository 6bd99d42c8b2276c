"""``attention="int8"`` and ``quantize="int8"`` on sparse patterns: fallback, simulation, precision schedule."""
import warnings

import pytest
import torch

import accel
from accel.base.context import AttnContext, StepContext, TokenLayout
from accel.base.registry import ATTENTION_METHODS
from accel.catalog import list_all
from accel.attention.intercept import dense_attention
from accel.attention.quantized import Int8Attention, Int8AttentionConfig
from accel.attention.patterns import RadialConfig, TopKConfig
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

TopKAttention = ATTENTION_METHODS.get("topk")

# Small blocks so the tiny pipelines' 48 visual tokens are really sparse; no dense warm-up.
SPARSE = {"block_size": 16, "dense_warmup": 0.0, "dense_layers": 0, "backend": "torch", "density": 0.5}


def relative_error(out, reference):
    return ((out - reference).norm() / reference.norm()).item()


def patched_run(pipe, family, run_pipeline, attention):
    kwargs = {**tiny_call_kwargs(family, steps=2), "output_type": "latent"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = accel.patch(pipe, attention=attention)
        out = run_pipeline(pipe, kwargs)
        counters = handle.summary()["methods"]["attention"]["counters"]
        handle.remove()
    return out, counters, [str(w.message) for w in caught if "accel" in str(w.message)]


def test_int8_is_registered_and_listed():
    assert ATTENTION_METHODS.get("int8") is Int8Attention
    assert "int8" in list_all()["methods"]["attention"]
    assert accel.Config(attention="radial+int8").attention == "radial+int8"


@pytest.mark.parametrize("make, field", [
    (lambda: Int8AttentionConfig(pv="int4"), "pv"),
    (lambda: Int8AttentionConfig(full_precision_steps=1.5), "full_precision_steps"),
    (lambda: Int8AttentionConfig(full_precision_layers=-1), "full_precision_layers"),
    (lambda: Int8AttentionConfig(block_size=16), "block_size"),
    (lambda: Int8AttentionConfig(backend="flex"), "backend"),
    (lambda: RadialConfig(quantize="int4"), "quantize"),
    (lambda: RadialConfig(quantize="int8", backend="flex"), "backend"),
    (lambda: TopKConfig(quantize="int8", full_precision_steps=-0.1), "full_precision_steps"),
    (lambda: accel.Config(attention="radial+int4"), "int8"),
    (lambda: accel.Config(attention="dense+int8"), "'int8'"),
])
def test_bad_quantization_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_wan_int8_falls_back_once_on_cpu_simulates_on_request_and_remove_restores(run_pipeline):
    family = "wan"
    pipe = build_tiny_pipeline(family)
    reference = run_pipeline(pipe, {**tiny_call_kwargs(family, steps=2), "output_type": "latent"})

    out, counters, messages = patched_run(pipe, family, run_pipeline, "int8")
    assert len(messages) == 1 and "INT8 attention runs on CUDA" in messages[0], messages
    assert counters["fallback_calls"] == counters["calls"] > 0 and counters["quantized_calls"] == 0
    dense, _, _ = patched_run(pipe, family, run_pipeline, "dense")
    assert torch.equal(out, dense)

    out, counters, messages = patched_run(pipe, family, run_pipeline, Int8AttentionConfig(backend="torch"))
    assert messages == [] and counters["quantized_calls"] == counters["calls"] > 0
    assert not torch.equal(out, reference) and relative_error(out, reference) < 5e-3  # measured 7e-4

    spec = {"name": "radial+int8", **SPARSE}
    out, counters, messages = patched_run(pipe, family, run_pipeline, spec)
    assert messages == [] and counters["quantized_calls"] == counters["sparse_calls"] == counters["calls"] > 0
    unquantized, _, _ = patched_run(pipe, family, run_pipeline, RadialConfig(**SPARSE))
    assert not torch.equal(out, unquantized) and relative_error(out, unquantized) < 5e-3  # measured 8e-4

    assert torch.equal(run_pipeline(pipe, {**tiny_call_kwargs(family, steps=2), "output_type": "latent"}), reference)


# -- single attention calls -----------------------------------------------------------------------

def make_ctx(step=5, num_steps=10, layer=3, grid=(3, 4, 4), text=0, position=None):
    return AttnContext(layer_index=layer, num_layers=8, site=f"blocks.{layer}.attn", kind="joint" if text else "self",
                       heads=2, layout=TokenLayout(grid=grid, text_tokens=text, text_position=position),
                       step=StepContext(step_index=step, num_steps=num_steps))


def qkv(seq, batch=1, dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, 2, dim, generator=gen).to(dtype) for _ in range(3)]


def run_calls(method, calls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [method.run(*args, **kwargs) for args, kwargs in calls]
    return outs, [str(w.message) for w in caught]


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_int8_full_precision_steps_and_layers_run_exact_dense():
    q, k, v = qkv(48)
    method = Int8Attention(Int8AttentionConfig(backend="torch", full_precision_steps=0.2, full_precision_layers=1))
    (early, first_layer, quantized), messages = run_calls(method, [
        ((q, k, v, make_ctx(step=1)), {}), ((q, k, v, make_ctx(layer=0)), {}), ((q, k, v, make_ctx(step=2)), {})])
    assert messages == []
    dense = dense_attention(q, k, v)
    assert torch.equal(early, dense) and torch.equal(first_layer, dense)
    assert not torch.equal(quantized, dense) and cosine(quantized, dense) >= 0.999
    assert method.counters() == {"calls": 3, "fallback_calls": 0, "quantized_calls": 1, "full_precision_calls": 2}


def test_sparse_quantize_keeps_full_precision_steps_unquantized_and_falls_back_off_cuda():
    q, k, v = qkv(48)
    config = {**SPARSE, "similarity_threshold": -1.0}
    plain = TopKAttention(TopKConfig(**config))
    method = TopKAttention(TopKConfig(**config, quantize="int8", full_precision_steps=0.5))
    (early, late), messages = run_calls(method, [((q, k, v, make_ctx(step=2)), {}), ((q, k, v, make_ctx(step=6)), {})])
    assert messages == []
    assert torch.equal(early, plain.run(q, k, v, make_ctx(step=2)))
    expected = plain.run(q, k, v, make_ctx(step=6))
    assert not torch.equal(late, expected) and cosine(late, expected) >= 0.999
    counters = method.counters()
    assert counters["quantized_calls"] == 1 and counters["full_precision_calls"] == 1 and counters["sparse_calls"] == 2

    auto = TopKAttention(TopKConfig(**{**config, "backend": "auto"}, quantize="int8"))
    outs, messages = run_calls(auto, [((q, k, v, make_ctx()), {})] * 2)
    assert len(messages) == 1 and "backend='torch'" in messages[0]
    assert auto.fallback_calls == 2 and all(torch.equal(out, dense_attention(q, k, v)) for out in outs)


def test_int8_unsupported_dtype_falls_back_and_padding_masks_stay_quantized():
    q, k, v = qkv(48, dtype=torch.float64)
    method = Int8Attention(Int8AttentionConfig(backend="torch"))
    (out,), messages = run_calls(method, [((q, k, v, make_ctx()), {})])
    assert len(messages) == 1 and "dtype" in messages[0] and torch.equal(out, dense_attention(q, k, v))

    text, visual = 16, 48
    q, k, v = qkv(visual + text, batch=2)
    keep = torch.ones(2, 1, 1, visual + text, dtype=torch.bool)
    keep[0, ..., 12:text] = False  # prefix text; the batch items pad differently
    keep[1, ..., 5:text] = False
    method = Int8Attention(Int8AttentionConfig(backend="torch"))
    (out,), messages = run_calls(method, [((q, k, v, make_ctx(text=text, position="prefix")), {"attn_mask": keep})])
    assert messages == [] and method.sparse_calls == 1
    assert cosine(out, dense_attention(q, k, v, attn_mask=keep)) >= 0.999
