"""ComfyUI model families: what the ComfyUI host needs to know about ComfyUI's own model classes.

The diffusers adapters (``accel.pipelines``) describe diffusers' classes; ComfyUI builds its own
(``comfy.ldm.wan.model.WanModel``, ``comfy.ldm.flux.model.Flux``, ...), with other block
signatures and patch points. One small adapter per ComfyUI family says: which ``patches_replace
["dit"]`` keys its loop consults, in order; how a block's arguments and outputs map to the cache
engine's streams (the visual stream first; joint models' single blocks carry text and image
concatenated, split here so every block shows the engine the same streams); the token grid of a
call; TeaCache's indicator input; and, for its blocks' attention, which call is the one over the
visual tokens and where text tokens sit in it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from accel.base.registry import Registry

# Keyed by the ComfyUI diffusion-model class name (subclasses match through their MRO).
COMFY_FAMILIES = Registry("ComfyUI model family")

BlockKey = Tuple[str, int]  # a patches_replace["dit"] key: ("double_block", 3)
Streams = Dict[str, torch.Tensor]


class ComfyFamily:
    family = ""  # the diffusers adapters' family name, whose presets the nodes use
    streams: Tuple[str, ...] = ("img",)  # what the engine sees of every block, visual first
    self_attention_call = 0  # the index, among a block's attention calls, of the one over the visual tokens
    text_position: Optional[str] = None  # joint attention: text tokens "prefix" or "suffix" of the sequence

    def block_keys(self, diffusion_model: Any) -> List[BlockKey]:
        raise NotImplementedError

    def token_grid(self, diffusion_model: Any, x: torch.Tensor) -> Optional[Tuple[int, int, int]]:
        raise NotImplementedError

    def block_streams(self, key: BlockKey, args: Dict[str, Any], call: Dict[str, Any]) -> Streams:
        """The engine's streams from a block patch's ``args`` (``call``: per-call scratch)."""
        return {name: args[name] for name in self.streams}

    def output_streams(self, key: BlockKey, out: Dict[str, Any], call: Dict[str, Any]) -> Streams:
        """The engine's streams from what the block returned."""
        return {name: out[name] for name in self.streams}

    def block_result(self, key: BlockKey, streams: Streams, call: Dict[str, Any]) -> Dict[str, Any]:
        """What the block patch returns, from the engine's streams."""
        return {name: streams[name] for name in self.streams}

    def modulated_input(self, args: Dict[str, Any]) -> Optional[torch.Tensor]:
        return args.get("vec")  # the time embedding's projection the first block is modulated by


def _grid(x: torch.Tensor, patch: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Tokens along (T, H, W) of latents ``x`` (B, C, T, H, W) or (B, C, H, W), padded to the patch."""
    sizes = (1, *x.shape[-2:]) if x.dim() == 4 else tuple(x.shape[-3:])
    return tuple(-(-size // p) for size, p in zip(sizes, patch))


class WanFamily(ComfyFamily):
    """Wan 2.1 / 2.2 (``WanModel`` and its VACE, camera, ... subclasses): one stream, blocks under
    ``("double_block", i)``, self-attention first in each block, then the text (and image) ones."""

    family = "wan"

    def block_keys(self, diffusion_model):
        return [("double_block", i) for i in range(len(diffusion_model.blocks))]

    def token_grid(self, diffusion_model, x):
        # newer ComfyUI also passes grid_sizes in transformer_options, older does not
        return _grid(x, tuple(diffusion_model.patch_size))


class LTXVFamily(WanFamily):
    """LTX-Video (``LTXVModel``): one stream, ``("double_block", i)`` over ``transformer_blocks``,
    self-attention (attn1) before cross-attention; latents are patchified 1 x 1 x 1."""

    family = "ltx"

    def block_keys(self, diffusion_model):
        return [("double_block", i) for i in range(len(diffusion_model.transformer_blocks))]

    def token_grid(self, diffusion_model, x):
        return _grid(x, tuple(diffusion_model.patchifier.patch_size))


class JointFamily(ComfyFamily):
    """Flux-style double/single-stream models: double blocks take and return ``img`` and ``txt``;
    single blocks one ``img`` that is text and image concatenated (the order is the family's)."""

    streams = ("img", "txt")

    def block_keys(self, diffusion_model):
        return ([("double_block", i) for i in range(len(diffusion_model.double_blocks))]
                + [("single_block", i) for i in range(len(diffusion_model.single_blocks))])

    def _split(self, joint: torch.Tensor, text: int) -> Streams:
        if self.text_position == "prefix":
            return {"img": joint[:, text:], "txt": joint[:, :text]}
        return {"img": joint[:, :joint.shape[1] - text], "txt": joint[:, joint.shape[1] - text:]}

    def _join(self, streams: Streams) -> torch.Tensor:
        parts = (streams["txt"], streams["img"]) if self.text_position == "prefix" else (streams["img"], streams["txt"])
        return torch.cat(parts, dim=1)

    def block_streams(self, key, args, call):
        if key[0] == "double_block":
            call["text_tokens"] = args["txt"].shape[1]
            return {"img": args["img"], "txt": args["txt"]}
        return self._split(args["img"], call["text_tokens"])

    def output_streams(self, key, out, call):
        if key[0] == "double_block":
            return {"img": out["img"], "txt": out["txt"]}
        return self._split(out["img"], call["text_tokens"])

    def block_result(self, key, streams, call):
        if key[0] == "double_block":
            return {"img": streams["img"], "txt": streams["txt"]}
        return {"img": self._join(streams)}


class FluxFamily(JointFamily):
    """FLUX.1 (``Flux``): joint attention over [text, image] in every block; 2 x 2 patches."""

    family = "flux"
    text_position = "prefix"

    def token_grid(self, diffusion_model, x):
        return _grid(x, (1, diffusion_model.patch_size, diffusion_model.patch_size))


class HunyuanVideoFamily(JointFamily):
    """HunyuanVideo (``HunyuanVideo``): Flux's blocks with the image first, [image, text]; its text
    refiner's attention runs before the first block and stays ComfyUI's."""

    family = "hunyuan_video"
    text_position = "suffix"

    def token_grid(self, diffusion_model, x):
        return _grid(x, tuple(diffusion_model.patch_size))


COMFY_FAMILIES.register("WanModel", WanFamily())
COMFY_FAMILIES.register("Flux", FluxFamily())
COMFY_FAMILIES.register("HunyuanVideo", HunyuanVideoFamily())
COMFY_FAMILIES.register("LTXVModel", LTXVFamily())


def family_of(diffusion_model: Any) -> Optional[ComfyFamily]:
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in COMFY_FAMILIES:
            return COMFY_FAMILIES.get(cls.__name__)
    return None


def supported() -> str:
    return ", ".join(f"{f.family} ({name})" for name, f in COMFY_FAMILIES.items())
