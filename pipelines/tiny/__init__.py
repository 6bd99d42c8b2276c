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
guidance path, then decodes with the VAE (``output_type="pt"``). What tests may
rely on about each family (pipeline class, token grid, transformer calls per
step and CFG style, scheduler kind) is its ``TinySpec``, declared in the
builder module's ``SPECS``: ``TINY_SPECS["ltx"].calls_per_step``. Wan 2.2
(``wan22``) adds ``transformer_2`` with boundary_ratio 0.875: step 0 runs
``transformer``, the rest ``transformer_2``.

All attention heads are 16 wide; text sequences are 16 tokens (T5/UMT5/Llama
after the template crop; CLIP is 77 but only its pooled output is used).
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import cogvideox, flux, hunyuan_video, ltx, wan
from ._common import TinySpec
from .tokenizer import build_word_tokenizer

__all__ = [
    "TINY_FAMILIES",
    "TINY_SPECS",
    "TinySpec",
    "build_tiny_pipeline",
    "build_word_tokenizer",
    "tiny_call_kwargs",
]

# Each builder module declares its families' facts (``SPECS``) next to the code that makes them.
_BUILDERS: dict[str, tuple[ModuleType, TinySpec]] = {
    spec.name: (module, spec) for module in (wan, hunyuan_video, cogvideox, ltx, flux) for spec in module.SPECS}
TINY_SPECS: dict[str, TinySpec] = {name: spec for name, (_, spec) in _BUILDERS.items()}
TINY_FAMILIES = tuple(TINY_SPECS)


def _builder(family: str) -> tuple[ModuleType, TinySpec]:
    try:
        return _BUILDERS[family]
    except KeyError:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}") from None


def build_tiny_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny random-weight pipeline for ``family`` (see ``TINY_FAMILIES``).

    Models are in eval mode with gradients off, cast to ``dtype``; the
    progress bar is disabled.
    """
    module, spec = _builder(family)
    return module.build(seed=seed, dtype=dtype, **spec.build_kwargs)


def tiny_call_kwargs(family: str, seed: int = 0, steps: int = 3) -> dict:
    """Keyword arguments for ``pipe(**kwargs)`` that run ``steps`` denoising steps
    plus VAE decode quickly on CPU, with a fresh ``torch.Generator`` seeded by
    ``seed``.  Returns a new dict each call (safe to modify)."""
    module, spec = _builder(family)
    return module.call_kwargs(seed=seed, steps=steps, **spec.build_kwargs)
