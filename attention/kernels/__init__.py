"""Attention kernels: block-sparse attention with one layout type and several backends.

Every backend takes q (B, Sq, H, D), k/v (B, Sk, H, D) and a BlockLayout, and
must match block_sparse_attention_reference; the quantized kernel instead matches
quantized_attention_reference (simulated quantization, see quantize.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .block_layout import BlockLayout, dense_block_mask_to_indices
from .block_sparse_flex import block_sparse_attention_flex
from .block_sparse_reference import block_sparse_attention_reference
from .block_sparse_quant_triton import block_sparse_attention_quant_triton, quant_triton_supported
from .block_sparse_triton import block_sparse_attention_triton, triton_supported
from .quantize import fp8_supported, quantize_qkv, quantized_attention_reference, resolve_pv

BACKENDS = ("auto", "triton", "flex", "torch")
QUANT_BACKENDS = ("auto", "triton", "torch")  # no FlexAttention path for INT8
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def select_backend(q: torch.Tensor, backend: str = "auto", quantized: bool = False,
                   pv: str = "input") -> Tuple[Optional[str], Optional[str]]:
    """(the backend that runs q, None), or (None, why none can): the one place "auto" is decided.

    Block-sparse: "auto" is the Triton kernel on CUDA (a head dim or device it does not support is
    a reason, so callers fall back to exact dense attention) and compiled FlexAttention elsewhere
    (the Triton interpreter is never picked: it is a correctness tool). INT8: the Triton kernel on
    CUDA; the torch simulation only when asked for (backend="torch"), never chosen silently: it
    would look like acceleration and be slower than the dense attention it replaces.
    """
    allowed = QUANT_BACKENDS if quantized else BACKENDS
    if backend not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {backend!r}")
    if q.dtype not in KERNEL_DTYPES:
        return None, f"dtype {q.dtype} has no {'INT8' if quantized else 'block-sparse'} kernel (fp16, bf16, fp32)"
    if quantized:
        if backend == "torch":
            return "torch", None
        if backend == "auto" and q.device.type != "cuda":
            return None, (f"INT8 attention runs on CUDA, not {q.device.type} "
                          "(backend='torch' runs its simulated-quantization reference instead)")
        ok, why = quant_triton_supported(q, pv)
        return ("triton", None) if ok else (None, f"INT8 Triton kernel: {why}")
    if q.device.type not in ("cpu", "cuda"):
        return None, f"device {q.device.type} has no block-sparse kernel"
    if backend == "triton" or (backend == "auto" and q.device.type == "cuda"):
        ok, why = triton_supported(q)
        return ("triton", None) if ok else (None, f"Triton block-sparse kernel: {why}")
    return ("flex" if backend == "auto" else backend), None


def _runnable(q: torch.Tensor, backend: str, quantized: bool = False, pv: str = "input") -> str:
    """``select_backend`` for the functions below, which must compute where a method would fall back
    to dense: "auto" then takes the path that runs anywhere (FlexAttention; the INT8 simulation)."""
    name, why = select_backend(q, backend, quantized, pv)
    if name is None:
        if backend != "auto":
            raise ValueError(why)
        name = "torch" if quantized else "flex"
    return name


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Block-sparse attention through ``backend`` ("auto": ``select_backend`` picks, else FlexAttention)."""
    backend = _runnable(q, backend)
    if backend == "triton":
        return block_sparse_attention_triton(q, k, v, layout, scale)
    if backend == "flex":
        return block_sparse_attention_flex(q, k, v, layout, scale)
    return block_sparse_attention_reference(q, k, v, layout, scale)


def quantized_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                     scale: float | None = None, pv: str = "input",
                                     backend: str = "auto") -> torch.Tensor:
    """INT8 QK^T block-sparse attention (PV in the input dtype or FP8, see ``resolve_pv``) through
    ``backend``: "triton" (the kernel), "torch" (the simulated-quantization reference: slow, the
    same numbers the kernel gives) or "auto" (``select_backend``, else the simulation)."""
    backend = _runnable(q, backend, quantized=True, pv=pv)
    if backend == "triton":
        return block_sparse_attention_quant_triton(q, k, v, layout, scale, pv)
    return quantized_attention_reference(q, k, v, layout, scale, resolve_pv(pv, q.device))


__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "block_sparse_attention_flex",
    "block_sparse_attention_quant_triton",
    "block_sparse_attention_reference",
    "block_sparse_attention_triton",
    "dense_block_mask_to_indices",
    "fp8_supported",
    "quant_triton_supported",
    "quantize_qkv",
    "quantized_block_sparse_attention",
    "quantized_attention_reference",
    "select_backend",
    "resolve_pv",
    "triton_supported",
]
