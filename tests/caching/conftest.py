from dataclasses import dataclass

import pytest
import torch

from accel.caching.indicators import Rule
from accel.pipelines.tiny import tiny_call_kwargs


def run_latents(pipe, family, steps=6, **overrides):
    """Final latents of one tiny-pipeline run (the VAE decode tells nothing about the transformer)."""
    out = pipe(**{**tiny_call_kwargs(family, steps=steps), "output_type": "latent", **overrides})
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def cache_counters(handle):
    return handle.summary()["methods"]["cache"]["counters"]


def flat_calibration(kind, model_class, steps, value, branches=("cond", "uncond", "cond_uncond")):
    """A hand-made artifact: constant TeaCache polynomial or constant MagCache ratios."""
    artifact = {"kind": kind, "model_class": model_class, "num_steps": steps}
    if kind == "teacache":
        artifact["coefficients"] = [0.0, 0.0, 0.0, 0.0, value]
    else:
        artifact["ratios"] = {b: [value] * steps for b in branches}
    return artifact


def record_decisions(handle):
    """[(step, branch, reused)] for every call, in order (wraps the rule's ``committed``)."""
    rule = handle.methods["cache"].engine.rule
    seen = []
    original = rule.committed

    def committed(state, probe, reused):
        seen.append((probe.step, probe.branch, reused))
        return original(state, probe, reused)

    rule.committed = committed
    return seen


def per_branch(decisions, branch):
    return [reused for _, b, reused in decisions if b == branch]


@dataclass
class CallCount:
    calls: int = 0


class AlwaysReuse(Rule):
    """Proposes reuse at every call; counts the calls it saw in its per-branch state."""

    State = CallCount

    def propose(self, state, probe):
        state.calls += 1
        return True


@pytest.fixture
def helpers():
    class Helpers:
        run = staticmethod(run_latents)
        counters = staticmethod(cache_counters)
        calibration = staticmethod(flat_calibration)
        decisions = staticmethod(record_decisions)
        branch = staticmethod(per_branch)
        AlwaysReuse = AlwaysReuse
    return Helpers
