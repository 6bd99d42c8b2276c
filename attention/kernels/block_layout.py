"""Block-sparse attention layout shared by every block-sparse attention path.

A layout says, for each query block, which key blocks it attends. It is stored
as a padded index list (the form kernels want: a query block only loops over
its own entries) rather than a dense block mask, because at video lengths the
index list is what makes skipping blocks free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def dense_block_mask_to_indices(block_mask: torch.Tensor, width: int | None = None):
    """Compact a bool (..., nq, nk) block mask into (indices, counts), both int32.

    Kept key blocks come first in ascending order; padding entries hold 0. The
    index tensor has `width` columns (default: the most kept blocks in any row,
    at least 1 so kernels never see a zero-sized tensor).
    """
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask: expected a bool tensor, got {block_mask.dtype}")
    num_k_blocks = block_mask.shape[-1]
    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    if width is None:
        width = max(1, int(counts.max().item()) if counts.numel() else 1)
    # A stable sort on the negated mask moves kept blocks to the front while
    # keeping them in ascending key order, which keeps memory access monotone.
    order = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True)
    indices = order[..., :width].to(torch.int32)
    if width > num_k_blocks:
        pad = indices.new_zeros(*indices.shape[:-1], width - num_k_blocks)
        indices = torch.cat([indices, pad], dim=-1)
    column = torch.arange(width, device=block_mask.device)
    indices = torch.where(column < counts.unsqueeze(-1), indices, torch.zeros_like(indices))
    return indices.contiguous(), counts.contiguous()


@dataclass(frozen=True, eq=False)  # identity eq/hash: fields are tensors
class BlockLayout:
    """Which key blocks each query block attends, per batch and head.

    kv_indices: int32 (B|1, H|1, num_q_blocks, max_kv_blocks); entries past
        kv_counts are padding and never read.
    kv_counts: int32 (B|1, H|1, num_q_blocks); 0 means the query block attends
        nothing and its rows produce exactly zero.
    Size-1 batch/head dims broadcast over the attention inputs.
    trusted: skip the checks of index and count values. They read tensors back to
        the host (about five device syncs), which stalls a GPU pipeline when
        dynamic patterns build a layout per call; only the constructors below,
        whose output is valid by construction, set it.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    trusted: bool = field(default=False, repr=False)

    def __post_init__(self):
        for name in ("block_q", "block_k", "q_len", "kv_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name, ndim in (("kv_indices", 4), ("kv_counts", 3)):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32:
                got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name}: expected an int32 tensor, got {got}")
            if tensor.dim() != ndim:
                raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(tensor.shape)}")
        if self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(
                f"kv_counts: shape {tuple(self.kv_counts.shape)} does not match "
                f"kv_indices leading dims {tuple(self.kv_indices.shape[:3])}"
            )
        if self.kv_indices.device != self.kv_counts.device:
            raise ValueError("kv_counts: must be on the same device as kv_indices")
        if self.kv_counts.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_counts: has {self.kv_counts.shape[2]} query blocks, but q_len={self.q_len} "
                f"with block_q={self.block_q} needs {self.num_q_blocks}"
            )
        max_kv_blocks = self.kv_indices.shape[3]
        if self.kv_counts.numel() and not self.trusted:
            if int(self.kv_counts.min()) < 0 or int(self.kv_counts.max()) > max_kv_blocks:
                raise ValueError(f"kv_counts: values must lie in [0, {max_kv_blocks}]")
            valid = torch.arange(max_kv_blocks, device=self.kv_counts.device) < self.kv_counts.unsqueeze(-1)
            listed = self.kv_indices[valid]
            if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= self.num_kv_blocks):
                raise ValueError(f"kv_indices: listed entries must lie in [0, {self.num_kv_blocks})")
            # A repeated block would be summed twice by the kernels' online softmax.
            if listed.numel() and int(self._dense_from_indices().max()) > 1:
                raise ValueError("kv_indices: a query block lists the same key block twice")

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_q: int, block_k: int, q_len: int, kv_len: int):
        """Build from a bool block mask of shape (B|1, H|1, num_q_blocks, num_kv_blocks)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError("mask: expected a 4-D bool tensor (B|1, H|1, num_q_blocks, num_kv_blocks)")
        expected = (math.ceil(q_len / block_q), math.ceil(kv_len / block_k))
        if tuple(mask.shape[2:]) != expected:
            raise ValueError(f"mask: block grid {tuple(mask.shape[2:])} does not match {expected}")
        # On a GPU, sizing the index list by the largest row count would read it back to the
        # host; listing room for every key block costs a little memory and no sync.
        width = mask.shape[-1] if mask.device.type == "cuda" else None
        indices, counts = dense_block_mask_to_indices(mask, width=width)
        # Sorted, unique, in-range entries by construction: no value checks needed.
        return cls(indices, counts, block_q, block_k, q_len, kv_len, trusted=True)

    @classmethod
    def full(cls, block_q: int, block_k: int, q_len: int, kv_len: int, device=None):
        """Every query block attends every key block (dense attention)."""
        mask = torch.ones(1, 1, math.ceil(q_len / block_q), math.ceil(kv_len / block_k),
                          dtype=torch.bool, device=device)
        return cls.from_dense_mask(mask, block_q, block_k, q_len, kv_len)

    def _dense_from_indices(self) -> torch.Tensor:
        max_kv_blocks = self.kv_indices.shape[3]
        valid = torch.arange(max_kv_blocks, device=self.device) < self.kv_counts.unsqueeze(-1)
        # Padding entries are routed to a spare column that is dropped afterwards,
        # so their (arbitrary) values never matter.
        target = torch.where(valid, self.kv_indices.long(), torch.full_like(self.kv_indices, self.num_kv_blocks).long())
        hits = torch.zeros(*self.kv_counts.shape, self.num_kv_blocks + 1, dtype=torch.int32, device=self.device)
        hits.scatter_add_(-1, target, torch.ones_like(target, dtype=torch.int32))
        return hits[..., : self.num_kv_blocks]

    def to_dense_mask(self) -> torch.Tensor:
        """Bool block mask (B|1, H|1, num_q_blocks, num_kv_blocks)."""
        return self._dense_from_indices() > 0

    def to_token_mask(self) -> torch.Tensor:
        """Bool token mask (B|1, H|1, q_len, kv_len); only for small shapes."""
        dense = self.to_dense_mask()
        dense = dense.repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        return dense.repeat_interleave(self.block_k, dim=3)[:, :, :, : self.kv_len]

    def density(self) -> float:
        """Fraction of (query token, key token) pairs kept, averaged over the layout's
        batch/head entries. Token-weighted, so a kept ragged tail block counts only for
        the tokens it really holds; this makes density * q_len * kv_len the exact
        number of score entries a kernel computes."""
        dense = self.to_dense_mask().to(torch.float64)
        q_sizes = torch.full((self.num_q_blocks,), float(self.block_q), dtype=torch.float64, device=self.device)
        q_sizes[-1] = self.q_len - (self.num_q_blocks - 1) * self.block_q
        k_sizes = torch.full((self.num_kv_blocks,), float(self.block_k), dtype=torch.float64, device=self.device)
        k_sizes[-1] = self.kv_len - (self.num_kv_blocks - 1) * self.block_k
        kept = torch.einsum("bhqk,q,k->bh", dense, q_sizes, k_sizes)
        return float(kept.mean()) / (self.q_len * self.kv_len)

    def to(self, device) -> "BlockLayout":
        """Copy to a device once, so kernels do not copy the index lists per call."""
        return BlockLayout(self.kv_indices.to(device), self.kv_counts.to(device),
                           self.block_q, self.block_k, self.q_len, self.kv_len, trusted=self.trusted)

    def query_block_slice(self, start: int, stop: int) -> "BlockLayout":
        """Layout for query blocks [start, stop), i.e. query tokens
        [start * block_q, min(stop * block_q, q_len)); used for spot checks at
        lengths where the dense reference does not fit in memory."""
        stop = min(stop, self.num_q_blocks)
        if not 0 <= start < stop:
            raise ValueError(f"start: need 0 <= start < stop <= {self.num_q_blocks}, got [{start}, {stop})")
        q_len = min(stop * self.block_q, self.q_len) - start * self.block_q
        return BlockLayout(self.kv_indices[:, :, start:stop].contiguous(), self.kv_counts[:, :, start:stop].contiguous(),
                           self.block_q, self.block_k, q_len, self.kv_len, trusted=self.trusted)

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ValueError unless q (B, Sq, H, D), k/v (B, Sk, H, D) fit this layout."""
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError("q, k, v: expected 4-D tensors laid out (batch, seq, heads, head_dim)")
        batch, q_len, heads, head_dim = q.shape
        if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != head_dim:
            raise ValueError(f"k, v: shapes {tuple(k.shape)}, {tuple(v.shape)} do not fit q {tuple(q.shape)}")
        if q_len != self.q_len or k.shape[1] != self.kv_len:
            raise ValueError(f"q_len/kv_len: layout is for ({self.q_len}, {self.kv_len}), "
                             f"inputs have ({q_len}, {k.shape[1]})")
        layout_b, layout_h = self.kv_counts.shape[:2]
        if layout_b not in (1, batch) or layout_h not in (1, heads):
            raise ValueError(f"kv_counts: batch/head dims ({layout_b}, {layout_h}) do not broadcast "
                             f"to ({batch}, {heads})")
        if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
            raise ValueError("q, k, v: must share dtype and device")
