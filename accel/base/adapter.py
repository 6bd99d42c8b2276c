"""The contract between ``accel`` and one transformer family (implemented in ``pipelines/``)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .context import TokenLayout

# How a family's attention processors reach the attention kernel.
INVOKES_DISPATCH = "dispatch_attention_fn"  # diffusers' dispatcher, q/k/v as (B, S, H, D)
INVOKES_SDPA = "scaled_dot_product_attention"  # torch SDPA called directly, q/k/v as (B, H, S, D)


@dataclass(frozen=True)
class AttentionSite:
    """One attention module that methods may replace."""

    path: str  # module path inside the transformer
    module: torch.nn.Module
    layer_index: int
    kind: str  # "self" (visual tokens only) or "joint" (text + visual in one sequence)
    heads: int


@dataclass(frozen=True)
class BlockIO:
    """How the blocks of one stack carry their streams: what a cache needs to skip blocks.

    ``streams`` names the forward parameters holding the tensors each block updates, the visual
    stream first (joint models also carry the text stream). ``returns`` lists the same names in
    the order ``forward`` returns them; a single name means the block returns a bare tensor.
    Everything else a block takes (time embedding, rotary tables, text for cross-attention) is
    context that a skipped block simply does not read.
    """

    streams: Tuple[str, ...] = ("hidden_states",)
    returns: Tuple[str, ...] = ("hidden_states",)

    def __post_init__(self) -> None:
        if not self.streams or len(set(self.returns)) != len(self.returns) or set(self.returns) != set(self.streams):
            raise ValueError(f"BlockIO.returns must list each of the streams {self.streams} once, got {self.returns}")


@dataclass(frozen=True)
class BlockStack:
    """A list of transformer blocks run in sequence (caching skips spans of these)."""

    name: str  # attribute path, e.g. "blocks" or "single_transformer_blocks"
    blocks: Sequence[torch.nn.Module]
    io: BlockIO = field(default_factory=BlockIO)


@dataclass(frozen=True)
class TargetTimeInputs:
    """Where a flow-map student's target time r can enter without new weights (Decoupled MeanFlow:
    the first blocks see the time embedding of t, the last blocks and the output head that of r).

    ``embedder`` is the module that turns the call's timestep (its first argument) into time
    embeddings and returns a tuple. The blocks of ``stack`` receive output ``block_output`` through
    their argument ``block_arg`` (keyword, or position ``block_arg_position``), possibly reshaped;
    ``head_outputs`` are outputs only the output head reads, so replacing them by r's feeds the head r.
    """

    embedder: str
    block_output: int
    block_arg: str
    block_arg_position: int
    stack: str = "blocks"
    head_outputs: Tuple[int, ...] = ()


class ModelAdapter:
    """Knows one transformer family: blocks, token layout, attention sites, presets.

    Subclasses set the class attributes and implement ``token_layout``. One adapter file per
    family; nothing else in the code base mentions a family by name.
    """

    family: str = ""  # user-facing family name, e.g. "wan"
    transformer_class: str = ""  # diffusers class name this adapter serves
    pipeline_classes: Tuple[str, ...] = ()  # pipelines known to carry this transformer
    invokes: str = INVOKES_DISPATCH
    timestep_position: int = 1  # positional index of ``timestep`` in the transformer's forward
    self_attention_paths: Tuple[str, ...] = ()  # attribute names of self/joint attention in a block
    cross_attention_paths: Tuple[str, ...] = ()  # text cross-attention (never replaced by sparse methods)
    block_stack_names: Tuple[str, ...] = ("blocks",)
    # Stacks outside the main block sequence whose self-attention methods still replace; caches
    # never skip them (Wan VACE's control blocks, which run before the main blocks).
    side_stack_names: Tuple[str, ...] = ()
    block_io: Mapping[str, BlockIO] = {}  # per stack name; stacks not listed carry one "hidden_states" stream
    joint_text: Optional[str] = None  # "prefix"/"suffix" when text shares the self-attention sequence
    teacache_coefficients: Optional[Tuple[float, ...]] = None  # highest power first
    # Submodule whose forward output holds TeaCache's indicator input when block 0 does not see
    # it (Wan: the time embedding leaves ``condition_embedder`` but blocks get its projection).
    teacache_input_module: Optional[str] = None
    presets: Mapping[str, Mapping[str, Any]] = {}
    default_preset: str = ""
    # Folders of fitted artifacts shipped for models of this family (``{kind}-{steps}.json``:
    # teacache, magcache, dss). Each records the model class and config fingerprint it was fitted
    # on, so a method picks only those made for the patched model.
    artifact_dirs: Tuple[str, ...] = ()
    # How a flow-map student of this family is told its target time (None: no students yet).
    target_time: Optional[TargetTimeInputs] = None

    def block_stacks(self, model: torch.nn.Module) -> List[BlockStack]:
        return [BlockStack(name, list(_get_path(model, name)), self.block_io.get(name, BlockIO()))
                for name in self.block_stack_names if _get_path(model, name, None) is not None]

    def attention_sites(self, model: torch.nn.Module) -> List[AttentionSite]:
        sites: List[AttentionSite] = []
        side = [BlockStack(name, list(_get_path(model, name)))
                for name in self.side_stack_names if _get_path(model, name, None) is not None]
        for stack in [*self.block_stacks(model), *side]:
            for block_index, block in enumerate(stack.blocks):
                for attr in self.self_attention_paths:
                    attn = _get_path(block, attr, None)
                    if attn is None:
                        continue
                    sites.append(AttentionSite(
                        path=f"{stack.name}.{block_index}.{attr}",
                        module=attn,
                        layer_index=len(sites),
                        kind="joint" if self.joint_text else "self",
                        heads=int(attn.heads),
                    ))
        return sites

    def token_layout(self, model: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> TokenLayout:
        """Token layout of one forward call, from its inputs (before patch embedding)."""
        raise NotImplementedError

    def teacache_input(self, first_block: torch.nn.Module, block_args: Mapping[str, Any],
                       captured: Any = None) -> Optional[torch.Tensor]:
        """The tensor whose relative change drives TeaCache (its coefficients were fitted on it).

        ``block_args`` are the first block's forward arguments by name; ``captured`` is the output
        of ``teacache_input_module`` in this call, when the adapter names one. ``None`` means the
        family has no hook; the cache then measures the first block's visual input and warns.
        """
        return None

    def timestep(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
        """The call's timestep as a float (the largest, for per-token timesteps as in Wan 2.2 TI2V)."""
        value = self.call_arg(args, kwargs, "timestep", self.timestep_position)
        if value is None:
            return None
        return float(value.max()) if torch.is_tensor(value) else float(value)

    @staticmethod
    def call_arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], name: str, position: int) -> Any:
        """A forward argument given by keyword or by position (diffusers pipelines use keywords)."""
        if name in kwargs:
            return kwargs[name]
        return args[position] if len(args) > position else None


def _get_path(obj: Any, path: str, *default: Any) -> Any:
    for part in path.split("."):
        if default and not hasattr(obj, part):
            return default[0]
        obj = getattr(obj, part)
    return obj


def config_fingerprint(models: Sequence[torch.nn.Module]) -> str:
    """A short hash of the architecture config of ``models`` (not the weights).

    Fitted artifacts (cache calibrations, learned solvers) record it: it tells the tiny test
    model, the reference model and Wan2.1-1.3B apart although all are ``WanTransformer3DModel``.
    """
    configs = [{k: v for k, v in dict(m.config).items() if not k.startswith("_")} for m in models]
    blob = json.dumps(configs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
