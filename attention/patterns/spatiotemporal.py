"""``spatiotemporal``: per head, a frame-local (spatial) or same-position (temporal) band.

Video heads tend to be either spatial (a token attends its own frame) or temporal (a token
attends the same place in other frames). Both are one banded block mask, in different token
orders: frame-major ("FHW") for spatial heads, token-major ("HWF") for temporal heads. So the
block layout is fixed per grid and only the per-head order changes. Which order a head gets is
measured on every call: for a sample of query rows the exact attention probabilities are
computed, and the head takes the order under which the mask holds most of their mass (the
masked-and-renormalised attention map is off by exactly 2 * (1 - kept mass) in L1, so this is
the exact map error). ``candidate_orders`` may list any of the six axis orders, which makes the
same measurement a per-head choice among all of them (as PAROAttention does offline).

The first ``sink_frames`` frames lead every order and their key blocks are kept for every query
(attention sinks); text tokens are dense as in every pattern.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from accel.base.config import check_range
from accel.attention.reorder import AXIS_ORDERS, axis_order, inverse_permutation

from .base import BlockPattern, Geometry, PatternConfig, num_blocks, register_pattern


@dataclass(frozen=True)
class SpatiotemporalConfig(PatternConfig):
    """sample_rows: query rows scored per call to choose each head's order.
    sink_frames: leading frames every query attends (0: none).
    candidate_orders: axis orders a head may take ("FHW" spatial, "HWF" temporal, or any of the six)."""

    sample_rows: int = 32
    sink_frames: int = 1
    candidate_orders: Tuple[str, ...] = ("FHW", "HWF")

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_range(owner, "sample_rows", self.sample_rows, 1, 4096, integer=True)
        check_range(owner, "sink_frames", self.sink_frames, 0, None, integer=True)
        orders = self.candidate_orders
        if (not isinstance(orders, (tuple, list)) or not orders or len(set(orders)) != len(orders)
                or any(order not in AXIS_ORDERS for order in orders)):
            raise ValueError(f"{owner}.candidate_orders must be distinct names from {AXIS_ORDERS}, got {orders!r}")


def sink_led_order(grid: Tuple[int, int, int], axes: str, sink_frames: int, device=None) -> torch.Tensor:
    """The sink frames first (frame-major), then the remaining frames in the ``axes`` order."""
    frames, height, width = grid
    sink = min(sink_frames, frames - 1)
    rest = axis_order((frames - sink, height, width), axes, device)
    return torch.cat([torch.arange(sink * height * width, device=device), rest + sink * height * width])


def band_mask(blocks: int, sink_blocks: int, density: float, device=None) -> torch.Tensor:
    """(blocks, blocks) bool: a diagonal band plus the sink columns, band width set by density."""
    # Kept blocks of row i for every half-width r, counted in closed form (an r x i x j tensor
    # would be cubic): the band [lo, hi] plus the sink columns [0, sink) minus their overlap.
    width = torch.arange(blocks).view(-1, 1)
    row = torch.arange(blocks).view(1, -1)
    lo, hi = (row - width).clamp_min(0), (row + width).clamp_max(blocks - 1)
    overlap = (torch.minimum(hi, torch.tensor(sink_blocks - 1)) - lo + 1).clamp_min(0)
    kept = (hi - lo + 1 + sink_blocks - overlap).sum(1)
    half_width = int(torch.argmin((kept.double() / (blocks * blocks) - density).abs()))
    i = torch.arange(blocks, device=device).view(-1, 1)
    j = torch.arange(blocks, device=device).view(1, -1)
    return ((i - j).abs() <= half_width) | (j < sink_blocks)


@register_pattern
class SpatiotemporalPattern(BlockPattern):
    name = "spatiotemporal"
    Config = SpatiotemporalConfig
    needs_grid = True
    min_frames = 2
    static_layout = True  # one band mask per grid; only the per-head order changes

    def __init__(self, config: SpatiotemporalConfig):
        super().__init__(config)
        self._masks: Dict[tuple, torch.Tensor] = {}
        self.last_head_orders: Optional[torch.Tensor] = None  # (H,) index into candidate_orders
        self._order_counts: Any = 0  # heads per candidate so far (a device tensor: no sync per call)

    @property
    def last_temporal_heads(self) -> Optional[torch.Tensor]:
        """(H,) bool: heads of the last call that took the token-major ("HWF") order."""
        if self.last_head_orders is None or "HWF" not in self.config.candidate_orders:
            return None
        return self.last_head_orders == self.config.candidate_orders.index("HWF")

    def _mask(self, grid, device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._masks:
            frames, height, width = grid
            block = self.config.block_size
            sink = min(self.config.sink_frames, frames - 1)
            visual_blocks = num_blocks(frames * height * width, block)
            sink_blocks = num_blocks(sink * height * width, block) if sink else 0
            self._masks[key] = band_mask(visual_blocks, sink_blocks, self.config.density, device)[None, None]
        return self._masks[key]

    def visual_layout(self, q, k, ctx, geom: Geometry, scale: float):
        mask = self._mask(geom.grid, q.device)
        orders = torch.stack([sink_led_order(geom.grid, axes, self.config.sink_frames, q.device)
                              for axes in self.config.candidate_orders])
        kept = self.kept_mass(q, k, geom, mask, orders, scale, seed=ctx.step.step_index * 1009 + ctx.layer_index)
        choice = torch.argmax(kept, dim=0)  # (H,); ties go to the first candidate
        self.last_head_orders = choice
        self._order_counts = self._order_counts + torch.bincount(choice, minlength=len(orders))
        order = orders[choice]  # (H, N)
        return mask, order, order

    def counters(self) -> Dict[str, Any]:
        if isinstance(self._order_counts, int):
            return {}
        counts = self._order_counts.tolist()
        return {"head_orders": {axes: round(c / sum(counts), 3)
                                for axes, c in zip(self.config.candidate_orders, counts)}}

    def kept_mass(self, q, k, geom: Geometry, mask: torch.Tensor, orders: torch.Tensor, scale: float,
                  seed: int = 0) -> torch.Tensor:
        """(len(orders), H): mean attention mass that ``mask`` keeps under each order, on sampled rows."""
        visual = geom.visual_tokens
        generator = torch.Generator().manual_seed(seed)  # local: the global RNG stays untouched
        rows = torch.randperm(visual, generator=generator)[: self.config.sample_rows].to(q.device)
        q_rows = self.visual_span(q, geom).index_select(1, rows)
        # Scores in the inputs' dtype (fp32 accumulation in the matmul), softmax in fp32: no fp32
        # copy of all keys, and the sample only has to rank two masks.
        logits = torch.cat([torch.einsum("brhd,bshd->bhrs", q_rows, keys)
                            for keys in (self.visual_span(k, geom), self.text_keys(k, geom))], dim=-1)
        probs = torch.softmax(logits.float() * scale, dim=-1)
        text_mass = probs[..., visual:].sum(-1)
        visual_probs = probs[..., :visual]
        masses = []
        for order in orders:
            block_of = inverse_permutation(order) // self.config.block_size  # token -> working block
            keep = mask[0, 0][block_of[rows]][:, block_of]  # (rows, visual keys)
            masses.append(((visual_probs * keep).sum(-1) + text_mass).mean((0, 2)))
        return torch.stack(masses)
