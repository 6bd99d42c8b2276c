"""The layers stay layers: which of our packages may import which, and no import cycles.

Static rules (every import statement, lazy ones inside functions included):

* ``accel.base`` imports nothing of ours but itself;
* the method packages (``accel.attention``, ``accel.caching``, ``accel.solvers``) import only
  ``accel.base`` and themselves: never each other, never an adapter, never the public API;
* the adapters and builders (``accel.pipelines``) import only ``accel.base`` and themselves;
* ``accel.distill`` may use everything below the command line; ``accel.eval`` everything but the
  command line; the top (``accel.api``, ``accel.cli``, ...) composes everything.

And at run time every module imports alone in a fresh interpreter.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("accel", "attention", "caching", "solvers", "distill", "pipelines", "eval")
METHODS = {"attention", "caching", "solvers"}
ALLOWED = {
    "base": {"base"},
    **{name: {"base", name} for name in METHODS},
    "pipelines": {"base", "pipelines"},
    "distill": {"base", "distill", "pipelines", "top", *METHODS},
    "eval": {"base", "eval", "distill", "pipelines", "top", *METHODS},
    "cli": {"base", "eval", "distill", "pipelines", "top", "cli", *METHODS},
    "top": {"base", "eval", "distill", "pipelines", "top", *METHODS},
}


def module_files():
    """(dotted module name in the accel namespace, path) for every module we ship."""
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts if folder == "accel" else ["accel", *parts]), path


def layer(module: str) -> str:
    """The layer of a dotted name in the accel namespace."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("api", "config", "catalog", "step_tracking", "_source_tree"):
        return "top"
    return parts[1] if parts[1] in ALLOWED else "top"


def imported_modules(module: str, path: pathlib.Path):
    """Every accel module that ``path`` imports, with the line, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # ``from accel import caching`` imports the subpackage accel.caching
            names = [f"{target}.{alias.name}" if target == "accel" else target for alias in node.names]
        else:
            continue
        for name in names:
            if name == "accel" or name.startswith("accel."):
                yield name, node.lineno


def test_every_folder_of_ours_is_scanned():
    modules = dict(module_files())
    assert len(modules) > 60
    assert {layer(m) for m in modules} == set(ALLOWED)


@pytest.mark.parametrize("rule", sorted(ALLOWED))
def test_layers_import_only_what_they_may(rule):
    broken = []
    for module, path in module_files():
        if layer(module) != rule:
            continue
        for target, line in imported_modules(module, path):
            if layer(target) not in ALLOWED[rule]:
                broken.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({layer(target)})")
    assert not broken, "\n".join(broken)


def test_no_module_imports_a_top_level_folder_name():
    """Inside the namespace every import says accel.<name>: a bare ``import caching`` would load a
    second copy of the package (or another project's ``caching``) and register methods twice."""
    bare = []
    for module, path in module_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bare += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                     if n and n.split(".")[0] in FOLDERS[1:]]
    assert not bare, "\n".join(bare)


# Runs in a fresh interpreter: third-party libraries are imported once, then each of our modules
# is imported first thing in a forked child, so every child starts with none of our modules loaded
# (what a cycle needs to show up) without paying torch's import time per module.
_FORK_SERVER = """
import os, sys, traceback
import torch, diffusers, transformers, numpy  # third-party only
assert not [m for m in sys.modules if m == 'accel' or m.startswith('accel.')], 'ours imported too early'
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
    modules = [name for name, _ in module_files()]
    script = f"MODULES = {modules!r}\n" + _FORK_SERVER
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bottom_layer_loads_nothing_else_of_ours():
    code = ("import sys, accel.base.registry, accel.base.context, accel.base.changes, accel.base.config, "
            "accel.base.adapter, accel.base.method\n"
            "ours = [m for m in sys.modules if m.startswith('accel.') and not m.startswith('accel.base') "
            "and m != 'accel._source_tree']\n"
            "print(ours); sys.exit(1 if ours else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
