"""Attention kernels: block-sparse attention with one layout type and several backends.

Every backend takes q (B, Sq, H, D), k/v (B, Sk, H, D) and a BlockLayout, and
must match block_sparse_attention_reference; the quantized kernel instead matches
quantized_attention_reference (simulated quantization, see quantize.py).
"""

from __future__ import annotations

import torch

from .block_layout import BlockLayout, dense_block_mask_to_indices
from .block_sparse_flex import block_sparse_attention_flex
from .block_sparse_reference import block_sparse_attention_reference
from .block_sparse_quant_triton import block_sparse_attention_quant_triton, quant_triton_supported
from .block_sparse_triton import block_sparse_attention_triton, triton_supported
from .quantize import fp8_supported, quantize_qkv, quantized_attention_reference, resolve_pv

_BACKENDS = ("auto", "triton", "flex", "torch")


def resolve_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend that runs q: ``auto`` is the Triton kernel on CUDA when it supports q, else
    compiled FlexAttention (the interpreter is never picked: it is a correctness tool)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if q.device.type == "cuda" and triton_supported(q)[0] else "flex"


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Block-sparse attention through the chosen backend (``resolve_backend`` picks for auto)."""
    backend = resolve_backend(q, backend)
    if backend == "triton":
        return block_sparse_attention_triton(q, k, v, layout, scale)
    if backend == "flex":
        return block_sparse_attention_flex(q, k, v, layout, scale)
    return block_sparse_attention_reference(q, k, v, layout, scale)


_QUANT_BACKENDS = ("auto", "triton", "torch")


def quantized_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                     scale: float | None = None, pv: str = "input",
                                     backend: str = "auto") -> torch.Tensor:
    """INT8 QK^T block-sparse attention (PV in the input dtype or FP8, see ``resolve_pv``).

    auto: the Triton kernel on CUDA when it supports the inputs, otherwise the simulated-
    quantization torch reference (slow; the same numbers the kernel would give).
    """
    if backend not in _QUANT_BACKENDS:
        raise ValueError(f"backend: quantized attention runs on one of {_QUANT_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and quant_triton_supported(q, pv)[0] else "torch"
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
    "resolve_backend",
    "resolve_pv",
    "triton_supported",
]
