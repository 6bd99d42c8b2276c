"""Token reorderings applied around attention, each an index tensor with an exact inverse.

Sparse patterns are blocky only in the right token order: a temporal head's pattern is a band in
token-major order, a 3D neighbourhood is a band in tile-major or Hilbert order. Attention is
equivariant to any permutation applied to q, k and v alike, so reordering and restoring the
output changes no number; it only decides which tokens share a block.

Conventions:

* A *visual order* is a LongTensor ``order`` of the N = T*H*W visual tokens: ``order[i]`` is the
  frame-major index of the token placed at position ``i``. Per-head orders are (H, N).
* Orders are cached per (grid, kind, device) and shared: callers must not write into them.
* ``TokenPermutation`` lifts visual orders to the full sequence, text included, as
  (B|1, H|1, S) index tensors, and applies them to (B, S, H, D) tensors by gathering.
  Text tokens are never reordered among themselves: they stay where they are
  (``text_placement="keep"``) or move as one span after the visual tokens (``"end"``), which
  sparse methods use so that visual blocks start at token 0 whatever the text length.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

Grid = Tuple[int, int, int]

# The six axis orders over (F=frame, H=height, W=width); the first letter varies slowest.
# "FHW" is the frame-major layout models produce, "HWF" is token-major (temporal neighbours
# adjacent).
AXIS_ORDERS = ("FHW", "FWH", "HWF", "HFW", "WHF", "WFH")
TEXT_PLACEMENTS = ("keep", "end")


def _check_grid(grid: Sequence[int]) -> Grid:
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid: expected three positive sizes (T, H, W), got {grid!r}")
    return grid  # type: ignore[return-value]


def _frame_major_coords(grid: Grid) -> torch.Tensor:
    """(N, 3) int64 (t, h, w) of each token, in frame-major order."""
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def _order_by_keys(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Indices sorting tokens lexicographically by ``keys`` (first key slowest); keys are >= 0."""
    combined = torch.zeros_like(keys[0])
    for key in keys:
        combined = combined * (int(key.max()) + 1) + key
    return torch.argsort(combined, stable=True)


def _hilbert_index(coords: torch.Tensor, bits: int) -> torch.Tensor:
    """Distance along the 3D Hilbert curve of the 2^bits cube, for (N, 3) integer coords.

    Skilling's transform (AIP Conf. Proc. 707, 2004): undo the curve's rotations and
    reflections level by level, Gray-encode, then interleave the bits of the three axes.
    """
    x = [coords[:, i].clone() for i in range(3)]
    q = 1 << (bits - 1)
    while q > 1:
        p = q - 1
        for i in range(3):
            high = (x[i] & q) != 0
            swap = (x[0] ^ x[i]) & p
            x0_new = torch.where(high, x[0] ^ p, x[0] ^ swap)
            xi_new = torch.where(high, x[i], x[i] ^ swap)
            if i == 0:
                x[0] = x0_new
            else:
                x[0], x[i] = x0_new, xi_new
        q >>= 1
    for i in range(1, 3):
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    index = torch.zeros_like(x[0])
    for bit in range(bits - 1, -1, -1):
        for i in range(3):
            index = (index << 1) | ((x[i] >> bit) & 1)
    return index


@functools.lru_cache(maxsize=256)
def _visual_order(kind: str, grid: Grid, param: Tuple, device: torch.device) -> torch.Tensor:
    coords = _frame_major_coords(grid)
    t, h, w = coords.unbind(1)
    if kind == "identity":
        order = torch.arange(coords.shape[0])
    elif kind == "axes":
        by_letter = {"F": t, "H": h, "W": w}
        order = _order_by_keys([by_letter[letter] for letter in param[0]])
    elif kind == "tile":
        tt, th, tw, full_tiles_first = param
        keys = [t // tt, h // th, w // tw, t % tt, h % th, w % tw]
        if full_tiles_first:
            # Tokens of an edge tile (clipped by the grid) come after all whole tiles, so whole
            # tiles of exactly a block's size stay aligned with the blocks.
            clipped = torch.zeros_like(t, dtype=torch.bool)
            for pos, size, length in ((t, tt, grid[0]), (h, th, grid[1]), (w, tw, grid[2])):
                if length % size:
                    clipped |= pos // size == length // size
            keys = [clipped.long(), *keys]
        order = _order_by_keys(keys)
    elif kind == "hilbert":
        # Ordering the grid's cells along the curve of the enclosing power-of-two cube serves any
        # sizes: cells outside the grid are skipped, so the curve stays local except at the jumps
        # where it leaves and re-enters the grid.
        bits = max(1, (max(grid) - 1).bit_length())
        order = torch.argsort(_hilbert_index(coords, bits), stable=True)
    else:  # pragma: no cover - guarded by the public functions
        raise ValueError(f"unknown order kind {kind!r}")
    return order.to(device)


def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def identity_order(grid: Sequence[int], device=None) -> torch.Tensor:
    return _visual_order("identity", _check_grid(grid), (), _device(device))


def axis_order(grid: Sequence[int], axes: str, device=None) -> torch.Tensor:
    """Tokens sorted by the axes in ``axes`` (one of ``AXIS_ORDERS``), first letter slowest."""
    if axes not in AXIS_ORDERS:
        raise ValueError(f"axes: expected one of {AXIS_ORDERS}, got {axes!r}")
    return _visual_order("axes", _check_grid(grid), (axes,), _device(device))


def token_major_order(grid: Sequence[int], device=None) -> torch.Tensor:
    """Same spatial position across frames contiguous (the "HWF" axis order)."""
    return axis_order(grid, "HWF", device)


def tile_major_order(grid: Sequence[int], tile: Sequence[int], device=None,
                     full_tiles_first: bool = False) -> torch.Tensor:
    """Tiles of (t, h, w) tokens contiguous, tiles in raster order; edge tiles may be smaller.

    ``full_tiles_first`` moves the edge tiles (clipped by a grid the tile does not divide) after
    all whole tiles, keeping raster order within each group.
    """
    tile = tuple(int(x) for x in tile)
    if len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"tile: expected three positive sizes (t, h, w), got {tile!r}")
    return _visual_order("tile", _check_grid(grid), (*tile, bool(full_tiles_first)), _device(device))


def hilbert_order(grid: Sequence[int], device=None) -> torch.Tensor:
    """Tokens along a 3D Hilbert curve over (T, H, W); any sizes."""
    return _visual_order("hilbert", _check_grid(grid), (), _device(device))


def per_head_axis_orders(grid: Sequence[int], axes_per_head: Sequence[str], device=None) -> torch.Tensor:
    """(H, N): head ``h`` sorted by ``axes_per_head[h]``."""
    return torch.stack([axis_order(grid, axes, device) for axes in axes_per_head])


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """``inverse[..., index[..., i]] = i`` along the last dim."""
    positions = torch.arange(index.shape[-1], device=index.device).expand_as(index)
    return torch.empty_like(index).scatter_(-1, index, positions)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, s, h] = x[b, index[b, h, s], h]`` for x (B, S, H, D), index (B|1, H|1, S')."""
    if index.shape[0] == 1 and index.shape[1] == 1:
        return x.index_select(1, index[0, 0])
    batch, _, heads, _ = x.shape
    # Advanced indexing with broadcast (B, S', H) index tensors; a gather with an index
    # expanded over D would allocate a LongTensor as large as x.
    b = torch.arange(batch, device=x.device).view(batch, 1, 1)
    h = torch.arange(heads, device=x.device).view(1, 1, heads)
    return x[b, index.transpose(1, 2), h]


def place_text(visual_index: torch.Tensor, visual_tokens: int, text_tokens: int,
               text_position: Optional[str], text_placement: str = "end",
               text_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full-sequence index (..., S') from a visual order (..., N) over the visual span.

    ``text_index`` lists the text tokens (offsets inside the text span) to include, in order;
    default all of them. Leaving some out (masked padding keys) gives a shorter key sequence.
    """
    if text_placement not in TEXT_PLACEMENTS:
        raise ValueError(f"text_placement: expected one of {TEXT_PLACEMENTS}, got {text_placement!r}")
    if text_tokens and text_position not in ("prefix", "suffix"):
        raise ValueError(f"text_position: expected 'prefix' or 'suffix' with {text_tokens} text tokens, "
                         f"got {text_position!r}")
    if visual_index.shape[-1] != visual_tokens:
        raise ValueError(f"visual_index: expected {visual_tokens} entries, got {visual_index.shape[-1]}")
    device = visual_index.device
    visual_start = text_tokens if text_position == "prefix" else 0
    text_start = 0 if text_position == "prefix" else visual_tokens
    if text_index is None:
        text_index = torch.arange(text_tokens, device=device)
    text = (text_index.to(device) + text_start).expand(*visual_index.shape[:-1], -1)
    visual = visual_index + visual_start
    if text_placement == "keep" and text_position == "prefix":
        return torch.cat([text, visual], dim=-1)
    return torch.cat([visual, text], dim=-1)


def _as_3d(index: torch.Tensor) -> torch.Tensor:
    while index.dim() < 3:
        index = index.unsqueeze(0)
    return index


@dataclass(frozen=True, eq=False)
class TokenPermutation:
    """Working orders of queries and keys/values, and how to restore the output.

    ``q_index``/``kv_index`` are (B|1, H|1, S') positions in the original sequence, in working
    order, or None for the original order (then nothing is gathered). Queries keep every token
    (their inverse restores the output); keys may leave out masked tokens.
    """

    q_index: Optional[torch.Tensor]
    kv_index: Optional[torch.Tensor]
    q_inverse: Optional[torch.Tensor]

    @classmethod
    def build(cls, q_index: Optional[torch.Tensor], kv_index: Optional[torch.Tensor] = None,
              kv_same_as_q: bool = True) -> "TokenPermutation":
        """``kv_index`` None means: the same as ``q_index`` when ``kv_same_as_q``, else identity."""
        q_index = None if q_index is None else _as_3d(q_index)
        if kv_index is None and kv_same_as_q:
            kv_index = q_index
        kv_index = None if kv_index is None else _as_3d(kv_index)
        return cls(q_index, kv_index, None if q_index is None else inverse_permutation(q_index))

    @classmethod
    def identity(cls) -> "TokenPermutation":
        return cls(None, None, None)

    def permute_q(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.q_index is None else gather_tokens(x, self.q_index)

    def permute_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.kv_index is None else gather_tokens(x, self.kv_index)

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """Output rows in working order back to the original order."""
        return out if self.q_inverse is None else gather_tokens(out, self.q_inverse)
