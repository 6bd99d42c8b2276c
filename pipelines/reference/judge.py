"""A tiny video classifier that judges clips of the procedural domain (``data.py``).

It predicts shape, colour, motion and background from a clip and gives three
*domain* metrics for the reference model:

- ``prompt_accuracy(videos, specs)``: fraction of videos whose shape, colour
  AND motion all match the prompt they were generated from;
- ``judge_features(videos)``: penultimate-layer features, (N, 128);
- ``frechet_distance(a, b)``: Frechet distance between two feature sets
  (Gaussian fit, scipy ``sqrtm``), used as a "reference FVD".

These are metrics for this toy domain only.  They are *not* FID/FVD (no
Inception/I3D network, features from a classifier trained on the same
procedural data) and their numbers are not comparable with published ones.

The classifier is a small 2D + 3D CNN (143k parameters, 0.6 MB, see
``Judge``).  It resamples any input to 16 frames of 64 x 128, so it also
accepts other resolutions.  It is trained on clips of the *training*
combinations only (with noise/blur augmentation so that imperfect generated
clips are judged fairly) and validated on the held-out combinations:
``python -m accel.pipelines.reference.judge --train [--device cuda]``.  The shipped
weights (``judge.json`` records how) used ``--steps 1000 --batch-size 32
--device cuda``: 15 s on an H100, 100% on every held-out attribute.  The same
recipe runs on CPU (1-2 s a step on two free cores); data are drawn on the
CPU, so the batches do not depend on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from accel.pipelines.reference import data

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "judge.safetensors")
HEADS = {"shape": len(data.SHAPES), "colour": len(data.COLOUR_NAMES),
         "motion": len(data.MOTIONS), "background": len(data.BACKGROUNDS)}
INPUT_SIZE = (16, 64, 128)  # frames, height, width the judge resamples to
FRAMES_2D = (0, 5, 10, 15)  # frames (of the 16) the per-frame branch looks at


class Judge(nn.Module):
    """Two small branches, pooled and joined:

    - a per-frame 2D CNN on 4 of the 16 frames, max-pooled over space and time:
      shape (and colour) are visible in any frame, and a 2D branch learns shape
      far faster than the 3D one (which stayed at chance for hundreds of steps);
    - a 3D CNN over all 16 frames, mean- and max-pooled: motion and background.
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32, 48), channels_2d: Sequence[int] = (16, 32, 64, 64),
                 feature_dim: int = 128):
        super().__init__()
        c1, c2, c3, c4 = channels
        # First 3D layer is per frame (no temporal kernel) at stride 2: cheap on the
        # full-resolution input; later layers mix time so motion is visible.
        self.convs = nn.ModuleList([
            nn.Conv3d(3, c1, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            nn.Conv3d(c1, c2, 3, stride=(2, 2, 2), padding=1, bias=False),
            nn.Conv3d(c2, c3, 3, stride=(2, 2, 2), padding=1, bias=False),
            nn.Conv3d(c3, c4, 3, stride=(1, 2, 2), padding=1, bias=False),
        ])
        self.norms = nn.ModuleList([nn.BatchNorm3d(c) for c in channels])
        ins = (3,) + tuple(channels_2d[:-1])
        strides = (2, 2, 2, 1)
        self.convs_2d = nn.ModuleList([nn.Conv2d(i, o, 3, stride=st, padding=1, bias=False)
                                       for i, o, st in zip(ins, channels_2d, strides)])
        self.norms_2d = nn.ModuleList([nn.BatchNorm2d(c) for c in channels_2d])
        self.fc = nn.Linear(2 * c4 + channels_2d[-1], feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in HEADS.items()})

    @staticmethod
    def prepare(videos: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) in [0, 1] -> (N, 3, 16, 64, 128) centred input.

        Frames are picked (nearest, evenly spaced) rather than interpolated, so a
        16-frame render equals a 29-frame one up to sub-frame timing."""
        frames, height, width = INPUT_SIZE
        t = videos.shape[1]
        if t != frames:
            videos = videos[:, torch.linspace(0, t - 1, frames).round().long()]
        x = videos.permute(0, 2, 1, 3, 4).float()
        if tuple(x.shape[3:]) != (height, width):
            x = F.interpolate(x.flatten(1, 2), size=(height, width), mode="bilinear",
                              antialias=True, align_corners=False).view(*x.shape[:3], height, width)
        return x * 2 - 1

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        x = self.prepare(videos)  # (N, 3, 16, H, W)
        n = x.shape[0]
        y = x[:, :, FRAMES_2D].transpose(1, 2).flatten(0, 1)  # (N * 4, 3, H, W)
        for conv, norm in zip(self.convs_2d, self.norms_2d):
            y = F.relu(norm(conv(y)))
        y = y.amax(dim=(2, 3)).view(n, len(FRAMES_2D), -1).amax(dim=1)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        # avg pooling sees the background, max pooling finds the (small) shape
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4)), y], dim=1)
        return F.relu(self.fc(pooled))

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(videos)
        return {k: head(f) for k, head in self.heads.items()}


def as_video_batch(videos) -> torch.Tensor:
    """Accept a (N,T,3,H,W)/(N,T,H,W,3) tensor or array, or a list of per-video
    (T,3,H,W)/(T,H,W,3) tensors/arrays (float in [0,1] or uint8); return float
    (N, T, 3, H, W) in [0, 1]."""
    items = list(videos) if isinstance(videos, (list, tuple)) else [videos]
    out = []
    for v in items:
        t = torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        if t.ndim == 4:
            t = t.unsqueeze(0)
        if t.shape[-1] == 3 and t.shape[2] != 3:
            t = t.permute(0, 1, 4, 2, 3)
        out.append(t)
    return torch.cat(out, 0)


_CACHE: dict[str, Judge] = {}


def load_judge(path: str = WEIGHTS) -> Judge:
    if path not in _CACHE:
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"judge weights not found at {path}; train with "
                                    "python -m accel.pipelines.reference.judge --train")
        cfg = json.load(open(os.path.splitext(path)[0] + ".json")) if os.path.isfile(
            os.path.splitext(path)[0] + ".json") else {}
        model = Judge(tuple(cfg.get("channels", (8, 16, 32, 48))), tuple(cfg.get("channels_2d", (16, 32, 64, 64))),
                      cfg.get("feature_dim", 128))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()})
        _CACHE[path] = model.eval()
    return _CACHE[path]


@torch.no_grad()
def _run(videos, fn, judge: Judge | None = None, batch_size: int = 16) -> torch.Tensor | dict:
    judge = judge or load_judge()
    batch = as_video_batch(videos)
    outs = [fn(judge, batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def predict(videos, judge: Judge | None = None) -> torch.Tensor:
    """(N, 4) predicted (shape, colour, motion, background) indices."""
    logits = _run(videos, lambda j, b: j(b), judge)
    return torch.stack([logits[k].argmax(-1) for k in HEADS], dim=1)


def prompt_accuracy(videos, specs: Sequence[data.Spec], judge: Judge | None = None) -> float:
    """Fraction of videos whose predicted shape, colour and motion all match ``specs``."""
    pred = predict(videos, judge)
    target = data.specs_to_tensor(specs)
    return float((pred[:, :3] == target[:, :3]).all(dim=1).float().mean())


def attribute_accuracy(videos, specs: Sequence[data.Spec], judge: Judge | None = None) -> dict[str, float]:
    pred, target = predict(videos, judge), data.specs_to_tensor(specs)
    return {k: float((pred[:, i] == target[:, i]).float().mean()) for i, k in enumerate(HEADS)}


def judge_features(videos, judge: Judge | None = None) -> np.ndarray:
    """(N, 128) penultimate features (float64 numpy)."""
    return _run(videos, lambda j, b: j.features(b), judge).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)) of Gaussian fits to two
    (N, F) feature sets (as in FID; the imaginary part of sqrtm is numerical noise)."""
    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # fewer samples than features: singular, still well defined
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        eps = np.eye(cov_a.shape[0]) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- training


def augment(clips: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and tiny brightness shifts: generated clips are never as clean as rendered ones."""
    n, dev = clips.shape[0], clips.device
    rand = lambda: torch.rand(n, 1, 1, 1, 1, generator=gen, device=dev)  # noqa: E731
    noise_sd = rand() * 0.05
    clips = clips + noise_sd * torch.randn(clips.shape, generator=gen, device=dev)
    flat = clips.flatten(0, 1)
    blurred = F.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False).view_as(clips)
    mix = (rand() < 0.5).float() * rand()
    clips = clips * (1 - mix) + blurred * mix
    clips = clips + (rand() - 0.5) * 0.04
    return clips.clamp(0, 1)


def validation_set(clips_per_spec: int = 4, seed: int = 1234) -> tuple[torch.Tensor, list[data.Spec]]:
    specs = [s for s in data.held_out_specs() for _ in range(clips_per_spec)]
    return data.make_batch(specs, generator=torch.Generator().manual_seed(seed), spread=1.0), specs


def train(steps: int = 400, batch_size: int = 24, lr: float = 3e-3, seed: int = 0,
          minutes: float | None = None, log_every: int = 50, device: str = "cpu") -> tuple[Judge, dict]:
    """Train on rendered clips of the training combinations; validate on held-out ones.
    Jitter and labels come from a CPU generator, so the data are the same on any device."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)                    # specs + jitter (CPU: device independent)
    aug_gen = torch.Generator(device).manual_seed(seed + 1)      # augmentation noise, on the device
    model = Judge().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start, step = time.time(), 0
    for step in range(steps):
        if minutes is not None and time.time() - start > minutes * 60:
            break
        idx = data.random_specs(batch_size, gen)
        # 16 rendered frames = what the judge keeps of a 29-frame clip (see prepare)
        clips = data.make_batch(idx, num_frames=INPUT_SIZE[0], generator=gen, device=device, spread=1.0)
        logits = model(augment(clips, aug_gen))
        loss = sum(F.cross_entropy(logits[k], idx[:, i].to(device)) for i, k in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0:
            print(f"judge step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model = model.cpu().eval()
    clips, specs = validation_set()
    acc = attribute_accuracy(clips, specs, model)
    acc["prompt"] = prompt_accuracy(clips, specs, model)
    info = {"steps": step + 1, "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(device),
            "seconds": round(time.time() - start, 1), "heldout_accuracy": acc,
            "params": sum(p.numel() for p in model.parameters())}
    return model, info


def save(model: Judge, info: dict, path: str = WEIGHTS) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    cfg = {"channels": [c.out_channels for c in model.convs],
           "channels_2d": [c.out_channels for c in model.convs_2d], "feature_dim": model.fc.out_features,
           "input_size": list(INPUT_SIZE), "heads": HEADS, "train": info}
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(cfg, f, indent=2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="train and save the judge")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=WEIGHTS)
    args = ap.parse_args(argv)
    if args.train:
        model, info = train(args.steps, args.batch_size, seed=args.seed, device=args.device)
        save(model, info, args.out)
        print(json.dumps(info, indent=2))
    else:
        clips, specs = validation_set()
        print(json.dumps(attribute_accuracy(clips, specs), indent=2))


if __name__ == "__main__":
    main()
