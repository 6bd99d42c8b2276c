"""Judge the reference model on the held-out prompts.

    python -m accel.pipelines.reference.evaluate [--weights DIR] [--steps N] [--limit K] [--out FILE]

Generates one video per held-out prompt (prompt ``i`` always uses seed
``seed + i``, whatever the batching) and reports, with the judge of
``judge.py``:

- ``prompt_accuracy``: shape, colour and motion all recognised as prompted;
- per-attribute accuracy;
- ``reference_fvd``: Frechet distance between judge features of the generated
  videos and of real procedural clips of the same prompts, next to
  ``real_vs_real_fd`` (two independent real sets) as the noise floor.

These are domain metrics for this toy domain, not FID/FVD.  Pass the same
arguments to compare an accelerated pipeline with the baseline
(``accel.patch(pipe, ...)`` before calling :func:`evaluate`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from accel.base.cli_args import integer, set_threads
from accel.pipelines.reference import data
from accel.pipelines.reference import judge as J
from accel.pipelines.reference.build import REFERENCE_DEFAULTS, load_reference_pipeline


def generate_videos(pipe, specs, steps=None, guidance=None, seed=None, batch_size=8, **kwargs) -> torch.Tensor:
    """(N, T, 3, H, W) float videos in [0, 1], one per spec."""
    steps = steps or REFERENCE_DEFAULTS["num_inference_steps"]
    guidance = REFERENCE_DEFAULTS["guidance_scale"] if guidance is None else guidance
    seed = REFERENCE_DEFAULTS["seed"] if seed is None else seed
    size = {k: kwargs.pop(k, REFERENCE_DEFAULTS[k]) for k in ("height", "width", "num_frames")}
    device = pipe._execution_device
    out = []
    for start in range(0, len(specs), batch_size):
        chunk = specs[start:start + batch_size]
        gens = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        res = pipe(prompt=[data.caption(s) for s in chunk], negative_prompt=[""] * len(chunk),
                   num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pt", **size, **kwargs)
        out.append(res.frames.float().cpu())
    return torch.cat(out)


def real_videos(specs, per_spec: int = 1, seed: int = 0, **size) -> tuple[torch.Tensor, list]:
    rep = [s for s in specs for _ in range(per_spec)]
    frames = size.get("num_frames", data.NUM_FRAMES)
    clips = data.make_batch(rep, frames, size.get("height", data.HEIGHT), size.get("width", data.WIDTH),
                            generator=torch.Generator().manual_seed(seed))
    return clips, rep


@torch.no_grad()
def heldout_report(pipe, specs, guidance_scales, steps, batch_size=64, samples=None, log=print, **size) -> dict:
    """Judge ``specs`` generated at each guidance scale (what train.py logs); optionally
    keep the videos (uint8 npz) for later study.  Skipped if no judge is shipped."""
    try:
        judge = J.load_judge()
    except FileNotFoundError as e:
        judge, out = None, {"judge": f"skipped: {e}"}
    else:
        out = {}
    saved = {}
    for cfg in guidance_scales:
        vids = generate_videos(pipe, specs, steps, cfg, batch_size=batch_size, **size)
        saved[f"cfg{cfg:g}"] = (vids.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        if judge is not None:
            acc = J.attribute_accuracy(vids, specs, judge)
            acc["prompt"] = J.prompt_accuracy(vids, specs, judge)
            out[f"cfg{cfg:g}"] = acc
            log(f"held-out prompts ({len(specs)}), guidance {cfg:g}: {acc}")
    if samples:
        import numpy as np

        np.savez_compressed(samples, specs=data.specs_to_tensor(specs).numpy(), **saved)
        log(f"  samples written to {samples}")
    return out


def evaluate(pipe, limit: int | None = None, steps: int | None = None, guidance: float | None = None,
             seed: int | None = None, batch_size: int = 8, real_per_spec: int = 4) -> dict:
    specs = data.held_out_specs()[:limit] if limit else data.held_out_specs()
    t = time.time()
    videos = generate_videos(pipe, specs, steps, guidance, seed, batch_size)
    gen_seconds = time.time() - t
    judge = J.load_judge()
    acc = J.attribute_accuracy(videos, specs, judge)
    real_a, _ = real_videos(specs, real_per_spec, seed=1)
    real_b, _ = real_videos(specs, real_per_spec, seed=2)
    f_gen, f_a, f_b = (J.judge_features(v, judge) for v in (videos, real_a, real_b))
    return {
        "prompts": len(specs),
        "steps": steps or REFERENCE_DEFAULTS["num_inference_steps"],
        "guidance_scale": REFERENCE_DEFAULTS["guidance_scale"] if guidance is None else guidance,
        "prompt_accuracy": J.prompt_accuracy(videos, specs, judge),
        "attribute_accuracy": acc,
        "reference_fvd": J.frechet_distance(f_gen, f_a),
        "real_vs_real_fd": J.frechet_distance(f_b, f_a),
        "generation_seconds": round(gen_seconds, 1),
        "note": "domain metrics from the toy-domain judge; not FID/FVD",
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate the reference pipeline on held-out prompts.")
    ap.add_argument("--weights", default=None, help="pipeline directory (default: the shipped weights)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first K held-out prompts")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=integer(1), help="CPU threads (default: the cores not already busy)")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    set_threads(args.threads)
    pipe = load_reference_pipeline(args.weights, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    result = evaluate(pipe, args.limit, args.steps, args.guidance, args.seed, args.batch_size)
    result["weights"] = args.weights or "shipped"
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
