"""The ``accel eval`` command line (``accel eval --help``; ``accel eval vbench --help``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from accel.base.cli_args import integer, output_folder

USAGE_EXAMPLE = """example:
  accel eval --model reference --presets dense,quality,fast --prompts reference --seeds 1 --out eval-out
  accel eval --model ./Wan2.1-T2V-1.3B-Diffusers --presets dense,fast --prompts vbench:subject_consistency \\
      --limit 20 --seeds 5 --out eval-wan --fvd-weights i3d_torchscript.pt
  accelerate launch --num_processes 2 -m accel.cli eval ...   (items split between the processes)
  accel eval vbench --videos eval-out/fast --dimensions temporal_flickering"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel eval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE_EXAMPLE,
        description="Generate every prompt x seed dense and with each preset (same seed), in VBench's layout "
                    "(OUT/<preset>/<prompt>-<index>.mp4); paired PSNR/SSIM against dense, speed-up, FID/FVD/CLIP "
                    "score from local weights; per_item.jsonl, aggregate.json and report.html. Resumable: items "
                    "already written are skipped.")
    parser.add_argument("--model", default="reference",
                        help="'reference' (the shipped reference model, default) or a local pipeline folder")
    parser.add_argument("--presets", default="dense,quality,fast",
                        help="comma-separated preset names; 'dense' is the unpatched pipeline (always run)")
    for part in ("attention", "cache", "solver"):
        parser.add_argument(f"--{part}", default=None,
                            help=f"one more column: this {part} method (a name or a JSON object with 'name')")
    parser.add_argument("--name", default="custom", help="the column name of --attention/--cache/--solver")
    parser.add_argument("--custom-steps", type=integer(1, 1000), default=None,
                        help="denoising steps of that column (default: --steps; a solver swap runs fewer)")
    parser.add_argument("--prompts", default="reference",
                        help="reference (the reference model's held-out captions) | vbench | vbench:DIMENSION | FILE")
    parser.add_argument("--limit", type=integer(1), default=None, help="only the first N prompts")
    parser.add_argument("--seeds", type=integer(1), default=1, help="seed indices 0..N-1 per prompt (default 1)")
    parser.add_argument("--out", required=True, type=output_folder, help="output folder (resumed when it exists)")
    parser.add_argument("--steps", type=integer(1, 1000), default=None)
    parser.add_argument("--height", type=integer(1), default=None)
    parser.add_argument("--width", type=integer(1), default=None)
    parser.add_argument("--frames", type=integer(1), default=None, help="number of frames (video pipelines)")
    parser.add_argument("--fps", type=integer(1), default=None, help="of the written mp4s (default 8 reference, 16 other)")
    parser.add_argument("--fid-weights", default=None, help="Inception TorchScript (inception-2015-12-05.pt); "
                                                            "or $ACCEL_FID_WEIGHTS")
    parser.add_argument("--fvd-weights", default=None, help="I3D TorchScript (i3d_torchscript.pt); or $ACCEL_FVD_WEIGHTS")
    parser.add_argument("--clip-model", default=None, help="a local CLIP folder (transformers); or $ACCEL_CLIP_MODEL")
    parser.add_argument("--lpips-weights", default=None, help="LPIPS AlexNet weights (needs the lpips package)")
    parser.add_argument("--players", type=integer(0), default=4, help="side-by-side players per preset in the report")
    parser.add_argument("--threads", type=integer(1), default=None, help="CPU threads (default: the cores not busy)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="default: bfloat16 on cuda, float32 on cpu")
    return parser


def _method_flag(text: Optional[str], flag: str) -> Any:
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc})") from None
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError(f"{flag}: a JSON object needs a 'name', got {text}")
    return value


def options_from_args(args: argparse.Namespace):
    from .evaluation import EvalOptions

    custom: Dict[str, Any] = {}
    for part in ("attention", "cache", "solver"):
        value = _method_flag(getattr(args, part), f"--{part}")
        if value is not None:
            custom[part] = value
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets and not custom:
        raise ValueError("--presets: name at least one preset (e.g. dense,quality,fast)")
    if args.custom_steps is not None and not custom:
        raise ValueError("--custom-steps: applies to the --attention/--cache/--solver column; name one of them")
    return EvalOptions(out=args.out, model=None if args.model == "reference" else args.model, presets=presets,
                       custom=custom, custom_name=args.name,
                       custom_steps=args.custom_steps, prompts=args.prompts, limit=args.limit,
                       seeds=args.seeds, steps=args.steps, height=args.height, width=args.width,
                       frames=args.frames, fps=args.fps, device=args.device, dtype=args.dtype,
                       threads=args.threads, fid_weights=args.fid_weights, fvd_weights=args.fvd_weights,
                       clip_model=args.clip_model, lpips_weights=args.lpips_weights, report_players=args.players)


def check_weights(options) -> None:
    """Every distribution metric asked for (flag or environment) names a file that exists, before
    anything is generated."""
    from . import distribution

    for kind, path in (("fid", options.fid_weights), ("fvd", options.fvd_weights), ("clip", options.clip_model)):
        if path or os.environ.get(distribution.ENV[kind]):
            distribution.resolve(kind, path)
    if options.lpips_weights and not os.path.isfile(options.lpips_weights):
        raise ValueError(f"--lpips-weights: no file {options.lpips_weights} (the LPIPS AlexNet weights, alex.pth "
                         "from the lpips package's repository)")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "vbench":
        from .vbench_suite import main as vbench_main

        return vbench_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .evaluation import EvalError, run_eval

    try:
        options = options_from_args(args)
        check_weights(options)
        run_eval(options)
    except (EvalError, ValueError) as exc:
        print(f"accel eval: error: {exc}", file=sys.stderr)
        return 2
    return 0
