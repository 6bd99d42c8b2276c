"""``tile_window``: tokens grouped in 3D tiles; each tile attends a 3D window of tiles around it.

The neighbourhood-attention view of video (sliding tiles): in tile-major order the tokens of a
tile of (t, h, w) tokens are contiguous, so "attend the tiles within (wt, wh, ww) tiles of
mine" is a block mask. Grids not divisible by the tile get smaller edge tiles; blocks that span
several tiles keep the union of their tiles' windows (block x tile incidence times the tile
window, so the mask is exact for the tile rule). Static per grid, like ``radial``.

Without an explicit window, the window is chosen for the target density. The tile-level density
of a window factorises over the three axes (sum over tile pairs within the window of the
product of their sizes), so every window is scored without building its mask.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from accel.attention.reorder import tile_major_order

from .base import BlockPattern, Geometry, PatternConfig, check_triple, num_blocks, register_pattern

Triple = Tuple[int, int, int]
SHORTLIST = 24  # windows whose block-level density is measured
DENSITY_RESOLUTION = 0.02  # densities closer than this count as equal; then the most balanced wins


@dataclass(frozen=True)
class TileWindowConfig(PatternConfig):
    """tile: tokens per tile (t, h, w); None: about ``block_size`` tokens (square in h, w).
    window: tiles attended on each side per axis (wt, wh, ww); None: chosen for ``density``."""

    tile: Optional[Triple] = None
    window: Optional[Triple] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_triple(owner, "tile", self.tile, 1)
        check_triple(owner, "window", self.window, 0)


def default_tile(block: int, grid: Triple) -> Triple:
    """A tile of ``block`` tokens, square in (h, w) as far as powers of two allow, clamped to the grid."""
    side = 1
    while (2 * side) ** 2 <= block:
        side *= 2
    frames = max(1, block // (side * side))
    return (min(frames, grid[0]), min(side, grid[1]), min(side, grid[2]))


def axis_tile_sizes(length: int, tile: int) -> torch.Tensor:
    sizes = torch.full(((length + tile - 1) // tile,), float(tile))
    sizes[-1] = length - (sizes.numel() - 1) * tile
    return sizes


def axis_window_density(sizes: torch.Tensor) -> torch.Tensor:
    """Entry r: the fraction of token pairs along one axis whose tiles are within r tiles."""
    distance = (torch.arange(sizes.numel()).view(-1, 1) - torch.arange(sizes.numel()).view(1, -1)).abs()
    pair_mass = sizes.view(-1, 1) * sizes.view(1, -1) / sizes.sum() ** 2
    return torch.stack([pair_mass[distance <= r].sum() for r in range(sizes.numel())])


class TileBlocks:
    """Which tiles each block of the tile-major order (whole tiles first) touches."""

    def __init__(self, grid: Triple, tile: Triple, block: int):
        frames, height, width = grid
        self.tiles_per_axis = [(n + t - 1) // t for n, t in zip(grid, tile)]
        order = tile_major_order(grid, tile, full_tiles_first=True)
        t, h, w = order // (height * width), (order // width) % height, order % width
        tiles_hw = self.tiles_per_axis[1] * self.tiles_per_axis[2]
        token_tile = (t // tile[0]) * tiles_hw + (h // tile[1]) * self.tiles_per_axis[2] + w // tile[2]
        blocks = num_blocks(order.numel(), block)
        padded = torch.cat([token_tile, token_tile[-1:].expand(blocks * block - order.numel())]).view(blocks, block)
        # Tiles are contiguous in this order, so a block holds a few runs of one tile id each.
        run_start = torch.ones_like(padded, dtype=torch.bool)
        run_start[:, 1:] = padded[:, 1:] != padded[:, :-1]
        run = torch.cumsum(run_start, dim=1) - 1
        self.block_tiles = padded[:, :1].repeat(1, int(run.max()) + 1)  # spare slots repeat the first tile
        self.block_tiles[run_start.nonzero(as_tuple=True)[0], run[run_start]] = padded[run_start]
        self.incidence = torch.zeros(blocks, tiles_hw * self.tiles_per_axis[0])
        self.incidence.scatter_(1, self.block_tiles, 1.0)

    def mask(self, window: Triple) -> torch.Tensor:
        """(nv, nv) bool: blocks kept when any of their tiles are within ``window`` tiles on every axis."""
        # Dilate each block's tiles by the window (one banded matrix per axis: separable, and far
        # cheaper than a 3D max-pool on CPU), then a block row keeps the blocks whose dilated tile
        # set contains one of its own tiles.
        bands = []
        for count, radius in zip(self.tiles_per_axis, window):
            index = torch.arange(count)
            bands.append(((index.view(-1, 1) - index.view(1, -1)).abs() <= radius).float())
        reach = torch.einsum("bthw,tu,hv,wx->buvx", self.incidence.view(-1, *self.tiles_per_axis), *bands)
        reach = reach.view(self.incidence.shape) > 0  # (key block, tile)
        return reach[:, self.block_tiles].any(-1).T


def choose_window(grid: Triple, tile: Triple, density: float, blocks: TileBlocks) -> Triple:
    """The window for ``density``: the closest at block level, balanced among near-equals.

    The factorised tile-level density shortlists windows; the block-level density decides,
    because blocks that straddle edge tiles keep more than their tiles do.
    """
    per_axis = [axis_window_density(axis_tile_sizes(n, t)) for n, t in zip(grid, tile)]
    windows = list(itertools.product(*(range(curve.numel()) for curve in per_axis)))
    tile_level = [float(per_axis[0][a] * per_axis[1][b] * per_axis[2][c]) for a, b, c in windows]
    shortlist = sorted(range(len(windows)), key=lambda i: abs(tile_level[i] - density))[:SHORTLIST]
    multi_tile_axes = [axis for axis, curve in enumerate(per_axis) if curve.numel() > 1] or [0]

    def rank(window: Triple):
        error = abs(blocks.mask(window).double().mean().item() - density)
        reach = [window[axis] for axis in multi_tile_axes]
        return round(error / DENSITY_RESOLUTION), max(reach) - min(reach), error

    return min((windows[i] for i in shortlist), key=rank)


def tile_window_mask(grid: Triple, tile: Triple, window: Triple, block: int) -> torch.Tensor:
    """(nv, nv) bool over blocks of the tile-major order (whole tiles first)."""
    return TileBlocks(grid, tile, block).mask(window)


@register_pattern
class TileWindowPattern(BlockPattern):
    name = "tile_window"
    Config = TileWindowConfig
    needs_grid = True
    static_layout = True

    def __init__(self, config: TileWindowConfig):
        super().__init__(config)
        self._masks: Dict[tuple, torch.Tensor] = {}
        self.windows: Dict[Triple, Tuple[Triple, Triple]] = {}  # grid -> (tile, window) used

    def tile_and_window(self, grid: Triple) -> Tuple[Triple, Triple]:
        if grid not in self.windows:
            tile = tuple(self.config.tile) if self.config.tile else default_tile(self.config.block_size, grid)
            window = (tuple(self.config.window) if self.config.window else
                      choose_window(grid, tile, self.config.density, TileBlocks(grid, tile, self.config.block_size)))
            self.windows[grid] = (tile, window)
        return self.windows[grid]

    def mask_for(self, grid: Triple, device=None) -> torch.Tensor:
        key = (grid, str(torch.device(device or "cpu")))
        if key not in self._masks:
            tile, window = self.tile_and_window(grid)
            self._masks[key] = tile_window_mask(grid, tile, window, self.config.block_size)[None, None].to(device)
        return self._masks[key]

    def visual_layout(self, q, k, ctx, geom: Geometry, scale: float):
        tile, _ = self.tile_and_window(geom.grid)
        order = tile_major_order(geom.grid, tile, q.device, full_tiles_first=True)
        return self.mask_for(geom.grid, q.device), order, order
