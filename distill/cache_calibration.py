"""Fit cache calibrations from runs of a registered model: TeaCache polynomials, MagCache ratios
(and, through ``distill/schedule_search.py``, a fixed cache's searched compute steps).

Both run the pipeline densely with the cache engine attached in record-only mode (threshold 0,
so every step computes and the output is the dense output), and watch the cached span of every
call:

* TeaCache: for consecutive steps of one branch, x = relative L1 change of the adapter's
  TeaCache input (the same tensor the rule measures) and y = relative L1 change of the cached
  span's output (the visual stream after the cached blocks: what reuse approximates). The
  artifact holds the least-squares degree-4 polynomial y(x), highest power first.
* MagCache: per step t and branch, the mean over tokens of |R_t| / |R_(t-1)| (per-token L2 norm)
  of the cached span's residual R, averaged over prompts; step 0 is 1.

``main(argv)`` is ``accel calibrate --cache teacache|magcache|fixed --model tiny:wan|reference|PATH ...``;
``--model reference`` runs the reference model at its default size and guidance on training-set
captions (the shipped artifacts in ``pipelines/reference/calibration/`` come from it).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from accel.base.adapter import config_fingerprint
from accel.base.cli_args import integer, output_path, set_threads
from accel.caching.calibration import FORMAT_VERSION, save_calibration
from accel.caching.configs import TeaCacheConfig
from accel.caching.forecast import FORECASTS
from accel.caching.indicators import relative_l1

DEFAULT_PROMPTS = (
    "a red fox runs through the snowy forest at sunset",
    "a golden retriever swims in a blue lake, slow motion",
    "a city street at night in the rain, cinematic lighting",
    "a bird flies over the ocean at sunrise, wide shot",
    "a woman dances in a field of yellow flowers",
    "a robot walks on a dark street, close up",
    "a horse runs on the beach, realistic, detailed",
    "a child sits under a green tree in the morning light",
)


class _SpanRecorder:
    """Per (model, branch): change statistics between consecutive computed steps."""

    def __init__(self) -> None:
        self.previous: Dict[Tuple[int, str], Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pairs: List[Tuple[float, float]] = []  # (input change, output change)
        self.ratios: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
        self.model = None

    def __call__(self, record) -> None:
        probe = record.probe
        self.model = record.model
        out = record.span_output[record.main_stream]
        residual = (out - record.span_input[record.main_stream]).float()
        key = (id(record.model), probe.branch)
        previous = self.previous.get(key)
        if previous is not None and previous[0] == probe.step - 1:
            _, prev_input, prev_out, prev_residual = previous
            self.pairs.append((relative_l1(probe.modulated_input, prev_input), relative_l1(out, prev_out)))
            token_norms = residual.norm(dim=-1) / prev_residual.norm(dim=-1).clamp_min(1e-12)
            self.ratios[probe.branch][probe.step].append(float(token_norms.mean()))
        self.previous[key] = (probe.step, probe.modulated_input, out, residual)


def _record(pipe: Any, prompts: Sequence[str], steps: int, call_kwargs: Optional[Dict[str, Any]],
            first_blocks: int, last_blocks: int) -> Tuple[_SpanRecorder, Dict[str, Any]]:
    import accel  # the public API composes the engine; imported here to keep this module light

    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if steps < 2:
        raise ValueError(f"calibration needs at least 2 steps, got {steps}")
    config = TeaCacheConfig(threshold=0.0, coefficients=(1.0, 0.0), warmup_steps=0, final_steps=0,
                            first_blocks=first_blocks, last_blocks=last_blocks)
    recorder = _SpanRecorder()
    handle = accel.patch(pipe, cache=config)
    try:
        handle.methods["cache"].engine.observers.append(recorder)
        for prompt in prompts:
            kwargs = dict(call_kwargs or {})
            kwargs.update(prompt=prompt, num_inference_steps=steps)
            kwargs.setdefault("output_type", "latent")  # the VAE decode tells the cache nothing
            with torch.no_grad():
                pipe(**kwargs)
        meta = artifact_meta(handle.session, steps, call_kwargs, len(prompts), first_blocks, last_blocks)
    finally:
        handle.remove()
    return recorder, meta


def artifact_meta(session: Any, steps: int, call_kwargs: Optional[Dict[str, Any]], prompts: int,
                  first_blocks: int, last_blocks: int) -> Dict[str, Any]:
    """The fields every cache calibration records about the model and run it was fitted on."""
    model = session.models[0]
    layout = session.layout_of(model)
    return {
        "format": FORMAT_VERSION,
        "kind": None,  # filled by the caller
        "model_class": type(model).__name__,
        "model_fingerprint": config_fingerprint(session.models),
        "family": session.adapter.family,
        "num_steps": steps,
        "resolution": {k: call_kwargs[k] for k in ("height", "width", "num_frames") if k in (call_kwargs or {})},
        "token_grid": list(layout.grid) if layout.grid else None,
        "prompts": prompts,
        "first_blocks": first_blocks,
        "last_blocks": last_blocks,
    }


def fit_polynomial(pairs: Sequence[Tuple[float, float]], degree: int = 4) -> Tuple[List[float], float]:
    """Least-squares coefficients (highest power first, padded to ``degree + 1``) and the RMSE."""
    pairs = [(x, y) for x, y in pairs if np.isfinite(x) and np.isfinite(y)]
    if len(pairs) < 2:
        raise ValueError(f"too few (input change, output change) pairs to fit: {len(pairs)}; "
                         "use more steps or prompts")
    x, y = np.array(pairs).T
    fit_degree = min(degree, len(pairs) - 1, len(set(x.tolist())) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poorly conditioned fits on few points are still usable
        coefficients = np.polyfit(x, y, max(fit_degree, 0))
    rmse = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    padded = [0.0] * (degree + 1 - len(coefficients)) + [float(c) for c in coefficients]
    return padded, rmse


def calibrate_teacache(pipe: Any, prompts: Sequence[str], steps: int, *, call_kwargs: Optional[Dict[str, Any]] = None,
                       first_blocks: int = 0, last_blocks: int = 0, out: Optional[str] = None) -> Dict[str, Any]:
    """Fit TeaCache's 4th-order rescaling polynomial for ``pipe``'s transformer at ``steps`` steps."""
    recorder, meta = _record(pipe, prompts, steps, call_kwargs, first_blocks, last_blocks)
    coefficients, rmse = fit_polynomial(recorder.pairs)
    artifact = {**meta, "kind": "teacache", "coefficients": coefficients,
                "fit": {"pairs": len(recorder.pairs), "rmse": rmse}}
    if out is not None:
        save_calibration(artifact, out)
    return artifact


def calibrate_magcache(pipe: Any, prompts: Sequence[str], steps: int, *, call_kwargs: Optional[Dict[str, Any]] = None,
                       first_blocks: int = 0, last_blocks: int = 0, out: Optional[str] = None) -> Dict[str, Any]:
    """Per-step residual magnitude ratios for ``pipe``'s transformer at ``steps`` steps, per branch."""
    recorder, meta = _record(pipe, prompts, steps, call_kwargs, first_blocks, last_blocks)
    ratios = {branch: [float(np.mean(by_step[t])) if by_step.get(t) else 1.0 for t in range(steps)]
              for branch, by_step in sorted(recorder.ratios.items())}
    if not ratios:
        raise ValueError("no consecutive computed steps were seen; nothing to calibrate")
    artifact = {**meta, "kind": "magcache", "ratios": ratios}
    if out is not None:
        save_calibration(artifact, out)
    return artifact


# ------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel calibrate", description=(
        "Fit a cache calibration for a registered model: a TeaCache polynomial, MagCache ratios, or the "
        "searched compute steps of a fixed cache (--cache fixed --budget K)."))
    parser.add_argument("--cache", required=True, choices=("teacache", "magcache", "fixed"))
    parser.add_argument("--model", required=True,
                        help="tiny:FAMILY (offline test pipelines), reference (the trained reference model), "
                             "or a local pipeline folder / cached hub id")
    parser.add_argument("--weights", help="with --model reference: a trained reference run's folder (default: shipped)")
    parser.add_argument("--prompts", type=integer(1), default=4, help="number of prompts to run (default 4)")
    parser.add_argument("--prompt-file", help="text file with one prompt per line (default: built-in prompts; "
                                              "training-set captions for --model reference)")
    parser.add_argument("--steps", type=integer(1, 1000), required=True,
                        help="denoising steps (the artifact is valid for these)")
    parser.add_argument("--out", type=output_path, required=True, help="JSON file to write")
    parser.add_argument("--height", type=integer(1))
    parser.add_argument("--width", type=integer(1))
    parser.add_argument("--frames", type=integer(1), help="number of frames (video pipelines)")
    parser.add_argument("--seed", type=integer(0), default=0)
    parser.add_argument("--first-blocks", type=integer(0), default=0,
                        help="blocks kept out of the cached span at the start")
    parser.add_argument("--last-blocks", type=integer(0), default=0, help="blocks kept out of the cached span at the end")
    parser.add_argument("--budget", type=integer(1),
                        help="with --cache fixed: how many of the --steps steps compute (the rest are forecast)")
    parser.add_argument("--forecast", default="taylorseer", choices=FORECASTS,
                        help="with --cache fixed: the forecast searched for; 'fitted' searches for TaylorSeer, then "
                             "fits the fitted forecast's weights on the schedule found")
    parser.add_argument("--order", type=integer(1, 2), default=2, help="with --cache fixed: the forecast's order")
    parser.add_argument("--schedule", metavar="ARTIFACT",
                        help="with --forecast fitted: fit on this fixed artifact's compute steps instead of searching")
    parser.add_argument("--residuals", type=integer(1, 8), default=3,
                        help="with --forecast fitted: computed residuals the forecast weighs (default 3)")
    parser.add_argument("--inputs", type=integer(0, 8), default=2,
                        help="with --forecast fitted: span-input moves the forecast weighs (default 2)")
    parser.add_argument("--seeds", type=integer(1), default=1,
                        help="with --cache fixed: noise draws scored per prompt (default 1)")
    parser.add_argument("--max-evaluations", type=integer(1), default=80,
                        help="with --cache fixed: at most this many masks tried (one generation per prompt each)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=integer(1), help="CPU threads (default: the cores not already busy)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on GPU, float32 on CPU")
    return parser


def _prompts(args: argparse.Namespace) -> List[str]:
    if args.prompts < 1:
        raise ValueError(f"--prompts must be at least 1, got {args.prompts}")
    if args.model == "reference" and not args.prompt_file:
        from accel.pipelines.reference.data import training_captions

        return training_captions(args.prompts)
    pool = list(DEFAULT_PROMPTS)
    if args.prompt_file:
        with open(args.prompt_file) as fh:
            pool = [line.strip() for line in fh if line.strip()]
        if not pool:
            raise ValueError(f"{args.prompt_file} holds no prompts")
    return [pool[i % len(pool)] for i in range(args.prompts)]


def _load_pipeline(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    if args.model.startswith("tiny:"):
        from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

        family = args.model.split(":", 1)[1]
        kwargs = tiny_call_kwargs(family, seed=args.seed, steps=args.steps)
        kwargs.pop("prompt", None)
        return build_tiny_pipeline(family, seed=args.seed), kwargs
    if args.model == "reference":
        from accel.pipelines.reference.build import REFERENCE_DEFAULTS, load_reference_pipeline

        pipe = load_reference_pipeline(args.weights, device=args.device or "cpu")
        pipe.set_progress_bar_config(disable=True)
        kwargs = {k: v for k, v in REFERENCE_DEFAULTS.items() if k not in ("prompt", "seed", "num_inference_steps")}
        kwargs["generator"] = torch.Generator(device=args.device or "cpu").manual_seed(args.seed)
        return pipe, kwargs
    from accel.pipelines.loading import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device != "cpu" else "float32"))
    pipe = load_pipeline(args.model, "--model", dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs: Dict[str, Any] = {"generator": torch.Generator(device=device).manual_seed(args.seed)}
    return pipe, kwargs


def _search_schedule(args: argparse.Namespace, pipe: Any, prompts: List[str],
                     call_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    from .schedule_search import search_schedule

    if args.first_blocks or args.last_blocks:
        raise ValueError("--cache fixed searches whole-step schedules; --first-blocks/--last-blocks do not apply")
    if args.schedule and args.forecast != "fitted":
        raise ValueError("--schedule goes with --forecast fitted (it fits weights on a given schedule)")
    return search_schedule(pipe, prompts, args.steps, args.budget, forecast=args.forecast, order=args.order,
                           call_kwargs=call_kwargs, seed=args.seed, seeds=args.seeds, max_evaluations=args.max_evaluations,
                           schedule=args.schedule, residuals=args.residuals, inputs=args.inputs, out=args.out,
                           log=lambda message: print(f"[calibrate fixed] {message}", flush=True))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    try:
        if args.weights and args.model != "reference":
            raise ValueError("--weights goes with --model reference (other models are named by --model)")
        prompts = _prompts(args)
        pipe, call_kwargs = _load_pipeline(args)
        for option, key in (("height", "height"), ("width", "width"), ("frames", "num_frames")):
            if getattr(args, option) is not None:
                call_kwargs[key] = getattr(args, option)
        if args.cache == "fixed":
            artifact = _search_schedule(args, pipe, prompts, call_kwargs)
        else:
            calibrate = calibrate_teacache if args.cache == "teacache" else calibrate_magcache
            artifact = calibrate(pipe, prompts, args.steps, call_kwargs=call_kwargs, first_blocks=args.first_blocks,
                                 last_blocks=args.last_blocks, out=args.out)
    except (ValueError, OSError) as exc:
        print(f"accel calibrate: error: {exc}", file=sys.stderr)
        return 2
    detail = {"teacache": lambda: f"coefficients {['%.4g' % c for c in artifact['coefficients']]}",
              "magcache": lambda: f"ratios for branches {sorted(artifact['ratios'])}",
              "fixed": lambda: _describe_fixed(artifact)}[args.cache]()
    print(f"accel calibrate: {args.cache} for {artifact['model_class']} at {args.steps} steps, "
          f"{len(prompts)} prompt(s): {detail} -> {args.out}")
    return 0


def _describe_fixed(artifact: Dict[str, Any]) -> str:
    search = artifact["search"]
    text = f"compute steps {artifact['compute_steps']}"
    if "score_db" in search:
        text += f" ({search['score_db']} dB against dense; evenly spaced: {search['start_score_db']} dB)"
    if artifact["forecast"] == "fitted":
        fitted = sum(len(steps) for steps in artifact["weights"]["branches"].values())
        text += (f", fitted forecast weights for {fitted} (step, branch) pairs, share {artifact['fit']['share']} of the "
                 "fit kept (TaylorSeer's weights for the rest)")
    return text


if __name__ == "__main__":
    sys.exit(main())
