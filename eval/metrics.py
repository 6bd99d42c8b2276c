"""Paired fidelity metrics for videos: PSNR, SSIM and (optional) LPIPS.

They compare an accelerated output with the un-accelerated one (same prompt,
seed and settings).  Every function takes two videos in any layout that
:func:`to_unit_video` understands and returns the mean over frames.

Conventions (documented because implementations differ):

- Inputs are intensities in [0, 1] (uint8 is divided by 255); data range 1.
- PSNR: per frame ``20 * log10(1 / sqrt(mse))`` with the MSE over all
  channels and pixels of that frame, then the mean over frames.  A frame with
  MSE 0 (or below 1e-10) scores ``MAX_PSNR`` = 100 dB, so identical videos
  give exactly 100.0 and averages stay finite.
- SSIM: Gaussian SSIM as in Wang et al. 2004 ("Image quality assessment: from
  error visibility to structural similarity"): an 11 x 11 Gaussian window with
  sigma 1.5, K1 = 0.01, K2 = 0.03, L = 1, computed per channel and per frame
  over the 'valid' region (no padding, as in the authors' reference code),
  averaged over the map, then over channels and frames.  No down-sampling.
- LPIPS: optional (AlexNet variant, needs the ``lpips`` package and local
  weights; nothing is downloaded).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MAX_PSNR", "to_unit_video", "psnr", "psnr_per_frame", "ssim", "ssim_per_frame", "lpips"]

MAX_PSNR = 100.0
_CHANNELS = (1, 3, 4)


def to_unit_video(frames: Any) -> torch.Tensor:
    """Normalise a video to a float64 tensor (T, C, H, W) in [0, 1].

    Accepts a torch tensor or numpy array shaped (T, C, H, W) or (T, H, W, C)
    (channels 1, 3 or 4; a leading batch axis of size 1 is dropped), a single
    (H, W, C)/(C, H, W) frame, or a list of PIL images / arrays / tensors (one
    per frame).  uint8 is scaled by 1/255; floats are taken as already in [0, 1].
    """
    if isinstance(frames, (list, tuple)):
        return torch.cat([to_unit_video(f) for f in frames], dim=0)
    if not isinstance(frames, (np.ndarray, torch.Tensor)):  # PIL image
        frames = np.array(frames.convert("RGB") if hasattr(frames, "convert") else frames)
    t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    t = t.detach().cpu()
    t = t.double() / 255.0 if t.dtype == torch.uint8 else t.double()
    if t.ndim == 2:  # single grey frame
        t = t[None, None]
    elif t.ndim == 3:  # single frame, CHW or HWC
        t = t[None]
    if t.ndim == 5 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 4:
        raise ValueError(f"expected a video (T, C, H, W) or (T, H, W, C), got shape {tuple(t.shape)}")
    if t.shape[1] not in _CHANNELS and t.shape[-1] in _CHANNELS:
        t = t.permute(0, 3, 1, 2)
    elif t.shape[1] not in _CHANNELS:
        raise ValueError(f"cannot find the channel axis (1, 3 or 4 channels) in shape {tuple(t.shape)}")
    return t.contiguous()


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_unit_video(a), to_unit_video(b)
    if x.shape != y.shape:
        raise ValueError(f"videos differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr_per_frame(a: Any, b: Any) -> torch.Tensor:
    """(T,) PSNR in dB of each frame, capped at MAX_PSNR."""
    x, y = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    val = -10.0 * torch.log10(mse.clamp(min=1e-10))  # == 20 log10(1 / sqrt(mse))
    return torch.where(mse < 1e-10, torch.full_like(val, MAX_PSNR), val.clamp(max=MAX_PSNR))


def psnr(a: Any, b: Any) -> float:
    """Mean over frames of the per-frame PSNR (dB); see the module doc for the cap."""
    return float(psnr_per_frame(a, b).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_per_frame(a: Any, b: Any, window: int = 11, sigma: float = 1.5,
                   k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """(T,) SSIM of each frame (mean over its channels and the valid map)."""
    x, y = _pair(a, b)
    t, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"frames of {h}x{w} are smaller than the {window}x{window} SSIM window")
    g = _gaussian_window(window, sigma)
    # separable Gaussian filter, valid region only, every (frame, channel) plane independently
    gh, gw = g.view(1, 1, window, 1), g.view(1, 1, 1, window)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, gh), gw)

    x, y = x.reshape(t * c, 1, h, w), y.reshape(t * c, 1, h, w)
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return smap.view(t, c, -1).mean(dim=2).mean(dim=1)


def ssim(a: Any, b: Any, **kwargs: Any) -> float:
    """Gaussian SSIM (Wang et al. 2004), mean over channels and frames."""
    return float(ssim_per_frame(a, b, **kwargs).mean())


DEFAULT_LPIPS_WEIGHTS = os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub", "checkpoints",
                                     "alexnet-owt-7be5be79.pth")


def lpips(a: Any, b: Any, weights_path: str | None = None, device: str = "cpu") -> float:
    """LPIPS (AlexNet, v0.1), mean over frames.  Optional: needs the ``lpips``
    package and the torchvision AlexNet weights on disk (``weights_path``, else
    ``$ACCEL_LPIPS_ALEX``, else torchvision's cache file); never downloads."""
    path = weights_path or os.environ.get("ACCEL_LPIPS_ALEX") or DEFAULT_LPIPS_WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS needs local AlexNet weights; expected the file {path} "
            "(torchvision's alexnet-owt-7be5be79.pth; pass weights_path= or set ACCEL_LPIPS_ALEX)")
    try:
        import lpips as lpips_pkg  # optional dependency
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lpips() needs the optional 'lpips' package (pip install lpips)") from e
    x, y = _pair(a, b)
    model = lpips_pkg.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu")
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    # lpips wraps torchvision's AlexNet features in 5 slices that keep the original indices
    for sl in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for name, module in sl.named_children():
            if f"{name}.weight" in feats:
                module.weight.data.copy_(feats[f"{name}.weight"])
                module.bias.data.copy_(feats[f"{name}.bias"])
    model = model.to(device).eval()
    with torch.no_grad():
        d = model(x.float().to(device)[:, :3] * 2 - 1, y.float().to(device)[:, :3] * 2 - 1)
    return float(d.mean())


def describe() -> dict[str, str]:
    """One-line descriptions of the variants, for reports."""
    return {
        "psnr": f"per-frame 20*log10(1/sqrt(mse)) on [0,1], mean over frames, capped at {MAX_PSNR:g} dB",
        "ssim": "Gaussian SSIM (Wang et al. 2004): 11x11, sigma 1.5, K1 0.01, K2 0.03, L 1, valid region, "
                "per channel per frame, mean",
        "lpips": "LPIPS v0.1 AlexNet (optional, local weights)",
    }

