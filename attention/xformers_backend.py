"""xformers' ``memory_efficient_attention`` as the dense kernel of ``attention={"name": "dense",
"backend": "xformers"}`` (the ``[xformers]`` extra).

xformers imports on machines where it has no operator at all (any CPU; a wheel built for another
torch or CUDA): whether an operator exists is found once per (device type, dtype, head dim) with a
one-token probe, and calls it cannot serve get a reason, so the method runs the caller's exact
dense kernel with one warning instead. Its layout (B, S, H, D) is ours; masked calls stay on the
caller's kernel (accel only passes key-padding masks, which xformers would need materialised as
a full bias).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

_PROBED: Dict[Tuple[str, torch.dtype, int], Optional[str]] = {}


def _ops() -> Any:
    try:
        import xformers.ops as ops
    except Exception as exc:  # absent, or built against another torch: it raises more than ImportError
        return f"xformers does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return ops


def xformers_unsupported(q: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> Optional[str]:
    """Why xformers cannot run this call (None when it can)."""
    if attn_mask is not None:
        return "xformers backend: calls with an attention mask run the caller's dense kernel"
    key = (q.device.type, q.dtype, q.shape[-1])
    if key not in _PROBED:
        ops = _ops()
        if isinstance(ops, str):
            _PROBED[key] = ops
        else:
            probe = torch.zeros(1, 1, 1, q.shape[-1], device=q.device, dtype=q.dtype)
            try:
                ops.memory_efficient_attention(probe, probe, probe)
                _PROBED[key] = None
            except (NotImplementedError, RuntimeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0][:100]
                _PROBED[key] = (f"xformers has no memory_efficient_attention operator for {q.device.type} "
                                f"{str(q.dtype).replace('torch.', '')} head dim {q.shape[-1]} ({first})")
    return _PROBED[key]


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    return _ops().memory_efficient_attention(q, k, v, scale=scale)
