"""The ``accel`` command line.

``accel list [--json]``, ``accel demo``, ``accel eval`` (and ``accel eval vbench``),
``accel bench attention|cache|solvers|sparse``, ``accel calibrate``, ``accel distill`` and ``accel comfy install``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from accel import __version__
from accel.base.cli_args import integer, output_folder

def _cmd_list(args: argparse.Namespace) -> int:
    from .catalog import list_all

    catalog = list_all()
    if args.json:
        print(json.dumps(catalog, indent=2, default=str))
        return 0
    print("models:")
    for m in catalog["models"]:
        print(f"  {m['family']:<14} {m['transformer']:<34} default preset: {m['default_preset']}")
    print("methods:")
    for kind, names in catalog["methods"].items():
        print(f"  {kind:<10} {', '.join(names) if names else '(none yet)'}")
    print("presets:")
    for family, presets in catalog["presets"].items():
        print(f"  {family:<14} {', '.join(presets)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from accel.eval.demo import DemoError, DemoOptions, run_demo

    options = DemoOptions(out=args.out, prompt=args.prompt, preset=args.preset, seed=args.seed, steps=args.steps,
                          model=args.model, height=args.height, width=args.width, frames=args.frames,
                          repeats=args.repeats, threads=args.threads, device=args.device, dtype=args.dtype)
    try:
        run_demo(options)
    except DemoError as exc:
        print(f"accel demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


# `accel bench TARGET ...` -> the benchmark module whose main(argv) takes the rest of the line.
BENCHMARKS = {
    "attention": "accel.eval.bench_attention_kernels",
    "cache": "accel.eval.bench_cache",
    "comfyui": "accel.eval.bench_comfyui",
    "compile": "accel.eval.bench_compile",
    "solvers": "accel.eval.bench_solvers",
    "sparse": "accel.eval.bench_sparse_quality",
}


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(BENCHMARKS[args.target]).main(args.rest) or 0)


CALIBRATE_USAGE = """usage: accel calibrate --cache teacache|magcache --model MODEL --steps N --out FILE [options]
       accel calibrate --cache fixed --budget K --model MODEL --steps N --out FILE [options]
       accel calibrate --solver dss --model MODEL --steps N [N ...] --out FILE [options]

Fit what a method loads for one model: a TeaCache polynomial, MagCache ratios or a fixed cache's
searched compute steps (--cache), or a learned DSS solver (--solver). `accel calibrate --cache teacache --help` lists the options of one."""


def _calibrate(rest: List[str]) -> int:
    """``--solver dss ...`` goes to the solver search, ``--cache teacache|magcache ...`` to the cache fit."""
    if any(a == "--solver" or a.startswith("--solver=") for a in rest):
        from accel.distill.solver_search import main as calibrate_solver

        return int(calibrate_solver(rest) or 0)
    if any(a == "--cache" or a.startswith("--cache=") for a in rest):
        from accel.distill.cache_calibration import main as calibrate_cache

        return int(calibrate_cache(rest) or 0)
    if any(a in ("-h", "--help") for a in rest):
        print(CALIBRATE_USAGE)
        return 0
    print("accel calibrate: error: say what to calibrate: --cache teacache|magcache|fixed ... or --solver dss ...",
          file=sys.stderr)
    return 2


def _cmd_comfy(args: argparse.Namespace) -> int:
    from .comfyui.install import install

    folder = install(args.comfyui_dir)
    print(f"accel: wrote {folder}; restart ComfyUI (its Python needs accel: python -m pip install accel-diffusers)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Drop-in acceleration for diffusers pipelines.")
    parser.add_argument("--version", action="version", version=f"accel {__version__} (distribution accel-diffusers)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="supported model families, methods and presets")
    p_list.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_list.set_defaults(func=_cmd_list)

    p_demo = sub.add_parser("demo", help="dense vs accelerated video, side by side, with a report")
    p_demo.add_argument("--out", default="accel-demo", type=output_folder, help="output folder (default: ./accel-demo)")
    p_demo.add_argument("--prompt", help="text prompt (default: the model's demo prompt)")
    p_demo.add_argument("--preset", help="preset to compare against dense (default: the model's default)")
    p_demo.add_argument("--seed", type=integer(0), default=0)
    p_demo.add_argument("--steps", type=integer(1, 1000), help="denoising steps (default: the model's default)")
    p_demo.add_argument("--model", help="local pipeline folder or cached hub id (default: the reference model)")
    p_demo.add_argument("--height", type=integer(1))
    p_demo.add_argument("--width", type=integer(1))
    p_demo.add_argument("--frames", type=integer(1), help="number of frames (video pipelines)")
    p_demo.add_argument("--repeats", type=integer(1), default=3,
                        help="dense and accelerated runs timed in turns; the speed-up is the ratio of medians (default 3)")
    p_demo.add_argument("--threads", type=integer(1), help="CPU threads (default: the cores not already busy)")
    p_demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p_demo.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="default: bfloat16 on cuda, float32 on cpu")
    p_demo.set_defaults(func=_cmd_demo)
    p_bench = sub.add_parser("bench", help="benchmarks: `accel bench TARGET --json OUT` (TARGET --help for options)")
    p_bench.add_argument("target", choices=sorted(BENCHMARKS), help="what to benchmark")
    p_bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see --help there)")
    p_bench.set_defaults(func=_cmd_bench)

    p_comfy = sub.add_parser("comfy", help="ComfyUI: `accel comfy install COMFYUI_DIR` adds the accel nodes")
    comfy_sub = p_comfy.add_subparsers(dest="comfy_command", required=True)
    p_install = comfy_sub.add_parser("install", help="write the node loader into COMFYUI_DIR/custom_nodes")
    p_install.add_argument("comfyui_dir", help="the ComfyUI folder (with main.py)")
    p_install.set_defaults(func=_cmd_comfy)

    # Listed for --help only: main() hands everything after "calibrate" to the chosen calibration,
    # because argparse cannot pass through a remainder that starts with an option.
    sub.add_parser("calibrate", help="fit cache (--cache teacache|magcache|fixed) or solver (--solver dss) "
                                     "calibrations for a registered model")

    sub.add_parser("distill", help="distill a few-step flow-map student from a flow-matching transformer "
                                   "(`accel distill --help`)")

    p_eval = sub.add_parser("eval", help="dense vs presets on a prompt suite: VBench-layout videos, paired and "
                                         "distribution metrics, report.html (`accel eval --help`)")
    p_eval.add_argument("rest", nargs=argparse.REMAINDER, help="options of accel eval (see accel eval --help)")
    return parser


def command_parser(argv: List[str]) -> "tuple[argparse.ArgumentParser, List[str]]":
    """The parser that reads ``argv`` (a full ``accel ...`` command line) and the arguments it gets:
    what the README test parses every documented command with, without running it."""
    import importlib

    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHMARKS:
        return importlib.import_module(BENCHMARKS[argv[1]]).build_parser(), argv[2:]
    if argv[:1] == ["eval"]:
        if argv[1:2] == ["vbench"]:
            return importlib.import_module("accel.eval.vbench_suite").build_parser(), argv[2:]
        return importlib.import_module("accel.eval.eval_cli").build_parser(), argv[1:]
    if argv[:1] == ["distill"]:
        return importlib.import_module("accel.distill.flow_map").build_parser(), argv[1:]
    if argv[:1] == ["calibrate"]:
        module = "accel.distill.solver_search" if "--solver" in argv else "accel.distill.cache_calibration"
        return importlib.import_module(module).build_parser(), argv[1:]
    return build_parser(), argv


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Bad flags exit through argparse (code 2, usage and the flag's message); a
    problem with what they name (a folder that is not a pipeline, a corrupt artifact, a size the
    model cannot make) is one ``accel CMD: error: ...`` line and code 2. ``ACCEL_DEBUG=1`` re-raises."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(argv[:2] if argv[:1] == ["bench"] else argv[:1])
    try:
        if argv and argv[0] == "calibrate":
            return _calibrate(argv[1:])
        if argv and argv[0] == "distill":
            from accel.distill.flow_map import main as distill_main

            return int(distill_main(argv[1:]) or 0)
        if argv and argv[0] == "eval":  # its own parser: options come first, which REMAINDER would refuse
            from accel.eval.eval_cli import main as eval_main

            return int(eval_main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, OSError) as exc:
        if os.environ.get("ACCEL_DEBUG"):
            raise
        print(f"accel {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
