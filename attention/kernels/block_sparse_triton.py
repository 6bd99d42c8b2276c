"""Block-sparse flash-attention forward kernel in Triton.

One program owns a tile of BLOCK_M query rows of one (batch, head) and runs a
flash-attention online softmax over only the key blocks its layout row lists.
Written with plain pointer arithmetic (no block pointers or TMA descriptors) so
the same source runs on Triton 3.6 GPUs and in the Triton 3.9 CPU interpreter.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and flex paths must still import without Triton
    triton = None
    tl = None

from .block_layout import BlockLayout

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2_E = 1.4426950408889634


def _block_sparse_fwd(
    Q, K, V, Out, KvIndices, KvCounts,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    num_heads, q_len, kv_len, qk_scale_log2,
    LAYOUT_BLOCK_Q: tl.constexpr,
    LAYOUT_BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SUB_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One function, no @triton.jit helpers, so nothing about it depends on how
    # other jit functions were decorated.
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    layout_row = (tile_m * BLOCK_M) // LAYOUT_BLOCK_Q

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len

    # int64 bases: batch * stride overflows int32 at video lengths with B > 1.
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    index_base = KvIndices + batch * stride_ib + head * stride_ih + layout_row * stride_iq
    listed_blocks = tl.load(KvCounts + batch * stride_cb + head * stride_ch + layout_row * stride_cq)

    q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    # A finite start for the running max keeps the rescale exp2(old - new) from
    # ever computing -inf - -inf (NaN), whatever order the tiles arrive in,
    # including a sub-tile that lies wholly past kv_len.
    running_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # One flat loop over (listed block, sub-tile) so the compiler pipelines the
    # key/value loads across block boundaries, not just inside one block.
    for step in range(0, listed_blocks * SUB_TILES):
        key_block = tl.load(index_base + (step // SUB_TILES) * stride_ik)
        keys = key_block * LAYOUT_BLOCK_K + (step % SUB_TILES) * BLOCK_N + cols
        key_ok = keys < kv_len
        k_tile = tl.load(k_base + keys[None, :] * stride_ks + dims[:, None] * stride_kd,
                         mask=key_ok[None, :], other=0.0)
        scores = tl.dot(q, k_tile, input_precision=DOT_PRECISION)
        # Only the ragged last key block needs the padding mask; skipping the
        # full-tile select elsewhere matters because softmax, not the matmuls,
        # bounds this loop on Hopper.
        if (key_block + 1) * LAYOUT_BLOCK_K > kv_len:
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
        # Scaling after the row max (valid since the scale is positive) lets the
        # scale multiply and the max subtraction fuse into one FMA per score.
        new_max = tl.maximum(running_max, tl.max(scores, 1) * qk_scale_log2)
        probs = tl.math.exp2(scores * qk_scale_log2 - new_max[:, None])
        rescale = tl.math.exp2(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        v_tile = tl.load(v_base + keys[:, None] * stride_vs + dims[None, :] * stride_vd,
                         mask=key_ok[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        running_max = new_max

    # Rows that saw no key keep sum 0 and acc 0, so dividing by 1 yields exact zeros.
    running_sum = tl.where(running_sum > 0.0, running_sum, 1.0)
    out = acc / running_sum[:, None]
    tl.store(o_base + rows[:, None] * stride_os + dims[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# Decorated explicitly (not with @triton.jit) so this module still imports when
# Triton is absent and the reference/flex paths stay usable.
_block_sparse_fwd_kernel = triton.jit(_block_sparse_fwd) if triton is not None else None


def _interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter in this process.

    Triton chooses compiler or interpreter when @triton.jit decorates a function,
    and its own standard library (tl.zeros, tl.max, ...) is decorated when
    `import triton` first runs. So TRITON_INTERPRET=1 only takes effect if it was
    set before Triton's first import; setting it later leaves compiled-mode
    library functions that fail inside an interpreted kernel.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction
    # tl.zeros stands in for the standard library: both it and our kernel must
    # have been decorated in interpreter mode.
    return isinstance(_block_sparse_fwd_kernel, InterpretedFunction) and isinstance(
        getattr(tl, "zeros", None), InterpretedFunction)


def triton_supported(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the Triton kernel can run on q; the reason says why not."""
    if triton is None:
        return False, "triton is not installed"
    if q.dtype not in _SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} is not one of fp16, bf16, fp32"
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return False, f"head_dim {head_dim} is not a power of two in [16, 256]"
    if q.device.type == "cpu" and not _interpreter_active():
        return False, ("device cpu needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                       "triton is first imported in the process")
    if q.device.type not in ("cpu", "cuda"):
        return False, f"device {q.device.type} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"
    return True, ""


def default_launch_config(block_q: int, block_k: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch parameters by head dim and dtype. No autotuning (it
    would need a GPU benchmarker at first call); these were the fastest of a
    small sweep on H100 (Triton 3.6, bf16/fp16, S=32760, 12 heads):
    D=128: 128x64 tiles, 8 warps, 3 stages, ~485 TFLOP/s dense; D=64: 4 stages.
    Kernel tiles may be smaller than layout blocks; they must divide them."""
    block_m, block_n = min(block_q, 128), min(block_k, 64)
    if dtype == torch.float32 or head_dim > 128:
        # 4-byte operands or 256-wide rows: 128x64 tiles would exceed shared memory.
        block_m, block_n = min(block_m, 64), min(block_n, 32)
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 4 if head_dim <= 64 else (3 if head_dim <= 128 else 2)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                  scale: float | None = None, launch_config: dict | None = None) -> torch.Tensor:
    """Block-sparse attention with q (B, Sq, H, D), k/v (B, Sk, H, D), any strides.

    launch_config overrides default_launch_config keys (BLOCK_M, BLOCK_N,
    num_warps, num_stages) for tuning.
    """
    supported, reason = triton_supported(q)
    if not supported:
        raise ValueError(f"q: Triton block-sparse kernel cannot run: {reason}")
    layout.check_inputs(q, k, v)
    batch, q_len, heads, head_dim = q.shape
    config = default_launch_config(layout.block_q, layout.block_k, head_dim, q.dtype)
    config.update(launch_config or {})
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    for name, tile, block in (("BLOCK_M", block_m, layout.block_q), ("BLOCK_N", block_n, layout.block_k)):
        # tl.dot needs >= 16 along every dim; tiles must not straddle layout blocks.
        if tile < 16 or tile & (tile - 1) or block % tile:
            raise ValueError(f"{name}: tile {tile} must be a power of two >= 16 dividing the layout block {block}")

    # Token offsets inside one (batch, head) are int32 in the kernel (int64
    # address math would slow every load); refuse inputs where they could wrap.
    if max(t.stride(1) * t.shape[1] + t.stride(3) * head_dim for t in (q, k, v)) >= 2**31:
        raise ValueError("q: sequence too long for the kernel's int32 token offsets")
    if layout.device != q.device:  # keep layouts on q's device to avoid this copy per call
        layout = layout.to(q.device)
    kv_indices = layout.kv_indices.expand(batch, heads, -1, -1)  # stride 0 where the layout broadcasts
    kv_counts = layout.kv_counts.expand(batch, heads, -1)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if not scale > 0:
        raise ValueError(f"scale: the Triton kernel needs a positive softmax scale, got {scale}")
    # fp32 inputs ask for exact fp32 products; TF32 would miss the reference by ~1e-3.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _block_sparse_fwd_kernel[grid](
        q, k, v, out, kv_indices, kv_counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *kv_indices.stride(), *kv_counts.stride(),
        heads, q_len, layout.kv_len, scale * _LOG2_E,
        LAYOUT_BLOCK_Q=layout.block_q, LAYOUT_BLOCK_K=layout.block_k,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, SUB_TILES=layout.block_k // block_n,
        DOT_PRECISION=precision,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out
