"""``attention="dense"``: exact attention through accel's interception.

By default it runs the caller's own kernel (diffusers' dispatcher with the backend the processor
asked for) and changes no number: it proves the interception path is exact on every family and is
the baseline sparse and quantized methods are measured against. ``backend="xformers"`` runs
xformers' memory-efficient attention instead where xformers has an operator for the call, and the
caller's kernel (one warning) where it has none.
"""
from __future__ import annotations

from dataclasses import dataclass

from accel.base.config import check_choice
from accel.base.registry import ATTENTION_METHODS

from .base import AttentionMethod
from .intercept import dense_attention
from .xformers_backend import xformers_attention, xformers_unsupported

DENSE_BACKENDS = ("caller", "xformers")


@dataclass(frozen=True)
class DenseAttentionConfig:
    backend: str = "caller"

    def __post_init__(self) -> None:
        check_choice("DenseAttentionConfig", "backend", self.backend, DENSE_BACKENDS)


@ATTENTION_METHODS.register("dense")
class DenseAttention(AttentionMethod):
    name = "dense"
    Config = DenseAttentionConfig
    differentiable = True

    def unsupported(self, q, k, v, ctx, attn_mask):
        return xformers_unsupported(q, attn_mask) if self.config.backend == "xformers" else None

    def attend(self, q, k, v, ctx, attn_mask=None, scale=None):
        if self.config.backend == "xformers":
            return xformers_attention(q, k, v, scale=scale)
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
