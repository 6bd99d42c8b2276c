"""Every misuse gets a clear error; an unsupported device/shape falls back with one warning."""
import warnings

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import accel
from accel.base.config import check_choice, check_range
from accel.base.registry import ATTENTION_METHODS
from accel.attention.base import AttentionMethod
from accel.attention.dense import DenseAttentionConfig
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs


@pytest.fixture(scope="module")
def wan_pipe():
    return build_tiny_pipeline("wan")


def test_unknown_preset_lists_valid_ones(wan_pipe):
    with pytest.raises(ValueError, match=r"unknown preset 'turbo' for wan; valid presets: .*dense"):
        accel.patch(wan_pipe, preset="turbo")


@pytest.mark.parametrize("kind, label", [("attention", "attention method"), ("cache", "cache method"),
                                         ("solver", "solver")])
def test_unknown_method_lists_valid_ones(wan_pipe, kind, label):
    with pytest.raises(ValueError, match=rf"unknown {label} 'warp-speed'; valid names: "):
        accel.patch(wan_pipe, **{kind: "warp-speed"})
    assert "_accel_handle" not in vars(wan_pipe), "a failed patch must leave nothing behind"


def test_unknown_attention_name_error_names_the_valid_methods(wan_pipe):
    with pytest.raises(ValueError) as info:
        accel.Config(attention="radiall")
    assert "dense" in str(info.value)


@pytest.mark.parametrize("bad, field", [
    (dict(preset=3), "preset"),
    (dict(attention=3.5), "attention"),
    (dict(solver=object()), "solver"),
])
def test_invalid_config_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        accel.Config(**bad)


def test_config_and_shortcuts_are_exclusive(wan_pipe):
    with pytest.raises(ValueError, match="either config"):
        accel.patch(wan_pipe, attention="dense", config=accel.Config(attention="dense"))


def test_range_and_choice_validators_name_field_and_range():
    with pytest.raises(ValueError, match=r"Cfg.threshold must be in \[0, 1\], got 1.5"):
        check_range("Cfg", "threshold", 1.5, 0, 1)
    with pytest.raises(ValueError, match=r"Cfg.steps must be in \(0, inf\), got 0"):
        check_range("Cfg", "steps", 0, 0, None, low_inclusive=False, integer=True)
    with pytest.raises(ValueError, match=r"Cfg.steps must be an integer"):
        check_range("Cfg", "steps", 2.5, 1, None, integer=True)
    with pytest.raises(ValueError, match=r"Cfg.order must be one of 1, 2, got 3"):
        check_choice("Cfg", "order", 3, (1, 2))
    check_range("Cfg", "threshold", 0.5, 0, 1)  # a valid value passes


def test_unsupported_pipeline_names_supported_families():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    with pytest.raises(ValueError, match=r"does not support DDPMPipeline.*wan \(WanTransformer3DModel\)"):
        accel.patch(pipe)
    with pytest.raises(ValueError, match="diffusers pipeline or transformer"):
        accel.patch(object())


def test_double_patch_raises_then_replace_is_clean(wan_pipe, run_pipeline):
    reference = run_pipeline(wan_pipe, tiny_call_kwargs("wan"))
    first = accel.patch(wan_pipe, attention="dense")
    with pytest.raises(ValueError, match="already patched"):
        accel.patch(wan_pipe, attention="dense")
    second = accel.patch(wan_pipe, config=accel.Config(attention=DenseAttentionConfig()), replace=True)
    assert first.removed and not second.removed
    run_pipeline(wan_pipe, tiny_call_kwargs("wan"))
    assert first.summary()["methods"]["attention"]["counters"]["calls"] == 0, "old patch must be inert"
    assert second.summary()["methods"]["attention"]["counters"]["calls"] > 0
    second.remove()
    second.remove()  # idempotent
    assert torch.equal(run_pipeline(wan_pipe, tiny_call_kwargs("wan")), reference)


class _NeverSupported(AttentionMethod):
    """A method whose every call is unsupported: the fallback must be exact dense attention."""

    name = "test_never_supported"
    Config = type("NeverSupportedConfig", (), {})

    def unsupported(self, q, k, v, ctx, attn_mask):
        return f"head dim {q.shape[-1]} is not supported by this test method"

    def attend(self, *args, **kwargs):
        raise AssertionError("must not be called")


def test_fallback_is_exactly_dense_with_one_warning(wan_pipe, run_pipeline, monkeypatch):
    reference = run_pipeline(wan_pipe, tiny_call_kwargs("wan"))
    monkeypatch.setitem(ATTENTION_METHODS._entries, "test_never_supported", _NeverSupported)
    handle = accel.patch(wan_pipe, attention="test_never_supported")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_pipeline(wan_pipe, tiny_call_kwargs("wan"))
    handle.remove()
    ours = [w for w in caught if "accel attention" in str(w.message)]
    assert len(ours) == 1 and "falling back to dense attention: head dim" in str(ours[0].message)
    counters = handle.summary()["methods"]["attention"]["counters"]
    assert counters["fallback_calls"] == counters["calls"] > 0
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_exception_inside_attention_does_not_leave_routing_on(wan_pipe, monkeypatch):
    from accel.attention import intercept
    from accel.attention.dense import DenseAttention

    def boom(self, *args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(DenseAttention, "attend", boom)
    handle = accel.patch(wan_pipe, attention="dense")
    with pytest.raises(RuntimeError, match="kernel failed"):
        wan_pipe(**tiny_call_kwargs("wan"))
    assert intercept.routed_entries() == ()
    handle.remove()


@pytest.mark.parametrize("make, message", [
    (lambda: accel.Config(cache={"name": "fbcache", "threshold": 10 ** 400}), "FBCacheConfig.threshold must be a finite"),
    (lambda: accel.Config(attention={"name": "radial", "density": 10 ** 400}), "RadialConfig.density must be a finite"),
    (lambda: accel.Config(solver={"name": "euler", "sigmas": [1.0, 0.5, "x"]}), r"EulerConfig.sigmas\[2\] must be a number"),
    (lambda: accel.Config(solver={"name": "euler", "sigmas": [[1.0], [0.5]]}), r"EulerConfig.sigmas\[0\] must be a number"),
    (lambda: accel.Config(solver={"name": "euler", "steps": 10 ** 12}), r"EulerConfig.steps must be in \[1, 1000\]"),
    (lambda: accel.Config(solver={"name": "unipc", "cfg_zero_steps": 10 ** 12}), "cfg_zero_steps must be in"),
    (lambda: accel.Config(attention={"name": ["radial"]}), r"attention method is named by a string; got \['radial'\]"),
    (lambda: accel.Config(cache={"name": {"fixed": 1}}), "cache method is named by a string"),
    (lambda: accel.Config(attention={"name": "radial+int8", "quantize": "none"}),
     "says quantize='int8' but its entry also sets quantize='none'"),
])
def test_config_misuse_is_a_value_error_naming_the_field(make, message):
    """Each of these raised OverflowError/TypeError, allocated terabytes, or silently picked one value."""
    with pytest.raises(ValueError, match=message):
        make()
