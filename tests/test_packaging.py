"""What gets installed: one import package, ``accel``, carrying the library and what the demo needs."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def package_folders():
    """accel.<dotted> -> folder, for every package folder under a top-level package folder."""
    found = {}
    for top in sorted(p for p in ROOT.iterdir() if (p / "__init__.py").is_file()):
        for init in top.glob("**/__init__.py"):
            parts = list(init.parent.relative_to(ROOT).parts)
            found[".".join(parts if parts[0] == "accel" else ["accel", *parts])] = init.parent.relative_to(ROOT)
    return found


def test_pyproject_maps_every_package_folder_into_the_namespace():
    setuptools = pyproject()["tool"]["setuptools"]
    assert sorted(setuptools["packages"]) == sorted(package_folders())
    top_level = {name: str(folder) for name, folder in package_folders().items() if len(folder.parts) == 1}
    assert setuptools["package-dir"] == top_level
    assert pyproject()["project"]["name"] == "accel-diffusers"


def test_source_tree_import_maps_the_same_folders():
    """``python -c "import accel; import accel.caching"`` in the repository root, nothing installed
    on the path but the checkout: every subpackage resolves to its top-level folder."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
            "import accel, accel.caching, accel.attention.kernels, accel.pipelines.reference\n"
            "print(accel.caching.__file__, accel.attention.kernels.__file__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(ROOT / "caching/__init__.py"), str(ROOT / "attention/kernels/__init__.py")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a copy of the checkout, so setuptools' build/ folder does not land in it."""
    source, out = tmp_path_factory.mktemp("source") / "accel", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("accel_diffusers-*.whl")
    return built


def test_wheel_installs_one_namespace_and_runs_the_demo_outside_the_repository(wheel, tmp_path):
    """A fresh venv gets only the wheel; its dependencies (torch, diffusers, ...) are borrowed from this
    environment by a path entry, which does not run this environment's editable-install hook."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (pathlib.Path(site) / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)

    info = next(pathlib.Path(site).glob("accel_diffusers-*.dist-info"))
    assert (info / "top_level.txt").read_text().split() == ["accel"]
    installed = {line.split(",")[0].split("/")[0] for line in (info / "RECORD").read_text().splitlines()}
    assert installed - {".."} == {"accel", info.name}  # ".." is the console script in bin/

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("attention", "caching", "pipelines", "eval"):
        probe = subprocess.run([str(python), "-c", f"import {name}"], capture_output=True, text=True, cwd=outside,
                               env=env)
        assert probe.returncode != 0 and "No module named" in probe.stderr, name
    where = subprocess.run([str(python), "-c", "import accel.caching; print(accel.caching.__file__)"],
                           capture_output=True, text=True, cwd=outside, env=env, check=True).stdout
    assert where.startswith(site), where

    listed = subprocess.run([str(env_dir / "bin" / "accel"), "list", "--json"], capture_output=True, text=True,
                            cwd=outside, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "wan" in {m["family"] for m in json.loads(listed.stdout)["models"]}
    suites = subprocess.run([str(python), "-c", "from accel.eval.vbench_suite import load_prompts; "
                             "from accel.eval.evaluation import REFERENCE_PROMPTS; "
                             "print(len(load_prompts('vbench')), len(load_prompts('vbench:scene')), "
                             "len(load_prompts(REFERENCE_PROMPTS)))"],
                            capture_output=True, text=True, cwd=outside, env=env, timeout=300)
    assert suites.returncode == 0, suites.stderr[-2000:]
    assert [int(n) for n in suites.stdout.split()][0::2] == [946, 62], suites.stdout  # the prompt suites shipped
    student = subprocess.run([str(python), "-c", "import accel; from accel.pipelines.reference.build import "
                              "load_reference_pipeline; handle = accel.patch(load_reference_pipeline(), solver='flowmap'); "
                              "print(*handle.methods['solver'].artifact.steps)"],
                             capture_output=True, text=True, cwd=outside, env=env, timeout=300)
    assert student.returncode == 0, student.stderr[-2000:]
    assert student.stdout.split() == ["2", "4"], "the shipped flow-map student loads from the installed wheel"
    demo = subprocess.run([str(env_dir / "bin" / "accel"), "demo", "--out", "demo", "--steps", "2", "--frames", "5"],
                          capture_output=True, text=True, cwd=outside, env=env, timeout=600)
    assert demo.returncode == 0, demo.stderr[-2000:]
    report = json.loads((outside / "demo" / "report.json").read_text())
    assert report["model"] == "reference" and report["steps"] == 2 and report["psnr"] > 20
