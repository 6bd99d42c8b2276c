"""``accel bench sparse``: rows, captured-attention error and honesty notes on the tiny Wan pipeline."""
import json

import pytest

from accel.eval.bench_sparse_quality import main, notes_for, parse_overrides, pick


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # Blocks of 16 tokens: the tiny grid (3x4x4 = 48 tokens) is then 3 blocks, so 0.5 is really
    # sparse. The torch reference backend keeps the test fast (compiling FlexAttention costs
    # ~15 s per mask shape on CPU); it is exact against the compiled path (tests/attention).
    path = tmp_path_factory.mktemp("bench") / "sparse.json"
    assert main(["--model", "tiny", "--prompts", "1", "--steps", "3", "--patterns", "radial", "topk",
                 "--densities", "0.5", "1.0", "--block-size", "16", "--backend", "torch", "--threads", "1",
                 "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_result_layout(result):
    assert set(result) >= {"what", "environment", "workload", "baseline", "rows", "capture"}
    assert result["baseline"]["wall_seconds"] > 0
    # 3 steps x 2 layers: steps int(0.3*3)=0 and int(0.7*3)=2, layers int(0.25*2)=0 and int(0.75*2)=1.
    assert result["capture"]["points"] == [[0, 0], [0, 1], [2, 0], [2, 1]]
    assert [(r["pattern"], r["density"]) for r in result["rows"]] == [
        ("radial", 0.5), ("radial", 1.0), ("topk", 0.5), ("topk", 1.0)]
    for row in result["rows"]:
        assert row["backend"] == "torch" and row["block_size"] == 16
        assert row["dense_warmup"] == 0.2 and row["dense_layers"] == 1  # the patterns' defaults, recorded
        for key in ("psnr", "ssim", "wall_seconds", "speedup", "realised_density", "attn_rel_error",
                    "attn_rel_error_max", "attn_cosine", "attn_density"):
            assert isinstance(row[key], float), key
        assert row["prompt_accuracy"] is None  # no judge for the random-weight tiny model
        assert row["fallback_calls"] == 0 and row["attn_fallback_calls"] == 0
        if row["density"] == 1.0:  # every block kept is dense attention: the model's own kernel, every call
            assert row["sparse_calls"] == 0 and row["dense_calls"] > 0
        else:
            assert row["sparse_calls"] > 0 and row["dense_calls"] > 0  # warm-up step and first layer dense
        assert 0.0 < row["realised_density"] <= 1.0 and isinstance(row["notes"], list)


def test_density_one_matches_dense(result):
    for row in (r for r in result["rows"] if r["density"] == 1.0):
        assert row["attn_density"] == 1.0
        assert row["attn_rel_error"] < 1e-5 and row["attn_cosine"] > 0.99999, row
        assert row["psnr"] > 60, row
        assert row["notes"] == []


def test_sparse_rows_are_sparse_or_say_why(result):
    radial = next(r for r in result["rows"] if r["pattern"] == "radial" and r["density"] == 0.5)
    assert radial["attn_density"] < 0.75 and radial["realised_density"] < 1.0
    assert 1e-3 < radial["attn_rel_error"] <= radial["attn_rel_error_max"] and radial["attn_cosine"] < 1.0
    assert radial["psnr"] < 100
    topk = next(r for r in result["rows"] if r["pattern"] == "topk" and r["density"] == 0.5)
    if topk["attn_density"] >= 0.999:  # random tiny weights: blocks may be too scattered to pool
        assert topk["attn_rel_error"] < 1e-5 and "fully dense" in topk["notes"][0]
    else:
        assert topk["attn_rel_error"] > 1e-3 and topk["notes"] == []


def test_notes_flag_fallbacks():
    assert "fell back" in notes_for({"density": 0.25, "fallback_calls": 3, "attn_density": 1.0})[0]


def test_pick_and_overrides():
    assert pick((0.3, 0.7), 10) == [3, 7] and pick((0.25, 0.75), 8) == [2, 6] and pick((0.3, 0.7), 1) == [0]
    assert parse_overrides(["similarity_threshold=-1", "reorder=hilbert"], ["topk"]) == {
        "similarity_threshold": -1, "reorder": "hilbert"}
    with pytest.raises(ValueError, match="similarity_threshold"):
        parse_overrides(["similarity_threshold=-1"], ["radial"])


def test_int8_rows_measure_quantization_error(tmp_path):
    """int8 has no density: one row, at 1.0, on the simulated-quantization reference (the CPU
    stand-in for the kernel). Its error must be small but not zero: INT8 QK^T is not exact."""
    path = tmp_path / "int8.json"
    assert main(["--model", "tiny", "--prompts", "1", "--steps", "3", "--patterns", "int8", "--densities", "0.5",
                 "0.25", "--block-size", "32", "--backend", "torch", "--threads", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["pattern"], r["density"]) for r in rows] == [("int8", 1.0)]
    row = rows[0]
    assert row["quantized_calls"] > 0 and row["fallback_calls"] == 0 and row["attn_fallback_calls"] == 0
    assert 0.0 < row["attn_rel_error"] < 0.03 and row["attn_cosine"] > 0.999
    assert 40.0 < row["psnr"] < 100.0
