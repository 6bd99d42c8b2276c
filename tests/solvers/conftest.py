import pytest
import torch

from accel.api import adapter_for
from accel.pipelines.tiny import tiny_call_kwargs


def latents(pipe, family, steps=3, **overrides):
    """The final latents of a tiny run (no VAE decode: faster, and closer to the solver)."""
    kwargs = tiny_call_kwargs(family, steps=steps)
    kwargs.update(output_type="latent", **overrides)
    out = pipe(**kwargs)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


@pytest.fixture
def run_latents():
    return latents


class CallCounter:
    """Counts real transformer work: calls and batch rows reaching the first block (a skipped call
    still passes the transformer's own hooks, so its first block is where work shows)."""

    def __init__(self, model):
        block = adapter_for(model).block_stacks(model)[0].blocks[0]
        self.calls = self.rows = 0
        self._hook = block.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.calls += 1
        self.rows += hidden.shape[0]

    def remove(self):
        self._hook.remove()


@pytest.fixture
def call_counter():
    return CallCounter
