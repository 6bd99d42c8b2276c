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


def test_a_method_by_name_is_the_first_preset_that_names_it():
    """``cache="fbcache"`` is the ``quality`` preset's fbcache, ``cache="fixed"`` the ``balanced`` one
    (before: fbcache by name used 0.08 where ``quality`` uses 0.1, and reused nothing in 10 steps)."""
    from accel.config import resolve_method
    from accel.pipelines.presets import BASE_PRESETS

    seen = set()
    for preset, parts in BASE_PRESETS.items():
        for kind, spec in parts.items():
            if spec is None:
                continue
            name = spec if isinstance(spec, str) else spec["name"]
            if (kind, name) in seen:
                continue
            seen.add((kind, name))
            assert resolve_method(kind, name).config == resolve_method(kind, spec).config, (preset, kind, name)
    assert ("cache", "fbcache") in seen and ("cache", "fixed") in seen


def test_the_summary_warns_when_a_method_changed_nothing(run_pipeline):
    pipe = build_tiny_pipeline("flux")  # one frame: the video-only radial pattern falls back on every call
    with accel.patched(pipe, cache={"name": "fbcache", "threshold": 0.0},
                       attention={"name": "radial", "block_size": 16, "backend": "torch"}) as handle:
        with pytest.warns(RuntimeWarning):
            run_pipeline(pipe, tiny_call_kwargs("flux", steps=3))
        summary = handle.summary()
    warnings = summary["warnings"]
    assert any(w.startswith("cache 'fbcache' reused no step in 3 transformer calls") for w in warnings), warnings
    assert any(w.startswith("attention 'radial' fell back to exact dense attention on all") and "frames" in w
               for w in warnings), warnings
    assert "warning: cache 'fbcache' reused no step" in str(summary)
    # Wan's tiny grid has enough key blocks per row for density 0.25 to drop some (FLUX's keeps them
    # all, which the summary now says); similarity_threshold -1: random weights make no block
    # self-similar, and topk would otherwise keep every row
    wan = build_tiny_pipeline("wan")
    topk = {"name": "topk", "block_size": 16, "backend": "torch", "similarity_threshold": -1.0, "density": 0.25}
    with accel.patched(wan, cache="fixed", attention=topk) as handle:
        run_pipeline(wan, tiny_call_kwargs("wan", steps=4))
        assert handle.summary()["warnings"] == []  # both did something
