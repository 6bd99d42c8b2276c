"""Block-sparse attention methods: one per registered pattern (``attention="radial"``, ...; ``accel list``).

One ``SparseAttention`` base runs any pattern from ``accel.attention.patterns``: dense warm-up steps and
dense first layers, reasons to fall back (no grid, a mask that is not text padding, no kernel for
the dtype/head dim/device), text padding handled by dropping the padded keys, the block-sparse
kernel between the pattern's permutation and its inverse, and density counters for
``Handle.summary()``. ``sparse_method`` makes the registered method of each pattern in
``SPARSE_PATTERNS``: it only names the pattern and its config.
``quantize="int8"`` on any pattern's config runs its sparse calls on the INT8 kernel instead
(``accel.attention.quantized`` explains the precision choices and the CPU fallback).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ClassVar, Dict, List, NamedTuple, Optional, Tuple

import torch

from accel.base.context import AttnContext
from accel.base.registry import ATTENTION_METHODS
from accel.attention.kernels import block_sparse_attention, quantized_block_sparse_attention, select_backend

from .base import NO_BACKWARD, AttentionMethod, needs_backward
from .intercept import dense_attention
from .patterns import SPARSE_PATTERNS, BlockPattern, Geometry, geometry_of

def leading_call(ctx: AttnContext, layers: int, step_fraction: float) -> bool:
    """Whether the call is in the first ``layers`` layers or the first ``step_fraction`` of the
    steps (when the step count is known): where warm-up and full-precision rules apply."""
    if ctx.layer_index < layers:
        return True
    progress = ctx.step.progress
    return progress is not None and progress < step_fraction


def text_padding_keep(attn_mask: torch.Tensor, geom: Geometry, batch: int, kv_len: int
                      ) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """(kept text keys (B|1, text) bool, or None when nothing is masked; reason when unsupported).

    Only key-padding masks over text tokens are supported (HunyuanVideo pads its prompt): they
    are the same for every query and head and keep every visual token, so dropping the masked
    keys is exact. Anything else (causal, per-query, finite biases) falls back to dense.
    """
    mask = attn_mask
    if mask.dtype != torch.bool:
        if not mask.is_floating_point() or not bool(((mask == 0) | (mask == float("-inf"))).all()):
            return None, "attention mask with finite biases is not a padding mask"
        mask = mask == 0
    if mask.dim() not in (2, 3, 4) or any(size != 1 for size in mask.shape[max(0, mask.dim() - 3):-1]) \
            or mask.shape[-1] != kv_len:
        return None, f"attention mask of shape {tuple(attn_mask.shape)} is not a key-padding mask"
    mask = mask.reshape(mask.shape[0] if mask.dim() == 4 else 1, kv_len)
    if mask.shape[0] not in (1, batch):
        return None, f"attention mask of shape {tuple(attn_mask.shape)} does not fit batch {batch}"
    visual_start = geom.text_tokens if geom.text_position == "prefix" else 0
    if not bool(mask[:, visual_start:visual_start + geom.visual_tokens].all()):
        return None, "attention mask hides visual tokens (only text padding is supported)"
    text_start = 0 if geom.text_position == "prefix" else geom.visual_tokens
    text = mask[:, text_start:text_start + geom.text_tokens]
    return (None if bool(text.all()) else text), None


# A realised density above this multiple of the request is reported in the summary's warnings.
OVER_DENSITY = 1.5


class Prepared(NamedTuple):
    """One call as ``unsupported`` found it runnable: ``attend`` reuses it instead of deciding again."""

    q: torch.Tensor
    geom: Geometry
    keep: Optional[torch.Tensor]  # kept text keys (B|1, text), None when nothing is masked
    backend: Optional[str]  # the kernel backend of a sparse call; None for a dense one


class SparseAttention(AttentionMethod):
    """Base of the block-sparse methods; subclasses set ``name``, ``Config`` and ``Pattern``."""

    Pattern: ClassVar[type] = BlockPattern
    differentiable = True  # through the pure-torch reference path (``_prepare``)

    # A benchmark's timer of the parts of a sparse call (``eval/bench_attention_call.py``):
    # ``phase_timer(name)`` is a context manager around "plan", "reorder", "kernel" and "restore".
    phase_timer: Optional[Callable[[str], Any]] = None

    def __init__(self, config: Any):
        super().__init__(config)
        self.pattern = self.Pattern(config)
        self.sparse_calls = 0
        self.dense_calls = 0  # warm-up steps, dense first layers, density 1.0
        self.quantized_calls = 0
        self.full_precision_calls = 0  # sparse calls that quantize="int8" kept unquantized
        self._density: Dict[Tuple[int, int], List[Any]] = {}  # (step, layer) -> [sum, calls]
        self._prepared: Optional[Prepared] = None  # what unsupported() found, for attend()
        self._sparse_density: Any = 0.0  # summed realised density of the sparse calls (a device tensor)

    # -- one call -------------------------------------------------------------------------------

    def run(self, q, k, v, ctx: AttnContext, attn_mask=None, scale=None, refused=None):
        fallbacks = self.fallback_calls
        try:
            out = super().run(q, k, v, ctx, attn_mask=attn_mask, scale=scale, refused=refused)
        finally:
            self._prepared = None
        if self.fallback_calls != fallbacks:
            self._record(ctx, 1.0)
        return out

    def unsupported(self, q, k, v, ctx: AttnContext, attn_mask) -> Optional[str]:
        prepared, reason = self._prepare(q, k, ctx, attn_mask)
        self._prepared = prepared
        return reason

    def _prepare(self, q, k, ctx: AttnContext, attn_mask) -> Tuple[Optional["Prepared"], Optional[str]]:
        """What this call runs on (geometry, kept text keys, kernel backend), or why it cannot run sparse."""
        if q.shape[1] != k.shape[1]:
            return None, f"query length {q.shape[1]} differs from key length {k.shape[1]}"
        geom, reason = geometry_of(q.shape[1], ctx.layout)
        reason = reason or self.pattern.unsupported(geom)
        if reason is not None:
            return None, reason
        backend = None
        if not self.dense_now(ctx):  # dense calls need no kernel
            requested = self.config.backend
            if needs_backward(q, k):
                if self.quantize_now(ctx):  # INT8 has no backward
                    return None, NO_BACKWARD
                # the kernels have no backward; the reference path computes the same sparse attention with one
                self.warn_once("inputs require grad: these calls run the pure-torch reference path of the pattern "
                               "(the same attention, with a backward pass; the kernels have none)")
                requested = "torch"
            backend, reason = select_backend(q, requested, self.quantize_now(ctx), self.config.pv)
            if reason is not None:
                return None, reason
        keep = None
        if attn_mask is not None:
            keep, reason = text_padding_keep(attn_mask, geom, q.shape[0], k.shape[1])
            if reason is not None:
                return None, reason
        return Prepared(q, geom, keep, backend), None

    def quantize_now(self, ctx: AttnContext) -> bool:
        """INT8 for this sparse call: quantize is on, and neither a full-precision layer nor step."""
        return self.config.quantize != "none" and not leading_call(
            ctx, self.config.full_precision_layers, self.config.full_precision_steps)

    def dense_now(self, ctx: AttnContext) -> bool:
        """Dense first layers, dense warm-up steps (by step_index / num_steps when known), and every
        call at density 1.0 without quantization: keeping every block is dense attention, and the
        caller's dense kernel computes it exactly where a block-sparse one would round differently."""
        if self.config.density >= 1.0 and self.config.quantize == "none":
            return True
        return leading_call(ctx, self.config.dense_layers, self.config.dense_warmup)

    def attend(self, q, k, v, ctx: AttnContext, attn_mask=None, scale=None):
        if self.dense_now(ctx):
            self.dense_calls += 1
            self._record(ctx, 1.0)
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        prepared = self._prepared
        if prepared is None or prepared.q is not q:  # attend() called directly, without run() and its fallback
            prepared, reason = self._prepare(q, k, ctx, attn_mask)
            if reason is not None:
                raise ValueError(f"{self.name}: {reason}")
        geom, keep, backend = prepared.geom, prepared.keep, prepared.backend
        quantize = self.quantize_now(ctx)
        outputs, densities = [], []
        for rows, kept in self._batch_groups(q.shape[0], keep):
            group_geom = geom if kept is None else dataclasses.replace(
                geom, text_keys_kept=torch.nonzero(kept).view(-1))
            qg, kg, vg = (x if rows is None else x[rows] for x in (q, k, v))
            # which blocks to keep is a decision, not a function to differentiate
            with torch.no_grad(), self._phase("plan"):
                plan = self.pattern.block_layout(qg, kg, ctx, group_geom, scale)
            perm = plan.permutation
            with self._phase("reorder"):
                inputs = (perm.permute_q(qg), perm.permute_kv(kg), perm.permute_kv(vg), plan.layout)
            with self._phase("kernel"):
                if quantize:
                    out = quantized_block_sparse_attention(*inputs, scale=scale, pv=self.config.pv, backend=backend)
                else:
                    out = block_sparse_attention(*inputs, scale=scale, backend=backend)
            with self._phase("restore"):
                outputs.append(perm.restore(out))
            densities.append(plan.density)
        self.sparse_calls += 1
        self._sparse_density = self._sparse_density + sum(densities) / len(densities)
        if quantize:
            self.quantized_calls += 1
        elif self.config.quantize != "none":
            self.full_precision_calls += 1
        self._record(ctx, sum(densities) / len(densities))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def _phase(self, name: str):
        return self.phase_timer(name) if self.phase_timer is not None else contextlib.nullcontext()

    @staticmethod
    def _batch_groups(batch: int, keep: Optional[torch.Tensor]):
        """(rows, kept text keys) per group of batch items sharing one padding mask."""
        if keep is None:
            return [(None, None)]
        if keep.shape[0] == 1 or bool((keep == keep[:1]).all()):
            return [(None, keep[0])]
        return [(slice(b, b + 1), keep[b]) for b in range(batch)]

    # -- counters -------------------------------------------------------------------------------

    def _record(self, ctx: AttnContext, density: Any) -> None:
        # Densities stay tensors on the device until counters() asks: no sync per attention call.
        entry = self._density.setdefault((ctx.step.step_index, ctx.layer_index), [0.0, 0])
        entry[0] = entry[0] + density
        entry[1] += 1

    def density_table(self) -> Dict[Tuple[int, int], float]:
        """Mean realised density per (step, layer), over heads, batch items and calls."""
        return {key: float(total) / calls for key, (total, calls) in sorted(self._density.items())}

    def sparse_mean_density(self) -> Optional[float]:
        """Mean realised density of the calls that ran sparse (dense warm-up and layers left out)."""
        return round(float(self._sparse_density) / self.sparse_calls, 4) if self.sparse_calls else None

    def idle_warning(self) -> Optional[str]:
        said = super().idle_warning()
        realised, asked = self.sparse_mean_density(), getattr(self.config, "density", None)  # int8 asks none
        if said is None and realised is not None and asked is not None and realised > OVER_DENSITY * asked:
            said = (f"attention {self.name!r} kept {realised:.2f} of the blocks on its sparse calls where "
                    f"density={asked} was asked: {self.pattern.density_knob}")
        return said

    def counters(self) -> Dict[str, Any]:
        per_step: Dict[int, List[float]] = {}
        total, calls = 0.0, 0
        for (step, _), (summed, count) in sorted(self._density.items()):
            summed = float(summed)
            per_step.setdefault(step, [0.0, 0])
            per_step[step][0] += summed
            per_step[step][1] += count
            total, calls = total + summed, calls + count
        return {
            **super().counters(),
            "sparse_calls": self.sparse_calls,
            "dense_calls": self.dense_calls,
            "mean_density": round(total / calls, 4) if calls else None,
            "sparse_mean_density": self.sparse_mean_density(),
            "density_by_step": [round(s / c, 3) for s, c in per_step.values()],
            **({"quantized_calls": self.quantized_calls, "full_precision_calls": self.full_precision_calls}
               if self.config.quantize != "none" else {}),
            **self.pattern.counters(),
        }


def sparse_method(pattern: type) -> type:
    """The attention method that runs ``pattern`` through ``SparseAttention``."""
    return type(pattern.__name__.replace("Pattern", "Attention"), (SparseAttention,),
                {"name": pattern.name, "Config": pattern.Config, "Pattern": pattern, "__module__": __name__,
                 "__doc__": f"``attention={pattern.name!r}``: {pattern.__name__} on the block-sparse kernels."})


for _name, _pattern in SPARSE_PATTERNS.items():
    ATTENTION_METHODS.register(_name, sparse_method(_pattern))
