"""Read and write a block's streams by name, from the adapter's declarative ``BlockIO``.

The engine never knows a model: it asks a ``StreamBinding`` for the streams a block was called
with (by keyword or by position, as the model's loop passes them) and packs stream values back
into the shape that block returns (a bare tensor, or a tuple in the block's own order).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from accel.base.adapter import BlockIO

Streams = Dict[str, Optional[torch.Tensor]]


class StreamBinding:
    """Where one block's streams sit in its call and its return value."""

    def __init__(self, block: torch.nn.Module, io: BlockIO, where: str):
        self.io = io
        self.where = where  # e.g. "transformer_blocks.3", for error messages
        self.signature = inspect.signature(block.forward)
        names = list(self.signature.parameters)
        missing = [s for s in io.streams if s not in self.signature.parameters]
        if missing:
            raise ValueError(f"{type(block).__name__}.forward at {where} has no parameter(s) {missing}; "
                             f"the adapter's BlockIO does not match this diffusers version")
        self.positions: Tuple[Tuple[str, int], ...] = tuple((s, names.index(s)) for s in io.streams)

    @property
    def names(self) -> Tuple[str, ...]:
        return self.io.streams

    def streams(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Streams:
        return {name: kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)
                for name, pos in self.positions}

    def arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """All forward arguments by name (defaults filled in), for adapter hooks."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def pack(self, streams: Mapping[str, Any]) -> Any:
        """The block's return value carrying ``streams``."""
        if len(self.io.returns) == 1:
            return streams[self.io.returns[0]]
        return tuple(streams[name] for name in self.io.returns)

    def unpack(self, output: Any) -> Streams:
        """Stream values by name from what the block returned."""
        returns = self.io.returns
        if len(returns) == 1:
            if not torch.is_tensor(output):
                raise RuntimeError(f"block {self.where} returned {type(output).__name__}, but its BlockIO says "
                                   f"it returns the tensor {returns[0]!r}")
            return {returns[0]: output}
        if not isinstance(output, (tuple, list)) or len(output) != len(returns):
            raise RuntimeError(f"block {self.where} returned {type(output).__name__} of length "
                               f"{len(output) if isinstance(output, (tuple, list)) else '-'}, but its BlockIO "
                               f"says it returns {returns}")
        return dict(zip(returns, output))
