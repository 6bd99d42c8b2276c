"""Shared pieces of the tiny pipeline builders: vocabulary, prompts, seeding
and small random-weight text encoders (T5 / UMT5 / CLIP / Llama) with
matching offline tokenizers.

All text encoders use ``TEXT_DIM`` as hidden size so the denoisers can take
their outputs directly.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Tuple

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from .tokenizer import build_word_tokenizer

TEXT_DIM = 32


@dataclass(frozen=True)
class TinySpec:
    """What a test may rely on about one tiny family, declared next to its builder.

    ``calls_per_step`` and ``cfg`` describe ``call_kwargs``' guidance: "separate" (cond and uncond
    as two transformer calls), "batched" (both halves in one call) or "none" (one call, guidance
    embedded or off). ``guidance_off`` are call kwargs that turn classifier-free guidance off.
    """

    name: str  # "wan22"
    pipeline_class: str  # diffusers pipeline class name
    token_grid: Tuple[int, ...]  # latent token grid after patching: (T, H, W), or (H, W) for images
    calls_per_step: int
    cfg: str
    flow_matching: bool  # a flow-matching scheduler (what the solver swaps serve)
    guidance_off: Dict[str, Any] = field(default_factory=dict)
    build_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the module's build/call_kwargs

    @property
    def frames(self) -> int:
        return self.token_grid[0] if len(self.token_grid) == 3 else 1

"""Hidden size of every tiny text encoder."""

PROMPT = "A red fox runs through the snowy forest at sunset, cinematic lighting"
NEGATIVE_PROMPT = "blurry, low quality, static, distorted"

VOCAB: tuple[str, ...] = tuple(
    """
    a an the of in on at to and with through over under by from into near is are
    red blue green yellow white black orange golden dark bright
    fox cat dog bird horse car person man woman child robot tree trees flower
    forest city street river ocean sky mountain field grass snow snowy beach room
    runs walks flies swims jumps sits stands drives dances looks moves
    sunset sunrise night day morning rain fog light lighting shadow
    cinematic realistic detailed smooth slow motion camera video scene view close up wide shot
    blurry low high quality static distorted ugly noisy bad
    describe system user
    , . : ; ! ? - ' "
    """.split()
)


def component_seed(seed: int, name: str) -> int:
    """Deterministic per-component seed: distinct components (e.g. the two Wan 2.2
    experts) get distinct weights, and building order does not matter."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """Seed torch's CPU RNG for building one component, restoring the caller's
    RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, name))
        yield


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point weights to ``dtype`` the way ``from_pretrained(torch_dtype=...)``
    does: submodules named in the class's ``_keep_in_fp32_modules`` (e.g. Wan's
    ``time_embedder``/``norm*``, T5's ``wo``) stay float32.  (A plain ``.to(dtype)``
    would cast those too, and diffusers warns about it.)"""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            tensor.data = tensor.data.to(target)


def finalize(pipe, dtype: torch.dtype = torch.float32):
    """Put every model of ``pipe`` in eval mode, frozen, in ``dtype``."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
            if dtype != torch.float32:
                cast_like_from_pretrained(component, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- T5 / UMT5


def t5_tokenizer(model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """T5-style: pad=0, eos=1, unk=2; eos appended, no bos."""
    return build_word_tokenizer(VOCAB, model_max_length=model_max_length)


def t5_encoder(vocab_size: int, seed: int, name: str, umt5: bool = False) -> torch.nn.Module:
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    with seeded(seed, name):
        return model_cls(config)


# --------------------------------------------------------------------------- CLIP

CLIP_MAX_LENGTH = 77  # HunyuanVideo hard-codes 77 for its CLIP encoder; Flux reads model_max_length


def clip_tokenizer() -> PreTrainedTokenizerFast:
    """CLIP-style: bos/eos added, pad == eos (as in openai/clip-vit-large-patch14)."""
    return build_word_tokenizer(
        VOCAB,
        model_max_length=CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        unk_token="<|unk|>",
    )


def clip_text_encoder(tokenizer: PreTrainedTokenizerFast, seed: int, name: str) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        # The pooler picks the first eos position; eos_token_id == 2 would trigger
        # the legacy argmax path, which our ids never hit (eos is 0).
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with seeded(seed, name):
        return CLIPTextModel(config)


# --------------------------------------------------------------------------- Llama

LLAMA_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Llama-3-style: bos prepended, no eos appended, chat markers as special tokens."""
    return build_word_tokenizer(
        VOCAB,
        model_max_length=model_max_length,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        add_eos_token=False,
        additional_special_tokens=LLAMA_CHAT_TOKENS,
    )


def llama_text_encoder(tokenizer: PreTrainedTokenizerFast, seed: int, name: str, num_layers: int = 3) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with seeded(seed, name):
        return LlamaModel(config)
