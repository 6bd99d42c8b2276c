"""Tiny native ComfyUI video/image models, made offline: ComfyUI's own classes and key layouts.

Random-weight Wan, Flux (FLUX.1-dev style, guidance embedding), HunyuanVideo (T2V) and LTX-Video
checkpoints of a few MB that ``comfy.model_detection`` recognises from their keys and "Load
Diffusion Model" loads like real ones, so the tests and ``accel bench comfyui`` run each family's
real ComfyUI code path (block loop, ``patches_replace``, attention) on CPU in seconds.

Sizes are the smallest detection allows: Wan and HunyuanVideo take 128-wide heads (one head of
128); LTX-Video takes 32 heads (32 heads of 4 here). Flux is the exception: detection hard-codes 24
heads of 128 (3072 wide, about 2 GB for one double and one single block), so a tiny Flux is 128 wide
with one head, which ``load_tiny`` builds from ComfyUI's own detection with that one fact set
(``comfy.sd.load_diffusion_model`` alone refuses it). Needs ComfyUI on ``sys.path``.
"""
from __future__ import annotations

import importlib
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple, Union

import torch

TEXT_TOKENS, TEXT_DIM = 16, 4096
Layers = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class TinyModel:
    """One family: its ComfyUI class and config, default depth, conditioning, CFG and latent shapes."""
    cls: str                          # module.Class of the diffusion model
    config: dict                      # constructor arguments besides the depth
    depth_keys: Tuple[str, ...]       # what ``layers`` sets: an int sets each, a tuple sets them in turn
    layers: Layers                    # default depth
    shapes: Dict[str, Tuple[int, ...]]  # "small" and "large" latents
    patch: Tuple[int, ...]            # latent cells per visual token
    text_dim: int = TEXT_DIM          # width of the text embedding fed to the model
    pooled_dim: Optional[int] = None  # CLIP-L pooled output (``pooled_output``) width
    guidance: Optional[float] = None  # distilled guidance (``guidance``) in the conditioning
    text_mask: bool = False           # T5 ``attention_mask``: the last quarter of the tokens is padding
    cfg: float = 5.0
    unit_norms: bool = True           # norms' scales start at one (Wan keeps its historical init)
    detect_fix: dict = field(default_factory=dict)  # what detection cannot read from the keys
    newer: dict = field(default_factory=dict)  # arguments only newer ComfyUI takes, passed where ``params`` has them
    params: Optional[str] = None      # the class's parameter dataclass in its module (``FluxParams``)

    @property
    def class_name(self) -> str:
        return self.cls.rsplit(".", 1)[1]

    def tokens(self, size: str = "small") -> int:
        """Visual tokens of a latent shape after patchifying."""
        return math.prod(self.shapes[size][2:]) // math.prod(self.patch)

    def build(self, layers: Optional[Layers] = None) -> torch.nn.Module:
        import comfy.ops
        module, name = self.cls.rsplit(".", 1)
        layers = self.layers if layers is None else layers
        depth = dict(zip(self.depth_keys, (layers,) * len(self.depth_keys) if isinstance(layers, int) else layers))
        module = importlib.import_module(module)
        taken = {f.name for f in fields(getattr(module, self.params))} if self.params else set()
        newer = {key: value for key, value in self.newer.items() if key in taken}
        return getattr(module, name)(**self.config, **newer, **depth, operations=comfy.ops.disable_weight_init)

    def save(self, path: str, seed: int = 0, layers: Optional[Layers] = None) -> str:
        """Write a random-weight checkpoint (safetensors): randn * 0.05, zero biases, unit norm scales."""
        import safetensors.torch
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for name, value in self.build(layers).state_dict().items():
            weight = torch.randn(value.shape, generator=generator) * (0.0 if name.endswith("bias") else 0.05)
            if self.unit_norms and re.search(r"norm[^.]*\.(weight|scale)$", name):
                weight = torch.ones(value.shape)
            state[name] = weight.contiguous()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        safetensors.torch.save_file(state, path)
        return path

    def conditioning(self, seed: int) -> List[list]:
        """A list of [text embedding, options]: random 16-token text, pooled output, guidance, text mask."""
        generator = torch.Generator().manual_seed(seed)
        options = {}
        text = torch.randn(1, TEXT_TOKENS, self.text_dim, generator=generator)
        if self.pooled_dim:
            options["pooled_output"] = torch.randn(1, self.pooled_dim, generator=generator)
        if self.guidance is not None:
            options["guidance"] = self.guidance
        if self.text_mask:
            options["attention_mask"] = (torch.arange(TEXT_TOKENS) < TEXT_TOKENS * 3 // 4).long()[None]
        return [[text, options]]


_DOUBLE_SINGLE = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=TEXT_DIM, hidden_size=128,
                      mlp_ratio=4.0, num_heads=1, axes_dim=[16, 56, 56], qkv_bias=True, guidance_embed=True)
TINY_MODELS: Dict[str, TinyModel] = {
    "wan": TinyModel("comfy.ldm.wan.model.WanModel",
                     dict(model_type="t2v", dim=128, ffn_dim=256, num_heads=1, text_dim=TEXT_DIM),
                     ("num_layers",), 4, {"small": (1, 16, 3, 8, 8), "large": (1, 16, 4, 32, 32)}, (1, 2, 2),
                     unit_norms=False),
    "flux": TinyModel("comfy.ldm.flux.model.Flux", dict(_DOUBLE_SINGLE, theta=10000, patch_size=2),
                      ("depth", "depth_single_blocks"), 2, {"small": (1, 16, 16, 16), "large": (1, 16, 64, 64)},
                      (2, 2), pooled_dim=768, guidance=3.5, cfg=1.0, detect_fix={"num_heads": 1},
                      newer={"txt_ids_dims": []}, params="FluxParams"),
    "hunyuan_video": TinyModel("comfy.ldm.hunyuan_video.model.HunyuanVideo",
                               dict(_DOUBLE_SINGLE, theta=256, patch_size=[1, 2, 2], byt5=False, meanflow=False,
                                    use_cond_type_embedding=False, vision_in_dim=None),
                               ("depth", "depth_single_blocks"), 2,
                               {"small": (1, 16, 3, 8, 8), "large": (1, 16, 4, 32, 32)}, (1, 2, 2),
                               pooled_dim=768, guidance=6.0, cfg=1.0, newer={"meanflow_sum": False},
                               params="HunyuanVideoParams"),
    "ltxv": TinyModel("comfy.ldm.lightricks.model.LTXVModel",
                      dict(in_channels=128, attention_head_dim=4, num_attention_heads=32, cross_attention_dim=128,
                           caption_channels=TEXT_DIM),
                      ("num_layers",), 2, {"small": (1, 128, 3, 4, 4), "large": (1, 128, 4, 16, 16)}, (1, 1, 1),
                      text_mask=True),
}


def save_tiny(family: str, path: str, seed: int = 0, layers: Optional[Layers] = None) -> str:
    """Write a random-weight ``family`` checkpoint; ``layers``: blocks, or (double, single) for Flux/HunyuanVideo."""
    return TINY_MODELS[family].save(path, seed, layers)


def save_tiny_wan(path: str, seed: int = 0, layers: int = 4) -> str:
    """Write a random-weight native Wan 2.1 T2V checkpoint (safetensors) to ``path``."""
    return save_tiny("wan", path, seed, layers)


def load_tiny(family: str, path: str):
    """What "Load Diffusion Model" gives for ``path``; for Flux, built the same way from ComfyUI's
    own detection with the one fact detection hard-codes (the head count) set to the file's."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    fix = TINY_MODELS[family].detect_fix
    if not fix:
        return comfy.sd.load_diffusion_model(path)
    state = comfy.utils.load_torch_file(path)
    unet_config = {**comfy.model_detection.detect_unet_config(state, ""), **fix}
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, state)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state, "")
    model.load_model_weights(state, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def family_conditioning(family: str, seed: int) -> List[list]:
    """ComfyUI conditioning for ``family``, fixed by ``seed``."""
    return TINY_MODELS[family].conditioning(seed)


def conditioning(seed: int) -> List[list]:
    """ComfyUI conditioning (a list of [text embedding, options]) with a random 16-token embedding."""
    return family_conditioning("wan", seed)


def sample_family(model, family: str, steps: int = 8, size: Union[str, Tuple[int, ...]] = "small", seed: int = 0,
                  start_step=None, last_step=None, latent=None) -> torch.Tensor:
    """KSampler's own path (``comfy.sample.sample``): euler, the family's CFG, fixed noise and conditioning."""
    import comfy.sample

    tiny = TINY_MODELS[family]
    if latent is None:
        latent = torch.zeros(tiny.shapes[size] if isinstance(size, str) else size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, tiny.cfg, "euler", "simple", tiny.conditioning(1),
                               tiny.conditioning(2), latent, start_step=start_step, last_step=last_step, seed=seed,
                               disable_pbar=True)


def sample(model, steps: int = 8, shape: Tuple[int, ...] = (1, 16, 3, 8, 8), seed: int = 0,
           start_step=None, last_step=None, latent=None) -> torch.Tensor:
    """The tiny Wan's sampling: ``sample_family(model, "wan", ...)`` at ``shape``."""
    return sample_family(model, "wan", steps, shape, seed, start_step, last_step, latent)
