"""Distribution metrics for `accel eval`: FID, FVD and CLIP score, offline.

Every network is a local file (or folder) the user supplies; nothing is ever
downloaded.  A path comes from the caller (the command's flag) or else from an
environment variable (``ENV``); without one, or when it does not exist,
:class:`MissingWeights` says which file is wanted and where it is published.

Inputs are sequences of videos in any layout :func:`accel.eval.metrics.to_unit_video`
accepts (an image is a 1-frame video).  Conventions:

- Range: uint8 is taken as is, floats as [0, 1] (clipped).  Networks are fed
  uint8 ``round(255 x)``, as StyleGAN2-ADA and StyleGAN-V feed theirs.  Grey
  frames are repeated to RGB; an alpha channel is dropped.
- No resizing or cropping here: each network resizes internally (see below),
  so frames are squashed to its square input whatever their aspect ratio.
- Frechet distances use ``accel.pipelines.reference.judge.frechet_distance``
  (Gaussian fit with the unbiased covariance; StyleGAN's code divides by N,
  a difference of order 1/N).  Each set needs at least 2 feature rows.

FID: every frame of every video is one image.  Network: the Inception-v3
TorchScript StyleGAN2-ADA publishes, ``inception-2015-12-05.pt``.  Called as in
its metric code: ``net(uint8 (N, 3, H, W), return_features=True)``, which
resizes to 299 x 299 and returns the 2048 pool features.

FVD: one clip of ``num_frames`` frames (16, as StyleGAN-V) per video.  Network:
the I3D (Kinetics-400, the tf.hub model of the original FVD) TorchScript
StyleGAN-V publishes, ``i3d_torchscript.pt``.
Called as StyleGAN-V's metric code calls it: ``net(uint8 (N, 3, T, H, W),
rescale=True, resize=True, return_features=True)``; it maps [0, 255] to
[-1, 1] itself, resizes to 224 x 224 and returns the 400 pre-softmax logits.
A video whose length differs from ``num_frames`` is resampled to frames
``round(linspace(0, T - 1, num_frames))``: uniform over the whole video,
first and last included, frames repeated when it is shorter.  (StyleGAN-V
reads consecutive frames of longer real videos instead.)

CLIP score: torchmetrics' definition, ``100 * max(cos(E_image, E_text), 0)``,
here clamped per frame, averaged over a video's frames, then over videos.
Model: a Hugging Face CLIP folder (torchmetrics' default is
``openai/clip-vit-large-patch14``) loaded with ``local_files_only=True``.
Frames go to its own processor as uint8 (shortest side resized, centre crop,
CLIP normalisation); prompts are truncated to the text encoder's length.
"""

from __future__ import annotations

import itertools
import os
import zipfile
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from accel.eval.metrics import to_unit_video

__all__ = ["ENV", "FLAGS", "MissingWeights", "resolve", "fid", "fvd", "clip_score"]

ENV = {"fid": "ACCEL_FID_WEIGHTS", "fvd": "ACCEL_FVD_WEIGHTS", "clip": "ACCEL_CLIP_MODEL"}
FLAGS = {"fid": "--fid-weights", "fvd": "--fvd-weights", "clip": "--clip-model"}
# (what it is, usual name, where it is published)
_SOURCES = {
    "fid": ("FID needs the Inception-v3 TorchScript file published with StyleGAN2-ADA",
            "inception-2015-12-05.pt",
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"),
    "fvd": ("FVD needs the I3D TorchScript file published with StyleGAN-V",
            "i3d_torchscript.pt",
            "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"),
    "clip": ("CLIP score needs a Hugging Face CLIP model folder with config.json, weights, tokenizer "
             "and preprocessor files",
             "openai/clip-vit-large-patch14",
             "https://huggingface.co/openai/clip-vit-large-patch14"),
}


class MissingWeights(ValueError):
    """A network file or folder was not given or does not exist (never downloaded)."""


def resolve(kind: str, path: str | None) -> str:
    """The path given, else ``$ENV[kind]``; MissingWeights when neither is set or it does not exist."""
    if kind not in ENV:
        raise ValueError(f"unknown metric {kind!r}: expected one of {sorted(ENV)}")
    what, name, url = _SOURCES[kind]
    hint = f"usual name {name}, from {url}; nothing is downloaded"
    origin = f"the path given ({FLAGS[kind]})"
    if not path:
        path, origin = os.environ.get(ENV[kind]) or None, f"${ENV[kind]}"
    todo = f"pass its path with {FLAGS[kind]} or set {ENV[kind]}"
    if not path:
        raise MissingWeights(f"{what} ({hint}). None given: {todo}.")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise MissingWeights(f"{what} ({hint}), but {origin} does not exist: {path}. Download it, then {todo}.")
    return path


def _first_sentence(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def _load_torchscript(kind: str, path: str, device: str) -> torch.jit.ScriptModule:
    name = _SOURCES[kind][1]
    # a pickle (e.g. the .pkl twin of the Inception file) would only fail deep inside torch
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a TorchScript file ({kind.upper()} expects {name})")
    try:
        net = torch.jit.load(path, map_location=device)
    except RuntimeError as err:  # e.g. a torch.save state dict: a zip, but no TorchScript code
        raise ValueError(f"cannot load {path} as TorchScript ({kind.upper()} expects {name}): "
                         f"{_first_sentence(err)}") from None
    return net.eval()


def _uint8_frames(video: Any) -> torch.Tensor:
    """(T, 3, H, W) uint8 of one video."""
    v = to_unit_video(video)
    v = v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v[:, :3]
    # floor(255 x + 0.5): rounds like StyleGAN's uint8 conversion of generator output
    return (v * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)


def _resample(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    t = frames.shape[0]
    if t == num_frames:
        return frames
    idx = np.rint(np.linspace(0, t - 1, num_frames)).astype(np.int64)
    return frames[torch.from_numpy(idx)]


def _batches(items: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stacks of up to batch_size items; a change of shape (another resolution) starts a new stack."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[torch.Tensor] = []
    for item in items:
        if pending and (len(pending) == batch_size or item.shape != pending[0].shape):
            yield torch.stack(pending)
            pending = []
        pending.append(item)
    if pending:
        yield torch.stack(pending)


def _features(net: Any, batches: Iterable[torch.Tensor], device: str, **kwargs: bool) -> np.ndarray:
    rows = []
    with torch.inference_mode():
        for batch in batches:
            out = net(batch.to(device), **kwargs)
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the feature network returned {shape}, expected ({batch.shape[0]}, F)")
            rows.append(out.detach().to("cpu", torch.float64).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def _distance(real: np.ndarray, fake: np.ndarray, what: str) -> float:
    from accel.pipelines.reference.judge import frechet_distance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"{what} needs at least 2 {'frames' if what == 'FID' else 'videos'} per set "
                         f"(got {len(real)} real, {len(fake)} generated)")
    return frechet_distance(real, fake)


def fid(real: Sequence, fake: Sequence, weights: str | None = None, *,
        batch_size: int = 32, device: str = "cpu") -> float:
    """Frechet Inception Distance between all frames of ``real`` and all frames of ``fake``."""
    net = _load_torchscript("fid", resolve("fid", weights), device)

    def frames(videos: Sequence) -> Iterator[torch.Tensor]:
        for video in videos:
            yield from _uint8_frames(video)

    feats = [_features(net, _batches(frames(v), batch_size), device, return_features=True)
             for v in (real, fake)]
    return _distance(feats[0], feats[1], "FID")


def fvd(real: Sequence, fake: Sequence, weights: str | None = None, *,
        num_frames: int = 16, batch_size: int = 8, device: str = "cpu") -> float:
    """Frechet Video Distance (StyleGAN-V's I3D protocol) between two sets of videos."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    net = _load_torchscript("fvd", resolve("fvd", weights), device)

    def clips(videos: Sequence) -> Iterator[torch.Tensor]:
        for video in videos:  # (C, T, H, W): the I3D wants channels before time
            yield _resample(_uint8_frames(video), num_frames).permute(1, 0, 2, 3).contiguous()

    feats = [_features(net, _batches(clips(v), batch_size), device,
                       rescale=True, resize=True, return_features=True) for v in (real, fake)]
    return _distance(feats[0], feats[1], "FVD")


def _embedding(out: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding;
    # 4.x returns the tensor itself
    emb = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.nn.functional.normalize(emb.float(), dim=-1)


def _load_clip(path: str, device: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"cannot load a CLIP model and processor from {path}: {_first_sentence(err)}") from None
    return model.to(device).eval(), processor


def clip_score(videos: Sequence, prompts: Sequence[str], model_dir: str | None = None, *,
               batch_size: int = 32, device: str = "cpu") -> float:
    """Mean over videos of the mean over frames of ``100 * max(cos(image, prompt), 0)``."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, one per video")
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts: one prompt per video")
    if len(videos) == 0:
        raise ValueError("clip_score needs at least one video")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, processor = _load_clip(resolve("clip", model_dir), device)
    max_len = model.config.text_config.max_position_embeddings

    with torch.inference_mode():
        text = []
        for i in range(0, len(prompts), batch_size):
            tok = processor.tokenizer(list(prompts[i:i + batch_size]), padding=True, truncation=True,
                                      max_length=max_len, return_tensors="pt")
            text.append(_embedding(model.get_text_features(
                input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))))
        text_emb = torch.cat(text)

        # (video index, HWC uint8 frame), streamed in batches across videos
        def frames() -> Iterator[tuple[int, np.ndarray]]:
            for i, video in enumerate(videos):
                for f in _uint8_frames(video):
                    yield i, f.permute(1, 2, 0).numpy()

        sums = torch.zeros(len(videos), dtype=torch.float64)
        counts = torch.zeros(len(videos), dtype=torch.float64)
        stream = frames()
        while chunk := list(itertools.islice(stream, batch_size)):
            owner = torch.tensor([i for i, _ in chunk])
            pixels = processor.image_processor(images=[f for _, f in chunk], return_tensors="pt")
            img_emb = _embedding(model.get_image_features(pixel_values=pixels["pixel_values"].to(device)))
            cos = (img_emb * text_emb[owner.to(text_emb.device)]).sum(-1).double().cpu()
            sums.index_add_(0, owner, 100.0 * cos.clamp(min=0))
            counts.index_add_(0, owner, torch.ones(len(chunk), dtype=torch.float64))
    return float((sums / counts).mean())
