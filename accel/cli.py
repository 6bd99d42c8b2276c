"""The ``accel`` command line.

``accel list [--json]`` works now; ``demo``, ``bench``, ``calibrate`` and ``eval`` are reserved for
the reference-model, benchmark, calibration and evaluation work and say so when called.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

RESERVED = {
    "demo": "generate dense vs accelerated videos on the reference model",
    "bench": "benchmarks (attention kernels, caching, solvers)",
    "calibrate": "fit cache and solver calibrations for a registered model",
    "eval": "quality evaluation against the dense output",
}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Drop-in acceleration for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="supported model families, methods and presets")
    p_list.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_list.set_defaults(func=_cmd_list)
    for name, what in RESERVED.items():
        p = sub.add_parser(name, help=f"(coming) {what}")
        p.set_defaults(func=lambda args, name=name: _not_yet(name))
    return parser


def _not_yet(name: str) -> int:
    print(f"accel {name}: not available in this version ({RESERVED[name]}).", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
