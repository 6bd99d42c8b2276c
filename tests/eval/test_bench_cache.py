"""``accel bench cache`` end to end on the tiny Wan pipeline (plumbing: its numbers mean nothing)."""
import json

import pytest

from accel.cli import main as accel_main
from accel.eval.bench_cache import pareto_front, targets


def test_bench_cache_writes_rows_for_ours_and_peers(tmp_path):
    out = tmp_path / "cache.json"
    code = accel_main(["bench", "cache", "--model", "tiny", "--prompts", "1", "--json", str(out),
                       "--only", "fbcache", "fixed", "FirstBlockCache", "PyramidAttentionBroadcast", "DBCache"])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["baseline_drift_psnr"] == 100.0  # every peer's disable restored the pipeline exactly
    ours = [r for r in rows if r["source"] == "accel"]
    assert {r["method"] for r in ours} == {"fbcache", "fixed"}
    for row in ours:
        assert 0.0 < row["compute_fraction"] <= 1.0
        assert row["psnr"] > 20 and 0 < row["ssim"] <= 1 and row["wall_speedup"] > 0
    # The smallest fbcache threshold never reuses on the tiny model: the dense video exactly.
    exact = [r for r in ours if r["method"] == "fbcache" and r["params"]["threshold"] == 0.05]
    assert exact[0]["compute_fraction"] == 1.0 and exact[0]["psnr"] == 100.0
    # Skipping work must show up as compute below 1 and a video that differs from dense.
    skipping = [r for r in ours if r["method"] == "fixed" and r["params"]["interval"] == 3]
    assert all(r["compute_fraction"] < 0.5 and r["psnr"] < 100 for r in skipping)
    peers = {r["method"] for r in rows if r["source"] == "diffusers"}
    assert peers == {"FirstBlockCache", "PyramidAttentionBroadcast"}
    for row in ours:  # the hooks' count and the engine's own agree
        assert abs(row["compute_fraction"] - row["engine_compute_fraction"]) < 1e-3
    for row in rows:
        assert set(row) >= {"method", "source", "params", "compute_fraction"}
        assert "skipped" in row or 0.0 < row["compute_fraction"] <= 1.0
        assert "skipped" in row or set(row) >= {"wall_speedup", "psnr", "ssim", "prompt_accuracy"}


def _row(source, compute, psnr):
    return {"method": "m", "source": source, "params": {}, "compute_fraction": compute, "wall_speedup": 1 / compute,
            "psnr": psnr, "prompt_accuracy": None}


def test_pareto_front_and_matched_compute_targets():
    rows = [_row("accel", 0.5, 40.0), _row("accel", 0.3, 30.0), _row("diffusers", 0.45, 35.0),
            _row("diffusers", 0.3, 29.5), _row("cache-dit", 0.8, 45.0), _row("diffusers", 0.2, 20.0),
            {"method": "x", "source": "diffusers", "params": {}, "compute_fraction": None, "skipped": "no"}]
    front = pareto_front(rows)
    assert [(r["compute_fraction"], r["psnr"]) for r in front] == [(0.2, 20.0), (0.3, 30.0), (0.45, 35.0),
                                                                    (0.5, 40.0), (0.8, 45.0)]
    result = targets(rows, None)
    by_peer = {c["peer"]["compute_fraction"]: c for c in result["matched_compute"]}
    assert set(by_peer) == {0.2, 0.3, 0.45}  # the 0.8 row is above the matched range, the skipped one has no PSNR
    # at 0.45 (> 0.4) ours at no more compute is 30 dB at 0.3: 5 dB short
    assert by_peer[0.45]["ours"]["psnr"] == 30.0 and not by_peer[0.45]["met"]
    # at 0.3 (<= 0.4) ours is 0.5 dB ahead, but 1 dB is required
    assert by_peer[0.3]["margin_db"] == 0.5 and by_peer[0.3]["required_db"] == 1.0 and not by_peer[0.3]["met"]
    # at 0.2 we have nothing at no more compute
    assert by_peer[0.2]["ours"] is None and not by_peer[0.2]["met"]
    assert not result["all_met"] and result["worst"]["peer"]["compute_fraction"] == 0.2


def test_bench_cache_rejects_bad_prompt_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        accel_main(["bench", "cache", "--model", "tiny", "--prompts", "0"])
    assert exit_info.value.code == 2 and "argument --prompts: must be in [1, inf], got 0" in capsys.readouterr().err
