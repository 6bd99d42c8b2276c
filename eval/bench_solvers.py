"""Few-step solvers against a many-step teacher: ``accel bench solvers --json OUT``.

    accel bench solvers --json OUT [--solvers euler unipc dpmpp dss flowmap] [--step-counts 4 6 8 10]
                        [--teacher-steps 50] [--dss DIR] [--flowmap DIR] [--weights DIR | --model tiny]
                        [--prompts N]

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

``flowmap`` rows sample a distilled flow-map student (``accel distill``; ``--flowmap DIR``, default
the student shipped for the model) at each step count it was distilled for, whatever
``--step-counts`` says: one transformer call per step and no unconditional branch. Every row has
``evaluations``, the transformer evaluations per video counting both CFG branches (rows reaching the
first block: the teacher takes 2 x 50, DSS at 4 steps 8, a 4-step student 4). With student rows
the result gains ``speed``: the transformer part alone (``output_type="latent"``) of the pipeline's
own default (its scheduler and step count, with CFG) against each student, timed in turns
``--repeats`` times, and the VAE decode timed apart (a full call minus a latent call of the same
default run), since the decode does not shrink with the step count.

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
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from accel.base.cli_args import integer
from accel.eval.quality_bench import (QualityBench, add_workload_args, environment, load_workload, patch_setup,
                                      write_result)

SOLVERS = ("euler", "heun", "unipc", "dpmpp", "dss", "flowmap")
DEFAULT_SOLVERS = ("euler", "unipc", "dpmpp", "dss", "flowmap")
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
    p.add_argument("--flowmap", default=None, help="a student folder (accel distill --out DIR) for the flowmap rows "
                                                   "(default: the student shipped for the model)")
    return p


class EvaluationCounter:
    """Transformer evaluations actually run: batch rows reaching each transformer's first block
    (a skipped CFG call never gets there; a batched [uncond, cond] call counts two)."""

    def __init__(self, pipe: Any):
        from accel.eval.work_count import block_modules, transformers

        self.rows = 0
        self._hooks = [block_modules(model)[0].register_forward_pre_hook(self._count, with_kwargs=True)
                       for model in transformers(pipe)]

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.rows += int(hidden.shape[0])

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class Counted:
    """A setup that also counts the evaluations of the runs it is applied to (``per_video``)."""

    def __init__(self, setup: Any, videos_per_run: int):
        self.setup, self.videos_per_run = setup, videos_per_run
        self.rows = self.videos = 0

    def __call__(self, pipe: Any):
        counter = EvaluationCounter(pipe)
        undo = self.setup(pipe) if self.setup is not None else None

        def finish() -> None:
            counter.remove()
            self.rows += counter.rows
            self.videos += self.videos_per_run
            if undo is not None:
                undo()
        return finish

    @property
    def per_video(self) -> Optional[int]:
        return self.rows // self.videos if self.videos else None


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


def find_student(pipe: Any, folder: Optional[str]) -> Union[Tuple[str, Tuple[int, ...]], str]:
    """(student folder, its step counts), checked against the pipeline up front, or why there is none."""
    import accel

    try:
        handle = accel.patch(pipe, solver={"name": "flowmap", "artifact": folder} if folder else "flowmap")
    except ValueError as exc:
        if folder is None and "none is shipped" in str(exc):
            return "no student shipped for this model (distill one with accel distill, pass --flowmap DIR)"
        raise
    artifact = handle.methods["solver"].artifact
    handle.remove()
    return artifact.folder, artifact.steps


def run_solver_bench(bench: QualityBench, solvers: Sequence[str], step_counts: Sequence[int], teacher_steps: int,
                     dss: Dict[int, DSSEntry], student: Union[Tuple[str, Tuple[int, ...]], str, None] = None
                     ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    bench.warm_up()
    videos = len(bench.workload.prompts)
    setup = patch_setup(solver={"name": "euler", "steps": teacher_steps})
    counter = Counted(setup, videos)
    teacher = {"solver": "euler", "steps": teacher_steps, "prompt_accuracy": None, **bench.set_baseline(setup=counter),
               "model_evals": _model_evals(setup), "evaluations": counter.per_video}
    bench.log("teacher " + json.dumps(teacher))
    rows = []
    for solver in solvers:
        counts = step_counts
        if solver == "flowmap":
            if isinstance(student, str):
                bench.log(f"flowmap skipped: {student}")
                rows.append({"solver": solver, "skipped": student})
                continue
            counts = student[1]
        for n in counts:
            fields: Dict[str, Any] = {"solver": solver, "steps": n}
            extras: Dict[str, Any] = {}
            if solver == "dss":
                entry = dss[n]
                if isinstance(entry, str):
                    bench.log(f"dss {n} steps skipped: {entry}")
                    rows.append({**fields, "skipped": entry})
                    continue
                setup = dss_setup(entry[0], n)
                extras = _dss_extras(*entry)
            elif solver == "flowmap":
                setup = student_setup(student[0], n)
                extras = {"student": student[0]}
            else:
                setup = patch_setup(solver={"name": solver, "steps": n})
            counter = Counted(setup, videos)
            row = bench.measure(fields, setup=counter)
            rows.append({**row, "model_evals": _model_evals(setup), "evaluations": counter.per_video, **extras})
    return teacher, rows


def student_setup(folder: str, steps: int):
    return patch_setup(solver={"name": "flowmap", "artifact": folder, "steps": steps})


def transformer_speed(bench: QualityBench, student: Tuple[str, Tuple[int, ...]], repeats: int) -> Dict[str, Any]:
    """The transformer part of the pipeline's own default run against each student step count
    (latents only, timed in turns), and the default run's VAE decode timed apart."""
    from accel.eval.timing import interleaved, timed

    w = bench.workload
    default_steps = w.call_kwargs.get("num_inference_steps")

    def latents(output_type: str = "latent") -> Any:
        for i, prompt in enumerate(w.prompts):
            w.pipe(prompt=prompt, negative_prompt="", generator=torch.Generator("cpu").manual_seed(w.seed + i),
                   output_type=output_type, **w.call_kwargs)

    repeats = max(repeats, 3)
    result: Dict[str, Any] = {"default": {"steps": default_steps, "scheduler": type(w.pipe.scheduler).__name__,
                                          "guidance_scale": w.call_kwargs.get("guidance_scale")},
                              "videos": len(w.prompts), "repeats": repeats, "students": []}
    full = statistics.median(timed(lambda: latents("pt"))[1] for _ in range(repeats))
    latent_only = statistics.median(timed(latents)[1] for _ in range(repeats))
    result["vae_decode_seconds"] = round((full - latent_only) / len(w.prompts), 3)
    for n in student[1]:
        setup = student_setup(student[0], n)

        def run_student() -> None:
            undo = setup(w.pipe)
            try:
                latents()
            finally:
                undo()

        _, _, timing = interleaved(latents, run_student, repeats)
        measured = timing.as_dict()
        result["students"].append({"steps": n, "transformer_speedup": measured["speedup"],
                                   "speedup_spread": measured["speedup_spread"], "noisy": measured["noisy"],
                                   "default_transformer_seconds": round(measured["baseline_seconds"] / len(w.prompts), 3),
                                   "student_transformer_seconds": round(measured["accelerated_seconds"] / len(w.prompts), 3)})
        bench.log("speed " + json.dumps(result["students"][-1]))
    return result


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(teacher: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    lines = ["| solver | steps | evaluations | PSNR (dB) | SSIM | prompt accuracy | wall s | speed-up | params |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| euler (teacher) | {teacher['steps']} | {_num(teacher.get('evaluations'), 'd')} | - | - | "
             f"{_num(teacher.get('prompt_accuracy'), '.3f')} | {teacher['wall_seconds']:.2f} | 1.00x | - |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['solver']} | {r.get('steps', '-')} | skipped: {r['skipped']} | | | | | | |")
            continue
        speedup = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['solver']} | {r['steps']} | {_num(r.get('evaluations'), 'd')} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {_num(r['prompt_accuracy'], '.3f')} | {r['wall_seconds']:.2f} | {speedup} | "
                     f"{r.get('params', '-')} |")
    return "\n".join(lines)


def format_speed(speed: Dict[str, Any]) -> str:
    default = speed["default"]
    lines = [f"transformer part, per video: default ({default['scheduler']}, {default['steps']} steps, guidance "
             f"{default['guidance_scale']}) vs student; VAE decode {speed['vae_decode_seconds']:.2f} s per video apart"]
    for s in speed["students"]:
        lines.append(f"  student {s['steps']} steps: {s['student_transformer_seconds']:.3f} s vs "
                     f"{s['default_transformer_seconds']:.3f} s = {s['transformer_speedup']:.2f}x "
                     f"(spread {s['speedup_spread'][0]:.2f}-{s['speedup_spread'][1]:.2f}x)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dss is not None and not os.path.isdir(args.dss):
            raise ValueError(f"--dss {args.dss!r} is not a folder")
        workload = load_workload(args)
        step_counts = list(dict.fromkeys(args.step_counts))
        dss = find_dss_artifacts(workload.pipe, args.dss, step_counts) if "dss" in args.solvers else {}
        student = find_student(workload.pipe, args.flowmap) if "flowmap" in args.solvers else None
        bench = QualityBench(workload, repeats=args.repeats)
        teacher, rows = run_solver_bench(bench, list(dict.fromkeys(args.solvers)), step_counts,
                                         args.teacher_steps, dss, student)
        speed = transformer_speed(bench, student, args.repeats) if isinstance(student, tuple) else None
    except (ValueError, FileNotFoundError) as exc:
        print(f"accel bench solvers: error: {exc}", file=sys.stderr)
        return 2
    # The pipeline's default step count never runs here: every row and the teacher set their own.
    described = {k: v for k, v in workload.description.items() if k != "num_inference_steps"}
    result = {"what": f"few-step solvers vs a {args.teacher_steps}-step Euler teacher (same prompts and seeds)",
              "environment": environment(), "workload": described, "teacher": teacher, "rows": rows}
    if speed is not None:
        result["speed"] = speed
    write_result(args.json_path, result)
    print(format_table(teacher, rows))
    if speed is not None:
        print(format_speed(speed))
    if args.json_path:
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
