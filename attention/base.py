"""Base class of attention methods: interception, fallback and counters in one place."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from accel.base.context import AttnContext
from accel.base.method import Method, PatchSession

from .intercept import dense_attention, route_module


NO_BACKWARD = "its inputs require grad and it has no backward pass; dense attention gives the exact gradient"


def needs_backward(*tensors: torch.Tensor) -> bool:
    """This call is recorded for a backward pass (training, not inference)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class AttentionMethod(Method):
    """Replaces the self/joint attention of every site the adapter lists.

    Subclasses implement ``attend`` (q, k, v as (B, S, H, D)) and may override ``unsupported`` to
    name a reason to fall back; the fallback is exact dense attention plus one warning per reason.
    """

    kind = "attention"
    # Whether ``attend`` has a backward pass; methods without one run exact dense attention (one
    # warning) on calls whose inputs require grad, so training through a patched model works.
    differentiable = False

    def __init__(self, config: Any):
        super().__init__(config)
        self.calls = 0
        self.fallback_calls = 0
        self.fallback_reasons: Dict[str, int] = {}

    def attach(self, session: PatchSession) -> None:
        for model in session.models:
            sites = session.adapter.attention_sites(model)
            for site in sites:
                if not route_module(site, session.adapter.invokes, self,
                                    self._context_factory(session, model, site, len(sites)), session.changes):
                    self.warn_once(f"cannot intercept {type(site.module.processor).__name__} at {site.path}; "
                                   "that module keeps its own attention")

    @staticmethod
    def _context_factory(session: PatchSession, model: torch.nn.Module, site, num_layers: int):
        def make() -> AttnContext:
            return AttnContext(layer_index=site.layer_index, num_layers=num_layers, site=site.path,
                               kind=site.kind, heads=site.heads, layout=session.layout_of(model),
                               step=session.step)
        return make

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext,
            attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
            refused: Optional[str] = None) -> torch.Tensor:
        """``refused``: a reason the caller found to run its exact kernel (e.g. ring attention)."""
        self.calls += 1
        reason = refused or self._backward_reason(q, k, v) or self.unsupported(q, k, v, ctx, attn_mask)
        if reason is not None:
            self.fallback_calls += 1
            self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1
            self.warn_once(f"falling back to dense attention: {reason}")
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return self.attend(q, k, v, ctx, attn_mask=attn_mask, scale=scale)

    def _backward_reason(self, q, k, v) -> Optional[str]:
        return None if self.differentiable or not needs_backward(q, k, v) else NO_BACKWARD

    def unsupported(self, q, k, v, ctx: AttnContext, attn_mask) -> Optional[str]:
        return None

    def attend(self, q, k, v, ctx: AttnContext, attn_mask=None, scale=None) -> torch.Tensor:
        raise NotImplementedError

    def counters(self) -> Dict[str, Any]:
        return {"calls": self.calls, "fallback_calls": self.fallback_calls}

    def idle_warning(self) -> Optional[str]:
        if self.calls and self.fallback_calls == self.calls:
            reasons = "; ".join(sorted(self.fallback_reasons))
            return (f"attention {self.name!r} fell back to exact dense attention on all {self.calls} calls, so it "
                    f"changed nothing ({reasons})")
        return None
