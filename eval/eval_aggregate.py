"""The end of ``accel eval``: records -> ``per_item.jsonl``, ``aggregate.json`` and ``report.html``.

Built only from what the item loop left on disk (the records and the written videos), so a run
resumed after a crash, or split between processes, aggregates to the same numbers as one run
straight through (timings aside: they are measured, not derived). Distribution metrics read the
videos back from their files, as VBench does:

- ``fid`` / ``fvd``: each preset's videos against the dense videos of the same items (the question
  is what acceleration changes, not how far the model is from real data); local TorchScript
  extractors only (``accel.eval.distribution``);
- ``clip_score``: every column's videos against their prompts (a local CLIP folder);
- ``reference_fvd`` (reference model only): the judge's Frechet distance between a column's videos
  and rendered clips of the same prompts, the reference model's own distribution score;
- ``vbench.temporal_flickering``: computed here for every column (it needs no weights); other
  VBench dimensions come from ``accel eval vbench`` and are merged in by it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .evaluation import EvalOptions, Item, log, record_path, write_json_atomically, write_text_atomically

PER_ITEM = "per_item.jsonl"
AGGREGATE = "aggregate.json"
MEAN_KEYS = ("wall_seconds", "speedup", "psnr", "ssim", "lpips", "prompt_accuracy", "compute_fraction")


def collect_records(out: str, items: Sequence[Item], columns: Sequence[str]) -> List[Dict[str, Any]]:
    """Every record, columns in their order and items in prompt x seed order; a missing one is an error."""
    records, missing = [], []
    for column in columns:
        for item in items:
            path = record_path(out, column, item)
            if not os.path.isfile(path):
                missing.append(path)
                continue
            with open(path) as f:
                records.append(json.load(f))
    if missing:
        raise RuntimeError(f"{len(missing)} record(s) missing after the run, e.g. {missing[0]}")
    return records


def compute_fraction(record: Dict[str, Any]) -> Optional[float]:
    cache = ((record.get("summary") or {}).get("methods") or {}).get("cache") or {}
    value = cache.get("compute_fraction")
    return float(value) if value is not None else None


def _mean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def column_row(records: List[Dict[str, Any]], patch_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"items": len(records)}
    for key in MEAN_KEYS:
        values = [compute_fraction(r) if key == "compute_fraction" else r.get(key) for r in records]
        mean = _mean(values)
        if mean is not None:
            row[key] = round(mean, 5)
    speedups = [r["speedup"] for r in records]
    row["speedup_min"], row["speedup_max"] = round(min(speedups), 4), round(max(speedups), 4)
    if patch_kwargs is None:
        row.update(speedup=1.0, speedup_min=1.0, speedup_max=1.0, psnr=None, ssim=None, patch="dense (unpatched)")
    else:
        row["patch"] = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in patch_kwargs.items())
    return row


def read_media(path: str) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames of an mp4 or png written by the run."""
    if path.endswith(".png"):
        import imageio.v2 as imageio

        return np.asarray(imageio.imread(path))[None, ..., :3]
    from .vbench_suite import read_video_frames

    return read_video_frames(path, reader="imageio")  # RGB (OpenCV's reader gives BGR)


def distribution_metrics(options: EvalOptions, out: str, by_column: Dict[str, List[Dict[str, Any]]],
                         size: Dict[str, int]) -> Dict[str, Dict[str, Any]]:
    from . import distribution
    from .vbench_suite import temporal_flickering

    videos = {c: [read_media(os.path.join(out, r["video"])) for r in rs] for c, rs in by_column.items()}
    extra: Dict[str, Dict[str, Any]] = {c: {} for c in by_column}
    for column, clips in videos.items():
        if clips[0].shape[0] > 1:
            extra[column]["vbench"] = {"temporal_flickering": round(float(np.mean([temporal_flickering(v)
                                                                                     for v in clips])), 6)}
    dense = videos["dense"]
    for column, clips in videos.items():
        prompts = [r["prompt"] for r in by_column[column]]
        if options.fid_weights or os.environ.get(distribution.ENV["fid"]):
            if column != "dense":
                extra[column]["fid"] = round(distribution.fid(dense, clips, options.fid_weights), 4)
        if options.fvd_weights or os.environ.get(distribution.ENV["fvd"]):
            if column != "dense" and clips[0].shape[0] > 1:
                extra[column]["fvd"] = round(distribution.fvd(dense, clips, options.fvd_weights), 4)
        if options.clip_model or os.environ.get(distribution.ENV["clip"]):
            extra[column]["clip_score"] = round(distribution.clip_score(clips, prompts, options.clip_model), 4)
    if options.model is None:
        extra = _reference_fvd(videos, by_column, size, extra)
    return extra


def _reference_fvd(videos, by_column, size, extra):
    """Judge features of each column against rendered clips of the same prompts (seed 1, as the
    reference model's own evaluation draws them)."""
    from accel.pipelines.reference import data
    from accel.pipelines.reference import judge as J
    from accel.pipelines.reference.evaluate import real_videos

    captions = {data.caption(s): s for s in data.all_specs()}
    any_column = next(iter(by_column.values()))
    specs = [captions.get(r["prompt"]) for r in any_column]
    if len(specs) < 2 or any(s is None for s in specs):  # a Gaussian fit needs two videos
        return extra
    real, _ = real_videos(specs, 1, seed=1, **size)
    judge = J.load_judge()
    real_features = J.judge_features(real, judge)
    for column, clips in videos.items():
        extra[column]["reference_fvd"] = round(J.frechet_distance(J.judge_features(clips, judge), real_features), 4)
    return extra


def aggregate_run(options: EvalOptions, items: Sequence[Item], columns: Dict[str, Optional[Dict[str, Any]]],
                  device: str, size: Optional[Dict[str, int]] = None, dtype: str = "float32") -> Dict[str, Any]:
    out = options.out
    records = collect_records(out, items, list(columns))
    write_text_atomically(os.path.join(out, PER_ITEM), "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    by_column = {c: [r for r in records if r["preset"] == c] for c in columns}
    rows = {c: column_row(rs, columns[c]) for c, rs in by_column.items()}
    log("distribution metrics from the written videos")
    for column, values in distribution_metrics(options, out, by_column, size or {}).items():
        rows[column].update(values)
    previous = _previous_vbench(out)
    for column, dims in previous.items():
        if column in rows:
            rows[column].setdefault("vbench", {}).update({k: v for k, v in dims.items() if k != "temporal_flickering"})
    aggregate = {"model": options.model or "reference", "settings": _settings(options, size, dtype),
                 "prompts": options.prompts, "seeds": options.seeds, "device": device, "items": len(items),
                 "presets": rows}
    write_json_atomically(os.path.join(out, AGGREGATE), aggregate)
    from .report import write_report

    report = write_report(out, aggregate, records, players=options.report_players)
    log(f"wrote {os.path.join(out, AGGREGATE)}, {os.path.join(out, PER_ITEM)} and {report}")
    return aggregate


def _settings(options: EvalOptions, size: Optional[Dict[str, int]], dtype: str) -> Dict[str, Any]:
    settings = {"steps": options.steps, "height": options.height, "width": options.width,
                "frames": options.frames, "dtype": dtype}
    renamed = {"num_inference_steps": "steps", "num_frames": "frames"}
    settings.update({renamed.get(k, k): v for k, v in (size or {}).items() if v is not None})
    return {k: v for k, v in settings.items() if v is not None}


def _previous_vbench(out: str) -> Dict[str, Dict[str, float]]:
    """VBench dimensions merged in by ``accel eval vbench`` on an earlier aggregate of this folder."""
    path = os.path.join(out, AGGREGATE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            rows = json.load(f).get("presets") or {}
    except (OSError, ValueError):
        return {}
    return {c: dict(r.get("vbench") or {}) for c, r in rows.items() if r.get("vbench")}


def merge_vbench(videos_dir: str, scores: Dict[str, float]) -> Optional[str]:
    """When ``videos_dir`` is a preset folder of an ``accel eval`` run, add the VBench scores to that
    preset's row of its ``aggregate.json`` and redraw ``report.html``; returns the aggregate's path
    (None for any other folder). Later aggregations of the run keep them (``_previous_vbench``)."""
    folder = os.path.abspath(videos_dir)
    out, column = os.path.dirname(folder), os.path.basename(folder)
    path = os.path.join(out, AGGREGATE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(out, PER_ITEM)):
        return None
    with open(path) as f:
        aggregate = json.load(f)
    if column not in aggregate.get("presets", {}):
        return None
    aggregate["presets"][column].setdefault("vbench", {}).update({k: round(float(v), 6) for k, v in scores.items()})
    write_json_atomically(path, aggregate)
    with open(os.path.join(out, PER_ITEM)) as f:
        records = [json.loads(line) for line in f if line.strip()]
    from .report import write_report

    write_report(out, aggregate, records)
    return path
