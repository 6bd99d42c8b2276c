"""One live handle per module, and no routing state that outlives a handle.

Regression tests for issue 20's first item (before the fix, a second handle on shared modules was
accepted and, after both removes, a never-patched pipeline's attention still went to the removed
method: its latents moved by 0.165).
"""
import pytest
import torch
from diffusers import WanPipeline

import accel
from accel.attention import intercept
from accel.attention.base import AttentionMethod
from accel.attention.patterns import RadialConfig
from accel.base.changes import ChangeLog
from accel.base.registry import ATTENTION_METHODS
from accel.pipelines.wan import WanAdapter
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

RADIAL = RadialConfig(density=0.2, block_size=16, backend="torch", dense_warmup=0.0, dense_layers=0)


def latents(pipe):
    return pipe(**{**tiny_call_kwargs("wan", steps=2), "output_type": "latent"}).frames


@pytest.mark.parametrize("second", ["shared_components", "transformer_then_pipeline", "pipeline_then_transformer"])
def test_a_module_of_a_live_handle_is_refused_and_replace_removes_that_handle(second):
    pipe = build_tiny_pipeline("wan")
    if second == "transformer_then_pipeline":
        first, other = pipe.transformer, pipe
    elif second == "pipeline_then_transformer":
        first, other = pipe, pipe.transformer
    else:
        first, other = pipe, WanPipeline(**pipe.components)  # what from_pipe does
    h1 = accel.patch(first, attention=RADIAL)
    with pytest.raises(ValueError, match=r"already patched by <accel.Handle wan .*active>.*replace=True"):
        accel.patch(other, attention="dense")
    h2 = accel.patch(other, attention="dense", replace=True)
    assert h1.removed and not h2.removed
    h2.remove()
    assert "_accel_handle" not in vars(pipe) and "_accel_handle" not in vars(pipe.transformer)


def test_routing_state_never_outlives_its_routes():
    """Two routes on the same attention modules, undone in the order they were made (not the
    reverse): each must remove its own entry and its own site, so that no route (here radial)
    stays switched on after both are gone, and the processors get their own class back."""
    pipe, never_patched = build_tiny_pipeline("wan", seed=0), build_tiny_pipeline("wan", seed=1)
    reference = latents(never_patched)
    classes = {name: type(m.processor) for name, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    radial, extra_routes, handle = ATTENTION_METHODS.get("radial")(RADIAL), ChangeLog(), []
    sites = WanAdapter().attention_sites(pipe.transformer)
    for site in sites:  # routed first, removed first
        assert intercept.route_module(site, WanAdapter.invokes, radial, lambda site=site: AttentionMethod._context_factory(
            handle[0].session, pipe.transformer, site, len(sites))(), extra_routes)
    handle.append(accel.patch(pipe, attention="dense"))
    latents(pipe)
    assert handle[0].methods["attention"].calls > 0 and radial.calls == 0  # the innermost route runs
    assert intercept.routed_entries() == ()
    extra_routes.undo_all()
    latents(pipe)
    assert handle[0].methods["attention"].calls > 0
    handle[0].remove()
    assert classes == {name: type(m.processor) for name, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    assert not any(hasattr(m, "_accel_site") for m in pipe.transformer.modules())
    with accel.patched(build_tiny_pipeline("wan", seed=2), preset="dense"):  # routes other modules of the same classes
        assert torch.equal(latents(never_patched), reference)
    assert intercept.routed_entries() == ()


@pytest.mark.parametrize("action", ["patch", "remove"])
def test_patch_and_remove_are_refused_from_inside_a_generation(action):
    pipe = build_tiny_pipeline("wan")
    handle = accel.patch(pipe, cache="fixed") if action == "remove" else None

    def callback(pipeline, step, timestep, tensors):
        if step == 0:
            handle.remove() if action == "remove" else accel.patch(pipeline, attention="dense")
        return {}

    with pytest.raises(ValueError, match=f"cannot {'remove accel from' if action == 'remove' else 'patch'} "
                                         "WanPipeline while a generation is running"):
        pipe(**tiny_call_kwargs("wan", steps=2), callback_on_step_end=callback)
    if handle is not None:
        assert not handle.removed
        handle.remove()
    assert "_accel_handle" not in vars(pipe)
    with accel.patched(pipe, attention="dense"):  # after the failed call both work again
        latents(pipe)
