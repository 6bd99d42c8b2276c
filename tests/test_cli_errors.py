"""Every bad argument of every ``accel`` command: a one-line message, exit code 2, no traceback.

In process (``accel.cli.main``); argument checks fail before any model loads, and a file a run
writes at its end is checked writable before the run starts. Several rows failed before issue 20
(tracebacks from deep inside diffusers, exit 0 with a 1-frame video or an empty table).
"""
import os
import shutil

import pytest

from accel.cli import main
from accel.pipelines.reference import build

WEIGHTS = build.WEIGHTS_DIR


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Pipeline folders broken the ways downloads and checkouts break, and other bad paths."""
    root = tmp_path_factory.mktemp("broken")
    paths = {"file": root / "a-file", "missing": root / "no-such-folder"}
    paths["file"].write_text("not a folder")
    weights = "transformer/diffusion_pytorch_model.safetensors"
    for name in ("lfs", "truncated", "empty_tokenizer", "garbage_encoder"):
        paths[name] = root / name
        shutil.copytree(WEIGHTS, paths[name])
    (paths["lfs"] / weights).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with open(paths["truncated"] / weights, "r+b") as fh:
        fh.truncate(100_000)
    (paths["empty_tokenizer"] / "tokenizer/tokenizer.json").write_text("")
    (paths["garbage_encoder"] / "text_encoder/model.safetensors").write_bytes(os.urandom(5000))
    paths["binary_dss"] = root / "dss"
    paths["binary_dss"].mkdir()
    (paths["binary_dss"] / "dss-2.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    return {k: str(v) for k, v in paths.items()}


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own exit after printing usage and the message
        code = exit_.code
    return code, capsys.readouterr().err


CASES = [
    # accel demo
    (["demo", "--height", "0"], "argument --height: must be in [1, inf], got 0"),
    (["demo", "--width", "-64"], "argument --width: must be in [1, inf], got -64"),
    (["demo", "--frames", "0"], "argument --frames: must be in [1, inf], got 0"),
    (["demo", "--frames", "-4"], "argument --frames: must be in [1, inf], got -4"),
    (["demo", "--steps", "0"], "argument --steps: must be in [1, 1000], got 0"),
    (["demo", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
    (["demo", "--out", "{file}/sub"], "argument --out: cannot write to {file}/sub: {file} is a file"),
    (["demo", "--model", "{missing}", "--out", "{tmp}"], "--model {missing}: no such folder"),
    (["demo", "--model", "{lfs}", "--out", "{tmp}"], "diffusion_pytorch_model.safetensors is a git-lfs pointer"),
    (["demo", "--model", "{truncated}", "--out", "{tmp}"], "diffusion_pytorch_model.safetensors is truncated"),
    (["demo", "--model", "{empty_tokenizer}", "--out", "{tmp}"], "tokenizer/tokenizer.json is empty"),
    (["demo", "--height", "17", "--width", "33", "--steps", "1", "--out", "{tmp}"],
     "`height` and `width` have to be divisible by 16 but are 17 and 33"),
    # accel bench sparse | cache | solvers (shared workload flags) and their own
    (["bench", "sparse", "--prompts", "0"], "argument --prompts: must be in [1, inf], got 0"),
    (["bench", "sparse", "--steps", "-1"], "argument --steps: must be in [1, 1000], got -1"),
    (["bench", "sparse", "--threads", "-1"], "argument --threads: must be in [1, inf], got -1"),
    (["bench", "sparse", "--densities", "0"], "argument --densities: must be a finite number in (0, 1], got 0"),
    (["bench", "sparse", "--weights", "{missing}"], "no trained reference pipeline at {missing}"),
    (["bench", "sparse", "--weights", "{lfs}"], "is a git-lfs pointer"),
    (["bench", "sparse", "--json", "{file}/out.json"], "argument --json: cannot write {file}/out.json"),
    (["bench", "cache", "--only", "bogus"], "argument --only: invalid choice: 'bogus'"),
    (["bench", "cache", "--threads", "-2"], "argument --threads: must be in [1, inf], got -2"),
    (["bench", "cache", "--weights", "{truncated}"], "diffusion_pytorch_model.safetensors is truncated"),
    (["bench", "cache", "--png", "{file}/plot.png"], "argument --png: cannot write {file}/plot.png"),
    (["bench", "solvers", "--step-counts", "0"], "argument --step-counts: must be in [1, 1000], got 0"),
    (["bench", "solvers", "--teacher-steps", "0"], "argument --teacher-steps: must be in [1, 1000], got 0"),
    (["bench", "solvers", "--weights", "{empty_tokenizer}"], "tokenizer/tokenizer.json is empty"),
    (["bench", "solvers", "--model", "tiny", "--prompts", "1", "--step-counts", "2", "--solvers", "dss",
      "--dss", "{binary_dss}"], "DSS artifact {binary_dss}/dss-2.json: is not a text file"),
    # accel bench compile
    (["bench", "compile", "--methods", "bogus"], "argument --methods: unknown ['bogus']"),
    (["bench", "compile", "--backend", "bogus"], "argument --backend: unknown 'bogus'"),
    (["bench", "compile", "--turns", "0"], "argument --turns: must be in [1, inf], got 0"),
    (["bench", "compile", "--style", "half"], "argument --style: invalid choice: 'half'"),
    # accel bench attention
    (["bench", "attention", "--densities", "nan"], "argument --densities: must be a finite number in (0, 1], got nan"),
    (["bench", "attention", "--densities", "0"], "argument --densities: must be a finite number in (0, 1], got 0"),
    (["bench", "attention", "--densities", "-0.5"], "argument --densities: must be a finite number in (0, 1]"),
    (["bench", "attention", "--repeats", "0"], "argument --repeats: must be in [1, inf], got 0"),
    (["bench", "attention", "--json", "{file}/rows.json"], "argument --json: cannot write {file}/rows.json"),
    (["bench", "attention", "--device", "cuda"], "--device cuda: no CUDA device visible"),
    (["bench", "warp"], "argument target: invalid choice: 'warp'"),
    # accel calibrate
    (["calibrate"], "say what to calibrate"),
    (["calibrate", "--cache", "teacache", "--model", "{missing}", "--steps", "2", "--out", "{tmp}/c.json"],
     "--model {missing}: no such folder"),
    (["calibrate", "--cache", "teacache", "--model", "{garbage_encoder}", "--steps", "2", "--out", "{tmp}/c.json"],
     "text_encoder/model.safetensors is truncated"),
    (["calibrate", "--cache", "teacache", "--model", "reference", "--steps", "2", "--frames", "0", "--out",
      "{tmp}/c.json"], "argument --frames: must be in [1, inf], got 0"),
    (["calibrate", "--cache", "teacache", "--model", "reference", "--steps", "2", "--out", "{file}/c.json"],
     "argument --out: cannot write {file}/c.json"),
    (["calibrate", "--solver", "dss", "--steps", "0", "--out", "{tmp}/d.json"],
     "argument --steps: must be in [1, 1000], got 0"),
    (["calibrate", "--solver", "dss", "--steps", "2", "3", "--model", "tiny:wan", "--out", "{file}/d-{{steps}}.json"],
     "--out: cannot write {file}/d-2.json"),
    (["calibrate", "--solver", "dss", "--steps", "2", "--model", "{missing}", "--out", "{tmp}/d.json"],
     "--model {missing}: no such folder"),
    # accel eval: flags and what they name, before any model loads
    (["eval"], "the following arguments are required: --out"),
    (["eval", "--out", "{file}"], "argument --out: {file} is a file, not a folder"),
    (["eval", "--out", "{tmp}/e", "--presets", "dense,turbo"], "--presets: unknown preset 'turbo' for wan"),
    (["eval", "--out", "{tmp}/e", "--prompts", "{missing}.txt"], "--prompts"),
    (["eval", "--out", "{tmp}/e", "--prompts", "vbench:no_such_dimension"], "no_such_dimension"),
    (["eval", "--out", "{tmp}/e", "--seeds", "0"], "argument --seeds: must be in [1, inf], got 0"),
    (["eval", "--out", "{tmp}/e", "--cache", "{{not json"], "--cache: not valid JSON"),
    (["eval", "--out", "{tmp}/e", "--fvd-weights", "{missing}.pt"], "i3d_torchscript.pt"),
    (["eval", "--out", "{tmp}/e", "--model", "{missing}"], "--model {missing}: no such folder"),
    (["eval", "vbench", "--videos", "{missing}", "--dimensions", "temporal_flickering"], "{missing}"),
    # unknown
    (["warp"], "argument command: invalid choice: 'warp'"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_one_clear_line(argv, message, broken, capsys, tmp_path):
    names = {**broken, "tmp": str(tmp_path)}
    code, err = run([a.format(**names) for a in argv], capsys)
    assert code == 2, err
    assert message.format(**names) in err, err
    assert "Traceback" not in err
