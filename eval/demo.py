"""``accel demo``: the same prompt and seed, dense and accelerated, side by side, with a report.

Runs on the shipped reference model by default (seconds on a laptop CPU) or on any supported
pipeline the user has locally (``--model PATH``). Writes ``baseline.mp4``, ``accelerated.mp4``,
``side_by_side.mp4`` and ``.gif``, ``report.json`` and ``report.md``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

import accel
from accel.api import adapter_for, check_preset

from accel.pipelines.loading import load_pipeline as load_pipeline_folder

from .metrics import psnr, ssim
from .video_io import side_by_side, to_uint8_frames, write_video


class DemoError(ValueError):
    """A user-facing problem (bad flag, missing model, unwritable output): printed without a traceback."""


@dataclass
class DemoOptions:
    out: str = "accel-demo"
    prompt: Optional[str] = None
    preset: Optional[str] = None
    seed: int = 0
    steps: Optional[int] = None
    model: Optional[str] = None  # None: the shipped reference model
    height: Optional[int] = None
    width: Optional[int] = None
    frames: Optional[int] = None
    fps: int = 8


def log(message: str) -> None:
    print(f"[accel demo] {message}", flush=True)


def prepare_output(out: str) -> str:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".accel-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise DemoError(f"cannot write to --out {out!r}: {exc.strerror or exc}") from None
    return out


def load_pipeline(model: Optional[str]):
    if model is None:
        from accel.pipelines.reference.build import load_reference_pipeline

        try:
            return load_reference_pipeline()
        except (FileNotFoundError, ValueError) as exc:
            raise DemoError(str(exc)) from None
    try:
        return load_pipeline_folder(model, "--model")
    except ValueError as exc:
        raise DemoError(f"{exc}. Pass a local pipeline folder (with model_index.json) or a hub id already "
                        "in the local cache.") from None


def call_kwargs(pipe, options: DemoOptions) -> Dict[str, Any]:
    """Generation arguments: the reference defaults for the reference model, else the pipeline's own."""
    kwargs: Dict[str, Any] = {}
    if options.model is None:
        from accel.pipelines.reference.build import REFERENCE_DEFAULTS

        kwargs.update({k: v for k, v in REFERENCE_DEFAULTS.items() if k != "seed"})
    if options.prompt is not None:
        kwargs["prompt"] = options.prompt
    kwargs.setdefault("prompt", "a red fox running in the snow")
    for key, value in (("num_inference_steps", options.steps), ("height", options.height),
                       ("width", options.width), ("num_frames", options.frames)):
        if value is not None:
            kwargs[key] = value
    return kwargs


def generate(pipe, kwargs: Dict[str, Any], seed: int):
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(**kwargs, generator=generator, output_type="np")
    frames = out.frames[0] if hasattr(out, "frames") else out.images
    return to_uint8_frames(frames)


def run_demo(options: DemoOptions) -> Dict[str, Any]:
    out = prepare_output(options.out)
    log("loading the pipeline" + (f" from {options.model}" if options.model else " (reference model)"))
    pipe = load_pipeline(options.model)
    adapter = adapter_for(getattr(pipe, "transformer", None) or torch.nn.Module())
    if adapter is None:
        raise DemoError(f"{type(pipe).__name__} is not supported; see `accel list` for supported families")
    preset = options.preset or adapter.default_preset
    try:
        check_preset(adapter, preset)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    kwargs = call_kwargs(pipe, options)
    if options.steps is not None and options.steps < 1:
        raise DemoError(f"--steps must be >= 1, got {options.steps}")

    log("warming up (one step, not timed)")
    generate(pipe, {**kwargs, "num_inference_steps": 1}, options.seed)

    log(f"dense run: {kwargs.get('num_inference_steps', 'default')} steps")
    start = time.perf_counter()
    baseline = generate(pipe, kwargs, options.seed)
    baseline_seconds = time.perf_counter() - start

    log(f"accelerated run: preset {preset!r}")
    with accel.patched(pipe, preset=preset) as handle:
        start = time.perf_counter()
        accelerated = generate(pipe, kwargs, options.seed)
        accelerated_seconds = time.perf_counter() - start
        summary = handle.summary()

    report = {
        "prompt": kwargs["prompt"],
        "preset": preset,
        "family": adapter.family,
        "model": options.model or "reference",
        "seed": options.seed,
        "steps": kwargs.get("num_inference_steps"),
        "baseline_seconds": round(baseline_seconds, 3),
        "accelerated_seconds": round(accelerated_seconds, 3),
        "speedup": round(baseline_seconds / accelerated_seconds, 3),
        "psnr": round(psnr(accelerated, baseline), 3),
        "ssim": round(ssim(accelerated, baseline), 5),
        "methods": summary["methods"],
        "files": {},
    }
    log("writing videos and the report")
    upscale = max(1, 256 // max(baseline.shape[1], 1))
    files = {
        "baseline": write_video(os.path.join(out, "baseline.mp4"), baseline, options.fps, upscale),
        "accelerated": write_video(os.path.join(out, "accelerated.mp4"), accelerated, options.fps, upscale),
    }
    both = side_by_side([baseline, accelerated])
    files["side_by_side"] = write_video(os.path.join(out, "side_by_side.mp4"), both, options.fps, upscale)
    files["side_by_side_gif"] = write_video(os.path.join(out, "side_by_side.gif"), both, options.fps, upscale)
    report["files"] = {k: os.path.basename(v) for k, v in files.items()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(report, str(summary)))
    log(f"done: speedup {report['speedup']}x, PSNR {report['psnr']} dB, SSIM {report['ssim']} -> {out}")
    return report


def render_markdown(report: Dict[str, Any], summary_text: str) -> str:
    psnr_text = "identical (inf)" if report["psnr"] == float("inf") else f"{report['psnr']} dB"
    return "\n".join([
        "# accel demo",
        "",
        f"Prompt: *{report['prompt']}* (seed {report['seed']}, {report['steps']} steps, model {report['model']})",
        "",
        "| | dense | accelerated |",
        "|---|---|---|",
        f"| time (s) | {report['baseline_seconds']} | {report['accelerated_seconds']} |",
        "",
        f"- Preset **{report['preset']}** on {report['family']}: speedup **{report['speedup']}x**",
        f"- Fidelity to the dense video (same seed): PSNR {psnr_text}, SSIM {report['ssim']}"
        " (per-frame PSNR on [0,1] and Gaussian SSIM 11/1.5, averaged over frames)",
        "",
        "Side by side (dense left, accelerated right): `side_by_side.mp4` / `side_by_side.gif`",
        "",
        "```",
        summary_text,
        "```",
        "",
    ])
