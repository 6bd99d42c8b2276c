"""``accel eval``: every prompt x seed generated dense and with each preset, written in VBench's
layout, scored, aggregated and reported.

For each item (a prompt and a seed index) the dense video is generated once and then each preset's
video with the same seed; the videos land in ``OUT/<preset>/<prompt>-<index>.mp4`` (one folder per
preset, so ``vbench evaluate --videos_path OUT/<preset>`` runs on any folder unchanged) and one
record per video in ``OUT/records/``: wall seconds, speed-up against the item's dense run, PSNR and
SSIM against it (LPIPS with local weights), the judge's prompt accuracy on the reference model and
the patch's ``Handle.summary()`` counters. An item counts as done when all of its records exist,
so a killed run resumed redoes at most the items it was in the middle of. At the end one process
(the main one when sharded) rebuilds ``per_item.jsonl`` from the records, computes the
distribution metrics from the written files (FID, FVD and CLIP score from local weights, the
reference FVD and temporal flickering) and writes ``aggregate.json`` and ``report.html``.

Paired metrics are computed on the frames as written (uint8), which the resumed and the sharded
runs see alike; distribution metrics read the files back, as VBench does. Seed index ``i`` of
every prompt generates with ``torch.Generator("cpu").manual_seed(i)`` (VBench's ``-{index}``).
Under ``accelerate launch`` or ``torchrun`` the items are split between processes with
``accelerate``'s ``split_between_processes``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .demo import DemoError, adapter_before_loading, device_and_dtype, generation_kwargs, load_pipeline
from .metrics import psnr, ssim

# Records: one JSON file per (preset, item), written atomically after its video.
RECORDS = "records"
SETTINGS_FILE = "eval_settings.json"
# the reference model's held-out captions (tests/eval/test_eval_run.py checks them against its data)
REFERENCE_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "reference_held_out.txt")


class EvalError(DemoError):
    """A user-facing problem: printed without a traceback."""


@dataclass
class EvalOptions:
    out: str
    model: Optional[str] = None  # None: the shipped reference model
    presets: Sequence[str] = ("dense", "quality", "fast")
    custom: Dict[str, Any] = field(default_factory=dict)  # attention/cache/solver for one more column
    custom_name: str = "custom"
    custom_steps: Optional[int] = None  # that column's steps (a solver swap is a step-count change)
    prompts: str = "reference"  # reference | vbench | vbench:DIMENSION | a text file
    limit: Optional[int] = None  # the first N prompts of the list
    seeds: int = 1
    steps: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    frames: Optional[int] = None
    fps: Optional[int] = None  # None: 8 for the reference model, 16 otherwise
    device: str = "auto"
    dtype: str = "auto"
    threads: Optional[int] = None
    fid_weights: Optional[str] = None
    fvd_weights: Optional[str] = None
    clip_model: Optional[str] = None
    lpips_weights: Optional[str] = None
    report_players: int = 4


@dataclass(frozen=True)
class Item:
    prompt_index: int
    prompt: str
    index: int  # the seed index: VBench's -{index}

    @property
    def key(self) -> str:
        return f"{self.prompt_index:05d}-{self.index}"


def log(message: str) -> None:
    print(f"[accel eval] {message}", flush=True)


def load_prompt_list(spec: str, limit: Optional[int]) -> List[str]:
    from .vbench_suite import load_prompts

    try:
        prompts = load_prompts(REFERENCE_PROMPTS if spec == "reference" else spec)
    except ValueError as exc:
        raise EvalError(f"--prompts: {exc}") from None
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise EvalError(f"--prompts {spec}: no prompts")
    return prompts


def make_items(prompts: Sequence[str], seeds: int) -> List[Item]:
    return [Item(p, prompt, i) for p, prompt in enumerate(prompts) for i in range(seeds)]


def preset_columns(options: EvalOptions) -> Dict[str, Optional[Dict[str, Any]]]:
    """Column name -> ``accel.patch`` keyword arguments and, under ``"steps"``, the column's own step
    count (``None``: dense, nothing patched)."""
    columns: Dict[str, Optional[Dict[str, Any]]] = {}
    for name in options.presets:
        columns[name] = None if name == "dense" else {"preset": name}
    if options.custom:
        if options.custom_name in columns:
            raise EvalError(f"--name {options.custom_name!r} is also in --presets; pick another name")
        columns[options.custom_name] = dict(options.custom)
        if options.custom_steps is not None:
            columns[options.custom_name]["steps"] = options.custom_steps
    if "dense" not in columns:
        columns = {"dense": None, **columns}  # every metric is against the dense run
    for name in columns:
        if not name or os.sep in name or name in (RECORDS, ".", ".."):
            raise EvalError(f"preset name {name!r} cannot be a folder name")
    return columns


def check_presets_early(model: Optional[str], columns: Dict[str, Optional[Dict[str, Any]]]) -> None:
    """A preset the model's adapter does not have fails before the model loads."""
    from accel.api import check_preset

    adapter = adapter_before_loading(model)
    for name, patch_kwargs in columns.items():
        if adapter is not None and patch_kwargs is not None and "preset" in patch_kwargs:
            try:
                check_preset(adapter, patch_kwargs["preset"])
            except ValueError as exc:
                raise EvalError(f"--presets: {exc}") from None


def _settings_fingerprint(options: EvalOptions, prompts: Sequence[str],
                          columns: Dict[str, Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """What a resumed run must share with the first one for its records to be comparable."""
    return {"model": options.model or "reference", "columns": columns, "seeds": options.seeds,
            "prompts_sha1": hashlib.sha1("\n".join(prompts).encode()).hexdigest(),
            "steps": options.steps, "height": options.height, "width": options.width, "frames": options.frames,
            "dtype": options.dtype}


def check_resume(out: str, fingerprint: Dict[str, Any]) -> None:
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        differ = [k for k in fingerprint if json.dumps(previous.get(k), sort_keys=True, default=str)
                  != json.dumps(fingerprint[k], sort_keys=True, default=str)]
        if differ:
            raise EvalError(f"{out} holds a run with other settings ({', '.join(differ)} differ); "
                            "resume it with the same flags or pick another --out")


def record_path(out: str, column: str, item: Item) -> str:
    return os.path.join(out, RECORDS, column, item.key + ".json")


def write_text_atomically(path: str, text: str) -> None:
    """A killed run leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomically(path: str, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=1, default=str))


def item_done(out: str, columns: Sequence[str], item: Item) -> bool:
    return all(os.path.isfile(record_path(out, c, item)) for c in columns)


def without_steps(column: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in column.items() if k != "steps"}


class Generator:
    """The loaded pipeline and its call arguments; ``run`` returns uint8 frames and wall seconds."""

    def __init__(self, options: EvalOptions, device: Optional[str] = None):
        self.device, self.dtype = device_and_dtype(options)
        self.device = device or self.device  # this process's GPU when the items are split between GPUs
        if self.device == "cpu":
            from accel.base.cli_args import set_threads

            set_threads(options.threads)
        self.pipe = load_pipeline(options.model, self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.kwargs = generation_kwargs(options)
        self.kwargs.pop("prompt", None)  # every item brings its own

    def check_columns(self, columns: Dict[str, Optional[Dict[str, Any]]]) -> None:
        import accel

        for name, patch_kwargs in columns.items():
            if patch_kwargs is None:
                continue
            try:  # builds and validates every part; removed at once
                accel.patch(self.pipe, **without_steps(patch_kwargs)).remove()
            except ValueError as exc:
                raise EvalError(f"{name}: {exc}") from None

    @torch.no_grad()
    def run(self, prompt: str, seed: int, patch_kwargs: Optional[Dict[str, Any]] = None,
            steps: Optional[int] = None) -> Tuple[np.ndarray, float, Optional[Dict[str, Any]]]:
        import accel

        from .video_io import to_uint8_frames

        kwargs = {**self.kwargs, "prompt": prompt, "generator": torch.Generator("cpu").manual_seed(seed),
                  "output_type": "np"}
        steps = (patch_kwargs or {}).get("steps", steps)
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        handle = accel.patch(self.pipe, **without_steps(patch_kwargs)) if patch_kwargs is not None else None
        try:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = self.pipe(**kwargs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            summary = dict(handle.summary()) if handle is not None else None
        finally:
            if handle is not None:
                handle.remove()
        frames = out.frames[0] if hasattr(out, "frames") else out.images
        return to_uint8_frames(frames), seconds, summary


def media_path(column: str, item: Item, frames: np.ndarray) -> str:
    """``<column>/<prompt>-<index>.mp4`` (``.png`` for a one-frame image pipeline), relative to OUT."""
    from .vbench_suite import video_file_name

    name = video_file_name(item.prompt, item.index)
    if frames.shape[0] == 1:
        name = os.path.splitext(name)[0] + ".png"
    return os.path.join(column, name)


def write_media(out: str, relative: str, frames: np.ndarray, fps: int) -> None:
    from .video_io import write_video

    path = os.path.join(out, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if relative.endswith(".png"):
        import imageio.v2 as imageio

        imageio.imwrite(path, frames[0])
    else:
        write_video(path, frames, fps=fps)


def compact_summary(summary: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The counters of each patched method (and any warnings), JSON-ready."""
    if summary is None:
        return None
    methods = {kind: {"name": m.get("name"), **(m.get("counters") or {})}
               for kind, m in (summary.get("methods") or {}).items() if m}
    return json.loads(json.dumps({"methods": methods, "warnings": list(summary.get("warnings") or [])},
                                 default=str))


class ItemScorer:
    """Per-item paired metrics against the dense frames, and the judge on the reference model."""

    def __init__(self, options: EvalOptions):
        self.lpips_weights = options.lpips_weights
        self.specs = None
        if options.model is None:
            from accel.pipelines.reference import data

            self.specs = {data.caption(s): s for s in data.all_specs()}
        self._judge = None

    def prompt_accuracy(self, frames: np.ndarray, prompt: str) -> Optional[float]:
        spec = self.specs.get(prompt) if self.specs else None
        if spec is None:
            return None
        from accel.pipelines.reference import judge as J

        if self._judge is None:
            self._judge = J.load_judge()
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None]
        return float(J.prompt_accuracy(video, [spec], self._judge))

    def paired(self, frames: np.ndarray, dense: np.ndarray) -> Dict[str, float]:
        scores = {"psnr": round(psnr(frames, dense), 3), "ssim": round(ssim(frames, dense), 5)}
        if self.lpips_weights:
            from .metrics import lpips

            scores["lpips"] = round(lpips(frames, dense, weights_path=self.lpips_weights), 5)
        return scores


def run_items(options: EvalOptions, items: Sequence[Item], columns: Dict[str, Optional[Dict[str, Any]]],
              generator: Generator, fps: int, progress: bool = True) -> int:
    """Generate and record every item not already done; returns how many were generated."""
    from tqdm.auto import tqdm

    scorer = ItemScorer(options)
    todo = [item for item in items if not item_done(options.out, list(columns), item)]
    for spec in columns.values() if todo else ():
        # first-call costs (allocations, a pattern's first plan, a solver's artifact) never land in a
        # timed run: every column once, at 2 steps unless it has its own step count
        generator.run(todo[0].prompt, 0, spec, steps=2)
    for item in tqdm(todo, desc="accel eval", unit="item", disable=not progress):
        dense, dense_seconds, _ = generator.run(item.prompt, item.index)
        for name, patch_kwargs in columns.items():
            if os.path.isfile(record_path(options.out, name, item)):
                continue
            if patch_kwargs is None:
                frames, seconds, summary = dense, dense_seconds, None
            else:
                frames, seconds, summary = generator.run(item.prompt, item.index, patch_kwargs)
            relative = media_path(name, item, frames)
            write_media(options.out, relative, frames, fps)
            record = {"preset": name, "prompt": item.prompt, "prompt_index": item.prompt_index,
                      "seed": item.index, "index": item.index, "video": relative,
                      "wall_seconds": round(seconds, 4), "speedup": round(dense_seconds / seconds, 4)}
            if patch_kwargs is not None:
                record.update(scorer.paired(frames, dense))
            accuracy = scorer.prompt_accuracy(frames, item.prompt)
            if accuracy is not None:
                record["prompt_accuracy"] = accuracy
            if summary is not None:
                record["summary"] = compact_summary(summary)
            write_json_atomically(record_path(options.out, name, item), record)
    return len(todo)


def prepare(options: EvalOptions) -> Tuple[List[str], List[Item], Dict[str, Optional[Dict[str, Any]]]]:
    """Validate what can be validated before any model loads (a resumed run's settings included)."""
    from .demo import prepare_output
    from .distribution import ENV

    if options.seeds < 1:
        raise EvalError(f"--seeds: expected >= 1, got {options.seeds}")
    prepare_output(options.out)
    prompts = load_prompt_list(options.prompts, options.limit)
    columns = preset_columns(options)
    check_presets_early(options.model, columns)
    if (options.fvd_weights or os.environ.get(ENV["fvd"])) and len(prompts) * options.seeds < 2:
        raise EvalError("FVD fits a Gaussian to video features: it needs at least 2 items (prompts x seeds)")
    fingerprint = _settings_fingerprint(options, prompts, columns)
    check_resume(options.out, fingerprint)
    return prompts, make_items(prompts, options.seeds), columns


def run_eval(options: EvalOptions) -> Optional[Dict[str, Any]]:
    """The whole command; returns the aggregate on the process that wrote it (None on the others)."""
    from accelerate import PartialState

    from .eval_aggregate import aggregate_run

    prompts, items, columns = prepare(options)
    device, _ = device_and_dtype(options)
    # cpu=True: under torchrun on a machine without GPUs accelerate would otherwise not see the processes
    state = PartialState(cpu=device == "cpu")
    generator = Generator(options, str(state.device) if device == "cuda" else "cpu")
    generator.check_columns(columns)
    if state.is_main_process:
        write_json_atomically(os.path.join(options.out, SETTINGS_FILE),
                              {**_settings_fingerprint(options, prompts, columns), "options": asdict(options)})
    fps = options.fps or (8 if options.model is None else 16)
    with state.split_between_processes(items) as mine:
        shard = (f"process {state.process_index + 1}/{state.num_processes}: {len(mine)} item(s); "
                 if state.num_processes > 1 else "")
        log(f"{len(items)} item(s) x {len(columns)} column(s) ({', '.join(columns)}); {shard}writing to {options.out}")
        generated = run_items(options, mine, columns, generator, fps, progress=True)
    log(f"generated {generated} item(s), {len(mine) - generated} already done")
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    size = {k: generator.kwargs[k] for k in ("height", "width", "num_frames", "num_inference_steps")
            if k in generator.kwargs}  # the pipeline's defaults otherwise
    dtype = str(generator.dtype).replace("torch.", "")
    return aggregate_run(options, items, columns, generator.device, size, dtype)
