"""Cache decisions under context parallelism: every rank decides from the same numbers.

Under context parallelism (diffusers' ``enable_parallelism``) each rank holds a slice of the
sequence, so a rule's means over its own slice differ from rank to rank: ranks would disagree
about skipping a step, and the next collective inside the blocks would deadlock or mix steps.
``GroupStats`` sums over the whole group instead, so every rank sees the one-process number (up to
summation order) and makes the same decision. Step-only rules (``fixed``, ``magcache``) never ask.
Forecast state stays on each rank: a rank forecasts its own slice of the residual.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .indicators import Stats


class GroupStats(Stats):
    """Means over every rank's part of a tensor (a slice, or a copy: a replicated tensor's mean is
    its own, since sums and counts both scale with the group size)."""

    def __init__(self, group: Any):
        self.group = group

    def mean_abs(self, x: torch.Tensor) -> float:
        totals = torch.stack([torch.sum(torch.abs(x), dtype=torch.float64),
                              torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
        dist.all_reduce(totals, group=self.group)
        return float(totals[0] / totals[1]) if totals[1] > 0 else 0.0
