"""What every block-sparse pattern shares: knobs, sequence geometry, text blocks, block selection.

A pattern looks at one attention call and returns a ``BlockLayout`` (which key blocks each query
block attends) plus the ``TokenPermutation`` under which that layout holds. The working order is
always: visual tokens in the pattern's order from token 0, then the text tokens (kept keys only),
so visual blocks are aligned whatever the text length. Blocks holding any text token are kept in
both directions, so text attends and is attended densely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional, Tuple

import torch

from accel.base.config import check_choice, check_range
from accel.base.context import AttnContext, TokenLayout
from accel.base.registry import Registry
from accel.attention.kernels import BACKENDS, QUANT_BACKENDS, BlockLayout
from accel.attention.reorder import TokenPermutation, identity_order, place_text

QUANTIZE = ("none", "int8")
PV_MODES = ("input", "fp8", "auto")


def check_quantization(owner: str, config) -> None:
    """The step-aware precision knobs shared by ``int8`` and the sparse patterns' ``quantize``."""
    check_choice(owner, "pv", config.pv, PV_MODES)
    check_range(owner, "full_precision_steps", config.full_precision_steps, 0.0, 1.0)
    check_range(owner, "full_precision_layers", config.full_precision_layers, 0, None, integer=True)


def check_triple(owner: str, field: str, value, low: int) -> None:
    """``value`` is None or three integers >= ``low``."""
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{owner}.{field} must be None or three integers (t, h, w), got {value!r}")
    for item in value:
        check_range(owner, field, item, low, None, integer=True)


@dataclass(frozen=True)
class PatternConfig:
    """Knobs shared by every sparse pattern.

    density: target fraction of visual query/key pairs kept (text blocks come on top).
    dense_warmup: fraction of the denoising steps, from the start, run densely.
    dense_layers: the first attention layers run densely.
    block_size: tokens per query and key block (a power of two; kernels tile by it).
    backend: block-sparse backend ("auto": Triton on CUDA, compiled FlexAttention on CPU).
    quantize: "int8" runs the sparse calls on the INT8 kernel (``accel.attention.quantized``); with it,
        pv ("input": P and V in the input dtype, "fp8", "auto": fp8 on sm89+), and the sparse
        calls that stay unquantized: the first full_precision_steps fraction of steps and the
        first full_precision_layers layers (the dense warm-up and dense layers are unquantized too).
    """

    density: float = 0.25
    dense_warmup: float = 0.2
    dense_layers: int = 1
    block_size: int = 128
    backend: str = "auto"
    quantize: str = "none"
    pv: str = "input"
    full_precision_steps: float = 0.0
    full_precision_layers: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_range(owner, "density", self.density, 0.0, 1.0, low_inclusive=False)
        check_range(owner, "dense_warmup", self.dense_warmup, 0.0, 1.0)
        check_range(owner, "dense_layers", self.dense_layers, 0, None, integer=True)
        check_range(owner, "block_size", self.block_size, 16, 1024, integer=True)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"{owner}.block_size must be a power of two in [16, 1024], got {self.block_size!r}")
        check_choice(owner, "backend", self.backend, BACKENDS)
        check_choice(owner, "quantize", self.quantize, QUANTIZE)
        check_quantization(owner, self)
        if self.quantize != "none" and self.backend not in QUANT_BACKENDS:
            raise ValueError(f"{owner}.backend must be one of {', '.join(map(repr, QUANT_BACKENDS))} with "
                             f"quantize={self.quantize!r}, got {self.backend!r}")


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where the visual and text tokens of one call sit.

    ``text_keys_kept`` lists the text tokens (offsets in the text span) that keys keep when a
    padding mask drops some; None keeps all.
    """

    visual_tokens: int
    grid: Optional[Tuple[int, int, int]]
    text_tokens: int = 0
    text_position: Optional[str] = None
    text_keys_kept: Optional[torch.Tensor] = None

    @property
    def text_keys(self) -> int:
        return self.text_tokens if self.text_keys_kept is None else int(self.text_keys_kept.numel())

    @property
    def q_len(self) -> int:
        return self.visual_tokens + self.text_tokens

    @property
    def kv_len(self) -> int:
        return self.visual_tokens + self.text_keys


def geometry_of(seq_len: int, layout: TokenLayout) -> Tuple[Optional[Geometry], Optional[str]]:
    """(geometry, None), or (None, reason) when the sequence does not fit the token layout."""
    if layout.grid is not None:
        visual = layout.visual_tokens
        text = seq_len - visual
        if text < 0:
            return None, f"sequence of {seq_len} tokens is shorter than the {visual}-token grid {layout.grid}"
        if text and layout.text_position not in ("prefix", "suffix"):
            return None, f"{text} tokens beyond the grid {layout.grid} and no known text position"
        return Geometry(visual, tuple(layout.grid), text, layout.text_position if text else None), None
    text = layout.text_tokens if layout.text_position in ("prefix", "suffix") else 0
    if text >= seq_len:
        return None, f"{text} text tokens leave no visual tokens in a {seq_len}-token sequence"
    return Geometry(seq_len - text, None, text, layout.text_position if text else None), None


def num_blocks(tokens: int, block: int) -> int:
    return math.ceil(tokens / block)


def block_sizes(tokens: int, block: int, device=None) -> torch.Tensor:
    """Tokens in each block (the last one may be ragged), as float."""
    sizes = torch.full((num_blocks(tokens, block),), float(block), device=device)
    sizes[-1] = tokens - (sizes.numel() - 1) * block
    return sizes


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of tokens: x (B, N, H, D) -> (B, H, nb, D) in fp32, ragged tail included.

    Sums accumulate in fp32 straight from x's dtype, without an fp32 copy of x.
    """
    batch, tokens, heads, dim = x.shape
    full = tokens // block
    sums = [x[:, :full * block].reshape(batch, full, block, heads, dim).sum(2, dtype=torch.float32)]
    if tokens % block:
        sums.append(x[:, full * block:].sum(1, keepdim=True, dtype=torch.float32))
    means = torch.cat(sums, dim=1) / block_sizes(tokens, block, x.device).view(1, -1, 1, 1)
    return means.transpose(1, 2)


def block_self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the tokens in each block: (B, N, H, D) -> (B, H, nb).

    With unit vectors u_i summing to s, sum_{i != j} u_i.u_j = |s|^2 - n, so no n^2 matrix.
    Single-token blocks count as perfectly self-similar.
    """
    unit = torch.nn.functional.normalize(x, dim=-1)
    n = block_sizes(x.shape[1], block, x.device).view(1, 1, -1)
    summed = pool_blocks(unit, block) * n.unsqueeze(-1)
    pairs = (summed.square().sum(-1) - n) / (n * (n - 1)).clamp_min(1)
    return torch.where(n > 1, pairs, torch.ones_like(pairs))


def select_blocks(prob: torch.Tensor, budget: int, cdf_threshold: float,
                  forced: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keep, per row, the most probable blocks until ``budget`` blocks or ``cdf_threshold`` mass.

    prob (..., nq, nk) sums to 1 over each row; forced blocks (bool, broadcastable) are ranked
    first and count towards both limits. At least one block per row is kept.
    """
    rank_key = prob if forced is None else prob + 2.0 * forced.to(prob.dtype)
    order = torch.argsort(rank_key, dim=-1, descending=True)
    sorted_prob = prob.gather(-1, order)
    mass_before = torch.cumsum(sorted_prob, dim=-1) - sorted_prob
    rank = torch.arange(prob.shape[-1], device=prob.device)
    limit = budget if forced is None else torch.maximum(
        torch.tensor(budget, device=prob.device), forced.sum(-1, keepdim=True).expand(*prob.shape[:-1], 1))
    keep_sorted = (rank < limit).expand_as(prob)
    if cdf_threshold < 1.0:  # at 1.0 rounding in the cumulative sum must not drop blocks
        keep_sorted = keep_sorted & (mass_before < cdf_threshold)
    keep_sorted = keep_sorted.clone()
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep if forced is None else keep | forced


def density_budget(density: float, blocks: int) -> int:
    return max(1, min(blocks, round(density * blocks)))


def kept_fraction(mask: torch.Tensor, block: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Token-weighted kept fraction of a block mask (mean over batch/head), as a 0-d tensor.

    Same number as ``BlockLayout.density()`` but stays on the device (no sync per call).
    """
    q_sizes = block_sizes(q_len, block, mask.device).double()
    k_sizes = block_sizes(kv_len, block, mask.device).double()
    kept = torch.einsum("bhqk,q,k->bh", mask.double(), q_sizes, k_sizes)
    return kept.mean() / (q_len * kv_len)


def with_text_blocks(visual_mask: torch.Tensor, geom: Geometry, block: int) -> torch.Tensor:
    """Full block mask over (visual + text queries) x (visual + kept text keys).

    visual_mask (B|1, H|1, nv, nv) covers the visual blocks; any block holding a text token
    (including a last visual block shared with text) is kept in its whole row and column.
    """
    nv = num_blocks(geom.visual_tokens, block)
    nq, nk = num_blocks(geom.q_len, block), num_blocks(geom.kv_len, block)
    mask = torch.zeros(*visual_mask.shape[:2], nq, nk, dtype=torch.bool, device=visual_mask.device)
    mask[..., :nv, :nv] = visual_mask
    first_text_block = geom.visual_tokens // block
    if geom.text_tokens:
        mask[..., first_text_block:, :] = True
    if geom.text_keys:
        mask[..., :, first_text_block:] = True
    return mask


class BlockPlan(NamedTuple):
    """A pattern's answer for one call."""

    layout: BlockLayout  # over the working order
    permutation: TokenPermutation  # original order -> working order (queries; keys/values)
    density: torch.Tensor  # realised kept fraction, 0-d, on the inputs' device


# Keyed by the user-facing name; ``accel.attention.sparse`` registers one attention method per entry.
SPARSE_PATTERNS = Registry("sparse pattern")


def register_pattern(cls: type) -> type:
    """Class decorator: make ``cls`` available as ``attention=cls.name``."""
    return SPARSE_PATTERNS.register(cls.name, cls)


class BlockPattern:
    """One way of choosing blocks. Subclasses set ``Config`` and implement ``visual_layout``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = PatternConfig
    needs_grid: ClassVar[bool] = True
    min_frames: ClassVar[int] = 1
    static_layout: ClassVar[bool] = False  # True when visual_layout returns a cached mask per grid

    def __init__(self, config: PatternConfig):
        self.config = config
        self._layouts: dict = {}

    def counters(self) -> dict:
        """Pattern-specific numbers for ``Handle.summary()`` (e.g. the share of temporal heads)."""
        return {}

    # What makes the realised density exceed the request, and the knob that controls it.
    density_knob = ("few blocks per row at this length round the budget up and every row keeps its "
                    "diagonal block; a smaller block_size gives finer control")

    def unsupported(self, geom: Geometry) -> Optional[str]:
        if self.needs_grid and geom.grid is None:
            return f"pattern {self.name!r} needs a token grid and this call has none"
        if self.needs_grid and geom.grid[0] < self.min_frames:
            return f"pattern {self.name!r} needs at least {self.min_frames} frames, grid is {geom.grid}"
        return None

    def block_layout(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext,
                     geom: Optional[Geometry] = None, scale: Optional[float] = None) -> BlockPlan:
        """The plan for q, k (B, S, H, D); ``geom`` defaults to the context's token layout."""
        if geom is None:
            geom, reason = geometry_of(q.shape[1], ctx.layout)
            if geom is None:
                raise ValueError(reason)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        visual_mask, q_order, kv_order = self.visual_layout(q, k, ctx, geom, scale)
        layout, density = self._layout(visual_mask, geom, q.device)
        return BlockPlan(layout, self._permutation(q_order, kv_order, geom, q.device), density)

    def _layout(self, visual_mask: torch.Tensor, geom: Geometry, device) -> Tuple[BlockLayout, torch.Tensor]:
        block = self.config.block_size
        # Static patterns hand back the same cached mask tensor for a grid; reusing one BlockLayout
        # object for it lets the kernels reuse what they derive from it (FlexAttention's BlockMask).
        key = (id(visual_mask), geom.visual_tokens, geom.q_len, geom.kv_len, str(device))
        if self.static_layout and key in self._layouts:
            return self._layouts[key]
        mask = with_text_blocks(visual_mask, geom, block)
        result = (BlockLayout.from_dense_mask(mask, block, block, geom.q_len, geom.kv_len),
                  kept_fraction(mask, block, geom.q_len, geom.kv_len))
        if self.static_layout:
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = result
        return result

    @staticmethod
    def _permutation(q_order: Optional[torch.Tensor], kv_order: Optional[torch.Tensor], geom: Geometry,
                     device) -> TokenPermutation:
        moves_text = geom.text_position == "prefix" and geom.text_tokens > 0
        if q_order is None and kv_order is None and not moves_text and geom.text_keys_kept is None:
            return TokenPermutation.identity()
        if q_order is None:
            q_order = (identity_order(geom.grid, device) if geom.grid
                       else torch.arange(geom.visual_tokens, device=device))
        if kv_order is None:
            kv_order = q_order
        q_index = place_text(q_order, geom.visual_tokens, geom.text_tokens, geom.text_position)
        if kv_order is q_order and geom.text_keys_kept is None:
            return TokenPermutation.build(q_index)
        kv_index = place_text(kv_order, geom.visual_tokens, geom.text_tokens, geom.text_position,
                              text_index=geom.text_keys_kept)
        return TokenPermutation.build(q_index, kv_index)

    def visual_layout(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, geom: Geometry,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(visual block mask (B|1, H|1, nv, nv), query visual order, key visual order).

        Orders are (N,), (H, N) or (B, H, N) indices into the visual span (``accel.attention.reorder``),
        or None for the model's own order; a None key order follows the query order.
        """
        raise NotImplementedError

    @staticmethod
    def visual_span(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
        """The visual tokens of x (B, S, H, D), in the model's own order."""
        start = geom.text_tokens if geom.text_position == "prefix" else 0
        return x[:, start:start + geom.visual_tokens]

    @staticmethod
    def text_keys(k: torch.Tensor, geom: Geometry) -> torch.Tensor:
        """The text keys that attention keeps (padding dropped), (B, text_keys, H, D)."""
        start = 0 if geom.text_position == "prefix" else geom.visual_tokens
        text = k[:, start:start + geom.text_tokens]
        return text if geom.text_keys_kept is None else text.index_select(1, geom.text_keys_kept.to(k.device))
