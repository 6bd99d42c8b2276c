"""Attention methods inside diffusers' context parallelism (Ulysses).

Under ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` each rank holds 1/N
of the sequence, and diffusers' templated attention swaps that for all of the sequence and 1/N of
the heads (an all-to-all), runs a kernel, and swaps back. A method runs as that kernel
(``forward_op``): it sees the whole sequence, so its plan over tokens is the plan one process
makes, and it is told which heads it holds (``AttnContext.head_offset``) for what it draws per head.

Two things are put back in one-process order first. The gathered sequence is the ranks' slices
one after another; where text shares the sequence (joint attention) each slice is (its text part,
its visual part), so the tokens are reordered to the layout's (all text, all visual) and back.

Ring attention merges partial results by their log-sum-exp, which accel's kernels do not return:
under ring (or ring x Ulysses) every call runs diffusers' own path, with one warning.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from accel.base.context import AttnContext, TokenLayout
from accel.base.parallel import degrees, ulysses_rank

from .base import needs_backward

RING = ("ring attention merges partial results by their log-sum-exp, which accel's kernels do not return; "
        "under ring_degree > 1 every call runs diffusers' own context-parallel attention")


def refusal(config: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any,
            layout: TokenLayout) -> Optional[str]:
    """Why a routed call under context parallelism must run diffusers' own path, or None."""
    degree = degrees(config)
    if degree["ring"] > 1:
        return RING
    if getattr(config, "ulysses_anything", False):
        return "ulysses_anything splits uneven slices, whose gathered order accel does not rebuild"
    if attn_mask is not None:
        return "an attention mask under context parallelism"
    if needs_backward(query, key, value):
        return "its inputs require grad; diffusers' context-parallel attention has the backward pass"
    if query.shape[2] % degree["ulysses"]:
        return f"{query.shape[2]} heads do not split over ulysses_degree={degree['ulysses']}"
    if key.shape[1] != query.shape[1]:
        return "keys and queries of different lengths under context parallelism"
    if one_process_order(layout, degree["ulysses"], query.shape[1]) is False:
        return "the gathered sequence does not match the call's token layout"
    return None


def one_process_order(layout: TokenLayout, world: int, local_length: int) -> Any:
    """Indices that put the gathered sequence in one-process order: None when it already is
    (no text in the sequence), False when the layout does not describe it."""
    visual, text = layout.visual_tokens, layout.text_tokens
    if visual is None:
        return None if not text else False
    if visual + text != world * local_length or visual % world or text % world:
        return False
    if not text:
        return None
    visual_part, text_part = visual // world, text // world
    text_first = layout.text_position == "prefix"
    rank_start = torch.arange(world) * local_length
    text_at = (rank_start + (0 if text_first else visual_part)).view(-1, 1) + torch.arange(text_part)
    visual_at = (rank_start + (text_part if text_first else 0)).view(-1, 1) + torch.arange(visual_part)
    parts = (text_at.reshape(-1), visual_at.reshape(-1))
    return torch.cat(parts if text_first else parts[::-1])


def ulysses_attention(method: Any, ctx: AttnContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scale: Optional[float], parallel_config: Any, config: Any) -> torch.Tensor:
    """``method`` as the kernel of diffusers' templated Ulysses attention."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    world = degrees(config)["ulysses"]
    held = query.shape[2] // world
    head_ctx = dataclasses.replace(ctx, head_offset=ulysses_rank(config) * held)
    order = one_process_order(ctx.layout, world, query.shape[1])
    inverse = None if order is None else torch.argsort(order).to(query.device)
    order = None if order is None else order.to(query.device)

    def forward_op(op_ctx, q, k, v, attn_mask, dropout_p, is_causal, scale_, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        if order is not None:
            q, k, v = (x.index_select(1, order) for x in (q, k, v))
        out = method.run(q, k, v, head_ctx, scale=scale_)
        return out if inverse is None else out.index_select(1, inverse)

    def backward_op(op_ctx, grad_out, *args):  # calls that need one take diffusers' path (refusal)
        raise RuntimeError("accel's context-parallel attention ran a call that needs a backward pass")

    return _templated_context_parallel_attention(query, key, value, None, 0.0, False, scale, False, False,
                                                 forward_op=forward_op, backward_op=backward_op,
                                                 _parallel_config=parallel_config)
