"""Block-sparse attention through torch FlexAttention, driven by a BlockLayout.

The layout's key-block lists become a FlexAttention BlockMask with the same
block sizes. Blocks wholly inside kv_len are passed as "full" blocks, which the
compiled kernels run without calling mask_mod; only a ragged last key block is
"partial". The mask_mod still encodes the whole layout (block lookup plus the
kv_len bound) because eager FlexAttention ignores the block lists and applies
mask_mod densely.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .block_layout import BlockLayout, dense_block_mask_to_indices

# layout -> {device: (BlockMask, kept-row mask or None)}; weak so dropping a
# layout frees its masks. Building a BlockMask sorts nq x nk entries, which is
# too slow to repeat per attention call.
_BLOCK_MASK_CACHE: "weakref.WeakKeyDictionary[BlockLayout, dict]" = weakref.WeakKeyDictionary()
_COMPILED_FLEX = None


def layout_to_block_mask(layout: BlockLayout, device) -> tuple[BlockMask, torch.Tensor | None]:
    """FlexAttention BlockMask equivalent to `layout`, plus a bool (B|1, Sq, H|1, 1)
    mask of query rows that attend anything, or None when every row does."""
    per_device = _BLOCK_MASK_CACHE.setdefault(layout, {})
    device = torch.device(device)
    if device in per_device:
        return per_device[device]

    dense = layout.to(device).to_dense_mask()
    num_kv_blocks = layout.num_kv_blocks
    kv_len = layout.kv_len
    is_tail = torch.zeros(num_kv_blocks, dtype=torch.bool, device=device)
    if kv_len % layout.block_k:
        is_tail[-1] = True
    # Width num_kv_blocks: BlockMask derives its transposed (q-block) view and
    # its default sequence length from that last dim.
    partial_indices, partial_counts = dense_block_mask_to_indices(dense & is_tail, width=num_kv_blocks)
    full_indices, full_counts = dense_block_mask_to_indices(dense & ~is_tail, width=num_kv_blocks)

    block_q, block_k = layout.block_q, layout.block_k
    per_batch, per_head = dense.shape[0] > 1, dense.shape[1] > 1

    def layout_mask(batch, head, q_idx, kv_idx):
        kept = dense[batch if per_batch else 0, head if per_head else 0, q_idx // block_q, kv_idx // block_k]
        return kept & (kv_idx < kv_len)

    block_mask = BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=(block_q, block_k), mask_mod=layout_mask,
        seq_lengths=(layout.q_len, kv_len),
    )
    row_kept = None
    if bool((layout.kv_counts == 0).any()):
        counts = layout.kv_counts.to(device).repeat_interleave(layout.block_q, dim=2)[..., : layout.q_len]
        row_kept = (counts > 0).transpose(1, 2).unsqueeze(-1)
    per_device[device] = (block_mask, row_kept)
    return per_device[device]


def _flex_fn(compile: bool):
    global _COMPILED_FLEX
    if not compile:
        return flex_attention
    if _COMPILED_FLEX is None:
        # Compiled once per process. dynamic=False: after a shape change the
        # automatic-dynamic recompile emits C++ that fails to build on CPU
        # (torch 2.13), so each new shape gets its own static compile instead.
        # Dynamo's recompile_limit (8 by default) then caps distinct shapes per
        # process; past it, calls silently fall back to eager FlexAttention.
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _kernel_options(layout: BlockLayout, device: torch.device) -> dict | None:
    # Inductor's CUDA template requires its BLOCK_M/BLOCK_N to divide the sparse
    # block size and raises when its single default config does not; with
    # layout blocks under 128 we pick tiles that fit.
    if device.type != "cuda" or (layout.block_q >= 128 and layout.block_k >= 128):
        return None
    return {"BLOCK_M": min(layout.block_q, 64), "BLOCK_N": min(layout.block_k, 64)}


def block_sparse_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                scale: float | None = None, compile: bool = True) -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D) -> (B, Sq, H, D).

    compile=False runs FlexAttention eagerly, which materialises the full score
    matrix: only for small shapes (tests). Returns a (B, Sq, H, D) view of
    FlexAttention's (B, H, Sq, D) output, without a copy.
    """
    layout.check_inputs(q, k, v)
    block_mask, row_kept = layout_to_block_mask(layout, q.device)
    out = _flex_fn(compile)(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        block_mask=block_mask, scale=scale, kernel_options=_kernel_options(layout, q.device),
    ).transpose(1, 2)
    if row_kept is not None:
        # FlexAttention writes 0 for rows with no unmasked key on CPU and CUDA
        # (torch 2.11-2.13), but that is its implementation detail; the
        # contract is ours, so enforce it.
        out = torch.where(row_kept, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
