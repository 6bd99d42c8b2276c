"""``accel distill``: fine-tune a flow-matching transformer into a few-step flow-map student.

    accel distill --teacher reference|tiny:wan|PATH --steps 2 4 --out DIR [--lora RANK]
                  [--guidance G] [--attention PATTERN] [--iterations N] ...

Data-free: the teacher's own guided ODE trajectories (``distill/trajectories.py``, generated once
and cached in ``DIR/trajectories``) are the data. The student is the teacher's class, told its
target time r through the family's ``TargetTimeInputs`` (Decoupled MeanFlow: the last ``r_blocks``
blocks and the head see r), and regresses the teacher's flow map: for two states z_a, z_b of one
trajectory (sigma_a > sigma_b) the exact average velocity is (z_a - z_b) / (sigma_a - sigma_b),
so u(z_a, sigma_b, sigma_a) is fitted to it with a mean squared error. That target needs no JVP
(MeanFlow) and no bootstrapping from the student's own predictions (SplitMeanFlow's interval
consistency): the trajectories already hold the integral. Most pairs are the jumps the student
will take (each step count's grid of teacher indices); the rest are any two teacher states, so
the student stays a flow map between its grid points. The teacher's states are guided, so the
student needs one branch (guidance distillation). With ``rollout_fraction`` > 0, that share of the
jumps after a student's first starts where the student's own previous jump lands (no gradient
through it) and is fitted to the same teacher state: a sampling student starts its later jumps
from its own states, not the teacher's, and this teaches it to bring its drift back.

A run continued with other training options (learning rate, batch size, pair mix) is a new phase,
recorded in the artifact; options that define the student (step counts, guidance, ``r_blocks``,
LoRA rank, attention, seed) must match the checkpoint's.

Training is ``accelerate``-aware (one process on CPU or GPU; under ``accelerate launch`` each
process records its share of the trajectories and trains on its own pairs, with the gradients
averaged by accelerate). ``DIR/checkpoint.pt`` is written every ``save_every`` iterations and an
interrupted run continues from it; ``DIR/loss.csv`` logs every iteration's loss.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from accel.base.cli_args import integer, number, output_folder, set_threads
from accel.base.config import check_range

from .trajectories import cached_trajectories, grid_indices, per_row, sample_pairs, student_call, student_jump


@dataclass(frozen=True)
class DistillOptions:
    steps: Tuple[int, ...] = (2, 4)
    prompts: Tuple[str, ...] = ()
    call_kwargs: Dict[str, Any] = field(default_factory=dict)  # pipeline arguments (size, negative prompt)
    guidance: float = 1.0
    teacher_steps: int = 50
    seeds_per_prompt: int = 1
    iterations: int = 400
    batch_size: int = 4
    lr: float = 1e-4
    grid_fraction: float = 0.75  # share of pairs that are the student's own jumps
    rollout_fraction: float = 0.0  # share of later jumps that start from the student's own previous jump
    r_blocks: Optional[int] = None  # default: a quarter of the blocks, at least one
    lora_rank: Optional[int] = None  # None: every weight is fine-tuned
    attention: Optional[str] = None  # an attention method active while training (sparsity-aware)
    seed: int = 0
    save_every: int = 50

    def __post_init__(self) -> None:
        owner = "DistillOptions"
        if not self.steps:
            raise ValueError(f"{owner}.steps must name at least one step count")
        for n in self.steps:
            check_range(owner, "steps", n, 1, self.teacher_steps, integer=True)
        object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))
        if not self.prompts:
            raise ValueError(f"{owner}.prompts must hold at least one prompt")
        check_range(owner, "guidance", self.guidance, 0, None, low_inclusive=False)
        check_range(owner, "teacher_steps", self.teacher_steps, 1, 1000, integer=True)
        for name in ("seeds_per_prompt", "batch_size", "save_every"):
            check_range(owner, name, getattr(self, name), 1, None, integer=True)
        check_range(owner, "iterations", self.iterations, 0, None, integer=True)
        check_range(owner, "lr", self.lr, 0, None, low_inclusive=False)
        check_range(owner, "grid_fraction", self.grid_fraction, 0, 1)
        check_range(owner, "rollout_fraction", self.rollout_fraction, 0, 1)
        if self.r_blocks is not None:
            check_range(owner, "r_blocks", self.r_blocks, 1, None, integer=True)
        if self.lora_rank is not None:
            check_range(owner, "lora_rank", self.lora_rank, 1, None, integer=True)

    def resume_key(self) -> Dict[str, Any]:
        """What a checkpoint must share with these options to be continued by them: what the
        student is. How it is trained (``PHASE_OPTIONS``) may change on resume, as a new phase."""
        kept = ("steps", "guidance", "teacher_steps", "r_blocks", "lora_rank", "attention", "seed")
        return {name: getattr(self, name) for name in kept}

    def phase(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in PHASE_OPTIONS}


PHASE_OPTIONS = ("batch_size", "lr", "grid_fraction", "rollout_fraction")


def linear_targets(model: torch.nn.Module, adapter: Any) -> List[str]:
    """Names of every linear layer inside the block stacks: where LoRA factors go."""
    names = []
    stacks = {id(block) for stack in adapter.block_stacks(model) for block in stack.blocks}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(id(m) in stacks for m in _parents(model, name)):
            names.append(name)
    return names


def _parents(model: torch.nn.Module, name: str) -> List[torch.nn.Module]:
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def distill_flow_map(pipe: Any, options: DistillOptions, out: str, *, teacher: str = "", command: str = "",
                     log: Callable[[str], None] = print, progress: bool = True) -> str:
    """Distill ``pipe.transformer`` into a student saved in ``out`` (``flowmap.json`` and its
    weights); returns the artifact's path. The pipeline's own transformer is left as it was."""
    from accelerate import Accelerator

    from accel.api import adapter_for
    from accel.base.adapter import config_fingerprint
    from accel.solvers.student import StudentArtifact, weights_digest
    from accel.solvers.target_time import TargetTimeRoute, target_time_inputs

    teacher_model = pipe.transformer
    adapter = adapter_for(teacher_model)
    spec = target_time_inputs(adapter, teacher_model)
    blocks = len(adapter.block_stacks(teacher_model)[0].blocks)
    r_blocks = options.r_blocks or max(1, blocks // 4)
    if r_blocks > blocks:
        raise ValueError(f"DistillOptions.r_blocks is {r_blocks}, but the model has {blocks} blocks")
    # cpu=True is what lets accelerate run several CPU processes (gloo) under torchrun/accelerate launch
    accelerator = Accelerator(cpu=next(teacher_model.parameters()).device.type == "cpu")
    if accelerator.num_processes > 1:
        pipe.to(accelerator.device)  # each process records and trains on its own device
    os.makedirs(out, exist_ok=True)
    identity = f"{type(teacher_model).__name__}:{config_fingerprint([teacher_model])}:{weights_digest(teacher_model)}"
    paths = cached_trajectories(
        pipe, options.prompts, options.seeds_per_prompt, options.seed, options.teacher_steps, options.guidance,
        options.call_kwargs, os.path.join(out, "trajectories"), identity,
        shard=lambda i: i % accelerator.num_processes == accelerator.process_index, log=log)
    accelerator.wait_for_everyone()
    # memory-mapped: only the states a batch reads are paged in (a 480p video's trajectory is ~400 MB)
    records = [torch.load(p, weights_only=False, mmap=True) for p in paths]
    sigmas = records[0]["sigmas"]
    scale = float(pipe.scheduler.config.get("num_train_timesteps", 1000))  # timestep = sigma * scale

    student = teacher_model if options.lora_rank else copy.deepcopy(teacher_model)
    grad_flags = {name: p.requires_grad for name, p in teacher_model.named_parameters()}
    targets: List[str] = []
    if options.lora_rank:
        from peft import LoraConfig

        targets = linear_targets(teacher_model, adapter)
        for p in student.parameters():
            p.requires_grad_(False)
        student.add_adapter(LoraConfig(r=options.lora_rank, lora_alpha=options.lora_rank, target_modules=targets,
                                       init_lora_weights=True), adapter_name="flowmap")
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad or not options.lora_rank}
    for p in trainable.values():
        p.requires_grad_(True)
    target_r: List[Optional[torch.Tensor]] = [None]
    from accel.base.changes import ChangeLog

    hooks = ChangeLog()
    TargetTimeRoute(student, spec, r_blocks, lambda: target_r[0]).install(hooks)
    attention, attention_use = None, None
    if options.attention:
        import accel

        attention = accel.patch(student, attention=options.attention)
    student.train()
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=options.lr, weight_decay=0.0)
    generator = torch.Generator("cpu").manual_seed(options.seed + 7919 * accelerator.process_index)
    state = {"iteration": 0, "losses": [], "wall_seconds": 0.0, "phases": []}
    checkpoint = os.path.join(out, "checkpoint.pt")
    if os.path.isfile(checkpoint):
        saved = torch.load(checkpoint, weights_only=False)
        if saved["options"] != options.resume_key():
            raise ValueError(f"{checkpoint} was written with other options ({saved['options']}); "
                             "use another --out, or delete it to start over")
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = options.lr
        generator.set_state(saved["generator"])
        state = saved["state"]
        log(f"resumed from {checkpoint} at iteration {state['iteration']}")
    if not state["phases"] or state["phases"][-1]["options"] != options.phase():
        state["phases"].append({"from_iteration": state["iteration"], "options": options.phase()})
    model, optimizer = accelerator.prepare(student, optimizer)
    grids = [grid_indices(options.teacher_steps, n) for n in options.steps]
    device = accelerator.device

    def save_checkpoint() -> None:
        if accelerator.is_main_process:
            torch.save({"options": options.resume_key(), "state": state, "generator": generator.get_state(),
                        "optimizer": optimizer.state_dict(),
                        "trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()}},
                       checkpoint + ".partial")
            os.replace(checkpoint + ".partial", checkpoint)

    from tqdm.auto import tqdm

    bar = tqdm(total=options.iterations, initial=state["iteration"], desc="distill",
               disable=not (progress and accelerator.is_local_main_process))
    loss_log = open(os.path.join(out, "loss.csv"), "a") if accelerator.is_main_process else None
    started = time.perf_counter()
    try:
        while state["iteration"] < options.iterations:
            picks = torch.randint(len(records), (options.batch_size,), generator=generator).tolist()
            pairs = sample_pairs(generator, options.batch_size, options.teacher_steps, grids, options.grid_fraction)
            batch = [records[i] for i in picks]
            x = torch.cat([r["states"][a] for r, (a, _, _) in zip(batch, pairs)]).to(device)
            rolled = [i for i, (_, _, previous) in enumerate(pairs) if previous >= 0 and options.rollout_fraction
                      and float(torch.rand((), generator=generator)) < options.rollout_fraction]
            if rolled:
                x[rolled] = student_jump(accelerator.unwrap_model(model), [batch[i] for i in rolled],
                                         [(pairs[i][2], pairs[i][0]) for i in rolled], sigmas, scale, target_r, device)
            z_b = torch.cat([r["states"][b] for r, (_, b, _) in zip(batch, pairs)]).to(device)
            gaps = per_row([float(sigmas[a] - sigmas[b]) for a, b, _ in pairs], x)
            target = ((x.double() - z_b.double()) / gaps).to(x.dtype)
            prediction = student_call(model, x, batch, [a for a, _, _ in pairs], [sigmas[b] for _, b, _ in pairs],
                                      scale, target_r)
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            state["iteration"] += 1
            value = float(loss.detach())
            state["losses"].append(value)
            if loss_log is not None:
                loss_log.write(f"{state['iteration']},{value:.6g}\n")
                loss_log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}")
            if state["iteration"] % options.save_every == 0:
                state["wall_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save_checkpoint()
        state["wall_seconds"] += time.perf_counter() - started
        save_checkpoint()
    finally:
        bar.close()
        if loss_log is not None:
            loss_log.close()
        target_r[0] = None
        hooks.undo_all()
        if attention is not None:
            counters = attention.summary()["methods"]["attention"]["counters"]
            attention_use = {"name": options.attention, **{k: counters.get(k) for k in (
                "calls", "sparse_calls", "dense_calls", "fallback_calls", "sparse_mean_density")}}
            attention.remove()
    student = accelerator.unwrap_model(model)
    student.eval()
    recent = state["losses"][-20:]
    artifact = StudentArtifact(
        folder=out, model_class=type(teacher_model).__name__, model_fingerprint=config_fingerprint([teacher_model]),
        teacher_weights=identity.rsplit(":", 1)[1], r_blocks=r_blocks,
        schedules={n: tuple(float(sigmas[i]) for i in grid) for n, grid in zip(options.steps, grids)},
        guidance=float(options.guidance),
        lora={"rank": options.lora_rank, "alpha": float(options.lora_rank), "targets": targets} if options.lora_rank else None,
        training={"command": command, "teacher": teacher, "seed": options.seed, "iterations": state["iteration"],
                  "wall_seconds": round(state["wall_seconds"], 1), "processes": accelerator.num_processes,
                  "final_loss": round(sum(recent) / len(recent), 6) if recent else None,
                  "trajectories": len(records), "teacher_steps": options.teacher_steps, "attention": attention_use,
                  "loss": "mse to the teacher's flow map (z_a - z_b) / (sigma_a - sigma_b)",
                  "options": {k: v for k, v in dataclasses.asdict(options).items()
                              if k not in ("prompts", "call_kwargs", *PHASE_OPTIONS)},
                  "phases": state["phases"]})
    if accelerator.is_main_process:
        _save_weights(student, artifact, out)
        path = artifact.save(out)
    else:
        path = os.path.join(out, "flowmap.json")
    if options.lora_rank:
        student.unload_lora()  # peft layers out: the pipeline's transformer is the teacher again
        for name, p in student.named_parameters():
            p.requires_grad_(grad_flags[name])
    accelerator.wait_for_everyone()
    return path


def _save_weights(student: torch.nn.Module, artifact: Any, out: str) -> None:
    from accel.solvers.student import FULL_WEIGHTS, LORA_WEIGHTS

    if artifact.lora is None:
        student.save_pretrained(os.path.join(out, FULL_WEIGHTS))
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    factors = get_peft_model_state_dict(student, adapter_name="flowmap")
    save_file({k: v.detach().cpu().contiguous() for k, v in factors.items()}, os.path.join(out, LORA_WEIGHTS))


# -- command line: accel distill ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel distill", description=(
        "Distill a flow-matching transformer into a few-step flow-map student (one transformer call per step, "
        "guidance distilled in). Sample it with accel.patch(pipe, solver={'name': 'flowmap', 'artifact': DIR})."))
    p.add_argument("--teacher", required=True, help="reference (the shipped reference model), tiny:wan, or a local "
                                                    "pipeline folder / cached hub id")
    p.add_argument("--steps", type=integer(1, 1000), nargs="+", required=True, help="step counts the student serves")
    p.add_argument("--out", type=output_folder, required=True, help="student folder (resumes a run stopped there)")
    p.add_argument("--lora", type=integer(1), help="fine-tune LoRA factors of this rank instead of every weight")
    p.add_argument("--guidance", type=number(0, low_inclusive=False),
                   help="guidance scale distilled in (default: the teacher's usual one)")
    p.add_argument("--attention", help="an attention method active while training (e.g. radial), for a student "
                                       "that samples with it")
    p.add_argument("--weights", help="with --teacher reference: a trained reference run's folder (default: shipped)")
    p.add_argument("--prompts", type=integer(1), help="use only the first N prompts")
    p.add_argument("--prompt-file", help="text file with one prompt per line (default: the model's built-in list)")
    p.add_argument("--seeds-per-prompt", type=integer(1), default=1)
    p.add_argument("--teacher-steps", type=integer(1, 1000), default=50)
    p.add_argument("--iterations", type=integer(0), default=400)
    p.add_argument("--batch-size", type=integer(1), default=4)
    p.add_argument("--lr", type=number(0, low_inclusive=False), default=1e-4)
    p.add_argument("--rollout-fraction", type=number(0, 1), default=0.0,
                   help="share of a student's later jumps trained from where its own previous jump lands (default 0)")
    p.add_argument("--r-blocks", type=integer(1), help="last blocks that see the target time (default: a quarter)")
    p.add_argument("--seed", type=integer(0), default=0)
    p.add_argument("--save-every", type=integer(1), default=50, help="iterations between checkpoints")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=integer(1), help="CPU threads (default: the cores not already busy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the loss is still logged)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from accel.base.registry import ATTENTION_METHODS
    from accel.distill.solver_search import load_model

    argv = list(argv if argv is not None else sys.argv[1:])
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    try:
        if args.weights and args.teacher != "reference":
            raise ValueError("--weights goes with --teacher reference (other teachers are named by --teacher)")
        if args.lora is not None and importlib.util.find_spec("peft") is None:
            raise ValueError("--lora trains LoRA factors through peft, which is not installed: pip install peft")
        if args.attention is not None and args.attention not in ATTENTION_METHODS.names():
            raise ValueError(f"--attention must be one of {', '.join(ATTENTION_METHODS.names())}, got {args.attention!r}")
        pipe, fields = load_model(args.teacher, args.weights)
        pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe.set_progress_bar_config(disable=True)
        prompts = tuple(fields.pop("prompts"))
        if args.prompt_file:
            with open(args.prompt_file) as fh:
                prompts = tuple(line.strip() for line in fh if line.strip())
        prompts = prompts[:args.prompts] if args.prompts else prompts
        guidance = args.guidance if args.guidance is not None else float(fields.get("guidance_scale") or 1.0)
        call_kwargs = {k: v for k, v in fields.items() if k not in ("guidance_scale", "guidance_scale_2") and v is not None}
        options = DistillOptions(
            steps=tuple(args.steps), prompts=prompts, call_kwargs=call_kwargs, guidance=guidance,
            teacher_steps=args.teacher_steps, seeds_per_prompt=args.seeds_per_prompt, iterations=args.iterations,
            batch_size=args.batch_size, lr=args.lr, rollout_fraction=args.rollout_fraction, r_blocks=args.r_blocks, lora_rank=args.lora,
            attention=args.attention, seed=args.seed, save_every=args.save_every)
        path = distill_flow_map(pipe, options, args.out, teacher=args.teacher, command=" ".join(["accel", "distill", *argv]),
                                log=lambda message: print(f"[distill] {message}", flush=True),
                                progress=not args.no_progress)
    except (ValueError, OSError) as exc:
        print(f"accel distill: error: {exc}", file=sys.stderr)
        return 2
    artifact = json.load(open(path))
    print(f"accel distill: student for {artifact['model_class']} at steps {sorted(map(int, artifact['schedules']))}, "
          f"{artifact['training']['iterations']} iterations, final loss {artifact['training']['final_loss']} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
