"""``accel bench compile``: each attention method eager against the same method under torch.compile.

The transformer's repeated blocks are compiled once (``compile_repeated_blocks(fullgraph=True)``,
or whole with ``--style whole``); every method then runs on the compiled blocks, where each routed
attention call is one opaque op (``torch.ops.accel.routed_attention``). The same method on an
eager copy of the pipeline and on the compiled one is timed in turns, so the ratio shows what compilation gains around the op boundary on this machine. The
first compiled run of each method is reported apart: it includes compilation.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from accel.base.cli_args import integer

from .metrics import psnr
from .quality_bench import QualityBench, add_workload_args, environment, load_workload, patch_setup, write_result
from .timing import interleaved

DEFAULT_METHODS = ("dense", "radial", "topk")


def compile_transformer(pipe: Any, style: str, backend: str) -> None:
    if style == "regional":
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
    else:
        pipe.transformer.compile(fullgraph=True, backend=backend)


def measure(eager: QualityBench, compiled: QualityBench, method: str, repeats: int) -> Dict[str, Any]:
    """``method`` on two copies of the pipeline, one with compiled blocks, timed in turns."""
    setups = [patch_setup(attention=method), patch_setup(attention=method)]
    undos = [setup(bench.workload.pipe) for setup, bench in zip(setups, (eager, compiled))]
    try:
        start = time.perf_counter()
        first = compiled.generate()[0]  # compiles what this method's calls need
        first_seconds = time.perf_counter() - start
        eager_videos, compiled_videos, timing = interleaved(lambda: eager.generate()[0],
                                                            lambda: compiled.generate()[0], repeats)
    finally:
        for undo in undos:
            undo()
    counters = setups[1].summary["methods"]["attention"]["counters"]
    times = timing.as_dict()
    return {"method": method, "first_compiled_run_seconds": round(first_seconds, 3),
            "eager_seconds": times["baseline_seconds"], "compiled_seconds": times["accelerated_seconds"],
            "compiled_over_eager": times, "psnr_compiled_vs_eager": _psnr(compiled_videos, eager_videos),
            "psnr_first_vs_eager": _psnr(first, eager_videos), "attention_calls": counters.get("calls"),
            "fallback_calls": counters.get("fallback_calls")}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over prompts (capped like every PSNR here: equal videos give the cap)."""
    return round(sum(psnr(x, y) for x, y in zip(a, b)) / len(a), 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel bench compile", description=__doc__.splitlines()[0])
    add_workload_args(parser, prompts=1)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="attention methods to run")
    parser.add_argument("--style", choices=("regional", "whole"), default="regional")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, eager, ...)")
    parser.add_argument("--turns", type=integer(1), default=3, help="eager/compiled runs timed in turns per method")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from accel import attention  # noqa: F401  (importing it fills ATTENTION_METHODS)
    from accel.base.registry import ATTENTION_METHODS

    unknown = [m for m in args.methods if m not in ATTENTION_METHODS.names()]
    backends = torch._dynamo.list_backends(exclude_tags=())
    problem = (f"argument --methods: unknown {unknown}; choose from {list(ATTENTION_METHODS.names())}" if unknown
               else None if args.backend in backends
               else f"argument --backend: unknown {args.backend!r}; choose from {backends}")
    if problem:
        print(f"accel bench compile: error: {problem}", file=sys.stderr)
        return 2
    try:
        workload = load_workload(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"accel bench compile: error: {exc}", file=sys.stderr)
        return 2
    log = lambda message: print(f"[bench compile] {message}", flush=True)  # noqa: E731
    eager, compiled = QualityBench(workload, log=log), QualityBench(load_workload(args), log=log)
    for bench in (eager, compiled):
        bench.warm_up()
    start = time.perf_counter()
    compile_transformer(compiled.workload.pipe, args.style, args.backend)
    rows = []
    for method in args.methods:
        row = measure(eager, compiled, method, args.turns)
        log(str(row))
        rows.append(row)
    result = {"what": "each attention method eager vs compiled on the same blocks, timed in turns",
              "environment": environment(), "workload": workload.description,
              "compile": {"style": args.style, "backend": args.backend, "fullgraph": True},
              "seconds_in_all": round(time.perf_counter() - start, 1), "rows": rows}
    write_result(args.json_path, result)
    for row in rows:
        timing = row["compiled_over_eager"]
        print(f"{row['method']:<16} eager {row['eager_seconds']:.2f} s  compiled {row['compiled_seconds']:.2f} s  "
              f"eager/compiled {timing['speedup']:.2f}x {timing['speedup_spread']}  first compiled run "
              f"{row['first_compiled_run_seconds']:.1f} s  PSNR compiled vs eager {row['psnr_compiled_vs_eager']}")
    return 0
