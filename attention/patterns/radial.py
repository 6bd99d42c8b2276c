"""``radial``: a static mask whose spatial band narrows as the frame distance grows.

Attention in video models decays with spatiotemporal distance. Query token i (frame f_i, spatial
index s_i within its frame) keeps key j when |s_i - s_j| < floor(w0 * decay^ceil(log2(d + 1))),
d = |f_i - f_j|: the full band w0 inside a frame, and a band that shrinks by ``decay`` each time
the frame distance doubles, until it is under one token wide and far frame pairs drop out. With
decay 0.5 the kept pairs grow as N log N. Diagonal blocks are always kept. The mask depends only
on the grid, so it is computed once per grid (w0 chosen for the target density) and reused, as
one ``BlockLayout``.

The block mask is exact for the token rule: blocks are cut at frame boundaries into segments
(each inside one block and one frame, so its spatial indices are an interval), and a block pair
is kept when any of its segment pairs holds a kept token pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from accel.base.config import check_range
from .base import BlockPattern, Geometry, PatternConfig, num_blocks, register_pattern


@dataclass(frozen=True)
class RadialConfig(PatternConfig):
    """decay: factor by which the band narrows per doubling of frame distance (1: never)."""

    decay: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(type(self).__name__, "decay", self.decay, 0.0, 1.0, low_inclusive=False)


def frame_segments(grid: Tuple[int, int, int], block: int) -> Dict[str, torch.Tensor]:
    """Frame-major tokens cut at block and frame boundaries: block, frame, spatial [lo, hi] each."""
    frames, height, width = grid
    tokens, frame_size = frames * height * width, height * width
    cuts = torch.unique(torch.cat([torch.arange(0, tokens, block), torch.arange(0, tokens, frame_size),
                                   torch.tensor([tokens])]))
    start, stop = cuts[:-1], cuts[1:]
    return {"block": start // block, "frame": start // frame_size,
            "lo": start % frame_size, "hi": (stop - 1) % frame_size}


def radial_block_mask(segments: Dict[str, torch.Tensor], blocks: int, band: float, decay: float) -> torch.Tensor:
    """(blocks, blocks) bool for full-band width ``band`` (in spatial tokens)."""
    distance = (segments["frame"].view(-1, 1) - segments["frame"].view(1, -1)).abs()
    levels = torch.ceil(torch.log2(distance.double() + 1))
    width = band * decay ** levels
    gap = torch.maximum(segments["lo"].view(-1, 1) - segments["hi"].view(1, -1),
                        segments["lo"].view(1, -1) - segments["hi"].view(-1, 1)).clamp_min(0)
    pair_block = segments["block"].view(-1, 1) * blocks + segments["block"].view(1, -1)
    mask = torch.zeros(blocks * blocks, dtype=torch.bool)
    mask[pair_block[gap < torch.floor(width)]] = True  # a band under one token wide keeps nothing
    return mask.view(blocks, blocks) | torch.eye(blocks, dtype=torch.bool)


@register_pattern
class RadialPattern(BlockPattern):
    name = "radial"
    Config = RadialConfig
    needs_grid = True
    min_frames = 2
    static_layout = True

    def __init__(self, config: RadialConfig):
        super().__init__(config)
        self._masks: Dict[tuple, torch.Tensor] = {}

    def mask_for(self, grid: Tuple[int, int, int], device=None) -> torch.Tensor:
        """The visual block mask (1, 1, nv, nv) for ``grid``: fitted once, then kept per device."""
        key = (grid, str(torch.device(device or "cpu")))
        if key not in self._masks:
            fitted = next((m for (g, _), m in self._masks.items() if g == grid), None)
            if fitted is None:
                fitted = self._fit(grid).view(1, 1, *([num_blocks(grid[0] * grid[1] * grid[2],
                                                                   self.config.block_size)] * 2))
            self._masks[key] = fitted.to(device)
        return self._masks[key]

    def _fit(self, grid: Tuple[int, int, int]) -> torch.Tensor:
        """Bisect the full-band width w0 for the block density closest to the target."""
        frames, height, width = grid
        blocks = num_blocks(frames * height * width, self.config.block_size)
        segments = frame_segments(grid, self.config.block_size)
        target, decay = self.config.density, self.config.decay
        # At this width every band spans a whole frame: the dense end of the search.
        widest = (height * width + 1) / decay ** torch.ceil(torch.log2(torch.tensor(float(frames)))).item()
        low, high = 0.0, float(widest)
        best = radial_block_mask(segments, blocks, high, decay)
        best_error = abs(best.double().mean().item() - target)
        for _ in range(24):
            middle = (low + high) / 2
            mask = radial_block_mask(segments, blocks, middle, decay)
            density = mask.double().mean().item()
            if abs(density - target) < best_error:
                best, best_error = mask, abs(density - target)
            if density > target:
                high = middle
            else:
                low = middle
        return best

    def visual_layout(self, q, k, ctx, geom: Geometry, scale: float):
        return self.mask_for(geom.grid, q.device), None, None  # frame-major: the model's own order
