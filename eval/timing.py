"""Wall-clock speed-ups a shared machine cannot fake: interleaved, repeated, with their spread.

One dense and one accelerated run, timed once each, measured 1.04x, 1.60x and 1.11x for the same
outputs on a busy 2-core CPU. Here the two run in turns (dense, accelerated, dense, ...), each
``repeats`` times, so both see the same machine; the speed-up is the ratio of the medians, and the
spread is the range of every dense time over every accelerated time of the run: what any single
comparison could have reported. A report should call a speed-up inside a wide spread what it is:
noise, with the compute fraction (work skipped, counted) as the stable figure.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch

# A spread wider than this (its high end over its low end) is called noisy in reports.
NOISY_SPREAD = 1.15


@dataclass
class Timing:
    baseline: List[float] = field(default_factory=list)  # seconds of each dense run
    accelerated: List[float] = field(default_factory=list)  # seconds of each accelerated run, same turns

    @property
    def speedup(self) -> float:
        return statistics.median(self.baseline) / statistics.median(self.accelerated)

    @property
    def spread(self) -> Tuple[float, float]:
        return min(self.baseline) / max(self.accelerated), max(self.baseline) / min(self.accelerated)

    @property
    def noisy(self) -> bool:
        low, high = self.spread
        return high / low > NOISY_SPREAD

    def as_dict(self) -> Dict[str, Any]:
        low, high = self.spread
        return {"speedup": round(self.speedup, 3), "speedup_spread": [round(low, 3), round(high, 3)],
                "baseline_seconds": round(statistics.median(self.baseline), 3),
                "accelerated_seconds": round(statistics.median(self.accelerated), 3),
                "repeats": len(self.baseline), "noisy": self.noisy,
                "baseline_timings": [round(t, 3) for t in self.baseline],
                "accelerated_timings": [round(t, 3) for t in self.accelerated]}


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def interleaved(run_baseline: Callable[[], Any], run_accelerated: Callable[[], Any], repeats: int
                ) -> Tuple[Any, Any, Timing]:
    """(first baseline output, first accelerated output, their timings over ``repeats`` turns)."""
    timing, outputs = Timing(), [None, None]
    for turn in range(max(1, repeats)):
        for index, (run, times) in enumerate(((run_baseline, timing.baseline),
                                              (run_accelerated, timing.accelerated))):
            out, seconds = timed(run)
            times.append(seconds)
            if turn == 0:
                outputs[index] = out
    return outputs[0], outputs[1], timing
