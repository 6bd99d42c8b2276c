"""Validation helpers for the config dataclasses of every method.

Configs validate in ``__post_init__`` and raise ``ValueError`` naming the field and the allowed
values, so a typo fails at construction time rather than mid-generation.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Iterable, Optional


def check_range(
    owner: str,
    field: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (bounds optional, inclusivity per side)."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{owner}.{field} must be {kind}, got {value!r}")
    if not integer and isinstance(value, int) and abs(value) > sys.float_info.max:
        raise ValueError(f"{owner}.{field} must be a finite number, got an integer of {len(str(abs(value)))} digits")
    below = low is not None and (value < low if low_inclusive else value <= low)
    above = high is not None and (value > high if high_inclusive else value >= high)
    if below or above:
        left = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low}"
        right = "inf)" if high is None else f"{high}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{owner}.{field} must be in {left}, {right}, got {value!r}")


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def config_params(config: Any) -> dict:
    """Plain-dict view of a config dataclass, for summaries and JSON reports."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return dict(vars(config))
