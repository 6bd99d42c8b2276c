"""``accel bench compile`` on the tiny pipeline: one row per method, compiled equal to eager."""
import json

from accel.eval import bench_compile


def test_bench_compile_rows(tmp_path):
    out = tmp_path / "compile.json"
    assert bench_compile.main(["--model", "tiny", "--prompts", "1", "--steps", "2", "--backend", "eager",
                               "--methods", "dense", "topk", "--turns", "1", "--threads", "1",
                               "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["compile"] == {"style": "regional", "backend": "eager", "fullgraph": True}
    assert [row["method"] for row in result["rows"]] == ["dense", "topk"]
    for row in result["rows"]:
        assert row["attention_calls"] > 0 and row["fallback_calls"] == 0
        assert row["psnr_compiled_vs_eager"] == 100.0  # the PSNR cap: equal outputs
        assert row["eager_seconds"] > 0 and row["compiled_seconds"] > 0
        assert row["compiled_over_eager"]["repeats"] == 1
