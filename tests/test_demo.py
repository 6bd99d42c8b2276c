"""``accel demo`` writes videos and reports; bad input exits non-zero with a message, no traceback.

Runs ``accel.cli.main`` in this process (tests/test_packaging.py runs the installed command).
"""
import json

import pytest

from accel.cli import main
from accel.pipelines.tiny import build_tiny_pipeline

TINY_FLAGS = ["--steps", "2", "--height", "64", "--width", "64", "--frames", "9", "--repeats", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def saved_tiny_wan(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-wan"
    build_tiny_pipeline("wan").save_pretrained(str(path))
    return str(path)


@pytest.fixture
def demo(capsys):
    def run(*args):
        code = main(["demo", *args])
        _, err = capsys.readouterr()
        return code, err
    return run


def test_demo_writes_videos_and_reports(demo, saved_tiny_wan, tmp_path):
    out = tmp_path / "demo"
    code, err = demo("--model", saved_tiny_wan, "--out", str(out), "--preset", "dense", "--seed", "3", *TINY_FLAGS)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("prompt", "preset", "baseline_seconds", "accelerated_seconds", "speedup", "speedup_spread",
                "repeats", "compute_fraction", "warnings", "device", "dtype", "threads", "psnr", "ssim"):
        assert key in report, key
    assert report["preset"] == "dense" and report["seed"] == 3 and report["steps"] == 2
    assert report["repeats"] == 2 and len(report["baseline_timings"]) == len(report["accelerated_timings"]) == 2
    low, high = report["speedup_spread"]
    assert low <= report["speedup"] <= high or abs(high - low) < 1e-3
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["threads"] == 1
    assert report["psnr"] >= 99, "the dense preset must reproduce the dense video"
    assert report["speedup"] == pytest.approx(report["baseline_seconds"] / report["accelerated_seconds"], rel=1e-2)
    for name in ("baseline.mp4", "accelerated.mp4", "side_by_side.mp4", "side_by_side.gif", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "Wall-clock speed-up" in (out / "report.md").read_text()


def test_an_unknown_preset_is_a_clear_error_before_the_model_loads(demo, saved_tiny_wan, tmp_path, monkeypatch):
    """The preset names depend on the model, read from its model_index.json; every other bad argument
    is in tests/test_cli_errors.py."""
    from accel.eval import demo as demo_module

    monkeypatch.setattr(demo_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model first"))
    code, err = demo("--model", saved_tiny_wan, "--out", str(tmp_path / "o"), "--preset", "warp", *TINY_FLAGS)
    assert code == 2 and "accel demo: error: unknown preset 'warp'" in err
    assert "Traceback" not in err
