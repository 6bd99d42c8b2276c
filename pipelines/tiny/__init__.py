"""Tiny, offline, random-weight builds of real diffusers pipelines, for tests.

Every builder returns a genuine diffusers pipeline class (``WanPipeline``,
``HunyuanVideoPipeline``, ``CogVideoXPipeline``, ``LTXPipeline``,
``FluxPipeline``) whose components are tiny models constructed from config,
with word-level tokenizers from :func:`build_word_tokenizer`.  Nothing is
downloaded.  Weights are a deterministic function of ``seed`` (each component
is built under its own seed derived from ``seed`` and the component name, and
the caller's global RNG state is left untouched).

Usage::

    pipe = build_tiny_pipeline("wan", seed=0)
    frames = pipe(**tiny_call_kwargs("wan", seed=0)).frames  # (B, F, C, H, W) in [0, 1]

``tiny_call_kwargs`` runs a full denoising loop with the pipeline's usual
guidance path, then decodes with the VAE (``output_type="pt"``):

============== ================== ========================================= ================
family         pipeline           guidance per step                         latent tokens
============== ================== ========================================= ================
wan            WanPipeline        CFG, 2 calls ("cond", "uncond")           T3 x H4 x W4
wan22          WanPipeline        same; step 0 on transformer, rest on      T3 x H4 x W4
               (+transformer_2)   transformer_2 (boundary_ratio 0.875)
hunyuan_video  HunyuanVideo...    embedded guidance + true CFG, 2 calls     T3 x H4 x W4
cogvideox      CogVideoXPipeline  CFG, 1 batched call ("cond_uncond")       T3 x H4 x W4
ltx            LTXPipeline        CFG, 1 batched call                       T3 x H3 x W3
flux           FluxPipeline       embedded guidance only, 1 call            H4 x W4
============== ================== ========================================= ================

All attention heads are 16 wide; text sequences are 16 tokens (T5/UMT5/Llama
after the template crop; CLIP is 77 but only its pooled output is used).
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import cogvideox, flux, hunyuan_video, ltx, wan
from .tokenizer import build_word_tokenizer

__all__ = [
    "TINY_FAMILIES",
    "TINY_TOKEN_GRIDS",
    "build_tiny_pipeline",
    "build_word_tokenizer",
    "tiny_call_kwargs",
]

TINY_FAMILIES = ("wan", "wan22", "hunyuan_video", "cogvideox", "ltx", "flux")

TINY_TOKEN_GRIDS: dict[str, tuple[int, ...]] = {
    "wan": (3, 4, 4),
    "wan22": (3, 4, 4),
    "hunyuan_video": (3, 4, 4),
    "cogvideox": (3, 4, 4),
    "ltx": (3, 3, 3),
    "flux": (4, 4),
}
"""Post-patching latent token grid (T, H, W) -- (H, W) for images -- that
``tiny_call_kwargs`` produces for each family."""

_MODULES: dict[str, ModuleType] = {
    "wan": wan,
    "wan22": wan,
    "hunyuan_video": hunyuan_video,
    "cogvideox": cogvideox,
    "ltx": ltx,
    "flux": flux,
}


def _module(family: str) -> ModuleType:
    try:
        return _MODULES[family]
    except KeyError:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}") from None


def _extra(family: str) -> dict:
    return {"two_experts": True} if family == "wan22" else {}


def build_tiny_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny random-weight pipeline for ``family`` (see ``TINY_FAMILIES``).

    Models are in eval mode with gradients off, cast to ``dtype``; the
    progress bar is disabled.
    """
    return _module(family).build(seed=seed, dtype=dtype, **_extra(family))


def tiny_call_kwargs(family: str, seed: int = 0, steps: int = 3) -> dict:
    """Keyword arguments for ``pipe(**kwargs)`` that run ``steps`` denoising steps
    plus VAE decode quickly on CPU, with a fresh ``torch.Generator`` seeded by
    ``seed``.  Returns a new dict each call (safe to modify)."""
    return _module(family).call_kwargs(seed=seed, steps=steps, **_extra(family))
