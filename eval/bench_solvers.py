"""Few-step solvers against a many-step teacher: ``accel bench solvers --json OUT``.

    accel bench solvers --json OUT [--solvers euler unipc dpmpp dss] [--step-counts 4 6 8 10]
                        [--teacher-steps 50] [--dss DIR] [--weights DIR | --model tiny] [--prompts N]

The teacher is the same pipeline patched with ``solver="euler"`` at ``--teacher-steps`` steps
(default 50), not the pipeline's own scheduler (UniPC for Wan). Two reasons: the DSS search
(``distill/solver_search.py``) fits its solvers to exactly this target (Euler on the model's
shifted schedule), so the learned solver is scored against what it learned; and every row then
differs from the teacher only in solver and step count (the Euler swap replays the model's own
shifted schedule), so Euler at the teacher's step count reproduces the teacher exactly (PSNR 100).

Each solver in ``--solvers`` runs at each of ``--step-counts`` through ``accel.patch(pipe,
solver=...)``; each row holds ``solver``, ``steps``, ``psnr``, ``ssim`` (against the teacher's
videos of the same prompts and seeds), ``prompt_accuracy`` (the reference judge; ``None`` on the
tiny model), ``wall_seconds``, ``speedup`` (teacher wall time / row wall time, same process) and
``model_evals`` (transformer evaluations per branch per video: Heun takes 2 * steps - 1).

``dss`` rows read ``DIR/dss-{steps}.json`` (what ``accel calibrate --solver dss --out
DIR/dss-{steps}.json`` writes) and add ``params`` (the artifact's parameter count), ``artifact``
and, when the artifact records it, the search cost in CPU minutes (``search_cpu_minutes`` for the
fit of that step count, ``search_teacher_cpu_minutes`` for the teacher trajectories one search run
shares across its step counts). A missing artifact gives ``{"solver": "dss", "steps": n,
"skipped": reason}``, never a number. An artifact that exists but was fitted for another model or
step count is an error, raised before anything is generated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from accel.base.cli_args import integer
from accel.eval.quality_bench import (QualityBench, add_workload_args, environment, load_workload, patch_setup,
                                      write_result)

SOLVERS = ("euler", "heun", "unipc", "dpmpp", "dss")
DEFAULT_SOLVERS = ("euler", "unipc", "dpmpp", "dss")
DEFAULT_STEP_COUNTS = (4, 6, 8, 10)
ARTIFACT_NAME = "dss-{steps}.json"

# What a dss row gets for step count n: (path, artifact JSON) or the reason it is skipped.
DSSEntry = Union[Tuple[str, Dict[str, Any]], str]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel bench solvers", description=__doc__.splitlines()[0])
    add_workload_args(p, prompts=4)
    p.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(DEFAULT_SOLVERS))
    p.add_argument("--step-counts", type=integer(1, 1000), nargs="+", default=list(DEFAULT_STEP_COUNTS),
                   help="solver steps of each row (overrides --steps)")
    p.add_argument("--teacher-steps", type=integer(1, 1000), default=50, help="Euler steps of the teacher")
    p.add_argument("--dss", default=None, help=f"folder holding {ARTIFACT_NAME} per step count")
    return p


def dss_setup(path: str, steps: int):
    return patch_setup(solver={"name": "dss", "artifact": path, "steps": steps})


def find_dss_artifacts(pipe: Any, folder: Optional[str], step_counts: Sequence[int]) -> Dict[int, DSSEntry]:
    """Locate and validate every DSS artifact up front, so a wrong one fails in seconds rather than
    after the teacher and the other solvers have run."""
    entries: Dict[int, DSSEntry] = {}
    for n in step_counts:
        if folder is None:
            entries[n] = "no --dss folder given (fit artifacts with accel calibrate --solver dss)"
            continue
        path = os.path.join(folder, ARTIFACT_NAME.format(steps=n))
        if not os.path.isfile(path):
            entries[n] = (f"no artifact {path} (fit one with accel calibrate --solver dss --steps {n} "
                          f"--out {path})")
            continue
        # Attaching runs learned.py's own checks: format, step count, model class and fingerprint.
        undo = dss_setup(path, n)(pipe)
        undo()
        with open(path) as f:
            entries[n] = (path, json.load(f))
    return entries


def _dss_extras(path: str, artifact: Dict[str, Any]) -> Dict[str, Any]:
    extras: Dict[str, Any] = {"params": artifact["parameter_count"], "artifact": path}
    fit = artifact.get("fit") or {}
    if "cpu_seconds" in fit:
        extras["search_cpu_minutes"] = round(fit["cpu_seconds"] / 60, 3)
    if "teacher_cpu_seconds" in fit:
        extras["search_teacher_cpu_minutes"] = round(fit["teacher_cpu_seconds"] / 60, 3)
    return extras


def _model_evals(setup: Any) -> Optional[int]:
    summary = setup.summary
    if not summary or not summary["generations"]:
        return None
    return summary["steps_run"] // summary["generations"]


def run_solver_bench(bench: QualityBench, solvers: Sequence[str], step_counts: Sequence[int], teacher_steps: int,
                     dss: Dict[int, DSSEntry]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    bench.warm_up()
    setup = patch_setup(solver={"name": "euler", "steps": teacher_steps})
    teacher = {"solver": "euler", "steps": teacher_steps, "prompt_accuracy": None, **bench.set_baseline(setup=setup),
               "model_evals": _model_evals(setup)}
    bench.log("teacher " + json.dumps(teacher))
    rows = []
    for solver in solvers:
        for n in step_counts:
            fields: Dict[str, Any] = {"solver": solver, "steps": n}
            if solver == "dss":
                entry = dss[n]
                if isinstance(entry, str):
                    bench.log(f"dss {n} steps skipped: {entry}")
                    rows.append({**fields, "skipped": entry})
                    continue
                setup = dss_setup(entry[0], n)
                extras = _dss_extras(*entry)
            else:
                setup = patch_setup(solver={"name": solver, "steps": n})
                extras = {}
            row = bench.measure(fields, setup=setup)
            rows.append({**row, "model_evals": _model_evals(setup), **extras})
    return teacher, rows


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(teacher: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    lines = ["| solver | steps | PSNR (dB) | SSIM | prompt accuracy | wall s | speed-up | params |",
             "|---|---|---|---|---|---|---|---|",
             f"| euler (teacher) | {teacher['steps']} | - | - | {_num(teacher.get('prompt_accuracy'), '.3f')} | "
             f"{teacher['wall_seconds']:.2f} | 1.00x | - |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['solver']} | {r['steps']} | skipped: {r['skipped']} | | | | | |")
            continue
        speedup = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['solver']} | {r['steps']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{_num(r['prompt_accuracy'], '.3f')} | {r['wall_seconds']:.2f} | {speedup} | "
                     f"{r.get('params', '-')} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dss is not None and not os.path.isdir(args.dss):
            raise ValueError(f"--dss {args.dss!r} is not a folder")
        workload = load_workload(args)
        step_counts = list(dict.fromkeys(args.step_counts))
        dss = find_dss_artifacts(workload.pipe, args.dss, step_counts) if "dss" in args.solvers else {}
        bench = QualityBench(workload, repeats=args.repeats)
        teacher, rows = run_solver_bench(bench, list(dict.fromkeys(args.solvers)), step_counts,
                                         args.teacher_steps, dss)
    except (ValueError, FileNotFoundError) as exc:
        print(f"accel bench solvers: error: {exc}", file=sys.stderr)
        return 2
    # The pipeline's default step count never runs here: every row and the teacher set their own.
    described = {k: v for k, v in workload.description.items() if k != "num_inference_steps"}
    result = {"what": f"few-step solvers vs a {args.teacher_steps}-step Euler teacher (same prompts and seeds)",
              "environment": environment(), "workload": described, "teacher": teacher, "rows": rows}
    write_result(args.json_path, result)
    print(format_table(teacher, rows))
    if args.json_path:
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
