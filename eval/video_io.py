"""Write videos for people to look at: MP4 (imageio-ffmpeg) and GIF, and side-by-side comparisons."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .metrics import to_unit_video


def to_uint8_frames(frames) -> np.ndarray:
    """Any pipeline output (np/torch/PIL list, [0,1] float or uint8) as (T, H, W, 3) uint8."""
    video = to_unit_video(frames)  # (T, C, H, W) float in [0, 1]
    return (video.clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)).numpy()


def side_by_side(videos: Sequence, gap: int = 4) -> np.ndarray:
    """Frames of several equally long videos placed left to right with a white gap."""
    clips = [to_uint8_frames(v) for v in videos]
    frames = min(len(c) for c in clips)
    height = max(c.shape[1] for c in clips)
    spacer = np.full((frames, height, gap, 3), 255, dtype=np.uint8)
    parts = []
    for i, clip in enumerate(clips):
        pad = height - clip.shape[1]
        parts.append(np.pad(clip[:frames], ((0, 0), (0, pad), (0, 0), (0, 0))))
        if i < len(clips) - 1:
            parts.append(spacer)
    return np.concatenate(parts, axis=2)


def write_video(path: str, frames, fps: int = 8, upscale: int = 1) -> str:
    """Write ``frames`` to ``path`` (.mp4 or .gif). ``upscale`` repeats pixels so tiny videos stay visible."""
    import imageio.v2 as imageio

    video = to_uint8_frames(frames) if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8) else frames
    if upscale > 1:
        video = video.repeat(upscale, axis=1).repeat(upscale, axis=2)
    if path.endswith(".gif"):
        imageio.mimsave(path, list(video), duration=1000 / fps, loop=0)
    else:
        # libx264 needs even sizes; pad rather than let imageio resize (which would blur the comparison).
        pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        # One encoder thread: x264's output depends on how many threads it picks (the CPUs the process
        # may use), so the same frames gave different files, and different metrics read back from
        # them, in processes with different CPU affinity (accel eval's shards, its resumed runs).
        imageio.mimsave(path, list(video), fps=fps, macro_block_size=1, codec="libx264", quality=8,
                        ffmpeg_params=["-threads", "1"])
    return path
