import json
import shutil
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "accel.cli", *args], capture_output=True, text=True, timeout=120)


def test_list_json_schema():
    result = run_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    catalog = json.loads(result.stdout)
    assert set(catalog) == {"models", "methods", "presets"}
    assert set(catalog["methods"]) == {"attention", "cache", "solver"}
    assert "dense" in catalog["methods"]["attention"]
    families = {m["family"] for m in catalog["models"]}
    assert families == {"wan", "hunyuan_video", "cogvideox", "ltx", "flux"}
    transformers = {m["transformer"] for m in catalog["models"]}
    assert "WanTransformer3DModel" in transformers and "FluxTransformer2DModel" in transformers
    for family, presets in catalog["presets"].items():
        assert family in families and presets, f"{family} has no preset"


def test_list_human_readable():
    result = run_cli("list")
    assert result.returncode == 0
    assert "WanTransformer3DModel" in result.stdout and "attention" in result.stdout


@pytest.mark.parametrize("command", ["calibrate", "eval"])  # calibrate without --cache/--solver
def test_reserved_commands_exit_nonzero_without_traceback(command):
    result = run_cli(command)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_console_script_installed():
    exe = shutil.which("accel")
    assert exe is not None, "the 'accel' console script is not on PATH (pip install -e .)"
    assert subprocess.run([exe, "list", "--json"], capture_output=True, timeout=120).returncode == 0


def test_bench_attention_tiny_cpu_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "attention", "--device", "cpu", "--shape", "tiny", "--densities", "1.0", "0.25",
                     "--repeats", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    backends = {row["backend"] for row in rows}
    assert {"flex"} <= backends and any(b.startswith("sdpa") for b in backends)
    for row in rows:
        assert {"shape", "device_name", "torch", "density", "backend", "ms", "speedup_vs_sdpa"} <= set(row)
        assert row["ms"] > 0
