"""Pure-torch block-sparse attention: the contract every fast path must match.

Computes softmax attention in fp32 over the token mask implied by a BlockLayout.
Query rows whose block keeps no key block output exactly 0 (a plain masked
softmax would give NaN there).
"""

from __future__ import annotations

import math

import torch

from .block_layout import BlockLayout

# Bound on the fp32 score buffer per query chunk, so the reference can spot-check
# long sequences without materialising the full (Sq, Sk) matrix at once.
_SCORE_BUDGET_BYTES = 256 * 1024 * 1024


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     layout: BlockLayout, scale: float | None = None) -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D) -> (B, Sq, H, D) in q.dtype."""
    layout.check_inputs(q, k, v)
    batch, q_len, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    layout = layout.to(q.device)

    qf = q.transpose(1, 2).float()
    kf = k.transpose(1, 2).float()
    vf = v.transpose(1, 2).float()
    block_mask = layout.to_dense_mask()  # (B|1, H|1, nq, nk)
    key_mask = block_mask.repeat_interleave(layout.block_k, dim=3)[..., : layout.kv_len]

    rows_per_chunk = _SCORE_BUDGET_BYTES // (4 * batch * heads * layout.kv_len)
    blocks_per_chunk = max(1, rows_per_chunk // layout.block_q)
    out = torch.empty(batch, heads, q_len, head_dim, dtype=torch.float32, device=q.device)
    for first_block in range(0, layout.num_q_blocks, blocks_per_chunk):
        row_start = first_block * layout.block_q
        row_stop = min(q_len, (first_block + blocks_per_chunk) * layout.block_q)
        # Expand block rows to token rows for this chunk only.
        chunk_mask = key_mask[:, :, first_block : first_block + blocks_per_chunk]
        chunk_mask = chunk_mask.repeat_interleave(layout.block_q, dim=2)[:, :, : row_stop - row_start]
        scores = torch.matmul(qf[:, :, row_start:row_stop], kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~chunk_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Fully masked rows softmax to NaN; the contract says they are zero.
        probs = torch.where(chunk_mask.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
        out[:, :, row_start:row_stop] = torch.matmul(probs, vf)
    return out.transpose(1, 2).to(q.dtype).contiguous()
