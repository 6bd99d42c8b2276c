"""``topk``: dynamic blocks from mean-pooled queries and keys; no token grid needed.

Per call, per batch item and head: pool each block of queries and keys to its mean, softmax the
pooled scores over key blocks (plus log of each block's token count, so a ragged tail block is
not over-weighted), and keep the best key blocks per query block until ``density`` of them or
``cdf_threshold`` of the pooled probability is reached. A pooled mean only speaks for its block
when the block's tokens point the same way: query blocks whose tokens are not self-similar (mean
pairwise cosine below ``similarity_threshold``) keep their whole row, such key blocks their whole
column. The diagonal is always kept.

It needs no grid, so it serves every family (FLUX included). With a grid, ``reorder`` can first
put spatial neighbours in the same blocks (Hilbert or tile-major order); without one the model's
own order is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.base.config import check_choice, check_range
from accel.attention.reorder import hilbert_order, tile_major_order, token_major_order

from .base import (BlockPattern, Geometry, PatternConfig, block_self_similarity, block_sizes,
                   density_budget, pool_blocks, register_pattern, select_blocks)
from .tile_window import default_tile

REORDERS = ("none", "hilbert", "tile", "token_major")


@dataclass(frozen=True)
class TopKConfig(PatternConfig):
    """cdf_threshold: also stop once this pooled probability is kept (1.0: pure top-k by density).
    similarity_threshold: blocks less self-similar than this keep their row/column (-1: never).
    reorder: token order applied first when the call has a grid."""

    cdf_threshold: float = 1.0
    similarity_threshold: float = 0.3
    reorder: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_range(owner, "cdf_threshold", self.cdf_threshold, 0.0, 1.0, low_inclusive=False)
        check_range(owner, "similarity_threshold", self.similarity_threshold, -1.0, 1.0)
        check_choice(owner, "reorder", self.reorder, REORDERS)


@register_pattern
class TopKPattern(BlockPattern):
    name = "topk"
    density_knob = ("blocks less self-similar than similarity_threshold keep their whole row and column "
                    "(lower it, -1: never, to keep closer to density), and few blocks per row at this length "
                    "round the budget up (a smaller block_size gives finer control)")
    Config = TopKConfig
    needs_grid = False

    def visual_order(self, geom: Geometry, device):
        if geom.grid is None or self.config.reorder == "none":
            return None
        if self.config.reorder == "hilbert":
            return hilbert_order(geom.grid, device)
        if self.config.reorder == "token_major":
            return token_major_order(geom.grid, device)
        tile = default_tile(self.config.block_size, geom.grid)
        return tile_major_order(geom.grid, tile, device, full_tiles_first=True)

    def visual_layout(self, q, k, ctx, geom: Geometry, scale: float):
        order = self.visual_order(geom, q.device)
        q_visual, k_visual = self.visual_span(q, geom), self.visual_span(k, geom)
        if order is not None:
            q_visual, k_visual = q_visual.index_select(1, order), k_visual.index_select(1, order)
        mask = self.select(q_visual, k_visual, scale)
        return mask, order, order

    def select(self, q_visual: torch.Tensor, k_visual: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, H, nv, nv) bool block mask for visual q, k (B, N, H, D) in working order."""
        block = self.config.block_size
        pooled_q, pooled_k = pool_blocks(q_visual, block), pool_blocks(k_visual, block)
        sizes = block_sizes(k_visual.shape[1], block, q_visual.device)
        logits = torch.einsum("bhqd,bhkd->bhqk", pooled_q, pooled_k) * scale + sizes.log()
        prob = torch.softmax(logits, dim=-1)
        blocks = prob.shape[-1]
        forced = torch.eye(blocks, dtype=torch.bool, device=prob.device).expand_as(prob)
        threshold = self.config.similarity_threshold
        if threshold > -1.0:
            q_scattered = block_self_similarity(q_visual, block) < threshold  # (B, H, nv)
            k_scattered = block_self_similarity(k_visual, block) < threshold
            forced = forced | q_scattered.unsqueeze(-1) | k_scattered.unsqueeze(-2)
        return select_blocks(prob, density_budget(self.config.density, blocks), self.config.cdf_threshold, forced)
