"""What the cache engine holds between calls (per model and CFG branch) and what it counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .forecast import Residuals
from .indicators import Probe
from .streams import Streams


@dataclass
class BranchState:
    """One CFG branch of one model, for the current generation."""

    rule_state: Any  # the reuse rule's running quantities
    history: List[Tuple[int, Residuals]] = field(default_factory=list)  # computed residuals, oldest first
    history_inputs: Dict[int, Streams] = field(default_factory=dict)  # span inputs of those steps (fitted forecast)
    consecutive_reuses: int = 0
    applied: Optional[Tuple[int, Residuals]] = None  # (step, residual) used at the branch's last call
    applied_computed: bool = False  # whether that residual was computed rather than reused
    cfg_delta: Optional[Residuals] = None  # uncond minus cond residual at the last step both computed

    def remember(self, step: int, residual: Residuals, keep: int, span_input: Optional[Streams] = None) -> None:
        """Add a step's residual (and, for forecasts that read them, its span input); keep ``keep``."""
        if self.history and not _same_shapes(self.history[-1][1], residual):
            self.history.clear()  # the token layout changed: older residuals cannot be combined
        elif self.history and self.history[-1][0] == step:
            self.history.pop()  # a repeated call at the same step replaces the earlier one
        self.history.append((step, residual))
        del self.history[:-keep]
        if span_input is not None:
            self.history_inputs[step] = span_input
        kept = {s for s, _ in self.history}
        self.history_inputs = {s: x for s, x in self.history_inputs.items() if s in kept}


def _same_shapes(a: Residuals, b: Residuals) -> bool:
    return a.keys() == b.keys() and all(a[name].shape == b[name].shape for name in a)


@dataclass
class CallState:
    """One transformer call in flight, from its first block to the end of the cached span."""

    branch: str
    state: BranchState
    probe: Probe
    first_input: Optional[torch.Tensor] = None  # visual stream entering block 0 (first-block rule)
    span_input: Optional[Streams] = None
    residual: Optional[Residuals] = None  # set when this call reuses
    cfg_reused: bool = False


@dataclass
class BranchCounters:
    calls: int = 0
    reused_calls: int = 0
    cfg_reused_calls: int = 0
    blocks_computed: int = 0
    blocks_reused: int = 0


class Counters:
    """Blocks and calls computed vs reused, per branch, over the handle's lifetime."""

    def __init__(self) -> None:
        self.branches: Dict[str, BranchCounters] = {}
        self.peak_bytes = 0

    def record(self, branch: str, total_blocks: int, reused_blocks: int, cfg: bool) -> None:
        c = self.branches.setdefault(branch, BranchCounters())
        c.calls += 1
        c.reused_calls += reused_blocks > 0
        c.cfg_reused_calls += cfg
        c.blocks_computed += total_blocks - reused_blocks
        c.blocks_reused += reused_blocks

    def as_dict(self, held: Tuple[int, int]) -> Dict[str, Any]:
        computed = sum(c.blocks_computed for c in self.branches.values())
        dense = computed + sum(c.blocks_reused for c in self.branches.values())
        per = lambda attr: {b: getattr(c, attr) for b, c in self.branches.items()}  # noqa: E731
        return {
            "compute_fraction": round(computed / dense, 4) if dense else 1.0,
            "calls": per("calls"),
            "steps_reused": per("reused_calls"),
            "cfg_reused": per("cfg_reused_calls"),
            "blocks_computed": per("blocks_computed"),
            "blocks_reused": per("blocks_reused"),
            "cache_tensors": held[0],
            "cache_bytes": held[1],
            "peak_cache_bytes": max(self.peak_bytes, held[1]),
        }


def tensors_in(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor reachable through dicts, sequences, dataclasses and plain objects."""
    if torch.is_tensor(obj):
        yield obj
    elif _depth > 6 or obj is None or isinstance(obj, (str, int, float, bool)):
        return
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, _depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value, _depth + 1)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from tensors_in(value, _depth + 1)


def held_memory(objects: Any) -> Tuple[int, int]:
    """(number of distinct tensors, bytes) held by ``objects``; shared tensors count once."""
    seen = set()
    total = 0
    for t in tensors_in(objects):
        key = (t.device, t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return len(seen), total
