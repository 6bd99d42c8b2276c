"""accel.eval.vbench_suite: VBench's prompt lists and file layout, temporal_flickering against values
computed by hand (and against VBench's own code where ``import vbench`` works), the CLI's errors, and
``run_vbench``'s plumbing through a fake VBench interpreter."""

import json
import os
import stat
import sys

import numpy as np
import pytest

from accel.eval import vbench_suite as V


def _write_mp4(path, frames):
    import imageio.v2 as imageio

    imageio.mimsave(str(path), list(frames), fps=8, codec="libx264", quality=10, macro_block_size=1)
    return str(path)


def _still(t=6, value=100):
    return np.full((t, 16, 16, 3), value, dtype=np.uint8)


# ----------------------------------------------------------------------------- prompts


def test_full_list_is_vbench_all_dimension_946_lines():
    prompts = V.load_prompts("vbench")
    assert len(prompts) == 946 and len(set(prompts)) == 944  # VBench lists two prompts twice
    assert all(p and p == p.strip() for p in prompts)


def test_every_dimension_has_its_prompt_list():
    dims = V.vbench_dimensions()
    assert len(dims) == 16 and "temporal_flickering" in dims
    counts = {d: len(V.load_prompts(f"vbench:{d}")) for d in dims}
    assert all(n > 0 for n in counts.values())
    assert counts["temporal_flickering"] == 75 and counts["subject_consistency"] == 72
    assert V.load_prompts("vbench:dynamic_degree") == V.load_prompts("vbench:subject_consistency")
    suites = ["appearance_style", "color", "human_action", "multiple_objects", "object_class",
              "overall_consistency", "scene", "spatial_relationship", "subject_consistency",
              "temporal_flickering", "temporal_style"]
    union = [p for s in suites for p in V.load_prompts(f"vbench:{s}")]
    assert sorted(union) == sorted(V.load_prompts("vbench"))


def test_unknown_dimension_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown VBench dimension 'flicker'.*temporal_flickering"):
        V.load_prompts("vbench:flicker")


def test_prompt_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na cat\n\n  a dog  \n#skip\n", encoding="utf-8")
    assert V.load_prompts(str(path)) == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="prompt file not found: .*nope.txt"):
        V.load_prompts(str(tmp_path / "nope.txt"))


# ----------------------------------------------------------------------------- file names


def test_file_name_is_vbench_layout_verbatim():
    assert V.video_file_name("A 3D model of a 1800s victorian house.", 0) == "A 3D model of a 1800s victorian house.-0.mp4"
    ukiyo = "A beautiful coastal beach in spring, waves lapping on sand by Hokusai, in the style of Ukiyo"
    assert V.video_file_name(ukiyo, 4) == ukiyo + "-4.mp4"
    for prompt in V.load_prompts("vbench"):  # every VBench prompt is its own file name
        assert V.video_file_name(prompt, 24) == f"{prompt}-24.mp4"


def test_unsafe_prompts_get_a_safe_distinct_name():
    a, b = V.video_file_name("red/blue", 1), V.video_file_name("red_blue/", 1)
    assert "/" not in a and a.startswith("red_blue~") and a.endswith("-1.mp4") and a != b
    long = V.video_file_name("é" * 300, 3)
    assert len(long.encode("utf-8")) <= 255 and long.endswith("-3.mp4")
    long.encode("utf-8").decode("utf-8")  # cut on a character boundary
    assert V.video_file_name("x" * 249, 0) == "x" * 249 + "-0.mp4"  # exactly 255 bytes: kept
    assert V.video_file_name("x" * 250, 0) != "x" * 250 + "-0.mp4"
    with pytest.raises(ValueError):
        V.video_file_name("a", -1)


# ----------------------------------------------------------------------------- temporal_flickering


def test_still_video_scores_one_and_alternating_black_white_zero():
    assert V.temporal_flickering(_still()) == 1.0
    flicker = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    flicker[1::2] = 255
    assert V.temporal_flickering(flicker) == 0.0


def test_known_small_changes_give_the_exact_value():
    ramp = np.stack([np.full((8, 8, 3), 10 + 3 * t, dtype=np.uint8) for t in range(6)])
    assert V.temporal_flickering(ramp) == (255.0 - 3.0) / 255.0  # every pixel +3 each frame
    half = _still(3, 50)
    half[1, :8] += 10  # frame 0->1: half the pixels by 10 (MAE 5); 1->2: back (MAE 5)
    assert V.temporal_flickering(half) == (255.0 - 5.0) / 255.0
    steps = np.stack([np.full((4, 4, 3), v, dtype=np.uint8) for v in (0, 1, 3)])  # MAEs 1, 2
    assert V.temporal_flickering(steps) == (255.0 - 1.5) / 255.0
    down = ramp[::-1].copy()  # absolute difference: direction does not matter
    assert V.temporal_flickering(down) == V.temporal_flickering(ramp)


def test_bad_frames_are_clear_errors():
    with pytest.raises(ValueError, match="uint8"):
        V.temporal_flickering(np.zeros((3, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 2 frames"):
        V.temporal_flickering(_still(1))


def test_mp4_path_reads_every_frame(tmp_path):
    still = _write_mp4(tmp_path / "still-0.mp4", _still(8))
    assert V.temporal_flickering(still, reader="imageio") == 1.0
    flicker = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    flicker[1::2] = 255
    path = _write_mp4(tmp_path / "flicker-0.mp4", flicker)
    frames = V.read_video_frames(path, reader="imageio")
    assert frames.shape == (8, 16, 16, 3) and frames.dtype == np.uint8
    assert V.temporal_flickering(path, reader="imageio") == V.temporal_flickering(frames)
    assert V.temporal_flickering(path) < 0.05  # lossy codec: nearly the minimum
    with pytest.raises(ValueError, match="video not found"):
        V.temporal_flickering(str(tmp_path / "missing.mp4"))


def test_folder_result_has_vbench_json_shape(tmp_path):
    prompts = V.load_prompts("vbench:temporal_flickering")
    _write_mp4(tmp_path / V.video_file_name(prompts[0], 0), _still(4))
    ramp = np.stack([np.full((16, 16, 3), 40 + 20 * t, dtype=np.uint8) for t in range(4)])
    _write_mp4(tmp_path / V.video_file_name(prompts[1], 3), ramp)
    _write_mp4(tmp_path / "not a vbench prompt-0.mp4", _still(4))  # standard mode ignores it
    result = json.loads(json.dumps(V.temporal_flickering_folder(tmp_path)))
    assert list(result) == ["temporal_flickering"]
    mean, videos = result["temporal_flickering"]
    assert [sorted(v) for v in videos] == [["video_path", "video_results"]] * 2
    assert videos[0]["video_path"] == os.path.join(str(tmp_path), f"{prompts[0]}-0.mp4")
    assert videos[0]["video_results"] == 1.0 and 0.9 < videos[1]["video_results"] < 1.0
    assert mean == pytest.approx(np.mean([v["video_results"] for v in videos]))
    custom = V.temporal_flickering_folder(tmp_path, mode="custom_input")["temporal_flickering"][1]
    assert len(custom) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos to score"):
        V.temporal_flickering_folder(tmp_path / "empty")


def _vbench_or_skip():
    try:
        import vbench.temporal_flickering as vt
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"`import vbench` fails in this interpreter ({type(exc).__name__}: {exc}); VBench pins "
                    "numpy<2 and transformers 4.33, so it lives in its own venv (docs/vbench.md)")
    return vt


def test_same_number_as_vbench_itself(tmp_path):
    vt = _vbench_or_skip()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(7, 24, 32, 3), dtype=np.uint8)
    assert V.temporal_flickering(frames) == (255.0 - np.mean(vt.mae_seq(list(frames))).item()) / 255.0
    noisy = np.clip(_still(8).astype(int) + rng.integers(-6, 7, size=(8, 16, 16, 3)), 0, 255).astype(np.uint8)
    paths = [_write_mp4(tmp_path / f"v-{i}.mp4", clip) for i, clip in enumerate([noisy, frames[:, :16, :16]])]
    ours = [V.temporal_flickering(p, reader="cv2") for p in paths]
    assert ours == [vt.cal_score(p) for p in paths]
    avg, per_video = vt.temporal_flickering(paths)
    folder = V.temporal_flickering_folder(tmp_path, mode="custom_input", reader="cv2")["temporal_flickering"]
    assert folder[1] == per_video and folder[0] == pytest.approx(avg, abs=1e-15)


def test_real_vbench_through_run_vbench(tmp_path):
    """Opt-in: ACCEL_VBENCH_PYTHON=/path/to/vbench-venv/bin/python runs the real VBench once."""
    python = os.environ.get("ACCEL_VBENCH_PYTHON")
    if not python:
        pytest.skip("set ACCEL_VBENCH_PYTHON to a VBench venv's python to run the real VBench")
    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        clip = np.clip(_still(8).astype(int) + rng.integers(-8, 9, size=(8, 16, 16, 3)), 0, 255).astype(np.uint8)
        _write_mp4(videos / f"clip {i}-0.mp4", clip)
    scores = V.run_vbench(videos, ["temporal_flickering"], python, tmp_path / "out", mode="custom_input",
                          device="cpu")
    ours = V.temporal_flickering_folder(videos, mode="custom_input")["temporal_flickering"][0]
    assert scores["temporal_flickering"] == pytest.approx(ours, abs=1e-3)  # exact when ours reads with cv2


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_temporal_flickering_json(tmp_path, capsys):
    _write_mp4(tmp_path / "a cat-0.mp4", _still(4))
    out = tmp_path / "res" / "scores.json"
    code = V.main(["--videos", str(tmp_path), "--dimensions", "temporal_flickering", "--mode", "custom_input",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and json.loads(printed) == {"temporal_flickering": 1.0} == json.loads(out.read_text())


def test_cli_needs_vbench_for_other_dimensions(tmp_path, capsys):
    code = V.main(["--videos", str(tmp_path), "--dimensions", "temporal_flickering", "subject_consistency"])
    err = capsys.readouterr().err
    assert code == 2 and "subject_consistency need VBench's models: pass --vbench-python" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_missing_videos_folder(tmp_path, capsys):
    code = V.main(["--videos", str(tmp_path / "nowhere"), "--dimensions", "temporal_flickering"])
    err = capsys.readouterr().err
    assert code == 2 and "videos folder not found" in err and "Traceback" not in err


def test_cli_rejects_unknown_dimension(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        V.main(["--videos", str(tmp_path), "--dimensions", "flicker"])
    assert exit_.value.code == 2 and "invalid choice: 'flicker'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run_vbench plumbing

_FAKE_VBENCH = '''
import json, os
if os.environ.get("FAKE_VBENCH_BROKEN"):
    raise ImportError("No module named 'decord'")

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.call = {"device": device, "full_info_dir": full_info_dir}
        self.out = output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        if os.environ.get("FAKE_VBENCH_FAIL"):
            raise RuntimeError("CUDA out of memory (fake)")
        self.call.update(videos_path=videos_path, name=name, prompt_list=prompt_list, dimensions=dimension_list,
                         local=local, mode=mode, kwargs=kwargs, cache=os.environ.get("VBENCH_CACHE_DIR"))
        with open(os.path.join(self.out, "call.json"), "w") as f:
            json.dump(self.call, f)
        nan = bool(os.environ.get("FAKE_VBENCH_NAN"))
        results = {d: [float("nan") if nan else 0.5 + i / 10, [{"video_path": "v.mp4", "video_results": 0.5}]]
                   for i, d in enumerate(dimension_list)}
        with open(os.path.join(self.out, name + "_eval_results.json"), "w") as f:
            json.dump(results, f, indent=4)
'''
_FAKE_TORCH = '''
def device(name):
    return name

class cuda:
    @staticmethod
    def is_available():
        return False
'''


@pytest.fixture
def fake_python(tmp_path):
    """An executable that acts as a VBench venv's python: the real interpreter with a stand-in
    ``vbench`` (and ``torch``, for speed) first on its path."""
    lib = tmp_path / "fake_site"
    for name, text in (("vbench", _FAKE_VBENCH), ("torch", _FAKE_TORCH)):
        (lib / name).mkdir(parents=True)
        (lib / name / "__init__.py").write_text(text)
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{lib}" exec "{sys.executable}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a cat-0.mp4").write_bytes(b"")  # the fake VBench reads no video
    return script


def test_run_vbench_reads_vbench_results(tmp_path, fake_python):
    scores = V.run_vbench(tmp_path / "videos", ["subject_consistency", "temporal_flickering"], fake_python,
                          tmp_path / "out", cache_dir=tmp_path / "weights")
    assert scores == {"subject_consistency": 0.5, "temporal_flickering": 0.6}
    call = json.loads((tmp_path / "out" / "call.json").read_text())
    assert call["dimensions"] == ["subject_consistency", "temporal_flickering"] and call["mode"] == "vbench_standard"
    assert call["local"] is True and call["device"] == "cpu" and call["prompt_list"] == []
    assert call["videos_path"] == str((tmp_path / "videos").resolve())
    assert call["full_info_dir"].endswith(os.path.join("vbench", "VBench_full_info.json"))
    assert call["kwargs"] == {"imaging_quality_preprocessing_mode": "longer"}
    assert call["cache"] == str((tmp_path / "weights").resolve())
    assert list((tmp_path / "out").glob(f"{call['name']}_eval_results.json"))


def test_run_vbench_custom_input_passes_prompts(tmp_path, fake_python):
    V.run_vbench(tmp_path / "videos", ["aesthetic_quality"], fake_python, tmp_path / "out", mode="custom_input",
                 prompts={"a~123-0.mp4": "a/very long prompt"})
    call = json.loads((tmp_path / "out" / "call.json").read_text())
    assert call["mode"] == "custom_input" and call["prompt_list"] == {"a~123-0.mp4": "a/very long prompt"}
    with pytest.raises(ValueError, match="color only in standard mode"):
        V.run_vbench(tmp_path / "videos", ["color"], fake_python, tmp_path / "out", mode="custom_input")


def test_run_vbench_errors_are_clear(tmp_path, fake_python, monkeypatch):
    videos, out = tmp_path / "videos", tmp_path / "out"
    with pytest.raises(ValueError, match="VBench interpreter not found"):
        V.run_vbench(videos, ["temporal_flickering"], tmp_path / "no" / "python", out)
    with pytest.raises(ValueError, match="videos folder not found"):
        V.run_vbench(tmp_path / "none", ["temporal_flickering"], fake_python, out)
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        V.run_vbench(videos, ["flicker"], fake_python, out)
    with pytest.raises(ValueError, match="must not be the videos folder"):
        V.run_vbench(videos, ["temporal_flickering"], fake_python, videos)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .mp4 or .gif videos in"):
        V.run_vbench(tmp_path / "empty", ["temporal_flickering"], fake_python, out)
    monkeypatch.setenv("FAKE_VBENCH_BROKEN", "1")
    with pytest.raises(ValueError, match=r"(?s)vbench is not importable by .*No module named 'decord'"):
        V.run_vbench(videos, ["temporal_flickering"], fake_python, out)
    monkeypatch.delenv("FAKE_VBENCH_BROKEN")
    monkeypatch.setenv("FAKE_VBENCH_FAIL", "1")
    with pytest.raises(ValueError, match=r"(?s)VBench failed \(exit 1\).*CUDA out of memory \(fake\)"):
        V.run_vbench(videos, ["temporal_flickering"], fake_python, out)
    monkeypatch.delenv("FAKE_VBENCH_FAIL")
    monkeypatch.setenv("FAKE_VBENCH_NAN", "1")
    with pytest.raises(ValueError, match="VBench found no videos for temporal_flickering"):
        V.run_vbench(videos, ["temporal_flickering"], fake_python, out)


def test_cli_with_vbench_python(tmp_path, fake_python, capsys):
    code = V.main(["--videos", str(tmp_path / "videos"), "--dimensions", "dynamic_degree", "--vbench-python",
                   str(fake_python), "--vbench-out", str(tmp_path / "vb")])
    assert code == 0 and json.loads(capsys.readouterr().out) == {"dynamic_degree": 0.5}
    assert json.loads((tmp_path / "vb" / "call.json").read_text())["local"] is True
