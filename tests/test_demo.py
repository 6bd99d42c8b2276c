"""``accel demo`` writes videos and reports; bad input exits non-zero with a message, no traceback."""
import json
import os
import subprocess
import sys

import pytest

from accel.pipelines.tiny import build_tiny_pipeline

TINY_FLAGS = ["--steps", "2", "--height", "64", "--width", "64", "--frames", "9"]


@pytest.fixture(scope="module")
def saved_tiny_wan(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-wan"
    build_tiny_pipeline("wan").save_pretrained(str(path))
    return str(path)


def demo(*args):
    return subprocess.run([sys.executable, "-m", "accel.cli", "demo", *args], capture_output=True, text=True,
                          timeout=600)


def test_demo_writes_videos_and_reports(saved_tiny_wan, tmp_path):
    out = tmp_path / "demo"
    result = demo("--model", saved_tiny_wan, "--out", str(out), "--preset", "dense", "--seed", "3", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("prompt", "preset", "baseline_seconds", "accelerated_seconds", "speedup", "psnr", "ssim"):
        assert key in report, key
    assert report["preset"] == "dense" and report["seed"] == 3 and report["steps"] == 2
    assert report["psnr"] >= 99, "the dense preset must reproduce the dense video"
    assert report["speedup"] == pytest.approx(report["baseline_seconds"] / report["accelerated_seconds"], rel=1e-2)
    for name in ("baseline.mp4", "accelerated.mp4", "side_by_side.mp4", "side_by_side.gif", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "speedup" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["unknown_preset", "unwritable_out", "missing_model"])
def test_demo_bad_input_is_a_clear_error(case, saved_tiny_wan, tmp_path):
    if case == "unknown_preset":
        result = demo("--model", saved_tiny_wan, "--out", str(tmp_path / "o"), "--preset", "warp", *TINY_FLAGS)
        expected = "unknown preset 'warp'"
    elif case == "unwritable_out":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        result = demo("--model", saved_tiny_wan, "--out", str(blocker / "sub"), *TINY_FLAGS)
        expected = "cannot write to --out"
    else:
        result = demo("--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o"), *TINY_FLAGS)
        expected = "cannot load --model"
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
