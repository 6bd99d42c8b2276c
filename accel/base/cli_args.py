"""Argument types for every ``accel`` command line, so bad input fails before any model loads.

``argparse`` turns an ``ArgumentTypeError`` into ``<prog>: error: argument --flag: <message>`` and
exit code 2; the commands (``accel.cli``, the benchmarks in ``accel.eval``, the calibrations in
``accel.distill``) use these types instead of bare ``int``/``float``, and ``output_path`` for every
file a run writes at its end, so a long run cannot fail at its last line. ``set_threads`` is what
every CPU-heavy command's ``--threads`` does (default: the cores not already busy).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional


def integer(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """An ``int`` type within [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be in [{low}, {'inf' if high is None else high}], got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def number(low: Optional[float] = None, high: Optional[float] = None, low_inclusive: bool = True,
           high_inclusive: bool = True) -> Callable[[str], float]:
    """A finite ``float`` type within the bounds (inclusive unless said otherwise)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = low is not None and (value < low if low_inclusive else value <= low)
        above = high is not None and (value > high if high_inclusive else value >= high)
        if not math.isfinite(value) or below or above:
            left = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
            right = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}, {right}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def output_path(text: str) -> str:
    """A file path this process can create or overwrite (parents may be created later)."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    reason = unwritable(os.path.dirname(path))
    if reason:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {reason}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return text


def check_output_file(path: str, flag: str) -> None:
    """``output_path`` for a path made after parsing (a template filled in): ``ValueError``."""
    try:
        output_path(path)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def output_folder(text: str) -> str:
    """A folder path this process can create or write into."""
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    reason = unwritable(path)
    if reason:
        raise argparse.ArgumentTypeError(f"cannot write to {text}: {reason}")
    return text


def unwritable(folder: str) -> Optional[str]:
    """Why files cannot be created in ``folder`` (creating missing parents as needed), or None."""
    ancestor = folder
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor):
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def auto_threads() -> int:
    """CPU threads for a run: the cores not already busy (load average), at least one. On an idle
    2-core machine the reference model runs 1.7x faster on 2 threads than on 1; on a busy one two
    threads fight the other load and one dense video took 43-57 s instead of 10 s."""
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # not available on this platform
        busy = 0
    return max(1, min(cores, cores - busy))


def set_threads(threads: Optional[int]) -> int:
    """Apply ``threads`` (None: ``auto_threads()``) to torch; returns what was set."""
    import torch

    threads = threads or auto_threads()
    torch.set_num_threads(threads)
    return threads
