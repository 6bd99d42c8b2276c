"""Every module imports on its own in a fresh interpreter: no import cycles between layers."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("accel", "attention", "caching", "solvers", "distill", "pipelines", "eval")


def all_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts)


# Runs in a fresh interpreter: third-party libraries are imported once, then each of our modules
# is imported first thing in a forked child, so every child starts with none of our modules loaded
# (what a cycle needs to show up) without paying torch's import time per module.
_FORK_SERVER = """
import os, sys, traceback
import torch, diffusers, transformers, numpy  # third-party only
assert not [m for m in sys.modules if m.split('.')[0] in PACKAGES], 'ours imported too early'
failed = []
for name in MODULES:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
            os._exit(0)
        except BaseException:
            sys.stderr.write(name + ': ' + traceback.format_exc().strip().splitlines()[-1] + '\\n')
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print('failed:', failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    modules = list(all_modules())
    assert len(modules) > 20
    script = f"PACKAGES = {PACKAGES!r}\nMODULES = {modules!r}\n" + _FORK_SERVER
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bottom_layer_imports_nothing_of_ours():
    code = ("import sys, accel.base.registry, accel.base.context, accel.base.changes, accel.base.config, "
            "accel.base.adapter, accel.base.method\n"
            "ours = [m for m in sys.modules if m.split('.')[0] in "
            f"{PACKAGES!r} and not m.startswith('accel.base') and m != 'accel']\n"
            "print(ours); sys.exit(1 if ours else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
