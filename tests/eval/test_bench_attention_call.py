"""``accel bench attention --mode call``: the whole routed call per pattern, timed by phase; and the
memory of a cold cluster plan grows no faster than its inputs."""
import json

import pytest
import torch

from accel.cli import main
from accel.eval import bench_attention_call as B

# 3 x 8 x 16 = 384 visual tokens and 32 text tokens in front (FLUX-like joint attention), 32-token
# blocks; the pure-torch kernel path, so no compile time lands in the test.
SMALL = B.CallGeometry((3, 8, 16), 2, 64, 32, "prefix")
KNOBS = {"block_size": 32, "backend": "torch"}


@pytest.mark.parametrize("name", B.PATTERNS)
def test_every_pattern_runs_sparse_with_its_phases_timed(name):
    row = B.measure(name, SMALL, 2, "cpu", torch.float32, **KNOBS)
    assert row["tokens"] == 384 + 32 and "fallback_reasons" not in row, row
    assert row["fallback_calls"] == 0 and 0 < row["realised_density"] <= 1.0
    for call in ("first", "steady"):
        phases = [row[call][f"{p}_ms"] for p in B.PHASES]
        assert all(ms >= 0 for ms in phases) and row[call]["kernel_ms"] > 0
        assert sum(phases) <= row[call]["total_ms"] * 1.05 + 1.0, row[call]  # the parts fit in the whole


def test_a_pattern_that_cannot_run_says_why_and_runs_dense():
    image = B.CallGeometry((1, 8, 16), 2, 64)  # one frame: no temporal axis for spatiotemporal
    row = B.measure("spatiotemporal", image, 2, "cpu", torch.float32, **KNOBS)
    assert row["fallback_calls"] == 2 and row["realised_density"] is None
    assert any("frame" in reason for reason in row["fallback_reasons"]), row["fallback_reasons"]


def test_the_table_and_json_come_from_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(B, "GEOMETRIES", {"small": SMALL})
    monkeypatch.setattr(B, "measure_in_child", lambda name, geometry, heads, *a, **k:
                        B.measure(name, B.GEOMETRIES[geometry], heads, "cpu", torch.float32, **KNOBS))
    out = tmp_path / "call.json"
    assert main(["bench", "attention", "--mode", "call", "--device", "cpu", "--geometry", "small", "--patterns",
                 "radial", "topk", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "radial" in table and "topk" in table and "vs dense" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["dense", "radial", "topk"]
    assert all(r["steady_vs_dense"] > 0 for r in rows[1:])


def test_a_cold_cluster_plan_adds_memory_no_faster_than_its_inputs():
    """The cluster pattern's first plan once filled 24 GB through per-centroid temporaries; each
    size runs in a fresh process (peak RSS is per process), plan alone, inputs 2x apart."""
    added, inputs = [], []
    for frames in (8, 16):
        geom = B.CallGeometry((frames, 32, 64), 4, 64)
        row = B.measure_in_child("cluster", geom, 4, "cpu", "float32", 1, plan_only=True)
        assert "error" not in row, row
        added.append(row["added_memory_gb"])
        inputs.append(3 * frames * 32 * 64 * 4 * 64 * 4 / 2**30)  # q, k, v in fp32
    # twice the tokens add at most a few copies of the added inputs (about 0.3 GB of it is the first
    # call's own fixed cost: lazy imports, allocator pools), and never more than a few GB in all
    assert added[1] - added[0] <= 4 * (inputs[1] - inputs[0]), (added, inputs)
    assert added[1] < 1.0, (added, inputs)
