"""PSNR / SSIM against hand-computed values and an independent direct implementation."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from accel.eval import metrics as M


def test_psnr_of_constant_frames_with_known_mse():
    a = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    b = a + 0.1  # mse 0.01 in every frame -> 20 dB
    assert M.psnr(a, b) == pytest.approx(20.0, abs=1e-9)


def test_psnr_averages_per_frame_values_not_the_mse():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    b = a.clone()
    b[0] += 0.1    # 20 dB
    b[1] += 0.01   # 40 dB
    assert M.psnr(a, b) == pytest.approx(30.0, abs=1e-9)  # PSNR of the mean mse would be ~23
    assert M.psnr_per_frame(a, b).tolist() == pytest.approx([20.0, 40.0])


def test_psnr_of_identical_videos_is_capped():
    a = torch.rand(3, 3, 8, 8)
    assert M.psnr(a, a) == M.MAX_PSNR
    b = a.clone()
    b[0] = 1 - b[0]
    vals = M.psnr_per_frame(a, b)
    assert vals[1] == vals[2] == M.MAX_PSNR and vals[0] < 20


def test_psnr_uint8_and_layouts():
    a = np.full((2, 6, 5, 3), 100, np.uint8)  # (T, H, W, C)
    b = np.full((2, 6, 5, 3), 110, np.uint8)
    expected = 20 * math.log10(255 / 10)
    assert M.psnr(a, b) == pytest.approx(expected, abs=1e-9)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # (T, C, H, W) floats
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255
    assert M.psnr(ta, tb) == pytest.approx(expected, abs=1e-4)


def test_to_unit_video_accepts_pipeline_outputs():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 12, 16, 3), dtype=np.uint8)
    pil = [Image.fromarray(f) for f in frames]
    a = M.to_unit_video(frames)
    assert a.shape == (4, 3, 12, 16) and a.dtype == torch.float64
    assert torch.equal(a, M.to_unit_video(pil))
    assert torch.allclose(a, M.to_unit_video(frames.astype(np.float32) / 255))
    assert torch.allclose(a, M.to_unit_video(frames[None].astype(np.float32) / 255))  # batch of one
    assert torch.allclose(a, M.to_unit_video(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255))
    with pytest.raises(ValueError):
        M.to_unit_video(np.zeros((4, 5, 6, 7)))


def test_ssim_identical_is_one_and_bounded():
    a = torch.rand(2, 3, 20, 24)
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(a, torch.rand(2, 3, 20, 24)) < 0.2


def test_ssim_of_constant_frames_matches_the_formula():
    # flat frames: sigma terms vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.5, 0.6
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    fa, fb = (torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (a, b))
    assert M.ssim(fa, fb) == pytest.approx(expected, rel=1e-12)


def _direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 written out: every 11x11 window, Gaussian weights, no convolution."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_direct_implementation_per_channel_and_frame():
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, 15, 17))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    direct = np.array([[_direct_ssim(x[t, c], y[t, c]) for c in range(3)] for t in range(2)])
    per_frame = M.ssim_per_frame(torch.from_numpy(x), torch.from_numpy(y))
    assert per_frame.numpy() == pytest.approx(direct.mean(axis=1), abs=1e-10)
    assert M.ssim(x, y) == pytest.approx(direct.mean(), abs=1e-10)


def test_ssim_rejects_frames_smaller_than_the_window_and_mismatched_shapes():
    with pytest.raises(ValueError):
        M.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError):
        M.psnr(torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8))


def test_lpips_names_the_missing_weights_file(tmp_path):
    missing = tmp_path / "alexnet.pth"
    with pytest.raises(FileNotFoundError, match="alexnet.pth"):
        M.lpips(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), weights_path=str(missing))
