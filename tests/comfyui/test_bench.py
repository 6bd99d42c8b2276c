"""``accel bench comfyui`` end to end on a small setting: the rows it promises, from real runs."""
import json

import pytest

from accel.eval import bench_comfyui


def test_bench_reports_skips_exactness_and_timings(comfy, comfyui_dir, tmp_path):
    out = tmp_path / "bench.json"
    code = bench_comfyui.main(["--comfyui", str(comfyui_dir), "--json", str(out), "--steps", "6", "--layers", "2",
                               "--latent", "1,16,3,8,8", "--repeats", "1", "--rows", "fast", "dense"])
    assert code == 0
    result = json.loads(out.read_text())
    fast, dense = result["rows"]
    skipped, calls = map(int, fast["steps_skipped"]["cond_uncond"].split("/"))
    assert calls == 6 and 0 < skipped < 6 and fast["compute_fraction"] < 1.0
    assert fast["latent_psnr"] < 100.0 and dense["latent_psnr"] == 100.0
    assert dense["attention"]["calls"] == 2 * 6 and dense["attention"]["fallback_calls"] == 0
    assert result["unpatched_rerun_identical"] is True and result["environment"]["comfyui"]
    assert fast["speedup"] > 0 and len(fast["baseline_timings"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--latent", "1,16"], "expected B,C,T,H,W (or B,C,H,W for images)"),
    (["--rows", "turbo"], "invalid choice: 'turbo'"),
    (["--family", "sd15"], "invalid choice: 'sd15'"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_comfyui.main(["--comfyui", "x", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_that_is_not_comfyui_is_a_clear_error(tmp_path, capsys):
    assert bench_comfyui.main(["--comfyui", str(tmp_path)]) == 2
    assert "is not a ComfyUI folder" in capsys.readouterr().err


def test_a_latent_of_another_family_is_a_clear_error(comfy, comfyui_dir, capsys):
    assert bench_comfyui.main(["--comfyui", str(comfyui_dir), "--family", "flux", "--latent", "1,16,3,8,8"]) == 2
    assert "--latent 1,16,3,8,8 does not fit flux: its latents are 4-D with 16 channels" in capsys.readouterr().err
