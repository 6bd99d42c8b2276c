"""Fit DSS learned solvers (``solvers/learned.py``) for a Wan-like flow pipeline.

``accel calibrate --solver dss --steps 4 6 8 10 --model reference --out dss-{steps}.json``

1. Teacher: the same model (with the pipeline's CFG) integrated by Euler with many steps on the
   model's shifted schedule, from fixed noises (prompts x seeds); its endpoints are the targets.
2. Student: n steps with learned sigmas (a softmax over n step fractions, so the schedule always
   runs 1 -> 0 monotonically) and a lower-triangular velocity-mixing matrix c, initialised to
   Euler on the shifted n-step schedule (c = 0). Adam on the mean squared endpoint error,
   backpropagating through the frozen transformer (its inputs depend on the sigmas).
3. The artifact keeps whichever of (Euler init, fitted) has the lower endpoint error over all
   pairs, and records both errors, so a search can never ship a solver worse than its start.

Deterministic given ``seed``: noises, minibatch order and initialisation all derive from it, and
CPU kernels are deterministic at a fixed thread count. Teacher trajectories are shared by every
step count of one run. The velocity field is built from the pipeline's components
(``encode_prompt``, ``prepare_latents``, ``transformer(hidden_states, timestep,
encoder_hidden_states)``, ``transformer_2`` below ``boundary_ratio``): any WanPipeline-like
pipeline works, including the trained reference model.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from accel.base.adapter import config_fingerprint
from accel.base.cli_args import check_output_file, integer, number, set_threads
from accel.solvers.learned import DSSArtifact, dss_velocity

TINY_PROMPTS = (
    "a red fox runs through the snowy forest at sunset",
    "a white cat sits in the grass near the river",
    "a blue car drives on the city street at night",
    "a black horse walks on the beach at sunrise",
)


@dataclass
class SearchOptions:
    prompts: Sequence[str]
    negative_prompt: str = ""
    seeds_per_prompt: int = 1
    teacher_steps: int = 32
    iterations: int = 60
    lr: float = 0.05
    batch_size: int = 4
    seed: int = 0
    guidance_scale: float = 5.0
    guidance_scale_2: Optional[float] = None  # Wan 2.2 low-noise expert; default: guidance_scale
    height: int = 480
    width: int = 832
    num_frames: int = 81
    max_sequence_length: int = 512
    shift: Optional[float] = None  # default: the pipeline scheduler's flow shift

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("SearchOptions.prompts must not be empty")
        for name in ("seeds_per_prompt", "teacher_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations < 0 or self.lr <= 0:
            raise ValueError("SearchOptions.iterations must be >= 0 and lr > 0")


class WanFlow:
    """The guided velocity v(x, sigma) of a WanPipeline-like pipeline, differentiable in x and sigma."""

    def __init__(self, pipe, options: SearchOptions):
        self.pipe, self.options = pipe, options
        self.models = [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]
        if not self.models or not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "prepare_latents"):
            raise ValueError(f"the DSS search needs a WanPipeline-like pipeline (transformer, encode_prompt, "
                             f"prepare_latents); got {type(pipe).__name__}")
        config = pipe.scheduler.config
        if config.get("use_dynamic_shifting", False) and options.shift is None:
            raise ValueError("the pipeline's scheduler shifts dynamically (needs mu); pass --shift")
        self.shift = float(options.shift if options.shift is not None else config.get("flow_shift", config.get("shift", 1.0)))
        self.num_train = int(config.get("num_train_timesteps", 1000))
        ratio = pipe.config.get("boundary_ratio", None) if hasattr(pipe, "config") else None
        self.boundary = ratio * self.num_train if ratio is not None and len(self.models) > 1 else None
        self.device = self.models[0].device
        self.dtype = self.models[0].dtype
        with torch.no_grad():
            self.cond, self.uncond = pipe.encode_prompt(
                prompt=list(options.prompts), negative_prompt=[options.negative_prompt] * len(options.prompts),
                do_classifier_free_guidance=options.guidance_scale > 1.0, max_sequence_length=options.max_sequence_length,
                device=self.device)

    def noise(self, seed: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        o = self.options
        return self.pipe.prepare_latents(1, self.models[0].config.in_channels, o.height, o.width, o.num_frames,
                                         torch.float32, self.device, generator)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        t = sigma * self.num_train
        low = self.boundary is not None and float(t) < self.boundary  # Wan 2.2: the low-noise expert
        model = self.models[1] if low else self.models[0]
        scale = (self.options.guidance_scale_2 or self.options.guidance_scale) if low else self.options.guidance_scale
        timestep = t.reshape(1).expand(x.shape[0]).to(device=self.device, dtype=self.dtype)
        cond = self.cond[prompt_index]
        if self.uncond is None or self.options.guidance_scale <= 1.0:
            return model(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=cond,
                         return_dict=False)[0].float()
        both = model(hidden_states=torch.cat([x, x]).to(self.dtype), timestep=torch.cat([timestep, timestep]),
                     encoder_hidden_states=torch.cat([cond, self.uncond[prompt_index]]), return_dict=False)[0].float()
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    def shifted(self, n: int) -> torch.Tensor:
        """The model's own n-step schedule (sigma 1 -> 0, shifted), float64."""
        u = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        return self.shift * u / (1 + (self.shift - 1) * u)


@contextlib.contextmanager
def _frozen(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """No parameter gradients during the search (only the solver's numbers learn); restored after."""
    saved = [[p.requires_grad for p in m.parameters()] for m in models]
    for m in models:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, flags in zip(models, saved):
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def rollout(flow: WanFlow, x: torch.Tensor, prompt_index: torch.Tensor, sigmas: torch.Tensor,
            coefficients: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1]: Euler, or DSS when ``coefficients`` (n x n) is given."""
    history: List[torch.Tensor] = []
    # The solver's numbers live on the CPU; copies on the model's device keep every op on one
    # device (the copies are differentiable, so the gradients still reach the CPU leaves).
    steps = (sigmas[1:] - sigmas[:-1]).float().to(x.device)
    if coefficients is not None:
        coefficients = coefficients.to(x.device)
    for i in range(len(sigmas) - 1):
        v = flow.velocity(x, sigmas[i], prompt_index)
        if coefficients is not None:
            history.append(v)
            v = dss_velocity(history, coefficients[i])
        x = x + steps[i] * v
    return x


def _student_sigmas(logits: torch.Tensor) -> torch.Tensor:
    fractions = torch.softmax(logits, dim=0)
    inner = 1.0 - torch.cumsum(fractions, dim=0)[:-1]
    return torch.cat([logits.new_ones(1), inner, logits.new_zeros(1)])


def _endpoint_mse(flow: WanFlow, pairs, sigmas, coefficients, batch_size: int) -> float:
    noise, target, prompt_index = pairs
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(noise), batch_size):
            sl = slice(start, start + batch_size)
            out = rollout(flow, noise[sl], prompt_index[sl], sigmas, coefficients)
            total += float(((out - target[sl]) ** 2).sum())
    return total / target.numel()


def teacher_pairs(flow: WanFlow, options: SearchOptions):
    """(noise, teacher endpoint, prompt index) for every prompt x seed."""
    prompt_index = torch.arange(len(options.prompts)).repeat_interleave(options.seeds_per_prompt)
    seeds = [options.seed * 100_003 + k for k in range(len(prompt_index))]
    noise = torch.cat([flow.noise(s) for s in seeds])
    sigmas = flow.shifted(options.teacher_steps)
    with torch.no_grad():
        target = torch.cat([rollout(flow, noise[k:k + options.batch_size], prompt_index[k:k + options.batch_size], sigmas)
                            for k in range(0, len(noise), options.batch_size)])
    return noise, target, prompt_index


def fit_dss(flow: WanFlow, steps: int, pairs, options: SearchOptions) -> DSSArtifact:
    """Fit one n-step DSS solver on precomputed teacher ``pairs``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    started, cpu_started = time.time(), time.process_time()
    init = flow.shifted(steps)
    logits = torch.log(init[:-1] - init[1:]).float().requires_grad_(True)
    coefficients = torch.zeros(steps, steps, requires_grad=True)
    mask = torch.ones(steps, steps).tril(-1)  # c_ij for j < i only
    optimizer = torch.optim.Adam([logits, coefficients], lr=options.lr)
    noise, target, prompt_index = pairs
    order = torch.Generator("cpu").manual_seed(options.seed)
    batch = min(options.batch_size, len(noise))
    for _ in range(options.iterations):
        pick = torch.randperm(len(noise), generator=order)[:batch]
        out = rollout(flow, noise[pick], prompt_index[pick], _student_sigmas(logits), coefficients * mask)
        loss = ((out - target[pick]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fitted_sigmas = _student_sigmas(logits.detach()).double()
    fitted_coefficients = (coefficients * mask).detach()
    euler_mse = _endpoint_mse(flow, pairs, init, None, batch)
    fitted_mse = _endpoint_mse(flow, pairs, fitted_sigmas, fitted_coefficients, batch)
    improved = fitted_mse < euler_mse
    sigmas = fitted_sigmas if improved else init
    rows = fitted_coefficients if improved else torch.zeros(steps, steps)
    fit = {"teacher": "euler", "teacher_steps": options.teacher_steps, "prompts": len(options.prompts),
           "samples": len(noise), "iterations": options.iterations, "lr": options.lr, "batch_size": batch,
           "seed": options.seed, "guidance_scale": options.guidance_scale, "shift": flow.shift,
           "size": [options.num_frames, options.height, options.width],
           "endpoint_mse": {"euler": euler_mse, "dss": min(fitted_mse, euler_mse)}, "improved": improved,
           "wall_seconds": round(time.time() - started, 2), "cpu_seconds": round(time.process_time() - cpu_started, 2)}
    sigma_list = [float(s) for s in sigmas[:-1]] + [0.0]
    return DSSArtifact(model_class=type(flow.models[0]).__name__, model_fingerprint=config_fingerprint(flow.models),
                       steps=steps, sigmas=tuple(sigma_list),
                       coefficients=tuple(tuple(float(c) for c in rows[i, :i]) for i in range(steps)), fit=fit)


def search(pipe, steps: Sequence[int], options: SearchOptions) -> Dict[int, DSSArtifact]:
    """One artifact per step count; the teacher runs once for all of them."""
    flow = WanFlow(pipe, options)
    with _frozen(flow.models):
        started = time.process_time()
        pairs = teacher_pairs(flow, options)
        teacher_cpu = round(time.process_time() - started, 2)
        artifacts = {}
        for n in steps:
            artifact = fit_dss(flow, n, pairs, options)
            artifact.fit["teacher_cpu_seconds"] = teacher_cpu
            artifacts[n] = artifact
    return artifacts


# -- command line (``accel calibrate --solver dss`` forwards here) --------------------------------

def load_model(spec: str, weights: Optional[str] = None):
    """(pipeline, default SearchOptions fields) for ``tiny:wan``, ``tiny:wan22``, ``reference`` (the shipped
    weights, or ``weights``: another trained reference run) or a folder."""
    if spec.startswith("tiny:"):
        from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

        family = spec.split(":", 1)[1]
        if family not in ("wan", "wan22"):
            raise ValueError(f"--model tiny:{family}: the DSS search supports Wan-like pipelines (tiny:wan, tiny:wan22)")
        kwargs = tiny_call_kwargs(family)
        defaults = dict(prompts=TINY_PROMPTS, negative_prompt=kwargs["negative_prompt"], height=kwargs["height"],
                        width=kwargs["width"], num_frames=kwargs["num_frames"], guidance_scale=kwargs["guidance_scale"],
                        guidance_scale_2=kwargs.get("guidance_scale_2"), max_sequence_length=kwargs["max_sequence_length"])
        return build_tiny_pipeline(family), defaults
    if spec == "reference":
        from accel.pipelines.reference.build import REFERENCE_DEFAULTS, load_reference_pipeline
        from accel.pipelines.reference import data

        specs = data.random_specs(32, torch.Generator("cpu").manual_seed(0))  # training combinations only
        prompts = tuple(data.caption(data.spec_from_index(s)) for s in specs)
        defaults = {k: REFERENCE_DEFAULTS[k] for k in ("negative_prompt", "height", "width", "num_frames", "guidance_scale")}
        return load_reference_pipeline(weights), dict(defaults, prompts=prompts)
    from accel.pipelines.loading import load_pipeline

    return load_pipeline(spec, "--model"), dict(prompts=TINY_PROMPTS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel calibrate", description="Fit a learned DSS solver for a flow pipeline.")
    p.add_argument("--solver", default="dss", choices=["dss"])
    p.add_argument("--steps", type=integer(1, 1000), nargs="+", required=True, help="step count(s) to fit, e.g. 4 6 8 10")
    p.add_argument("--model", default="reference", help="tiny:wan, tiny:wan22, reference, or a local pipeline folder")
    p.add_argument("--out", required=True, help="artifact path; with several --steps it must contain {steps}")
    p.add_argument("--weights", help="with --model reference: a trained reference run's folder (default: shipped)")
    # The same names as `accel calibrate --cache` and the benches: --prompts counts, --prompt-file lists.
    p.add_argument("--prompt-file", help="text file with one prompt per line (default: the model's built-in list)")
    p.add_argument("--prompts", type=integer(1), help="use only the first N prompts")
    p.add_argument("--seeds-per-prompt", type=integer(1))
    p.add_argument("--teacher-steps", type=integer(1, 1000))
    p.add_argument("--iterations", type=integer(0))
    p.add_argument("--lr", type=number(0, low_inclusive=False))
    p.add_argument("--batch-size", type=integer(1))
    p.add_argument("--seed", type=integer(0))
    p.add_argument("--guidance-scale", type=number(0))
    p.add_argument("--shift", type=number(0, low_inclusive=False))
    p.add_argument("--height", type=integer(1))
    p.add_argument("--width", type=integer(1))
    p.add_argument("--frames", dest="num_frames", type=integer(1))
    p.add_argument("--device", default="cpu", help="run the model here (cuda: a minutes-long search takes seconds)")
    p.add_argument("--threads", type=integer(1), help="CPU threads (default: the cores not already busy)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    try:
        if len(args.steps) > 1 and "{steps}" not in args.out:
            raise ValueError("with several --steps, --out must contain {steps}, e.g. dss-{steps}.json")
        for n in args.steps:  # every artifact path is writable before a search of minutes starts
            try:
                check_output_file(args.out.format(steps=n), "--out")
            except (KeyError, IndexError):
                raise ValueError(f"--out {args.out!r}: {{steps}} is the only field it may hold") from None
        if args.weights and args.model != "reference":
            raise ValueError("--weights goes with --model reference (other models are named by --model)")
        pipe, fields = load_model(args.model, args.weights)
        pipe.to(args.device)
        if args.prompt_file:
            with open(args.prompt_file) as f:
                fields["prompts"] = tuple(line.strip() for line in f if line.strip())
        if args.prompts:
            fields["prompts"] = tuple(fields["prompts"])[:args.prompts]
        names = {f.name for f in dataclasses.fields(SearchOptions)}
        fields.update({k: v for k, v in vars(args).items() if k in names and k != "prompts" and v is not None})
        options = SearchOptions(**fields)
        for n, artifact in search(pipe, args.steps, options).items():
            path = args.out.format(steps=n)
            artifact.save(path)
            mse = artifact.fit["endpoint_mse"]
            print(f"dss {n} steps: endpoint mse {mse['dss']:.4g} (euler {mse['euler']:.4g}), "
                  f"{artifact.parameter_count} parameters, {artifact.fit['cpu_seconds']} cpu s -> {path}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"accel calibrate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
