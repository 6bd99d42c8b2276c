"""Shared harness of the quality benchmarks (``accel bench cache|solvers|sparse``).

Every quality benchmark asks the same question of a different knob: generate a fixed set of
prompts and seeds with the knob set, and compare with the dense output of the same prompts and
seeds measured in the same process. :class:`QualityBench` holds the workload (pipeline, prompts,
seeds, call arguments), generates and times a run, and turns a run into a JSON row:

- ``psnr`` / ``ssim``: mean over prompts of the per-frame means (``accel.eval.metrics``), against the
  baseline videos (the dense pipeline unless a benchmark names another, e.g. a 50-step teacher);
- ``prompt_accuracy``: the toy-domain judge's reading of shape, colour and motion (reference
  model only: its prompts are captions of held-out specs; ``None`` elsewhere);
- ``wall_seconds`` and ``speedup`` against the baseline's wall time from the same process
  (optionally re-timed every few rows, so the speed-up compares neighbours in time).

The workload is the shipped reference model by default; ``--weights DIR`` points at another
trained reference pipeline, and ``--model tiny`` runs a random-weight tiny Wan pipeline (for
smoke tests: its numbers only prove the plumbing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from accel.base.cli_args import integer, output_path, set_threads

from .metrics import psnr, ssim
from .timing import interleaved
from .work_count import WorkCounter, transformers

Setup = Optional[Callable[[Any], Optional[Callable[[], None]]]]  # pipe -> undo (or None)


@dataclass
class Workload:
    pipe: Any
    prompts: List[str]
    specs: Optional[list]  # data.Spec per prompt when the judge applies
    seed: int
    call_kwargs: Dict[str, Any]  # steps, guidance, size, negative prompt
    description: Dict[str, Any] = field(default_factory=dict)


def add_workload_args(parser: argparse.ArgumentParser, prompts: int = 4) -> None:
    parser.add_argument("--model", choices=("reference", "tiny"), default="reference",
                        help="reference: the trained reference Wan model (default); tiny: random-weight "
                             "tiny Wan pipeline, for smoke tests only")
    parser.add_argument("--weights", default=None, help="reference pipeline folder (default: the shipped weights)")
    parser.add_argument("--prompts", type=integer(1), default=prompts, help="held-out prompts to generate")
    parser.add_argument("--seed", type=integer(0), default=0, help="prompt i uses seed + i")
    parser.add_argument("--steps", type=integer(1, 1000), default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--threads", type=integer(1), default=None,
                        help="torch CPU threads (default: the cores not already busy)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=integer(1), default=1,
                        help="time each row this many times in turns with a dense run; speed-ups are ratios of "
                             "medians with their spread (default 1: one run against a nearby dense timing)")
    parser.add_argument("--json", dest="json_path", type=output_path, default=None, help="write the result here")


def device_and_dtype(args: argparse.Namespace) -> tuple:
    device = getattr(args, "device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device visible")
    dtype = getattr(args, "dtype", "auto")
    dtype = dtype if dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, getattr(torch, dtype)


def load_workload(args: argparse.Namespace) -> Workload:
    if args.prompts < 1:
        raise ValueError(f"prompts: expected >= 1, got {args.prompts}")
    device, dtype = device_and_dtype(args)
    if device == "cpu":
        set_threads(getattr(args, "threads", None))
    from accel.pipelines.reference import data

    specs = data.held_out_specs()[: args.prompts]
    prompts = [data.caption(s) for s in specs]
    if args.model == "tiny":
        from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

        pipe = build_tiny_pipeline("wan", seed=0, dtype=dtype).to(device)
        kwargs = {k: v for k, v in tiny_call_kwargs("wan", seed=0).items()
                  if k not in ("prompt", "generator", "output_type", "negative_prompt")}
        specs = None
        description = {"model": "tiny wan (random weights): plumbing check, numbers mean nothing"}
    else:
        from accel.pipelines.reference.build import REFERENCE_DEFAULTS, load_reference_pipeline

        pipe = load_reference_pipeline(args.weights, torch_dtype=dtype, device=device)
        kwargs = {k: v for k, v in REFERENCE_DEFAULTS.items() if k not in ("prompt", "seed", "negative_prompt")}
        description = {"model": "reference Wan model", "weights": args.weights or "shipped"}
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {args.steps}")
        kwargs["num_inference_steps"] = args.steps
    pipe.set_progress_bar_config(disable=True)
    description.update(prompts=len(prompts), seed=args.seed, device=device, dtype=str(dtype).replace("torch.", ""),
                       **{k: v for k, v in kwargs.items()})
    return Workload(pipe, prompts, specs, args.seed, kwargs, description)


def environment() -> Dict[str, Any]:
    import diffusers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"device": gpu or "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__}


class QualityBench:
    """Runs one workload under different settings and reports each against a baseline run."""

    def __init__(self, workload: Workload, log: Callable[[str], None] = print, retime_every: int = 0,
                 repeats: int = 1, count_work: bool = False):
        """``retime_every``: re-time the baseline after that many rows (0: never) and compute
        speed-ups against the latest baseline timings, not only the first. On a shared CPU the
        machine's speed drifts by 10-20% over a long run (an exact no-op row measured 0.79x
        against a baseline timed ten minutes earlier); a nearby baseline cancels the drift."""
        self.workload = workload
        self.log = log
        self.retime_every = retime_every
        # > 1: each row is timed that many times in turns with the baseline (eval/timing.py)
        self.repeats = repeats
        # True: every row gets ``compute_fraction``, the block work it ran over the baseline's,
        # counted by the same hooks for every method (eval/work_count.py)
        self.count_work = count_work
        self.last_work: Optional[int] = None
        self.baseline_work: Optional[int] = None
        self._judge = None
        self.baseline_videos: Optional[torch.Tensor] = None
        self.baseline_seconds: Optional[float] = None
        self.baseline_timings: List[float] = []  # first (best of repeats), then each re-timing
        self._baseline_run: tuple = (None, {})
        self._rows_since_timing = 0

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, **overrides: Any) -> tuple:
        """(videos (N, T, 3, H, W) in [0, 1], wall seconds); one pipeline call per prompt, as users run it."""
        w = self.workload
        kwargs = {**w.call_kwargs, **overrides}
        videos, start = [], time.perf_counter()
        for i, prompt in enumerate(w.prompts):
            generator = torch.Generator("cpu").manual_seed(w.seed + i)
            out = w.pipe(prompt=prompt, negative_prompt="", generator=generator, output_type="pt", **kwargs)
            videos.append(out.frames[0].float().cpu())
        return torch.stack(videos), time.perf_counter() - start

    def warm_up(self) -> None:
        """One short call so first-call costs (allocations, lazy imports) never land in a timed run."""
        w = self.workload
        w.pipe(prompt=w.prompts[0], negative_prompt="", generator=torch.Generator("cpu").manual_seed(0),
               output_type="pt", **{**w.call_kwargs, "num_inference_steps": 1})

    def set_baseline(self, repeats: int = 1, setup: Setup = None, **overrides: Any) -> Dict[str, Any]:
        """Generate (and time, best of ``repeats``) the reference videos every row is compared with."""
        best = None
        for _ in range(max(1, repeats)):
            videos, seconds = self.run(setup, **overrides)
            best = seconds if best is None else min(best, seconds)
        self.baseline_videos, self.baseline_seconds = videos, best
        self.baseline_timings = [best]
        self.baseline_work = self.last_work
        self._baseline_run = (setup, overrides)
        row = {"wall_seconds": round(best, 3)}
        if self.workload.specs is not None:
            row["prompt_accuracy"] = self.prompt_accuracy(videos)
        return row

    def run(self, setup: Setup = None, **overrides: Any) -> tuple:
        """Generate with ``setup(pipe)`` applied (it returns the undo); always undone afterwards."""
        undo = setup(self.workload.pipe) if setup is not None else None
        try:
            if not self.count_work:
                return self.generate(**overrides)
            counter = WorkCounter(*transformers(self.workload.pipe))
            with counter.counting():
                out = self.generate(**overrides)
            self.last_work = counter.macs
            return out
        finally:
            if undo is not None:
                undo()

    # -- metrics ------------------------------------------------------------------------------

    def prompt_accuracy(self, videos: torch.Tensor) -> Optional[float]:
        if self.workload.specs is None:
            return None
        from accel.pipelines.reference import judge as J

        if self._judge is None:
            self._judge = J.load_judge()
        return round(J.prompt_accuracy(videos, self.workload.specs, self._judge), 4)

    def local_baseline_seconds(self) -> float:
        """The faster of the two latest baseline timings (one run is noisy; two bracket drift)."""
        return min(self.baseline_timings[-2:])

    def retime_baseline(self) -> tuple:
        """Run the baseline again for its time; its videos must match the first run exactly (so no
        earlier row left the pipeline changed), else the drift is logged."""
        setup, overrides = self._baseline_run
        videos, seconds = self.run(setup, **overrides)
        self.baseline_timings.append(seconds)
        drift = sum(psnr(a, b) for a, b in zip(videos, self.baseline_videos)) / len(videos)
        if drift < 100.0:
            self.log(f"warning: the baseline changed since its first run (PSNR {drift:.2f} dB against it)")
        return seconds, round(drift, 3)

    def compare(self, videos: torch.Tensor, seconds: float, work: Optional[int] = None) -> Dict[str, Any]:
        if self.baseline_videos is None:
            raise RuntimeError("set_baseline() must run before compare()")
        pairs = list(zip(videos, self.baseline_videos))
        counted = {}
        if self.count_work and self.baseline_work:
            counted["compute_fraction"] = round((self.last_work if work is None else work) / self.baseline_work, 4)
        return {**counted,
            "psnr": round(sum(psnr(a, b) for a, b in pairs) / len(pairs), 3),
            "ssim": round(sum(ssim(a, b) for a, b in pairs) / len(pairs), 5),
            "prompt_accuracy": self.prompt_accuracy(videos),
            "wall_seconds": round(seconds, 3),
            "speedup": round(self.local_baseline_seconds() / seconds, 3) if seconds > 0 else None,
        }

    def measure(self, fields: Dict[str, Any], setup: Setup = None, **overrides: Any) -> Dict[str, Any]:
        if self.repeats > 1:
            return self._measure_interleaved(fields, setup, **overrides)
        if self.retime_every and self._rows_since_timing >= self.retime_every:
            self.retime_baseline()
            self._rows_since_timing = 0
        self._rows_since_timing += 1
        videos, seconds = self.run(setup, **overrides)
        row = {**fields, **self.compare(videos, seconds)}
        self.log(json.dumps(row))
        return row

    def _measure_interleaved(self, fields: Dict[str, Any], setup: Setup, **overrides: Any) -> Dict[str, Any]:
        base_setup, base_overrides = self._baseline_run
        works = []

        def accelerated():
            out = self.run(setup, **overrides)
            works.append(self.last_work)
            return out

        _, (videos, _), timing = interleaved(lambda: self.run(base_setup, **base_overrides), accelerated,
                                             self.repeats)
        measured = timing.as_dict()
        row = {**fields, **self.compare(videos, measured["accelerated_seconds"], works[-1]),
               "speedup": measured["speedup"], "speedup_spread": measured["speedup_spread"],
               "speedup_noisy": measured["noisy"]}
        self.log(json.dumps(row))
        return row


def patch_setup(**patch_kwargs: Any) -> Setup:
    """A setup that applies ``accel.patch(pipe, **patch_kwargs)``; the returned undo removes it and
    stores the handle's summary on the setup (``setup.summary``) for the row."""
    import accel

    def setup(pipe):
        handle = accel.patch(pipe, **patch_kwargs)

        def undo():
            setup.summary = handle.summary()
            handle.remove()
        return undo

    setup.summary = None
    return setup


def write_result(path: Optional[str], result: Dict[str, Any]) -> None:
    text = json.dumps(result, indent=2, default=str)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
