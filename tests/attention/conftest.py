"""Run a test module's Triton kernel cases in Triton's CPU interpreter, in a child process.

Triton decides compiler vs interpreter when `import triton` decorates its own standard library,
so TRITON_INTERPRET=1 must be set before Triton's first import, which this pytest process cannot
promise. The child imports the test module by path and calls its ``kernel_case_errors(case_id)``
for every id in its ``KERNEL_CASES``; errors are reported per case, so one failure does not hide
the others.
"""
import json
import os
import subprocess
import sys

import pytest

_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("interpreted_cases", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
results = {}
for case_id in mod.KERNEL_CASES:
    try:
        results[case_id] = mod.kernel_case_errors(case_id)
    except Exception as error:
        results[case_id] = {"error": f"{type(error).__name__}: {error}"}
print("RESULTS=" + json.dumps(results))
"""


@pytest.fixture(scope="session")
def run_cases_in_interpreter():
    def run(test_file: str) -> dict:
        pytest.importorskip("triton")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(test_file))))
        proc = subprocess.run([sys.executable, "-c", _CHILD, test_file], env=env, capture_output=True, text=True,
                              timeout=300, cwd=root)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS=")]
        assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stderr[-4000:]}"
        return json.loads(lines[-1][len("RESULTS="):])
    return run
