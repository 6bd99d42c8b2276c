"""The user's diffusers attention backend on every dense path of a routed call: a method that falls
back, and a sparse pattern at density 1.0, give the unpatched output bit for bit under each
backend that runs here."""
import warnings

import pytest
import torch

import accel
from accel.api import adapter_for
from accel.base.adapter import INVOKES_DISPATCH
from accel.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs

attention_dispatch = pytest.importorskip("diffusers.models.attention_dispatch")

DISPATCH_FAMILIES = [f for f in TINY_FAMILIES if adapter_for(build_tiny_pipeline(f).transformer).invokes == INVOKES_DISPATCH]
METHODS = {
    "int8": "int8",  # no INT8 kernel on the CPU: every call falls back (one warning)
    "topk at density 1.0": {"name": "topk", "density": 1.0, "block_size": 16, "backend": "torch"},
    "radial at density 1.0": {"name": "radial", "density": 1.0, "block_size": 16, "backend": "torch"},
}


def latents(pipe, family):
    with torch.no_grad():
        out = pipe(**{**tiny_call_kwargs(family, steps=2), "output_type": "latent"})
    return out.frames if hasattr(out, "frames") else out.images


def runnable_backends(pipe, family):
    """Every diffusers backend whose unpatched run works on this machine, with its output."""
    found = {}
    for backend in attention_dispatch.AttentionBackendName:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe.transformer.set_attention_backend(backend.value)
                found[backend.value] = latents(pipe, family)
        except Exception:  # noqa: BLE001 - not usable here: missing package, no device, a hub kernel offline
            continue
    return found


@pytest.mark.parametrize("family", DISPATCH_FAMILIES)
def test_dense_paths_are_the_users_backend_bit_for_bit(family):
    pipe = build_tiny_pipeline(family)
    outputs = runnable_backends(pipe, family)
    assert {"native", "_native_math"} <= set(outputs), sorted(outputs)
    # _native_math rounds differently from native: a dense path through torch SDPA would show
    assert not torch.equal(outputs["native"], outputs["_native_math"])
    for backend, unpatched in outputs.items():
        pipe.transformer.set_attention_backend(backend)
        for label, spec in METHODS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the int8 fallback's one warning
                with accel.patched(pipe, attention=spec) as handle:
                    patched = latents(pipe, family)
                    counters = handle.summary()["methods"]["attention"]["counters"]
            assert counters["calls"] > 0, (family, backend, label)
            assert torch.equal(patched, unpatched), (family, backend, label, (patched - unpatched).abs().max())
        assert torch.equal(latents(pipe, family), unpatched), (family, backend, "after remove()")


def test_an_approximate_user_backend_is_replaced_with_one_warning(monkeypatch):
    """SageAttention does not run on the CPU: the backend the router sees is named as sage while
    the call itself runs native; the rule and its one warning are what is checked."""
    from accel.attention import intercept

    pipe = build_tiny_pipeline("wan")
    monkeypatch.setattr(intercept, "_backend_name", lambda backend: "sage")
    with warnings.catch_warnings(record=True) as caught, accel.patched(pipe, attention="int8"):
        warnings.simplefilter("always")
        latents(pipe, "wan")
    said = [str(w.message) for w in caught if "itself approximate" in str(w.message)]
    assert len(said) == 1 and "'int8' replaces it" in said[0], said
    with warnings.catch_warnings(record=True) as caught, accel.patched(pipe, attention="dense"):
        warnings.simplefilter("always")
        latents(pipe, "wan")
    assert not [w for w in caught if "itself approximate" in str(w.message)]
