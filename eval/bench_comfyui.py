"""``accel bench comfyui``: the nodes on a native Wan in a real ComfyUI, against the unpatched model.

    accel bench comfyui --comfyui DIR --json OUT [--family wan] [--steps 8] [--layers N]
                        [--latent B,C,T,H,W] [--repeats 3] [--rows quality balanced fast dense tile_window]

ComfyUI is an application, not a package: ``--comfyui`` is its folder (its Python must have its
requirements). The model is a random-weight native model of ``--family`` (ComfyUI's own class,
128 wide: ``accel.comfyui.tiny``, ``--layers`` blocks, or for Flux and HunyuanVideo that many
double and single blocks) loaded as "Load Diffusion Model" loads it and sampled through
``comfy.sample.sample`` (KSampler's path: Euler, the family's CFG, the same noise and conditioning
for every row) at its large latent (1,024 visual tokens) unless ``--latent`` says otherwise. Each
row is one preset of ``AccelPatchModel`` (``tile_window``: the ``AccelAttention`` node at density
0.3) and reports ``steps_skipped`` per CFG branch (calls whose cached blocks were skipped, of all
calls), ``compute_fraction`` (blocks run / dense), ``attention`` counters, ``speedup`` (unpatched /
patched median, timed in turns after one untimed run: ``accel.eval.timing``) and ``latent_psnr``
(dB, against the unpatched model's latent; the peak is that latent's range, 100 means identical).
No VAE decodes here: the latent is the output.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from accel.base.cli_args import integer, output_path
from accel.eval.quality_bench import environment, write_result
from accel.eval.timing import interleaved
from accel.comfyui.tiny import TINY_MODELS

ROWS = {  # row name -> (node, node inputs)
    "quality": ("AccelPatchModel", {"preset": "quality"}),
    "balanced": ("AccelPatchModel", {"preset": "balanced"}),
    "fast": ("AccelPatchModel", {"preset": "fast"}),
    "dense": ("AccelPatchModel", {"preset": "dense"}),
    "tile_window": ("AccelAttention", {"attention": "tile_window", "density": 0.3}),
}
MAX_PSNR = 100.0


def latent_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,C,T,H,W integers, got {text!r}") from None
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B,C,T,H,W (or B,C,H,W for images), every size >= 1, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel bench comfyui", description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True, help="the ComfyUI folder (with main.py and comfy/)")
    p.add_argument("--json", dest="json_path", type=output_path, default=None, help="write the result here")
    p.add_argument("--steps", type=integer(2, 200), default=8)
    p.add_argument("--family", choices=list(TINY_MODELS), default="wan", help="which native model")
    p.add_argument("--layers", type=integer(1, 64), default=None, help="blocks (default: the tiny model's)")
    p.add_argument("--latent", type=latent_shape, default=None, help="the latent's shape (default: the family's "
                                                                        "large one)")
    p.add_argument("--repeats", type=integer(1, 50), default=3, help="timed turns of each row and the baseline")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    return p


def latent_psnr(reference: torch.Tensor, out: torch.Tensor) -> float:
    mse = float((reference.double() - out.double()).pow(2).mean())
    peak = float(reference.max() - reference.min())
    return MAX_PSNR if mse == 0.0 else min(MAX_PSNR, 10.0 * torch.log10(torch.tensor(peak * peak / mse)).item())


def row_result(name: str, report: Dict[str, Any], reference: torch.Tensor, out: torch.Tensor, timing) -> Dict[str, Any]:
    row: Dict[str, Any] = {"row": name, "node": ROWS[name][0], "inputs": ROWS[name][1]}
    cache = report["methods"].get("cache")
    if cache:
        counters = cache["counters"]
        row["cache"] = cache["name"]
        row["steps_skipped"] = {b: f"{counters['steps_reused'][b]}/{counters['calls'][b]}" for b in counters["calls"]}
        row["compute_fraction"] = counters["compute_fraction"]
    attention = report["methods"].get("attention")
    if attention:
        counters = attention["counters"]
        row["attention"] = {"method": attention["name"], **{k: counters.get(k) for k in
                                                            ("calls", "sparse_calls", "fallback_calls", "mean_density")}}
    row["latent_psnr"] = round(latent_psnr(reference, out), 2)
    row.update(timing.as_dict())
    row["warnings"] = report["warnings"]
    return row


def run(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    from accel.comfyui.runtime import use_comfyui

    use_comfyui(args.comfyui)
    import comfy.sd

    from accel.comfyui.host import HOLDER_KEY
    from accel.comfyui.nodes import patch
    from accel.comfyui.tiny import load_tiny, sample_family, save_tiny

    tiny = TINY_MODELS[args.family]
    with tempfile.TemporaryDirectory() as folder:
        model = load_tiny(args.family, save_tiny(args.family, os.path.join(folder, "model.safetensors"),
                                                 layers=args.layers))
    latent = args.latent or tiny.shapes["large"]
    if len(latent) != len(tiny.shapes["large"]) or latent[1] != tiny.shapes["large"][1]:
        raise ValueError(f"--latent {','.join(map(str, latent))} does not fit {args.family}: its latents are "
                         f"{len(tiny.shapes['large'])}-D with {tiny.shapes['large'][1]} channels")
    def run_sample(m):
        return sample_family(m, args.family, steps=args.steps, size=latent)
    run_base = lambda: run_sample(model)  # noqa: E731
    reference = run_base()
    rows: List[Dict[str, Any]] = []
    for name in args.rows:
        node, inputs = ROWS[name]
        patched = patch(node, model, **inputs)
        holder = patched.model_options["transformer_options"][HOLDER_KEY]
        run_sample(patched)  # untimed: the first call of a method may compile (FlexAttention) or warm caches
        _, out, timing = interleaved(run_base, lambda: run_sample(patched), args.repeats)
        rows.append(row_result(name, holder.reports[0], reference, out, timing))
        log(format_row(rows[-1]))
    unchanged = torch.equal(run_base(), reference)
    import comfyui_version

    return {"what": f"accel's ComfyUI nodes on a random-weight native {args.family} model, against the unpatched "
                    "model (same seed)",
            "environment": {**environment(), "comfyui": comfyui_version.__version__},
            "workload": {"model": f"{tiny.cls}, 128 wide, {args.layers or tiny.layers} blocks (see accel.comfyui.tiny), "
                                  "random weights", "latent": list(latent), "visual_tokens": tiny.tokens("large")
                         if args.latent is None else None, "steps": args.steps, "sampler": "euler", "cfg": tiny.cfg,
                         "cond_uncond": "batched (KSampler)" if tiny.cfg != 1.0 else "cond only (CFG 1)"},
            "unpatched_rerun_identical": unchanged, "rows": rows}


def format_row(row: Dict[str, Any]) -> str:
    skipped = ", ".join(f"{b} {v}" for b, v in row.get("steps_skipped", {}).items()) or "-"
    attention = row.get("attention")
    density = f", density {attention['mean_density']}" if attention and attention.get("mean_density") else ""
    return (f"{row['row']:9s} skipped {skipped:18s} speedup {row['speedup']:.2f}x "
            f"[{row['speedup_spread'][0]:.2f}, {row['speedup_spread'][1]:.2f}]  latent PSNR {row['latent_psnr']:.1f} dB"
            + density)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, ImportError) as exc:
        print(f"accel bench comfyui: error: {exc}", file=sys.stderr)
        return 2
    write_result(args.json_path, result)
    if args.json_path:
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
