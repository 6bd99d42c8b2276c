"""``attention="dense"``: exact attention through accel's interception (torch SDPA).

It changes no number; it exists to prove the interception path is exact on every family and is
the baseline that sparse and quantized methods are measured against.
"""
from __future__ import annotations

from dataclasses import dataclass

from accel.base.registry import ATTENTION_METHODS

from .base import AttentionMethod
from .intercept import dense_attention


@dataclass(frozen=True)
class DenseAttentionConfig:
    pass


@ATTENTION_METHODS.register("dense")
class DenseAttention(AttentionMethod):
    name = "dense"
    Config = DenseAttentionConfig
    differentiable = True

    def attend(self, q, k, v, ctx, attn_mask=None, scale=None):
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
