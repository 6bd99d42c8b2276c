"""diffusers' own transformer model tests, run on models accel patches right after they are built
(``accel_patch_plugin.py``), against the same tests unpatched: every setting must pass as many.

Skipped unless ``DIFFUSERS_SRC`` names a checkout of diffusers' repository (its ``tests/``
folder): CI has none. ``ACCEL_PEER_TABLE=FILE`` also writes the pass counts as JSON. How to run
it: docs/peer_tests.md.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
SOURCE = os.environ.get("DIFFUSERS_SRC")
FAMILIES = ("wan", "hunyuan_video", "flux", "ltx", "cogvideox")
pytestmark = pytest.mark.skipif(not SOURCE, reason="DIFFUSERS_SRC does not name a checkout of diffusers' repository")


def run_suite(family: str, setting: str = "") -> dict:
    test_file = pathlib.Path(SOURCE) / "tests" / "models" / "transformers" / f"test_models_transformer_{family}.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)}
    env.pop("ACCEL_PEER_SETTING", None)
    if setting:
        env["ACCEL_PEER_SETTING"] = setting
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "accel_patch_plugin", str(test_file), "-q",
                             "-p", "no:cacheprovider", "-rf"], cwd=SOURCE, env=env, capture_output=True, text=True,
                            timeout=1200)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|errors|skipped|xpassed)",
                                                     result.stdout.splitlines()[-1] if result.stdout else "")}
    counts["failures"] = re.findall(r"^FAILED (\S+)", result.stdout, re.M)
    return counts


@pytest.fixture(scope="module")
def table():
    rows = {}
    yield rows
    if os.environ.get("ACCEL_PEER_TABLE"):
        pathlib.Path(os.environ["ACCEL_PEER_TABLE"]).write_text(json.dumps(rows, indent=1))


def settings():
    sys.path.insert(0, str(HERE))
    try:
        import accel_patch_plugin
        return list(accel_patch_plugin.SETTINGS)
    finally:
        sys.path.remove(str(HERE))


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_models_pass_diffusers_model_tests_as_unpatched(family, table):
    unpatched = run_suite(family)
    assert unpatched.get("passed", 0) > 0, unpatched
    table[family] = {"unpatched": unpatched.get("passed", 0)}
    missing = {}
    for setting in settings():
        patched = run_suite(family, setting)
        table[family][setting] = patched.get("passed", 0)
        if patched.get("passed", 0) != unpatched["passed"]:
            missing[setting] = sorted(set(patched["failures"]) - set(unpatched["failures"]))
    assert not missing, missing
