"""Every preset of every family resolves to registered methods and runs on the tiny pipeline."""
import pytest
import torch

import accel
from accel.api import adapter_for
from accel.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_presets_run_and_default_is_used_without_arguments(family, run_pipeline):
    pipe = build_tiny_pipeline(family)
    adapter = adapter_for(pipe.transformer)
    reference = run_pipeline(pipe, tiny_call_kwargs(family, steps=4))
    for preset in adapter.presets:
        with accel.patched(pipe, preset=preset) as handle:
            out = run_pipeline(pipe, tiny_call_kwargs(family, steps=4))
            summary = handle.summary()
        assert summary["preset"] == preset and torch.isfinite(out).all()
        expected = {kind for kind, spec in adapter.presets[preset].items() if spec is not None}
        assert {kind for kind, info in summary["methods"].items() if info is not None} == expected
    with accel.patched(pipe) as handle:
        assert handle.preset == adapter.default_preset
    assert torch.equal(run_pipeline(pipe, tiny_call_kwargs(family, steps=4)), reference)
