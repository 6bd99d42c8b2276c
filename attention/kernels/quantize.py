"""Quantization pre-pass for quantized attention, and its simulated-quantization reference.

The quantized kernel (``block_sparse_quant_triton``) consumes what ``quantize_qkv`` produces:

* Q and K in INT8 with one scale per (batch, head, kernel tile): the tile is the unit the kernel
  multiplies by a single scale after its int8 x int8 -> int32 product, so finer scales would cost
  a multiply per score. The softmax scale and log2(e) are folded into Q's scales (the kernel uses
  exp2), so dequantizing a score is one multiply by q_scale * k_scale.
* K smoothed first: its mean over tokens (per batch, head, channel) is subtracted. That shifts
  every score of a query row by the same q.mean_k, which softmax ignores, and removes the
  channel offsets that would otherwise set K's absmax and waste the int8 range.
* V either kept in the input dtype, or in FP8 e4m3 with one scale per (batch, head, channel)
  (``pv="fp8"``). With FP8 V the kernel also casts P to FP8, scaled by 448 (P <= 1 after the
  running-max subtraction, so 448 maps the largest probability onto the top of e4m3's range).

``quantized_attention_reference`` is the contract the kernel must match. It quantizes with the
same function, then replays the kernel's online softmax tile by tile in fp32: same key tiles in
the same order, same running max, same P rounding (P quantized against the running max, not the
final one, changes which values round where, so a two-pass softmax would not match FP8 P).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .block_layout import BlockLayout

_LOG2_E = 1.4426950408889634
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
PV_MODES = ("input", "fp8")
# Bound on the gathered key/value tiles per reference chunk, as in the plain reference.
_TILE_BUDGET_BYTES = 256 * 1024 * 1024


class QuantizedQKV(NamedTuple):
    """What the quantized kernel reads. Tensors keep the (B, S, H, D) shape contract (strides vary)."""

    q: torch.Tensor  # int8 (B, Sq, H, D)
    q_scale: torch.Tensor  # fp32 (B, H, ceil(Sq / block_m)); includes softmax scale * log2(e)
    k: torch.Tensor  # int8 (B, Sk, H, D), smoothed
    k_scale: torch.Tensor  # fp32 (B, H, ceil(Sk / block_n))
    v: torch.Tensor  # float8_e4m3fn (seq-contiguous) or the input dtype (B, Sk, H, D)
    v_scale: Optional[torch.Tensor]  # fp32 (B, H, D) when v is FP8, else None
    block_m: int
    block_n: int


def fp8_supported(device: torch.device) -> bool:
    """Whether kernels can multiply FP8 on this device: CUDA capability 8.9 (Ada) and newer."""
    device = torch.device(device)
    return (FP8_DTYPE is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (8, 9))


def resolve_pv(pv: str, device: torch.device) -> str:
    """``auto`` -> ``fp8`` where the device multiplies FP8, else ``input``."""
    if pv == "auto":
        return "fp8" if fp8_supported(device) else "input"
    if pv not in PV_MODES:
        raise ValueError(f"pv: expected 'auto' or one of {PV_MODES}, got {pv!r}")
    return pv


def quant_tiles(block_q: int, block_k: int, head_dim: int) -> Tuple[int, int]:
    """Default kernel tiles (BLOCK_M, BLOCK_N), which are also the quantization blocks.

    The fp16 kernel's sizes, not yet swept for 8-bit operands (which halve the shared memory a
    tile needs, so larger tiles may pay on the GPU).
    """
    block_m, block_n = min(block_q, 128), min(block_k, 64)
    if head_dim > 128:
        block_m, block_n = min(block_m, 64), min(block_n, 32)
    return block_m, block_n


def _blockwise(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, S, H, D) -> fp32 (B, nb, block, H, D), the ragged tail zero-padded (zeros leave absmax alone)."""
    batch, seq, heads, dim = x.shape
    padded = F.pad(x.float(), (0, 0, 0, 0, 0, (-seq) % block))
    return padded.view(batch, -1, block, heads, dim)


def quantize_int8_blocks(x: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 (B, S, H, D), fp32 scale (B, H, nb)): symmetric absmax/127 per (batch, block, head)."""
    seq = x.shape[1]
    blocks = _blockwise(x, block)
    absmax = blocks.abs().amax(dim=(2, 4))  # (B, nb, H)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    quantized = torch.round(blocks / scale[:, :, None, :, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized.flatten(1, 2)[:, :seq], scale.transpose(1, 2).contiguous()


def quantize_fp8_channels(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn (B, S, H, D), fp32 scale (B, H, D)): absmax/448 per (batch, head, channel).

    The FP8 tensor is stored sequence-contiguous ((B, H, D, S) memory): it is the B operand of
    P @ V, and Hopper's FP8 MMA wants that operand K-major.
    """
    if FP8_DTYPE is None:
        raise ValueError("v: this torch build has no float8_e4m3fn")
    vf = v.float()
    absmax = vf.abs().amax(dim=1)  # (B, H, D)
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    scaled = (vf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    stored = scaled.permute(0, 2, 3, 1).contiguous().to(FP8_DTYPE)  # (B, H, D, S)
    return stored.permute(0, 3, 1, 2), scale


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                 scale: Optional[float] = None, pv: str = "input") -> QuantizedQKV:
    """Quantize q (B, Sq, H, D), k/v (B, Sk, H, D) for the quantized kernel (see the module doc)."""
    if pv not in PV_MODES:
        raise ValueError(f"pv: expected one of {PV_MODES}, got {pv!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not scale > 0:
        raise ValueError(f"scale: quantized attention needs a positive softmax scale, got {scale}")
    q8, q_scale = quantize_int8_blocks(q, block_m)
    smoothed = k.float() - k.float().mean(dim=1, keepdim=True)
    k8, k_scale = quantize_int8_blocks(smoothed, block_n)
    q_scale = q_scale * (scale * _LOG2_E)
    if pv == "fp8":
        v_q, v_scale = quantize_fp8_channels(v)
    else:
        v_q, v_scale = v, None
    return QuantizedQKV(q8, q_scale, k8, k_scale, v_q, v_scale, block_m, block_n)


def check_tiles(layout: BlockLayout, block_m: int, block_n: int) -> None:
    for name, tile, block in (("BLOCK_M", block_m, layout.block_q), ("BLOCK_N", block_n, layout.block_k)):
        # tl.dot needs >= 16 along every dim; tiles must not straddle layout blocks.
        if tile < 16 or tile & (tile - 1) or block % tile:
            raise ValueError(f"{name}: tile {tile} must be a power of two >= 16 dividing the layout block {block}")


def quantized_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                  scale: Optional[float] = None, pv: str = "input",
                                  block_m: Optional[int] = None, block_n: Optional[int] = None) -> torch.Tensor:
    """What the quantized kernel computes, in torch: q (B, Sq, H, D), k/v (B, Sk, H, D) -> q.dtype.

    ``pv``: "input" (P cast to V's dtype) or "fp8" (runs on any device here, CPU included).
    block_m/block_n: the kernel tiles to simulate (default ``quant_tiles``).
    """
    layout.check_inputs(q, k, v)
    default_m, default_n = quant_tiles(layout.block_q, layout.block_k, q.shape[-1])
    block_m, block_n = block_m or default_m, block_n or default_n
    check_tiles(layout, block_m, block_n)
    quantized = quantize_qkv(q, k, v, block_m, block_n, scale, pv)
    return _replay_kernel(quantized, layout.to(q.device), v.dtype).to(q.dtype)


def _head_major(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, S, H, D) -> fp32 (B, H, length, D), zero-padded along S to ``length``."""
    xt = x.transpose(1, 2).float()
    return F.pad(xt, (0, 0, 0, length - xt.shape[2]))


def _replay_kernel(qkv: QuantizedQKV, layout: BlockLayout, v_dtype: torch.dtype) -> torch.Tensor:
    batch, q_len, heads, dim = qkv.q.shape
    block_m, block_n = qkv.block_m, qkv.block_n
    sub_tiles = layout.block_k // block_n
    q_tiles = math.ceil(q_len / block_m)
    kv_padded = layout.num_kv_blocks * layout.block_k  # every listed tile lies inside
    q = _head_major(qkv.q, q_tiles * block_m).view(batch, heads, q_tiles, block_m, dim)
    k = _head_major(qkv.k, kv_padded)
    v = _head_major(qkv.v, kv_padded)
    k_scale = F.pad(qkv.k_scale, (0, kv_padded // block_n - qkv.k_scale.shape[-1]), value=1.0)
    # The layout row each query tile reads (tiles never straddle layout blocks).
    rows = torch.arange(q_tiles, device=q.device) * block_m // layout.block_q
    indices = layout.kv_indices.expand(batch, heads, -1, -1)[:, :, rows].long()
    counts = layout.kv_counts.expand(batch, heads, -1)[:, :, rows]

    # Per query tile and step: gathered K and V tiles (+ index), and a few score-sized temporaries.
    per_tile = batch * heads * 4 * (3 * block_n * dim + 4 * block_m * block_n)
    chunk = max(1, _TILE_BUDGET_BYTES // per_tile)
    out = torch.empty(batch, heads, q_tiles, block_m, dim, device=q.device)
    for start in range(0, q_tiles, chunk):
        part = slice(start, start + chunk)
        out[:, :, part] = _replay_tiles(q[:, :, part], qkv.q_scale[:, :, part], k, k_scale, v,
                                        indices[:, :, part], counts[:, :, part], sub_tiles, block_n,
                                        layout.kv_len, qkv.v_scale is not None, v_dtype)
    if qkv.v_scale is not None:
        out = out * (qkv.v_scale * (1.0 / FP8_MAX))[:, :, None, None, :]
    return out.flatten(2, 3)[:, :, :q_len].transpose(1, 2)


def _replay_tiles(q, q_scale, k, k_scale, v, indices, counts, sub_tiles, block_n, kv_len, pv_fp8, v_dtype):
    """Online softmax over the listed key tiles of a run of query tiles, as the kernel runs it."""
    batch, heads, tiles, block_m, dim = q.shape
    running_max = torch.full((batch, heads, tiles, block_m), -1.0e30, device=q.device)
    running_sum = torch.zeros_like(running_max)
    acc = torch.zeros_like(q)
    cols = torch.arange(block_n, device=q.device)
    for step in range(indices.shape[-1] * sub_tiles):
        active = step // sub_tiles < counts  # (B, H, tiles); inactive tiles leave the state untouched
        key_tile = indices[..., step // sub_tiles] * sub_tiles + step % sub_tiles
        keys = key_tile[..., None] * block_n + cols  # (B, H, tiles, block_n)
        key_ok = (keys < kv_len) & active[..., None]
        gather = keys.flatten(2)[..., None].expand(-1, -1, -1, dim)
        k_tile = k.gather(2, gather).view(batch, heads, tiles, block_n, dim)
        v_tile = v.gather(2, gather).view(batch, heads, tiles, block_n, dim)
        # Integer products summed in fp32 are exact here (|sum| <= 127^2 * 256 < 2^24).
        scores = torch.matmul(q, k_tile.transpose(-1, -2))
        scores = scores * (q_scale * k_scale.gather(2, key_tile))[..., None, None]
        scores = scores.masked_fill(~key_ok[..., None, :], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=-1))
        probs = torch.exp2(scores - new_max[..., None])
        rescale = torch.exp2(running_max - new_max)
        running_sum = running_sum * rescale + probs.sum(dim=-1)
        if pv_fp8:
            probs = (probs * FP8_MAX).to(FP8_DTYPE).float()
        else:
            probs = probs.to(v_dtype).float()
        acc = acc * rescale[..., None] + torch.matmul(probs, v_tile)
        running_max = new_max
    running_sum = torch.where(running_sum > 0, running_sum, torch.ones_like(running_sum))
    return acc / running_sum[..., None]
