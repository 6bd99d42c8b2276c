"""``accel eval`` end to end on the reference model at a few steps: VBench layout, records,
aggregate, report; a run killed halfway resumes with the rest only and aggregates to the same
numbers; a run split between two processes (torchrun, gloo) aggregates to the one-process numbers.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from accel.cli import main
from accel.eval import evaluation
from accel.eval.vbench_suite import video_file_name

FLAGS = ["--presets", "dense,fast", "--limit", "2", "--seeds", "2", "--steps", "3", "--frames", "9", "--threads", "1", "--players", "1"]
TIMING = {"wall_seconds", "speedup", "speedup_min", "speedup_max"}


def eval_cli(*args):
    return main(["eval", *args])


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, (list, tuple)):
        return [without_timing(v) for v in value]
    return value


def flat(value, prefix=""):
    """{"a.b.0.c": leaf}: a failed comparison names the keys that differ."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def read_run(out):
    aggregate = json.loads((out / "aggregate.json").read_text())
    items = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    return aggregate, items


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "straight"
    assert eval_cli("--out", str(out), *FLAGS) == 0
    return out


def test_reference_prompt_file_is_the_held_out_captions():
    from accel.eval.vbench_suite import load_prompts
    from accel.pipelines.reference import data

    assert load_prompts(evaluation.REFERENCE_PROMPTS) == [data.caption(s) for s in data.held_out_specs()]


def test_a_run_writes_vbench_layout_records_aggregate_and_report(straight_run):
    aggregate, items = read_run(straight_run)
    prompts = evaluation.load_prompt_list("reference", 2)
    for column in ("dense", "fast"):
        names = sorted(os.listdir(straight_run / column))
        assert names == sorted(video_file_name(p, i) for p in prompts for i in range(2)), names
    assert len(items) == 2 * 4 and {r["preset"] for r in items} == {"dense", "fast"}
    for record in items:
        assert (straight_run / record["video"]).stat().st_size > 0
        assert record["prompt"] in prompts and record["seed"] == record["index"] in (0, 1)
        assert 0.0 <= record["prompt_accuracy"] <= 1.0
    fast = [r for r in items if r["preset"] == "fast"]
    assert all(r["summary"]["methods"]["cache"]["name"] for r in fast)
    assert all(0 < r["psnr"] < 100 and 0 < r["ssim"] <= 1 for r in fast), "fast is not the dense video"
    rows = aggregate["presets"]
    assert list(rows) == ["dense", "fast"] and aggregate["items"] == 4
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["psnr"] is None
    for key in ("speedup", "speedup_min", "speedup_max", "psnr", "ssim", "prompt_accuracy", "reference_fvd",
                "compute_fraction"):
        assert rows["fast"][key] is not None, key
    assert rows["fast"]["psnr"] == pytest.approx(sum(r["psnr"] for r in fast) / 4, abs=1e-3)
    assert rows["fast"]["compute_fraction"] < 1.0
    assert 0 < rows["fast"]["vbench"]["temporal_flickering"] <= 1
    for absent in ("fid", "fvd", "clip_score", "lpips"):  # present only when computed
        assert absent not in rows["fast"]
    html = (straight_run / "report.html").read_text()
    assert "fast" in html and prompts[0] in html


def test_a_killed_run_resumes_with_the_rest_only_and_aggregates_the_same(straight_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    calls, killed = [], []
    original = evaluation.Generator.run

    def dies_in_the_second_item(self, prompt, seed, patch_kwargs=None, steps=None):
        calls.append(steps)
        if len(calls) == 6 and not killed:  # 2 warm-ups, item 1 dense + fast, item 2 dense: killed in item 2's fast
            killed.append(True)
            raise KeyboardInterrupt
        return original(self, prompt, seed, patch_kwargs, steps)

    monkeypatch.setattr(evaluation.Generator, "run", dies_in_the_second_item)
    with pytest.raises(KeyboardInterrupt):
        eval_cli("--out", str(out), *FLAGS)
    assert not (out / "aggregate.json").exists()
    calls.clear()
    assert eval_cli("--out", str(out), *FLAGS) == 0
    # a warm-up per column + 3 items left (item 2 started over: its dense video is needed) x 2 columns
    assert len(calls) == 2 + 3 * 2, calls
    calls.clear()
    assert eval_cli("--out", str(out), *FLAGS) == 0
    assert calls == [], "a finished run generates nothing when run again"
    assert flat(without_timing(read_run(out))) == flat(without_timing(read_run(straight_run)))


def test_resuming_with_other_settings_is_a_clear_error(straight_run, capsys):
    code = eval_cli("--out", str(straight_run), *FLAGS[:-2], "--players", "1", "--steps", "4")
    assert code == 2 and "other settings (steps differ)" in capsys.readouterr().err


def test_two_processes_split_the_items_and_aggregate_the_same(tmp_path):
    """Both runs in fresh interpreters: after the rest of the suite, this process's own state (torch
    settings other tests leave behind) moved the dense frames by a rounding step in CI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "accel.cli", "eval", "--out", str(tmp_path / "one"), *FLAGS],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    out = tmp_path / "sharded"
    with socket.socket() as probe:  # a free port: a fixed one can still be held by an earlier run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), "-m", "accel.cli", "eval", "--out", str(out), *FLAGS],
                            capture_output=True, text=True, timeout=600, env=env)
    errors = [line for line in result.stderr.splitlines() if "accel eval: error" in line or "Error" in line]
    assert result.returncode == 0, "\n".join(errors) or result.stderr[-3000:]
    assert "process 1/2: 2 item(s)" in result.stdout and "process 2/2: 2 item(s)" in result.stdout
    assert flat(without_timing(read_run(out))) == flat(without_timing(read_run(tmp_path / "one")))


class Features(torch.nn.Module):
    """A stand-in for the published extractors' call signatures: pooled colour features."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        pooled = x.float().flatten(2).mean(-1) if x.dim() == 4 else x.float().mean(dim=(3, 4)).flatten(1)
        return torch.cat([pooled, pooled.square() / 255.0], dim=1)


def test_distribution_metrics_and_vbench_scores_join_a_finished_run(straight_run, tmp_path, capsys):
    """A finished run given local extractors aggregates again with FID/FVD (nothing regenerated);
    ``accel eval vbench`` on one of its preset folders merges its scores into the aggregate."""
    out = tmp_path / "copy"
    shutil.copytree(straight_run, out)
    weights = str(tmp_path / "features.pt")
    torch.jit.script(Features()).save(weights)
    assert eval_cli("--out", str(out), *FLAGS, "--fid-weights", weights, "--fvd-weights", weights) == 0
    assert "generated 0 item(s)" in capsys.readouterr().out
    rows = read_run(out)[0]["presets"]
    assert rows["fast"]["fid"] > 0 and rows["fast"]["fvd"] > 0
    assert "fid" not in rows["dense"], "dense is the reference set of the Frechet distances"

    code = main(["eval", "vbench", "--videos", str(out / "fast"), "--dimensions", "temporal_flickering",
                 "--mode", "custom_input"])
    captured = capsys.readouterr()
    assert code == 0 and "merged into" in captured.err, captured.err
    printed = json.loads(captured.out)["temporal_flickering"]
    assert read_run(out)[0]["presets"]["fast"]["vbench"]["temporal_flickering"] == pytest.approx(printed, abs=1e-6)


def test_the_same_frames_make_the_same_file_whatever_cpus_the_process_may_use(tmp_path):
    """x264 picks its thread count from the CPUs it may use, and the file changed with it: a sharded
    run (whose processes may be pinned) then read back other frames than one process had written."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a process that may use 2 CPUs or more, and sched_setaffinity (Linux)")
    from accel.eval.video_io import write_video

    frames = torch.rand(29, 64, 128, 3, generator=torch.Generator().manual_seed(0)).mul(255).to(torch.uint8).numpy()
    write_video(str(tmp_path / "all.mp4"), frames)
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        write_video(str(tmp_path / "one.mp4"), frames)
    finally:
        os.sched_setaffinity(0, allowed)
    assert (tmp_path / "all.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes()
