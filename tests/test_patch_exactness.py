"""``attention="dense"`` changes nothing, and ``remove()`` restores bit-identical output, per family."""
import pytest
import torch

import accel
from accel.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dense_equals_unpatched_and_remove_restores(family, run_pipeline):
    pipe = build_tiny_pipeline(family)
    never_patched = run_pipeline(pipe, tiny_call_kwargs(family))

    handle = accel.patch(pipe, attention="dense")
    patched = run_pipeline(pipe, tiny_call_kwargs(family))
    summary = handle.summary()
    handle.remove()
    restored = run_pipeline(pipe, tiny_call_kwargs(family))

    assert summary["family"] == handle.family
    assert summary["methods"]["attention"]["counters"]["calls"] > 0, "no attention call was intercepted"
    assert summary["methods"]["attention"]["counters"]["fallback_calls"] == 0
    torch.testing.assert_close(patched, never_patched, atol=1e-6, rtol=0)
    assert torch.equal(restored, never_patched)


def test_remove_restores_every_attribute():
    pipe = build_tiny_pipeline("wan")
    transformer, scheduler = pipe.transformer, pipe.scheduler
    before = (dict(vars(transformer)), dict(vars(scheduler)), dict(vars(pipe)))
    processors = {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in transformer.named_modules()}
    import diffusers.models.transformers.transformer_wan as wan_module
    dispatch = wan_module.dispatch_attention_fn

    classes = {name: type(p) for name, p in processors.items()}
    handle = accel.patch(pipe, attention="dense")
    assert wan_module.dispatch_attention_fn is dispatch  # routed processors read a shadow of the module
    assert any(type(m.processor) is not classes[name] for name, m in transformer.named_modules() if name in classes)
    handle.remove()

    assert wan_module.dispatch_attention_fn is dispatch
    assert (dict(vars(transformer)), dict(vars(scheduler)), dict(vars(pipe))) == before
    assert processors == {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}
    assert classes == {name: type(p) for name, p in processors.items()}
    assert hooks == {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in transformer.named_modules()}


def test_patched_context_manager_restores(run_pipeline):
    pipe = build_tiny_pipeline("flux")
    reference = run_pipeline(pipe, tiny_call_kwargs("flux"))
    with accel.patched(pipe, attention="dense") as handle:
        inside = run_pipeline(pipe, tiny_call_kwargs("flux"))
        assert not handle.removed
    assert handle.removed
    torch.testing.assert_close(inside, reference, atol=1e-6, rtol=0)
    assert torch.equal(run_pipeline(pipe, tiny_call_kwargs("flux")), reference)


def test_two_pipelines_share_the_router_and_unpatched_one_is_untouched(run_pipeline):
    a, b = build_tiny_pipeline("wan", seed=0), build_tiny_pipeline("wan", seed=1)
    ref_b = run_pipeline(b, tiny_call_kwargs("wan"))
    handle_a = accel.patch(a, attention="dense")
    assert torch.equal(run_pipeline(b, tiny_call_kwargs("wan")), ref_b)
    handle_b = accel.patch(b, attention="dense")
    handle_a.remove()  # b is still patched: the shared router must stay installed for it
    run_pipeline(b, tiny_call_kwargs("wan"))
    assert handle_b.summary()["methods"]["attention"]["counters"]["calls"] > 0
    handle_b.remove()
    assert torch.equal(run_pipeline(b, tiny_call_kwargs("wan")), ref_b)
