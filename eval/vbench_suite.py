"""VBench (Huang et al., CVPR 2024) for ``accel eval vbench``: its prompt suites, its video layout,
its ``temporal_flickering`` dimension computed here, and the real ``vbench`` package run in its own
interpreter for every dimension (docs/vbench.md sets that interpreter up).

The prompt lists in ``prompts/vbench/`` are VBench's own files, byte for byte (``SOURCE.md`` there).
Facts taken from VBench 0.1.5 / github.com/Vchitect/VBench: videos are ``{prompt}-{index}.mp4``; in
its standard mode it looks for exactly those names, index 0..4, per prompt of a dimension's suite; in
``custom_input`` mode it takes every ``.mp4``/``.gif`` of the folder and reads the prompt back from the
name (the stem less a trailing ``-<digits>``). ``temporal_flickering`` is, per video, the mean over
consecutive frame pairs of the mean absolute difference (float32, all pixels and channels) of every
decoded frame, as ``(255 - mean) / 255``; VBench applies no static filter inside the dimension (its
separate ``vbench static_filter`` step picks static videos first, not done here).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts" / "vbench"

# VBench's 16 dimensions, in its order (VBench.build_full_dimension_list).
DIMENSIONS = (
    "subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality", "object_class",
    "multiple_objects", "color", "spatial_relationship", "scene", "temporal_style", "overall_consistency",
    "human_action", "temporal_flickering", "motion_smoothness", "dynamic_degree", "appearance_style",
)
# Dimensions scored on another dimension's prompt list (VBench's prompts/README.md table; the same
# lists, in the same order, as VBench_full_info.json assigns them).
_SUITE = {
    "background_consistency": "scene", "motion_smoothness": "subject_consistency",
    "dynamic_degree": "subject_consistency", "aesthetic_quality": "overall_consistency",
    "imaging_quality": "overall_consistency",
}
# Dimensions VBench refuses in custom_input mode (they need its per-prompt metadata).
STANDARD_ONLY = frozenset({"object_class", "multiple_objects", "scene", "appearance_style", "color",
                           "spatial_relationship"})
MODES = {"standard": "vbench_standard", "custom_input": "custom_input"}
STANDARD_INDICES = range(5)  # the indices VBench's standard mode looks for
_NAME_MAX = 255  # bytes in one file name on Linux file systems


def vbench_dimensions() -> List[str]:
    """VBench's 16 evaluation dimensions (each a valid ``vbench:DIMENSION`` prompt spec)."""
    return list(DIMENSIONS)


def _check_dimension(dimension: str) -> str:
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown VBench dimension {dimension!r}; allowed: {', '.join(DIMENSIONS)}")
    return dimension


def load_prompts(spec: str) -> List[str]:
    """``"vbench"``: VBench's full list (946 lines, two prompts twice, as VBench ships it);
    ``"vbench:DIMENSION"``: the list VBench scores that dimension on; else a text file, one prompt a
    line, blank lines and lines starting with ``#`` skipped."""
    if spec == "vbench":
        return (PROMPTS_DIR / "all_dimension.txt").read_text(encoding="utf-8").splitlines()
    if spec.startswith("vbench:"):
        dimension = _check_dimension(spec[len("vbench:"):])
        suite = _SUITE.get(dimension, dimension)
        return (PROMPTS_DIR / "prompts_per_dimension" / f"{suite}.txt").read_text(encoding="utf-8").splitlines()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {spec} (or use vbench / vbench:DIMENSION)")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def video_file_name(prompt: str, index: int) -> str:
    """VBench's layout, ``f"{prompt}-{index}.mp4"``, byte for byte (VBench truncates nothing and
    replaces no character; every VBench prompt fits, the longest name is 216 bytes).

    A prompt that cannot be a Linux file name as it is (a ``/`` or NUL in it, or the name over 255
    bytes) becomes ``f"{cut}~{hash}-{index}.mp4"``: ``/`` and NUL replaced by ``_``, cut at a UTF-8
    character boundary to fit, ``hash`` the first 12 hex digits of the prompt's SHA-256 (distinct prompts
    stay distinct). VBench's standard mode never asks for such a name, and its custom_input mode would
    read ``cut~hash`` as the prompt: give the real prompts to :func:`run_vbench` (``prompts=``)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"video index must be an int >= 0, got {index!r}")
    tail = f"-{index}.mp4"
    if "/" not in prompt and "\0" not in prompt and len((prompt + tail).encode("utf-8")) <= _NAME_MAX:
        return prompt + tail
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
    safe = prompt.replace("/", "_").replace("\0", "_").encode("utf-8")
    budget = _NAME_MAX - len(tail) - len(digest) - 1
    return f"{safe[:budget].decode('utf-8', 'ignore')}~{digest}{tail}"


def read_video_frames(path, reader: str = "auto") -> np.ndarray:
    """Every decoded frame of a video file as ``(T, H, W, 3)`` uint8. ``reader="cv2"`` reads as VBench
    does (OpenCV's ``VideoCapture``, BGR); ``"imageio"`` through imageio's ffmpeg plugin (RGB, frames
    passed through without rate conversion); ``"auto"``: cv2 when importable, else imageio."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"video not found: {path}")
    if reader == "auto":
        try:
            import cv2  # noqa: F401
            reader = "cv2"
        except ImportError:
            reader = "imageio"
    frames = []
    if reader == "cv2":
        import cv2

        capture = cv2.VideoCapture(path)
        while capture.isOpened():
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        capture.release()
    elif reader == "imageio":
        import imageio.v2 as imageio

        try:
            video = imageio.get_reader(path, "ffmpeg", output_params=["-fps_mode", "passthrough"])
            try:
                frames = [frame for frame in video]
            finally:
                video.close()
        except Exception as exc:  # noqa: BLE001 - an undecodable file is "no frames", as for cv2
            raise ValueError(f"cannot decode {path}: {exc}") from None
    else:
        raise ValueError(f"reader must be auto, cv2 or imageio, got {reader!r}")
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return np.stack(frames)


def temporal_flickering(video, *, reader: str = "auto") -> float:
    """VBench's ``temporal_flickering`` of one video: frames ``(T, H, W, 3)`` uint8 (RGB or BGR, the
    measure does not care) or a path to a video file. 1.0 for a still video, 0.0 when every pixel
    swings between 0 and 255 each frame. VBench's float32 arithmetic, so the same bits as VBench for
    the same frames (for a file: the same frames when read with cv2, as VBench does)."""
    if isinstance(video, (str, os.PathLike)):
        frames = read_video_frames(video, reader)
    else:
        frames = np.asarray(video)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if len(frames) < 2:
        raise ValueError(f"temporal_flickering needs at least 2 frames, got {len(frames)}")
    maes = np.array([np.mean(np.abs(frames[i].astype(np.float32) - frames[i + 1].astype(np.float32)))
                     for i in range(len(frames) - 1)])  # float32 per pair, as VBench's mae_seq
    return (255.0 - np.mean(maes).item()) / 255.0


def _videos_for(videos_dir: Path, dimension: str, mode: str) -> List[str]:
    """The files VBench would score for ``dimension`` (ours read mp4 only), as VBench names them."""
    if mode == "standard":
        names = [video_file_name(p, i) for p in load_prompts(f"vbench:{dimension}") for i in STANDARD_INDICES]
        present = set(os.listdir(videos_dir))
        return [os.path.join(str(videos_dir), n) for n in names if n in present]
    names = sorted(os.listdir(videos_dir))
    if any(n.lower().endswith(".gif") for n in names):
        raise ValueError(f"{videos_dir} holds .gif files: only VBench itself reads those (--vbench-python)")
    return [os.path.join(str(videos_dir), n) for n in names if n.lower().endswith(".mp4")]


def _check_dir(videos_dir) -> Path:
    path = Path(videos_dir)
    if not path.is_dir():
        raise ValueError(f"videos folder not found: {videos_dir}")
    return path


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def temporal_flickering_folder(videos_dir, *, mode: str = "standard", reader: str = "auto") -> Dict[str, list]:
    """``{"temporal_flickering": [mean, [{"video_path": P, "video_results": score}, ...]]}``, the entry
    VBench writes in ``*_eval_results.json``. ``mode="standard"``: the ``{prompt}-{0..4}.mp4`` files of
    VBench's temporal_flickering prompts; ``"custom_input"``: every ``.mp4`` in the folder. Videos
    with no decodable frame are left out, as VBench does (said on stderr)."""
    folder = _check_dir(videos_dir)
    paths = _videos_for(folder, "temporal_flickering", _check_mode(mode))
    if not paths:
        hint = " (named {prompt}-{index}.mp4 after VBench's temporal_flickering prompts; or use custom_input)"
        raise ValueError(f"no videos to score in {videos_dir}" + (hint if mode == "standard" else ""))
    results = []
    for path in paths:
        try:
            frames = read_video_frames(path, reader)
        except ValueError as exc:
            print(f"accel eval vbench: skipped {path}: {exc}", file=sys.stderr)
            continue
        if len(frames) < 2:  # VBench would record NaN (the mean of no pairs)
            raise ValueError(f"{path}: temporal_flickering needs at least 2 frames, it has 1")
        results.append({"video_path": path, "video_results": temporal_flickering(frames)})
    if not results:
        raise ValueError(f"no decodable video in {videos_dir}")
    return {"temporal_flickering": [float(np.mean([r["video_results"] for r in results])), results]}


# Runs in VBench's interpreter: VBench's Python API as its launch script uses it, without the
# torch.distributed set-up (one process; VBench's helpers fall back to rank 0 of 1).
_DRIVER = r"""
import json, os, sys
a = json.loads(sys.argv[1])
try:
    import vbench
    from vbench import VBench
    import torch
except Exception as exc:
    sys.stderr.write("vbench is not importable: %r\n" % (exc,))
    sys.exit(3)
device = torch.device(a["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
VBench(device, info, a["out_dir"]).evaluate(
    videos_path=a["videos_dir"], name=a["name"], prompt_list=a["prompts"] or [],
    dimension_list=a["dimensions"], local=a["local"], read_frame=False, mode=a["mode"],
    imaging_quality_preprocessing_mode="longer")
"""


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:]) or "(no output)"


def run_vbench(videos_dir, dimensions: Sequence[str], vbench_python, out_dir, *, mode: str = "standard",
               local: bool = True, device: Optional[str] = None, cache_dir=None,
               prompts: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None) -> Dict[str, float]:
    """Score ``videos_dir`` with the real ``vbench`` installed for ``vbench_python`` (its own venv),
    VBench's files going to ``out_dir``; returns ``{dimension: score}`` from its ``*_eval_results.json``.
    ``local``: VBench's ``load_ckpt_from_local`` (weights from ``VBENCH_CACHE_DIR``, needed offline);
    ``cache_dir`` sets ``VBENCH_CACHE_DIR``; ``device`` defaults to cuda when there, else cpu;
    ``prompts``: file name -> prompt for custom_input mode (VBench's prompt_list). Any failure is a
    ValueError carrying the end of VBench's output."""
    dims = [_check_dimension(d) for d in dimensions]
    if not dims:
        raise ValueError("no dimensions given")
    if _check_mode(mode) == "custom_input" and STANDARD_ONLY & set(dims):
        raise ValueError(f"VBench scores {', '.join(sorted(STANDARD_ONLY & set(dims)))} only in standard mode "
                         "(they need its prompt metadata)")
    folder = _check_dir(videos_dir).resolve()
    if not any(n.lower().endswith((".mp4", ".gif")) for n in os.listdir(folder)):
        raise ValueError(f"no .mp4 or .gif videos in {videos_dir}")
    python = Path(shutil.which(str(vbench_python)) or vbench_python)
    if not python.is_file() or not os.access(python, os.X_OK):
        raise ValueError(f"VBench interpreter not found or not executable: {vbench_python}")
    out = Path(out_dir).resolve()
    if out == folder:
        raise ValueError("out_dir must not be the videos folder (VBench lists that folder's files)")
    out.mkdir(parents=True, exist_ok=True)
    name = f"accel_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
    job = {"videos_dir": str(folder), "out_dir": str(out), "name": name, "dimensions": dims, "mode": MODES[mode],
           "local": bool(local), "device": device, "prompts": dict(prompts) if prompts else None}
    env = dict(os.environ)
    if cache_dir is not None:
        env["VBENCH_CACHE_DIR"] = str(Path(cache_dir).resolve())
    try:
        done = subprocess.run([str(python), "-c", _DRIVER, json.dumps(job)], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=str(out))
    except subprocess.TimeoutExpired:
        raise ValueError(f"VBench did not finish within {timeout} s") from None
    except OSError as exc:
        raise ValueError(f"cannot run VBench interpreter {vbench_python}: {exc}") from None
    if done.returncode == 3:
        raise ValueError(f"vbench is not importable by {vbench_python} (see docs/vbench.md):\n"
                         f"{_tail(done.stderr)}")
    if done.returncode != 0:
        raise ValueError(f"VBench failed (exit {done.returncode}):\n{_tail(done.stderr or done.stdout)}")
    result_file = out / f"{name}_eval_results.json"
    try:
        raw = json.loads(result_file.read_text(encoding="utf-8"))
        scores = {d: float(raw[d][0]) for d in dims}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"VBench wrote no usable {result_file.name} ({exc!r}):\n{_tail(done.stderr)}") from None
    missing = [d for d, s in scores.items() if not np.isfinite(s)]
    if missing:
        raise ValueError(f"VBench found no videos for {', '.join(missing)} in {videos_dir} (mode {mode}; "
                         f"standard mode wants {{prompt}}-{{0..4}}.mp4 names)")
    return scores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel eval vbench",
        description="VBench scores of a folder of videos, printed as JSON {dimension: score}. Without "
                    "--vbench-python only temporal_flickering (computed here); see docs/vbench.md.")
    parser.add_argument("--videos", required=True, help="folder of videos ({prompt}-{index}.mp4 for standard mode)")
    parser.add_argument("--dimensions", nargs="+", required=True, choices=DIMENSIONS, metavar="DIMENSION",
                        help="VBench dimensions: " + ", ".join(DIMENSIONS))
    parser.add_argument("--vbench-python", default=None, help="python of a venv with vbench installed")
    parser.add_argument("--mode", choices=tuple(MODES), default="standard",
                        help="standard: VBench's prompt suite and names (default); custom_input: every video")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--vbench-out", default="evaluation_results",
                        help="where VBench writes its own files (default ./evaluation_results, as VBench)")
    parser.add_argument("--cache-dir", default=None, help="VBENCH_CACHE_DIR for VBench (its weights)")
    parser.add_argument("--device", default=None, help="VBench's torch device (default cuda if there, else cpu)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``accel eval vbench ...``: 0 and the JSON on stdout, or 2 and one error line on stderr."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    dims = list(dict.fromkeys(args.dimensions))
    try:
        _check_dir(args.videos)
        if args.vbench_python:
            scores = run_vbench(args.videos, dims, args.vbench_python, args.vbench_out, mode=args.mode,
                                device=args.device, cache_dir=args.cache_dir)
        else:
            others = [d for d in dims if d != "temporal_flickering"]
            if others:
                raise ValueError(f"{', '.join(others)} need VBench's models: pass --vbench-python PATH "
                                 "(docs/vbench.md); without it only temporal_flickering is computed")
            scores = {"temporal_flickering": temporal_flickering_folder(args.videos, mode=args.mode)
                      ["temporal_flickering"][0]}
        text = json.dumps(scores, indent=2)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        from .eval_aggregate import merge_vbench

        merged = merge_vbench(args.videos, scores)  # a preset folder of an `accel eval` run: into its aggregate
    except (ValueError, OSError) as exc:
        print(f"accel eval vbench: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if merged:
        print(f"accel eval vbench: merged into {merged} (and its report.html)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
