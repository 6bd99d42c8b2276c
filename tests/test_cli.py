"""The ``accel`` command: listing, benchmarks, commands without their arguments; errors exit non-zero without a traceback.

Everything runs ``accel.cli.main`` in this process; one test starts the installed console script.
"""
import json
import shutil
import subprocess

import pytest

from accel.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_schema(capsys):
    code, out, err = run(capsys, "list", "--json")
    assert code == 0, err
    catalog = json.loads(out)
    assert set(catalog) == {"models", "methods", "presets"}
    assert set(catalog["methods"]) == {"attention", "cache", "solver"}
    assert "dense" in catalog["methods"]["attention"]
    families = {m["family"] for m in catalog["models"]}
    assert families == {"wan", "hunyuan_video", "cogvideox", "ltx", "flux"}
    transformers = {m["transformer"] for m in catalog["models"]}
    assert "WanTransformer3DModel" in transformers and "FluxTransformer2DModel" in transformers
    for family, presets in catalog["presets"].items():
        assert family in families and presets, f"{family} has no preset"


def test_list_human_readable(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "WanTransformer3DModel" in out and "attention" in out


def test_calibrate_without_a_target_exits_nonzero_without_traceback(capsys):
    code, _, err = run(capsys, "calibrate")  # neither --cache nor --solver
    assert code != 0 and err.startswith("accel calibrate:")
    assert "Traceback" not in err


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["warp"])
    assert exit_info.value.code == 2 and "invalid choice: 'warp'" in capsys.readouterr().err


def test_console_script_installed():
    exe = shutil.which("accel")
    assert exe is not None, "the 'accel' console script is not on PATH (pip install -e .)"
    result = subprocess.run([exe, "list", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wan" in {m["family"] for m in json.loads(result.stdout)["models"]}


def test_bench_attention_tiny_cpu_writes_rows(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code, _, err = run(capsys, "bench", "attention", "--device", "cpu", "--shape", "tiny", "--densities", "1.0",
                       "0.25", "--repeats", "2", "--json", str(out))
    assert code == 0, err[-2000:]
    rows = json.loads(out.read_text())
    backends = {row["backend"] for row in rows}
    assert {"flex"} <= backends and any(b.startswith("sdpa") for b in backends)
    for row in rows:
        assert {"shape", "device_name", "torch", "density", "backend", "ms", "speedup_vs_sdpa"} <= set(row)
        assert row["ms"] > 0


def test_list_and_version_do_not_import_diffusers_pipelines():
    """What keeps ``accel list`` fast (1.5 s measured, most of it torch's own import)."""
    import subprocess
    import sys

    code = ("import sys; from accel.cli import main; assert main(['list']) == 0\n"
            "heavy = [m for m in ('diffusers', 'transformers', 'scipy') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-500:] + result.stderr[-2000:]


def test_version_and_every_help_exit_zero(capsys):
    for argv in (["--version"], ["--help"], ["list", "--help"], ["demo", "--help"], ["bench", "cache", "--help"],
                 ["bench", "attention", "--help"], ["calibrate", "--cache", "teacache", "--help"],
                 ["calibrate", "--solver", "dss", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0, argv
    assert main(["calibrate", "--help"]) == 0 and "accel calibrate --cache" in capsys.readouterr().out
