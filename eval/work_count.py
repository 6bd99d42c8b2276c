"""The transformer-block work a run actually did, counted the same way for every cache.

Caches skip work at different grains: ours and FirstBlockCache skip whole blocks, TaylorSeer
forecasts the attention and feed-forward modules and lets norms and modulation run, pyramid
attention broadcast skips attention only. A hook on a block would fire even when a peer's own
hook on it skipped the work inside, so the count is taken one level down, on what does the work:

* every ``torch.nn.Linear`` inside the transformer's block stacks: tokens x in x out
  multiply-accumulates per call;
* every attention module inside them (diffusers' ``Attention``/``AttentionModuleMixin``: a module
  with ``heads`` and ``to_q``): the score and value products, 2 x query tokens x key tokens x
  inner width per call (joint attention: text and image tokens on both sides).

A skipped or forecast module never calls its own submodules, so neither is counted (the
attention products are counted when the module's ``to_q`` runs). The compute
fraction of a run is its count over the dense run's count of the same workload.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch


def block_modules(transformer: torch.nn.Module) -> List[torch.nn.Module]:
    """The transformer's block-stack modules (its adapter's stacks; every ``ModuleList`` of a
    model accel has no adapter for)."""
    from accel.api import adapter_for

    adapter = adapter_for(transformer)
    if adapter is not None:
        stacks = adapter.block_stacks(transformer)
        if stacks:
            return [block for stack in stacks for block in stack.blocks]
    return [block for module in transformer.children() if isinstance(module, torch.nn.ModuleList)
            for block in module]


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "heads") and isinstance(getattr(module, "to_q", None), torch.nn.Linear)


def transformers(pipe) -> List[torch.nn.Module]:
    """The pipeline's denoisers (Wan 2.2's two experts are two)."""
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


class WorkCounter:
    """Multiply-accumulates run inside the blocks of ``models`` while ``counting()`` is active."""

    def __init__(self, *models: torch.nn.Module):
        self.models = models
        self.macs = 0
        self._pending: Dict[torch.nn.Module, int] = {}

    def _linear(self, module: torch.nn.Linear, args) -> None:
        rows = args[0].numel() // module.in_features
        self.macs += rows * module.in_features * module.out_features
        self.macs += self._pending.pop(module, 0)  # the attention products of the module whose to_q this is

    def _attention(self, module: torch.nn.Module, args, kwargs) -> None:
        # Fires even when another hook then forecasts the module's output, so the products are
        # only noted here, and counted when the module's own to_q runs.
        hidden = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states")
        if context is None and len(args) > 1 and torch.is_tensor(args[1]):
            context = args[1]
        if not torch.is_tensor(hidden):
            return
        queries = keys = hidden.shape[1]
        if context is not None:
            keys = context.shape[1]
            if getattr(module, "add_q_proj", None) is not None:  # joint: text and image attend together
                queries = keys = hidden.shape[1] + context.shape[1]
        self._pending[module.to_q] = 2 * hidden.shape[0] * queries * keys * module.to_q.out_features

    @contextlib.contextmanager
    def counting(self) -> Iterator["WorkCounter"]:
        handles = []
        try:
            for block in (b for model in self.models for b in block_modules(model)):
                for module in block.modules():
                    if isinstance(module, torch.nn.Linear):
                        handles.append(module.register_forward_pre_hook(self._linear))
                    elif _is_attention(module):
                        handles.append(module.register_forward_pre_hook(self._attention, with_kwargs=True))
            yield self
        finally:
            self._pending.clear()
            for handle in handles:
                handle.remove()
