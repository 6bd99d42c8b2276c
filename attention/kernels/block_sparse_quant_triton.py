"""Quantized block-sparse flash attention in Triton: INT8 QK^T, PV in FP8 or the input dtype.

Same block-list interface as ``block_sparse_triton`` (a full ``BlockLayout`` is dense attention),
so dense, sparse and sparse+quantized are one kernel family. Inputs come from
``quantize.quantize_qkv``: per-tile INT8 Q/K scales (the softmax scale folded into Q's), K
smoothed, V in FP8 with per-channel scales or left in the input dtype. Scores accumulate in int32,
softmax and the output in fp32; ``quantize.quantized_attention_reference`` replays this kernel.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference paths must still import without Triton
    triton = None
    tl = None

from .block_layout import BlockLayout
from .block_sparse_triton import _interpreter_active
from .quantize import check_tiles, fp8_supported, quant_tiles, quantize_qkv, resolve_pv

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _block_sparse_quant_fwd(
    Q, K, V, Out, QScale, KScale, VScale, KvIndices, KvCounts,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_qsb, stride_qsh, stride_qst,
    stride_ksb, stride_ksh, stride_kst,
    stride_vsb, stride_vsh, stride_vsd,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    num_heads, q_len, kv_len,
    LAYOUT_BLOCK_Q: tl.constexpr,
    LAYOUT_BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SUB_TILES: tl.constexpr,
    PV_FP8: tl.constexpr,
    ROUND_FP8_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
    k_scale_base = KScale + batch * stride_ksb + head * stride_ksh
    index_base = KvIndices + batch * stride_ib + head * stride_ih + layout_row * stride_iq
    listed_blocks = tl.load(KvCounts + batch * stride_cb + head * stride_ch + layout_row * stride_cq)
    # Q's scale is one number per tile (the quantization block is the tile).
    q_scale = tl.load(QScale + batch * stride_qsb + head * stride_qsh + tile_m * stride_qst)

    q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :] * stride_qd, mask=row_ok[:, None], other=0)

    # A finite start for the running max keeps exp2(old - new) from computing -inf - -inf (NaN).
    running_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for step in range(0, listed_blocks * SUB_TILES):
        key_block = tl.load(index_base + (step // SUB_TILES) * stride_ik)
        key_tile = key_block * SUB_TILES + step % SUB_TILES
        keys = key_tile * BLOCK_N + cols
        key_ok = keys < kv_len
        k_tile = tl.load(k_base + keys[None, :] * stride_ks + dims[:, None] * stride_kd,
                         mask=key_ok[None, :], other=0)
        # Exact int32 scores; one multiply dequantizes them (scale, log2(e) and both block scales).
        dequant = q_scale * tl.load(k_scale_base + key_tile * stride_kst)
        scores = tl.dot(q, k_tile, out_dtype=tl.int32).to(tl.float32) * dequant
        if (key_block + 1) * LAYOUT_BLOCK_K > kv_len:  # only the ragged last key block needs the mask
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        v_tile = tl.load(v_base + keys[:, None] * stride_vs + dims[None, :] * stride_vd,
                         mask=key_ok[:, None], other=0.0)
        if PV_FP8:
            probs = probs * 448.0  # FP8_MAX: P <= 1 lands on the top of e4m3's range
            if ROUND_FP8_IN_FP32:
                # The interpreter's fp32 -> fp8 cast rounds wrongly when the mantissa carries into
                # the exponent (0.49 -> 0.25). Round to the e4m3 grid here (ties to even, as the
                # GPU's cvt.rn does) so that its cast only ever sees exact values.
                bits = probs.to(tl.int32, bitcast=True)
                normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
                subnormal = (probs + 16384.0) - 16384.0  # multiples of 2^-9 below 2^-6
                probs = tl.where(probs < 0.015625, subnormal, normal)
            pv = tl.dot(probs.to(tl.float8e4nv), v_tile, out_dtype=tl.float32)
        else:
            pv = tl.dot(probs.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        # Added outside the dot so that Hopper's reduced-precision FP8 accumulation spans one
        # tile only; the running sum across tiles stays in fp32 registers.
        acc = acc * rescale[:, None] + pv
        running_max = new_max

    # Rows that saw no key keep sum 0 and acc 0, so dividing by 1 yields exact zeros.
    running_sum = tl.where(running_sum > 0.0, running_sum, 1.0)
    out = acc / running_sum[:, None]
    if PV_FP8:
        v_scale = tl.load(VScale + batch * stride_vsb + head * stride_vsh + dims * stride_vsd)
        out = out * (v_scale * (1.0 / 448.0))[None, :]
    tl.store(o_base + rows[:, None] * stride_os + dims[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


_block_sparse_quant_fwd_kernel = triton.jit(_block_sparse_quant_fwd) if triton is not None else None


def quant_triton_supported(q: torch.Tensor, pv: str = "input") -> tuple[bool, str]:
    """Whether the quantized kernel can run on q with this PV mode; the reason says why not."""
    if triton is None:
        return False, "triton is not installed"
    if q.dtype not in _SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} is not one of fp16, bf16, fp32"
    head_dim = q.shape[-1]
    # 8-bit tl.dot needs K >= 32 on NVIDIA GPUs; QK^T reduces over the head dim.
    if head_dim < 32 or head_dim > 256 or head_dim & (head_dim - 1):
        return False, f"head_dim {head_dim} is not a power of two in [32, 256]"
    if q.device.type == "cpu":
        if not _interpreter_active():
            return False, ("device cpu needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                           "triton is first imported in the process")
    elif q.device.type != "cuda":
        return False, f"device {q.device.type} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"
    if resolve_pv(pv, q.device) == "fp8" and q.device.type == "cuda" and not fp8_supported(q.device):
        return False, "FP8 PV needs CUDA capability 8.9 or newer"
    return True, ""


def quant_launch_config(block_m: int, head_dim: int) -> dict:
    """Warps and stages; untuned: the fp16 kernel's choices for the same tiles."""
    return {"num_warps": 8 if block_m >= 128 else 4,
            "num_stages": 4 if head_dim <= 64 else (3 if head_dim <= 128 else 2)}


def block_sparse_attention_quant_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                        scale: float | None = None, pv: str = "input",
                                        launch_config: dict | None = None) -> torch.Tensor:
    """Quantized block-sparse attention, q (B, Sq, H, D), k/v (B, Sk, H, D) -> q.dtype.

    pv: "input" (P and V in the input dtype), "fp8", or "auto" (fp8 where the GPU has it).
    launch_config overrides BLOCK_M, BLOCK_N (also the quantization blocks), num_warps, num_stages.
    """
    supported, reason = quant_triton_supported(q, pv)
    if not supported:
        raise ValueError(f"q: quantized Triton kernel cannot run: {reason}")
    layout.check_inputs(q, k, v)
    pv = resolve_pv(pv, q.device)
    batch, q_len, heads, head_dim = q.shape
    block_m, block_n = quant_tiles(layout.block_q, layout.block_k, head_dim)
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, **quant_launch_config(block_m, head_dim)}
    config.update(launch_config or {})
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    check_tiles(layout, block_m, block_n)
    if pv == "fp8" and block_n < 32:  # P @ V reduces over BLOCK_N keys; 8-bit dots need >= 32
        raise ValueError(f"BLOCK_N: FP8 PV needs key tiles of at least 32, got {block_n}")
    if max(t.stride(1) * t.shape[1] + t.stride(3) * head_dim for t in (q, k, v)) >= 2**31:
        raise ValueError("q: sequence too long for the kernel's int32 token offsets")
    if layout.device != q.device:
        layout = layout.to(q.device)

    qkv = quantize_qkv(q, k, v, block_m, block_n, scale, pv)
    v_scale = qkv.v_scale if qkv.v_scale is not None else qkv.q_scale.new_ones(1, 1, 1)  # never read
    kv_indices = layout.kv_indices.expand(batch, heads, -1, -1)
    kv_counts = layout.kv_counts.expand(batch, heads, -1)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _block_sparse_quant_fwd_kernel[grid](
        qkv.q, qkv.k, qkv.v, out, qkv.q_scale, qkv.k_scale, v_scale, kv_indices, kv_counts,
        *qkv.q.stride(), *qkv.k.stride(), *qkv.v.stride(), *out.stride(),
        *qkv.q_scale.stride(), *qkv.k_scale.stride(), *v_scale.stride(),
        *kv_indices.stride(), *kv_counts.stride(),
        heads, q_len, layout.kv_len,
        LAYOUT_BLOCK_Q=layout.block_q, LAYOUT_BLOCK_K=layout.block_k,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, SUB_TILES=layout.block_k // block_n,
        PV_FP8=pv == "fp8", ROUND_FP8_IN_FP32=q.device.type == "cpu",
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


__all__ = ["block_sparse_attention_quant_triton", "quant_launch_config", "quant_triton_supported"]
