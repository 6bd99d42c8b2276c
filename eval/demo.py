"""``accel demo``: the same prompt and seed, dense and accelerated, side by side, with a report.

Runs on the shipped reference model by default (seconds on a laptop CPU) or on any supported
pipeline the user has locally (``--model PATH``). Writes ``baseline.mp4``, ``accelerated.mp4``,
``side_by_side.mp4`` and ``.gif``, ``report.json`` and ``report.md``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

import accel
from accel.api import adapter_for, check_preset
from accel.base.cli_args import set_threads
from accel.base.registry import MODEL_ADAPTERS
from accel.pipelines.loading import load_pipeline as load_pipeline_folder

from .metrics import psnr, ssim
from .timing import interleaved
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
    repeats: int = 3  # interleaved dense/accelerated turns timed (eval/timing.py)
    threads: Optional[int] = None  # CPU threads; None: the cores not already busy
    device: str = "auto"  # "auto": cuda when available
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def device_and_dtype(options: DemoOptions) -> Tuple[str, torch.dtype]:
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device visible")
    dtype = options.dtype if options.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, DTYPES[dtype]


def adapter_before_loading(model: Optional[str]):
    """The model's adapter from its folder's model_index.json, so a bad --preset fails before loading."""
    if model is None:
        return MODEL_ADAPTERS.get("WanTransformer3DModel")  # the reference model is a Wan pipeline
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        return None  # a hub id in the cache, or not a pipeline: the loader says which
    try:
        with open(index) as f:
            entry = json.load(f).get("transformer") or [None, None]
    except (OSError, ValueError, AttributeError):
        return None
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    return MODEL_ADAPTERS.get(name) if name in MODEL_ADAPTERS else None


def load_pipeline(model: Optional[str], device: str = "cpu", dtype: torch.dtype = torch.float32):
    if model is None:
        from accel.pipelines.reference.build import load_reference_pipeline

        try:
            return load_reference_pipeline(torch_dtype=dtype, device=device)
        except (FileNotFoundError, ValueError) as exc:
            raise DemoError(str(exc)) from None
    try:
        return load_pipeline_folder(model, "--model", dtype=dtype).to(device)
    except ValueError as exc:
        raise DemoError(f"{exc}. Pass a local pipeline folder (with model_index.json) or a hub id already "
                        "in the local cache.") from None


def generation_kwargs(options: Any) -> Dict[str, Any]:
    """Generation arguments from ``options.model`` (None: the reference model's own defaults, its
    prompt included; else the pipeline's) and its ``steps``, ``height``, ``width`` and ``frames``
    (``accel demo``'s and ``accel eval``'s options both have them)."""
    kwargs: Dict[str, Any] = {}
    if options.model is None:
        from accel.pipelines.reference.build import reference_call_kwargs

        kwargs.update(reference_call_kwargs())
    for key, value in (("num_inference_steps", options.steps), ("height", options.height),
                       ("width", options.width), ("num_frames", options.frames)):
        if value is not None:
            kwargs[key] = value
    return kwargs


def call_kwargs(pipe, options: DemoOptions) -> Dict[str, Any]:
    """Generation arguments: the reference defaults for the reference model, else the pipeline's own."""
    kwargs = generation_kwargs(options)
    if options.prompt is not None:
        kwargs["prompt"] = options.prompt
    kwargs.setdefault("prompt", "a red fox running in the snow")
    return kwargs


def generate(pipe, kwargs: Dict[str, Any], seed: int):
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(**kwargs, generator=generator, output_type="np")
    frames = out.frames[0] if hasattr(out, "frames") else out.images
    return to_uint8_frames(frames)


def check_preset_early(options: DemoOptions) -> None:
    adapter = adapter_before_loading(options.model)
    if adapter is not None and options.preset is not None:
        try:
            check_preset(adapter, options.preset)
        except ValueError as exc:
            raise DemoError(str(exc)) from None


def run_demo(options: DemoOptions) -> Dict[str, Any]:
    out = prepare_output(options.out)
    check_preset_early(options)
    device, dtype = device_and_dtype(options)
    threads = set_threads(options.threads) if device == "cpu" else torch.get_num_threads()
    log("loading the pipeline" + (f" from {options.model}" if options.model else " (reference model)")
        + f" on {device} in {str(dtype).replace('torch.', '')}" + (f", {threads} CPU thread(s)" if device == "cpu" else ""))
    pipe = load_pipeline(options.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(getattr(pipe, "transformer", None) or torch.nn.Module())
    if adapter is None:
        raise DemoError(f"{type(pipe).__name__} is not supported; see `accel list` for supported families")
    preset = options.preset or adapter.default_preset
    try:
        check_preset(adapter, preset)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    kwargs = call_kwargs(pipe, options)

    log("warming up (one step, not timed)")
    generate(pipe, {**kwargs, "num_inference_steps": 1}, options.seed)

    summaries = []

    def accelerated():
        with accel.patched(pipe, preset=preset) as handle:
            video = generate(pipe, kwargs, options.seed)
            summaries.append(handle.summary())
        return video

    log(f"dense and preset {preset!r} in turns, {options.repeats} time(s) each, "
        f"{kwargs.get('num_inference_steps', 'default')} steps")
    baseline, accelerated_video, timing = interleaved(lambda: generate(pipe, kwargs, options.seed), accelerated,
                                                      options.repeats)
    summary = summaries[0]
    cache = summary["methods"].get("cache")
    report = {
        "prompt": kwargs["prompt"],
        "preset": preset,
        "family": adapter.family,
        "model": options.model or "reference",
        "seed": options.seed,
        "steps": kwargs.get("num_inference_steps"),
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads if device == "cpu" else None,
        **timing.as_dict(),
        "compute_fraction": cache["counters"].get("compute_fraction") if cache else None,
        "psnr": round(psnr(accelerated_video, baseline), 3),
        "ssim": round(ssim(accelerated_video, baseline), 5),
        "warnings": summary["warnings"],
        "methods": summary["methods"],
        "files": {},
    }
    for warning in summary["warnings"]:
        log(f"warning: {warning}")
    log("writing videos and the report")
    upscale = max(1, 256 // max(baseline.shape[1], 1))
    files = {
        "baseline": write_video(os.path.join(out, "baseline.mp4"), baseline, options.fps, upscale),
        "accelerated": write_video(os.path.join(out, "accelerated.mp4"), accelerated_video, options.fps, upscale),
    }
    both = side_by_side([baseline, accelerated_video])
    files["side_by_side"] = write_video(os.path.join(out, "side_by_side.mp4"), both, options.fps, upscale)
    files["side_by_side_gif"] = write_video(os.path.join(out, "side_by_side.gif"), both, options.fps, upscale)
    report["files"] = {k: os.path.basename(v) for k, v in files.items()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(report, str(summary)))
    low, high = report["speedup_spread"]
    log(f"done: speedup {report['speedup']}x (spread {low}-{high}x), compute fraction "
        f"{report['compute_fraction']}, PSNR {report['psnr']} dB, SSIM {report['ssim']} -> {out}")
    return report


def render_markdown(report: Dict[str, Any], summary_text: str) -> str:
    psnr_text = "identical (inf)" if report["psnr"] == float("inf") else f"{report['psnr']} dB"
    low, high = report["speedup_spread"]
    timing = (f"- Wall-clock speed-up **{report['speedup']}x**: the median of {report['repeats']} dense and "
              f"{report['repeats']} accelerated runs taken in turns; any one dense run against any one "
              f"accelerated run gave {low}x to {high}x")
    lines = [
        "# accel demo",
        "",
        f"Prompt: *{report['prompt']}* (seed {report['seed']}, {report['steps']} steps, model {report['model']}, "
        f"{report['device']}, {report['dtype']}" + (f", {report['threads']} CPU thread(s)" if report["threads"] else "")
        + ")",
        "",
        "| | dense | accelerated |",
        "|---|---|---|",
        f"| time (s), median | {report['baseline_seconds']} | {report['accelerated_seconds']} |",
        "",
        f"- Preset **{report['preset']}** on {report['family']}",
        timing,
    ]
    if report["compute_fraction"] is not None:
        lines.append(f"- Compute fraction {report['compute_fraction']}: transformer blocks run / blocks a dense run "
                     "runs (counted, not timed: the stable figure)")
    if report["noisy"]:
        lines.append("- **The spread is wide**: the machine was busy while timing, so the wall-clock ratio is "
                     "noise-dominated; trust the compute fraction, or rerun with more `--repeats` on a quiet machine")
    lines += [f"- Fidelity to the dense video (same seed): PSNR {psnr_text}, SSIM {report['ssim']}"
              " (per-frame PSNR on [0,1] and Gaussian SSIM 11/1.5, averaged over frames)"]
    lines += [f"- **Warning**: {w}" for w in report["warnings"]]
    lines += ["", "Side by side (dense left, accelerated right): `side_by_side.mp4` / `side_by_side.gif`", "",
              "```", summary_text, "```", ""]
    return "\n".join(lines)
