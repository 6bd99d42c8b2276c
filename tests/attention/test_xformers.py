"""``attention={"name": "dense", "backend": "xformers"}`` with xformers installed where it has no
operator (this CPU; the 0.0.35 wheel is built for CUDA and another torch): one warning, exactly
the unpatched output. The wheel is installed without its dependencies into the test cache
(``ACCEL_TEST_CACHE``) and imported in a child process, so the suite's own torch stays untouched."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

XFORMERS = "xformers==0.0.35"
CACHE = pathlib.Path(os.environ.get("ACCEL_TEST_CACHE", pathlib.Path.home() / ".cache" / "accel-tests"))
TARGET = CACHE / XFORMERS.replace("==", "-")

CHILD = r'''
import json, warnings, torch, accel
import xformers
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

def run(pipe):
    with torch.no_grad():
        return pipe(**{**tiny_call_kwargs("wan", steps=2), "output_type": "latent"}).frames

pipe = build_tiny_pipeline("wan")
unpatched = run(pipe)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with accel.patched(pipe, attention={"name": "dense", "backend": "xformers"}) as handle:
        patched = run(pipe)
        counters = handle.summary()["methods"]["attention"]["counters"]
said = [str(w.message) for w in caught if str(w.message).startswith("accel")]
print(json.dumps({"xformers": xformers.__version__, "equal": bool(torch.equal(patched, unpatched)),
                  "calls": counters["calls"], "fallback_calls": counters["fallback_calls"], "said": said,
                  "restored": bool(torch.equal(run(pipe), unpatched))}))
'''


@pytest.fixture(scope="module")
def xformers_path():
    if not (TARGET / "xformers" / "__init__.py").is_file():
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TARGET),
                                 XFORMERS], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"the package index is unreachable for {XFORMERS}: "
                        f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return str(TARGET)


def test_xformers_without_an_operator_warns_once_and_runs_exactly_dense(xformers_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([xformers_path, *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["xformers"] == "0.0.35"
    assert report["equal"] and report["restored"], report
    assert report["calls"] > 0 and report["fallback_calls"] == report["calls"], report
    assert len(report["said"]) == 1 and "no memory_efficient_attention operator for cpu float32" in report["said"][0], \
        report["said"]


def test_a_bad_dense_backend_is_refused_naming_the_choices():
    from accel.attention.dense import DenseAttentionConfig

    with pytest.raises(ValueError, match="DenseAttentionConfig.backend must be one of 'caller', 'xformers', got 'flash'"):
        DenseAttentionConfig(backend="flash")
